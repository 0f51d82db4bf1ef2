// kvcompose: in-place composite-token compaction of a llama_kv_cache (llama-kvcompose-compact.h).
//
// The K/V rows move inside the cache tensors with one small ggml graph, run through the
// context's scheduler the way llama_kv_cache::update() runs K-shift. The cell metadata is
// then rewritten on the host. Per-layer budgets are recorded per cell
// (llama_kv_cell_layers) and turned into a per-layer mask bias by the attention graph
// (kvcompose-compact-graph.h).

#include "llama-kvcompose.h"
#include "kvcompose-access.h"
#include "kvcompose-compact-graph.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <vector>

using access = llama_kvcompose_access;

// The cache compaction works on: a plain KV cache, or the base (full-attention) cache of an
// iSWA memory. An iSWA model's sliding-window layers keep their K/V in a second cache that
// llama.cpp already bounds to the window; compaction never touches it. nullptr when the memory
// is something else (recurrent, hybrid, ...) or the cache shares its cells with another one.
llama_kv_cache * llama_kvcompose_compact_cache(llama_context * ctx) {
    if (ctx == nullptr) {
        return nullptr;
    }
    llama_memory_i * mem = ctx->get_memory();
    auto * kv = dynamic_cast<llama_kv_cache *>(mem);
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        kv = iswa->get_base();
    }
    if (kv == nullptr || access::has_other(*kv) || access::swa_type(*kv) != LLAMA_SWA_TYPE_NONE || kv->has_cell_ext()) {
        return nullptr;
    }
    return kv;
}

int32_t llama_kvcompose_cache_for_layers(llama_context * ctx, int32_t n_layer, llama_kv_cache *& kv) {
    kv = llama_kvcompose_compact_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    return n_layer == llama_model_n_layer(&ctx->get_model()) ? LLAMA_KVCOMPOSE_OK : LLAMA_KVCOMPOSE_ERR_ARGUMENT;
}

namespace {

// the sliding-window cache of an iSWA memory, nullptr for any other memory
const llama_kv_cache * swa_cache(llama_context * ctx) {
    auto * iswa = ctx == nullptr ? nullptr : dynamic_cast<const llama_kv_cache_iswa *>(ctx->get_memory());
    return iswa == nullptr ? nullptr : iswa->get_swa();
}

// K and V bytes one cell takes over all the layers of this cache
uint64_t cache_cell_bytes(const llama_kv_cache & kv) {
    uint64_t total = 0;
    for (const auto & layer : access::layers(kv)) {
        total += layer.k ? layer.k->nb[1] : 0;
        total += layer.v ? ggml_row_size(layer.v->type, layer.v->ne[0]) : 0;
    }
    return total;
}

// the cells of seq_id in ascending order: the first `capacity` written out, all counted
int32_t list_seq_cells(const llama_kv_cells & cells, llama_seq_id seq_id, int32_t capacity,
        int32_t * cells_out, llama_pos * positions_out) {
    int32_t n = 0;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (cells.is_empty(c) || !cells.seq_has(c, seq_id)) {
            continue;
        }
        if (n < capacity) {
            cells_out[n]     = (int32_t) c;
            positions_out[n] = cells.pos_get(c);
        }
        ++n;
    }
    return n;
}

// whether model layer il has its K/V in this cache
bool holds_layer(const llama_kv_cache & kv, int32_t il) {
    return access::layer_index(kv, il) >= 0;
}

// the cells [0, width) layer il attends to out of the n_kv the mask covers: all of them,
// or only those it holds rows for in a per-layer layout
int64_t layer_width(const llama_kv_cache & kv, int32_t il, int64_t n_kv) {
    const int32_t ikv = access::layer_index(kv, il);
    return ikv < 0 ? n_kv : std::min<int64_t>(n_kv, access::layers(kv)[ikv].k->ne[1]);
}

bool seq_id_valid(const llama_kv_cache & kv, llama_seq_id seq_id) {
    return seq_id >= 0 && (uint32_t) seq_id < access::n_seq_max(kv);
}

// every model layer must have K and V in this cache (or, for an iSWA memory, in its
// sliding-window cache, which is left alone), with the same KV head count and whole
// quantisation blocks per head (so a head's slice of a row can move on its own)
int32_t check_layers(const llama_kv_cache & kv, const llama_kv_cache * swa, const llama_model & model,
        int32_t n_layer, int32_t n_head_kv) {
    const auto & hp = access::hparams(kv);
    if (n_layer != llama_model_n_layer(&model)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        if ((int32_t) hp.n_head_kv(il) != n_head_kv) {
            return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
        }
        const int32_t ikv = access::layer_index(kv, il);
        if (ikv < 0) {
            if (swa != nullptr && holds_layer(*swa, il)) {
                continue;
            }
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
        }
        const auto & layer = access::layers(kv)[ikv];
        if (layer.k == nullptr || layer.v == nullptr) {
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
        }
        if (hp.n_embd_head_k(il) % ggml_blck_size(layer.k->type) != 0 ||
            hp.n_embd_head_v(il) % ggml_blck_size(layer.v->type) != 0) {
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
        }
        if (access::v_trans(kv) && ggml_is_quantized(layer.v->type)) {
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
        }
        // rows are moved as per-head slices, which must tile the row exactly
        if (layer.k->nb[1] != ggml_row_size(layer.k->type, hp.n_embd_head_k(il))*n_head_kv ||
            (!access::v_trans(kv) && layer.v->nb[1] != ggml_row_size(layer.v->type, hp.n_embd_head_v(il))*n_head_kv)) {
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
        }
    }
    return LLAMA_KVCOMPOSE_OK;
}

struct compaction_plan {
    uint32_t strm = 0;
    int32_t n_layer   = 0;
    int32_t n_head_kv = 0;
    int32_t n_slots   = 0;
    const int32_t * counts = nullptr; // [n_layer], 0 for a layer whose K/V live in another cache
    const int32_t * cells  = nullptr; // [n_layer][n_head_kv][n_slots]
    std::vector<uint32_t> seq_cells;  // the sequence's cells before the call, ascending
    std::vector<uint32_t> dst_cells;  // [n_slots] cell receiving slot j, ascending
};

// after an earlier compaction with per-layer budgets, a slot's rows beyond a layer's count
// are not that layer's tokens and must not be selected for it
bool layer_owns(const llama_kv_cache & kv, const llama_kv_cells & cells, uint32_t c, int32_t il) {
    const auto & cl = cells.layers_get(c);
    return cl.budget < 0 || cl.slot < access::budgets(kv)[cl.budget][il];
}

int32_t validate(const llama_kv_cache & kv, llama_seq_id seq_id, const llama_pos * slot_positions, compaction_plan & plan) {
    const auto & cells = access::cells(kv, plan.strm);
    const uint32_t size = cells.size();

    if (plan.n_slots < 1 || (uint32_t) plan.n_slots > size) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    int32_t max_count = 0;
    for (int32_t il = 0; il < plan.n_layer; ++il) {
        // a sliding-window layer of an iSWA memory has no row here: 0 slots, every cell -1
        const int32_t lo = holds_layer(kv, il) ? 1 : 0;
        const int32_t hi = holds_layer(kv, il) ? plan.n_slots : 0;
        if (plan.counts[il] < lo || plan.counts[il] > hi) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
        max_count = std::max(max_count, plan.counts[il]);
    }
    if (max_count != plan.n_slots) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }

    // per cell, looked up once: not the sequence's, the sequence's, or the sequence's under a
    // per-layer budget (then only some layers own it); the selection has a lookup per entry
    enum : uint8_t { OTHER, HELD, HELD_BUDGETED };
    std::vector<uint8_t> held(size, OTHER);
    for (uint32_t c = 0; c < size; ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id)) {
            held[c] = cells.layers_get(c).budget < 0 ? HELD : HELD_BUDGETED;
        }
    }
    // the stream's seen-marks, one per cell, reused for every (layer, head) list
    std::vector<int32_t> seen(size, -1);
    for (int32_t il = 0; il < plan.n_layer; ++il) {
        for (int32_t h = 0; h < plan.n_head_kv; ++h) {
            const int32_t list = il*plan.n_head_kv + h;
            const int32_t * row = plan.cells + (int64_t) list*plan.n_slots;
            for (int32_t j = 0; j < plan.counts[il]; ++j) {
                const int32_t c = row[j];
                if (c < 0 || (uint32_t) c >= size) {
                    return LLAMA_KVCOMPOSE_ERR_RANGE;
                }
                if (held[c] == OTHER || (held[c] == HELD_BUDGETED && !layer_owns(kv, cells, c, il))) {
                    return LLAMA_KVCOMPOSE_ERR_SEQUENCE;
                }
                if (seen[c] == list) {
                    return LLAMA_KVCOMPOSE_ERR_DUPLICATE;
                }
                seen[c] = list;
            }
            for (int32_t j = plan.counts[il]; j < plan.n_slots; ++j) {
                if (row[j] != -1) {
                    return LLAMA_KVCOMPOSE_ERR_RANGE;
                }
            }
        }
    }

    const llama_pos pos_max = cells.seq_pos_max(seq_id);
    llama_pos slot_pos_max = -1;
    for (int32_t j = 0; j < plan.n_slots; ++j) {
        if (slot_positions[j] < 0 || slot_positions[j] > pos_max) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
        slot_pos_max = std::max(slot_pos_max, slot_positions[j]);
    }
    if (slot_pos_max != pos_max) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }

    // destinations: cells that are free or held by this sequence alone, so that no other
    // sequence's rows are overwritten. The lowest such cells in a shared pool; with a per-layer
    // layout, slot j's own cell n_recent + j, which a layer holds only while j < its capacity.
    const uint32_t n_recent = access::n_recent(kv);
    for (uint32_t c = 0; c < size; ++c) {
        const bool own = held[c] != OTHER;
        if (own) {
            plan.seq_cells.push_back(c);
        }
        if ((int32_t) plan.dst_cells.size() < plan.n_slots && c >= n_recent && (cells.is_empty(c) || (own && cells.seq_count(c) == 1))) {
            plan.dst_cells.push_back(c);
        }
    }
    if ((int32_t) plan.dst_cells.size() < plan.n_slots) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    if (n_recent > 0) {
        if (plan.dst_cells.back() != n_recent + plan.n_slots - 1) {
            return LLAMA_KVCOMPOSE_ERR_RANGE; // another sequence holds a slot cell
        }
        for (int32_t il = 0; il < plan.n_layer; ++il) {
            const int32_t ikv = access::layer_index(kv, il);
            if (ikv >= 0 && (int64_t) n_recent + plan.counts[il] > access::layers(kv)[ikv].k_stream[plan.strm]->ne[1]) {
                return LLAMA_KVCOMPOSE_ERR_RANGE;
            }
        }
    }
    return LLAMA_KVCOMPOSE_OK;
}

// The bytes of a cache tensor typed as F32 words, so that rows move as raw 32-bit words:
// bit-exact for every cache type (no dequantise/requantise round trip) and no wider
// temporary than the rows themselves. ggml has no reinterpreting view, so the alias is a
// tensor of its own over the same buffer, already allocated like the cache itself.
void place_over(ggml_tensor * t, ggml_tensor * cache, size_t offs) {
    GGML_ASSERT(cache->data != nullptr && offs + ggml_nbytes(t) <= ggml_nbytes(cache));
    t->view_src  = cache->view_src ? cache->view_src : cache;
    t->view_offs = (cache->view_src ? cache->view_offs : 0) + offs;
    t->buffer    = cache->buffer;
    t->data      = (char *) cache->data + offs;
}

ggml_tensor * view_as_words(ggml_context * ctx, ggml_tensor * cache) {
    GGML_ASSERT(cache->nb[1] % sizeof(float) == 0);
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cache->nb[1]/sizeof(float), cache->ne[1]);
    place_over(t, cache, 0);
    return t;
}

// What one layer's move does, decided on the host before the graph is built. A source row
// that already sits in its destination is not moved (protected prefixes, sinks). A slot whose
// heads all chose the same cell moves as one whole row; the others move per (cell, head)
// slice: fewer, longer rows, since the gather costs about the same per row whatever its length.
struct layer_moves {
    int64_t lo = 0; // the sources lie in cells [lo, hi); indices below are relative to lo
    int64_t hi = 0;
    std::vector<int32_t> row_src, row_dst; // whole rows: cell - lo, destination cell
    std::vector<int32_t> sub_src, sub_dst; // slices: (cell - lo)*n_head_kv + h, dst*n_head_kv + h

    // the same move as one span: slots [j0, count) in slot order, all heads, in chunks of
    // consecutive slots; chunk k gathers from the cells [lo, hi) its sources span: whole rows
    // (cell - lo) when every slot's heads agree, else slices ((cell - lo)*n_head_kv + h,
    // slot-major), at span_src[first .. first + n)
    struct chunk {
        int64_t j_begin, j_end; // slots
        int64_t lo, hi;         // source cells
        int64_t first, n;       // indices in span_src
        bool    direct;         // gathered from the cache itself, not from a staged copy
    };
    int64_t j0 = 0;
    bool    span_whole = false;
    std::vector<chunk>   chunks;
    std::vector<int32_t> span_src;

    int64_t dst_first = -1;    // the cell of slot j0 when the slots from j0 on are consecutive cells
    bool k_span = false;       // K moves as the span (else split)
    bool v_span = false;       // V moves as the span (always for a transposed V)

    bool empty() const { return row_src.empty() && sub_src.empty(); }
};

int32_t slot_cell(const compaction_plan & plan, int32_t il, int32_t h, int32_t j) {
    return plan.cells[((int64_t) il*plan.n_head_kv + h)*plan.n_slots + j];
}

// the first slot at or after which some head's source is not already its destination
int64_t first_moved_slot(const compaction_plan & plan, int32_t il) {
    for (int32_t j = 0; j < plan.counts[il]; ++j) {
        for (int32_t h = 0; h < plan.n_head_kv; ++h) {
            if ((uint32_t) slot_cell(plan, il, h, j) != plan.dst_cells[j]) {
                return j;
            }
        }
    }
    return plan.counts[il];
}

void plan_split(const compaction_plan & plan, int32_t il, layer_moves & m) {
    const int32_t H = plan.n_head_kv;
    m.lo = INT64_MAX;
    for (int32_t j = 0; j < plan.counts[il]; ++j) {
        const int32_t dst = (int32_t) plan.dst_cells[j];
        const int32_t c0  = slot_cell(plan, il, 0, j);
        bool whole = true;
        for (int32_t h = 1; h < H; ++h) {
            whole = whole && slot_cell(plan, il, h, j) == c0;
        }
        for (int32_t h = 0; h < H; ++h) {
            const int32_t c = slot_cell(plan, il, h, j);
            if (c != dst) {
                m.lo = std::min<int64_t>(m.lo, c);
                m.hi = std::max<int64_t>(m.hi, c + 1);
            }
            if (c != dst && !whole) {
                m.sub_src.push_back(c*H + h); // made relative to lo below
                m.sub_dst.push_back(dst*H + h);
            }
        }
        if (whole && c0 != dst) {
            m.row_src.push_back(c0);
            m.row_dst.push_back(dst);
        }
    }
    if (m.empty()) {
        m.lo = m.hi = 0;
    }
    for (auto & c : m.row_src) { c -= (int32_t) m.lo; }
    for (auto & s : m.sub_src) { s -= (int32_t) m.lo*H; }
}

// The cells [lo, hi) that the sources of the slots [a, b) span, from each slot's bounds.
struct cell_span {
    int64_t lo, hi;

    // at least three cells per slot: only then did a direct gather beat staging (measured in
    // docs/compaction.md, "The move")
    bool sparse(int64_t n_slots) const { return hi - lo >= 3*n_slots; }
};

cell_span span_of(const std::vector<int32_t> & slot_lo, const std::vector<int32_t> & slot_hi, int64_t a, int64_t b) {
    return { *std::min_element(slot_lo.begin() + a, slot_lo.begin() + b), *std::max_element(slot_hi.begin() + a, slot_hi.begin() + b) };
}

// The slots from j0 on, in chunks of consecutive slots run in graph order, with the cells each
// chunk's sources span. A chunk gathers either from a staged copy of those cells, or, when no
// source of the chunk lies in the cells the chunk writes, straight from the cache ("direct").
//
// Why both: on a CPU a gather from memory the caches do not hold is latency-bound (about
// 45 ns per 128-byte slice in ggml's get_rows), while staging copies every cell the sources
// span (a sequential read, then a gather from the copy while the caches hold it). When few
// cells are kept the sources are sparse and staging reads several cells per slice moved, so
// gathering directly is cheaper; it needs no copy and no staging memory.
//
// A direct chunk [a, b) is safe whatever order or threads ggml gathers its rows in: every
// source slice of it is either already its own destination (a self-copy) or lies at or after
// the chunk's last destination cell, which no row of this chunk writes, and earlier chunks
// only wrote cells before the chunk's first destination. Direct chunks are planned from the
// last slot backwards, each as long as the rule allows: when each head's cells ascend with
// the slots (as policies lay them out) the sources of the late slots lie far behind their
// destinations, so the chunks grow geometrically towards the end (a quarter kept: about 4x per
// chunk). The slots before them are staged, in chunks of about 512 KiB of K rows, so that a
// staged copy stays in the CPU's caches between its copy and its gather. Staged chunks are
// only safe when none reads a cell an earlier chunk wrote: with consecutive destinations,
// when every chunk's sources lie at or after its first destination cell. Else the whole span
// is one staged chunk. Two passes over the layer's selection, the rest on per-slot bounds:
// planning is part of every compaction's time.
void plan_span(const compaction_plan & plan, int32_t il, int64_t row_bytes, int64_t chunks_max, layer_moves & m) {
    const int32_t H  = plan.n_head_kv;
    const int64_t j1 = plan.counts[il];
    const int64_t n  = j1 - m.j0;
    const bool consecutive = m.dst_first >= 0;
    auto dst = [&](int64_t j) { return m.dst_first + (j - m.j0); }; // with consecutive destinations

    // slot-major source cells, each slot's bounds over its heads, and min_from[j - j0]: the
    // lowest source from slot j on that is not already its slot's destination (a direct chunk
    // [a, b) needs min_from[a - j0] >= dst(b); meaningless, and unused, without consecutive
    // destinations); one pass, from the last slot backwards
    std::vector<int32_t> cells((size_t) (n*H)), slot_lo((size_t) n), slot_hi((size_t) n);
    std::vector<int64_t> min_from((size_t) n + 1, INT64_MAX);
    m.span_whole = true;
    for (int64_t j = j1 - 1; j >= m.j0; --j) {
        const size_t i = (size_t) (j - m.j0);
        int32_t * slot = cells.data() + i*H;
        int32_t lo = INT32_MAX, hi = 0;
        int64_t lowest_moving = min_from[i + 1];
        for (int32_t h = 0; h < H; ++h) {
            const int32_t c = slot_cell(plan, il, h, (int32_t) j);
            slot[h] = c;
            lo = std::min(lo, c);
            hi = std::max(hi, c + 1);
            lowest_moving = c != dst(j) ? std::min<int64_t>(lowest_moving, c) : lowest_moving;
            m.span_whole = m.span_whole && c == slot[0];
        }
        slot_lo[i] = lo;
        slot_hi[i] = hi;
        min_from[i] = lowest_moving;
    }

    // direct chunks, last first (a chunk of a few slots is not worth its graph nodes)
    const cell_span all = span_of(slot_lo, slot_hi, 0, n);
    const int64_t min_direct = 16;
    std::vector<layer_moves::chunk> direct;
    int64_t b = j1;
    const bool may_direct = consecutive && chunks_max > 1 && all.sparse(n);
    while (may_direct && (int64_t) direct.size() + 1 < chunks_max && b > m.j0) {
        // the first slot a with min_from[a - j0] >= dst(b); min_from does not decrease with the slot
        const auto it = std::lower_bound(min_from.begin(), min_from.begin() + (b - m.j0), dst(b));
        const int64_t a = m.j0 + (it - min_from.begin());
        if (b - a < min_direct || !span_of(slot_lo, slot_hi, a - m.j0, b - m.j0).sparse(b - a)) {
            break;
        }
        direct.push_back({ a, b, 0, 0, 0, 0, true });
        b = a;
    }

    // staged chunks of about 512 KiB of K rows over the slots [j0, b) the direct ones left
    if (b > m.j0) {
        const cell_span head = span_of(slot_lo, slot_hi, 0, b - m.j0);
        const int64_t k_staged = std::clamp<int64_t>(1 + (head.hi - head.lo)*row_bytes/(512*1024), 1,
                std::min<int64_t>(chunks_max - (int64_t) direct.size(), b - m.j0));
        for (int64_t k = 0; k < k_staged; ++k) {
            m.chunks.push_back({ m.j0 + (b - m.j0)*k/k_staged, m.j0 + (b - m.j0)*(k + 1)/k_staged, 0, 0, 0, 0, false });
        }
    }
    m.chunks.insert(m.chunks.end(), direct.rbegin(), direct.rend());

    bool chunks_safe = true;
    for (auto & c : m.chunks) {
        const cell_span span = span_of(slot_lo, slot_hi, c.j_begin - m.j0, c.j_end - m.j0);
        c.lo = span.lo;
        c.hi = span.hi;
        chunks_safe = chunks_safe && (c.direct || c.j_begin == m.j0 || (consecutive && c.lo >= dst(c.j_begin)));
    }
    if (!chunks_safe) {
        m.chunks = { { m.j0, j1, all.lo, all.hi, 0, 0, false } };
    }

    // gather indices relative to each chunk's first cell: whole rows, or (cell, head) slices
    const int32_t per_slot = m.span_whole ? 1 : H;
    m.span_src.resize((size_t) (n*per_slot));
    for (auto & c : m.chunks) {
        c.first = (c.j_begin - m.j0)*per_slot;
        c.n     = (c.j_end - c.j_begin)*per_slot;
        int32_t * out = m.span_src.data() + c.first;
        if (m.span_whole) {
            for (int64_t j = c.j_begin; j < c.j_end; ++j) {
                out[j - c.j_begin] = (int32_t) (cells[(size_t) ((j - m.j0)*H)] - c.lo);
            }
        } else {
            const int32_t * src = cells.data() + (c.j_begin - m.j0)*H;
            for (int64_t i = 0; i < c.n; i += H) {
                for (int32_t h = 0; h < H; ++h) {
                    out[i + h] = (int32_t) ((src[i + h] - c.lo)*H + h);
                }
            }
        }
    }
}

// A cache tensor as rows of units that move without conversion: F32 words when a head's slice
// is whole words (every supported type at the usual head sizes), else the cache's own type.
struct row_units {
    ggml_tensor * rows;     // [units per row, kv_size]
    int64_t       per_head; // units per head slice
};

row_units view_row_units(ggml_context * ctx, ggml_tensor * cache, int64_t head_dim, int64_t n_head_kv) {
    const size_t head_bytes = ggml_row_size(cache->type, head_dim);
    GGML_ASSERT(cache->nb[1] == head_bytes*n_head_kv);
    if (head_bytes % sizeof(float) == 0) {
        return { view_as_words(ctx, cache), (int64_t) (head_bytes/sizeof(float)) };
    }
    return { ggml_view_2d(ctx, cache, head_dim*n_head_kv, cache->ne[1], cache->nb[1], 0), head_dim };
}

// rows [units, n_rows] as n_rows*n_head_kv head slices
ggml_tensor * view_slices(ggml_context * ctx, ggml_tensor * rows, int64_t per_head, int64_t n_head_kv) {
    return ggml_view_2d(ctx, rows, per_head, rows->ne[1]*n_head_kv, per_head*ggml_element_size(rows), 0);
}

struct layer_inputs {
    ggml_tensor * row_src = nullptr; // I32, see layer_moves
    ggml_tensor * row_dst = nullptr;
    ggml_tensor * sub_src = nullptr;
    ggml_tensor * sub_dst = nullptr;
    ggml_tensor * span_src = nullptr;
};

ggml_tensor * new_index(ggml_context * ctx, size_t n) {
    if (n == 0) {
        return nullptr;
    }
    ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) n);
    ggml_set_input(t);
    return t;
}

// The gather's cost is the latency of its scattered reads, not bandwidth. On a CPU, copying
// the source cells first (a sequential read the prefetcher streams) and gathering from that
// copy while the caches still hold it took less than half the time of the scattered gather
// alone. A device hides the latency with parallelism and skips the copy. Only the CPU
// backend qualifies, not any host-visible buffer: the in-place gather that staging allows
// relies on nodes running one after another in graph order, which a GPU backend sharing
// host memory (Metal, integrated GPUs) does not promise. The test is the buffer type itself,
// the one llama_kv_cache allocates on the CPU: ggml's CPU buffer type reports no device.
// KVCOMPOSE_COMPACT_UNSTAGED=1 gives the CPU the form device memory takes, so that the
// CPU-only tests run the GPUs' path too.
bool stage_sources(const ggml_tensor * cache) {
    return cache->buffer != nullptr && ggml_backend_buffer_get_type(cache->buffer) == ggml_backend_cpu_buffer_type() &&
        getenv("KVCOMPOSE_COMPACT_UNSTAGED") == nullptr;
}

// cells [lo, hi) of rows [units, kv_size], copied when staged
ggml_tensor * source_rows(ggml_context * ctx, ggml_tensor * rows, int64_t lo, int64_t hi, bool stage) {
    ggml_tensor * src = ggml_view_2d(ctx, rows, rows->ne[0], hi - lo, rows->nb[1], lo*rows->nb[1]);
    return stage ? ggml_cont(ctx, src) : src;
}

// K or plain V of one layer, gathered into a temporary and written with set_rows. Every gather
// is built before any write into the same tensor, so no gather reads a row this move has
// already overwritten (with staging, the writes also depend on the copy they gather from).
void build_move_split(ggml_context * ctx, ggml_cgraph * gf, const row_units & u, int64_t n_head_kv,
        const layer_moves & m, const layer_inputs & in, bool stage) {
    ggml_tensor * src = source_rows(ctx, u.rows, m.lo, m.hi, stage);

    ggml_tensor * rows = in.row_src ? ggml_get_rows(ctx, src, in.row_src) : nullptr;
    ggml_tensor * subs = in.sub_src ? ggml_get_rows(ctx, view_slices(ctx, src, u.per_head, n_head_kv), in.sub_src) : nullptr;
    for (ggml_tensor * g : { rows, subs }) {
        if (g != nullptr) {
            ggml_build_forward_expand(gf, g);
        }
    }
    if (rows != nullptr) {
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, u.rows, rows, in.row_dst));
    }
    if (subs != nullptr) {
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, view_slices(ctx, u.rows, u.per_head, n_head_kv), subs, in.sub_dst));
    }
}

// K or plain V of one layer when the slots from j0 on are consecutive cells: no gather reads
// a row it writes (its staged copy, or for a direct chunk cells past its destinations), so its
// output can be the destination rows themselves (one pass, no temporary, no set_rows).
// ggml_get_rows always makes a new tensor; it is placed over the cache bytes the way
// view_as_words places the alias. The chunks run in graph order (the CPU backend computes
// nodes one after the other), each copy before the writes of the chunks after it.
void build_move_span(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * cache, const row_units & u, int64_t n_head_kv,
        const layer_moves & m, ggml_tensor * span_src) {
    for (const auto & c : m.chunks) {
        ggml_tensor * src = source_rows(ctx, u.rows, c.lo, c.hi, !c.direct);
        ggml_tensor * idx = ggml_view_1d(ctx, span_src, c.n, c.first*sizeof(int32_t));
        ggml_tensor * out = ggml_get_rows(ctx, m.span_whole ? src : view_slices(ctx, src, u.per_head, n_head_kv), idx);
        place_over(out, cache, (m.dst_first + c.j_begin - m.j0)*cache->nb[1]);
        ggml_build_forward_expand(gf, out);
    }
}

// transposed V of one layer: one row of kv_size cells per channel. The source cells are first
// transposed into channel-contiguous rows and gathered like K; the slots are then written
// back as columns: one strided copy when the slots are consecutive cells, else one element
// per (slot, channel). Only the slots from the first one that moves, and only the cells their
// sources span, take part.
ggml_tensor * build_move_columns(ggml_context * ctx, ggml_tensor * cache, int64_t head_dim, int64_t n_head_kv,
        const layer_moves & m, ggml_tensor * span_src, ggml_tensor * dst_cells, int64_t dst_first) {
    const int64_t kv_size = cache->ne[1];
    const size_t  es      = ggml_element_size(cache);
    const int64_t n_move  = dst_cells->ne[0];
    const auto &  span    = m.chunks.front();
    const int64_t n_src   = span.hi - span.lo;
    GGML_ASSERT(m.chunks.size() == 1);

    ggml_tensor * by_channel = ggml_view_2d(ctx, cache, n_src, head_dim*n_head_kv, kv_size*es, span.lo*es);
    // transposed and widened to F32 in one pass: ggml copies a same-type strided tensor with
    // one memcpy per element, a converting one in a typed loop (8k cells, a quarter kept:
    // 320-350 ms a compaction before, 210 after); exact, as the get_rows to F32 already was
    ggml_tensor * by_cell    = ggml_cast(ctx, ggml_transpose(ctx, by_channel), GGML_TYPE_F32); // [n_chan, n_src]
    const size_t  fs         = ggml_element_size(by_cell);
    ggml_tensor * sub        = m.span_whole ? by_cell : ggml_view_2d(ctx, by_cell, head_dim, n_src*n_head_kv, head_dim*fs, 0);
    ggml_tensor * rows       = ggml_get_rows(ctx, sub, span_src);               // F32, head_dim*n_head_kv per slot

    if (dst_first >= 0) {
        // [n_move, head_dim, n_head_kv] from the gathered rows, into cells dst_first .. dst_first + n_move - 1
        ggml_tensor * by_slot = ggml_view_3d(ctx, rows, head_dim, n_head_kv, n_move, head_dim*fs, n_head_kv*head_dim*fs, 0);
        ggml_tensor * src = ggml_permute(ctx, by_slot, 1, 2, 0, 3);
        ggml_tensor * dst = ggml_view_3d(ctx, cache, n_move, head_dim, n_head_kv, kv_size*es, head_dim*kv_size*es, dst_first*es);
        return ggml_cpy(ctx, src, dst);
    }

    ggml_tensor * elems = ggml_view_4d(ctx, rows, 1, n_move, head_dim, n_head_kv,
            n_head_kv*head_dim*fs, fs, head_dim*fs, 0);                           // [1, n_move, head_dim, n_head_kv]
    ggml_tensor * dst   = ggml_view_4d(ctx, cache, 1, kv_size, head_dim, n_head_kv,
            es, kv_size*es, head_dim*kv_size*es, 0);
    return ggml_set_rows(ctx, dst, elems, dst_cells);
}

struct move_inputs {
    std::vector<layer_inputs> layers; // per layer
    ggml_tensor * dst_cells = nullptr; // I32 [n_slots]
};

// the first of cells dst[j0 .. n-1] when they are consecutive, else -1
int64_t consecutive_from(const std::vector<uint32_t> & dst, int64_t j0, int64_t n) {
    for (int64_t j = j0 + 1; j < n; ++j) {
        if (dst[j] != dst[j0] + (j - j0)) {
            return -1;
        }
    }
    return dst[j0];
}

// the span form with its gather written straight into the cache: only in the CPU backend's
// memory (chunks must run in graph order), for consecutive destination cells, and rows moved
// as F32 words (ggml_get_rows returns F32)
bool gathers_in_place(const ggml_tensor * cache, int64_t head_dim, int64_t dst_first) {
    return dst_first >= 0 && stage_sources(cache) && ggml_row_size(cache->type, head_dim) % sizeof(float) == 0;
}

// Chunks per tensor that keep the graph within the context's node budget (llama.cpp sizes it
// from the model's tensor count, at least 8 per tensor): each chunk adds about 10 tensors to a
// layer (a copy, a gather and views, for K and for V), the rest of a layer's move up to 30.
int64_t max_chunks(const llm_graph_result * res, int32_t n_layer) {
    const int64_t per_layer = res->get_max_nodes()/std::max(1, n_layer);
    return std::max<int64_t>(1, std::min<int64_t>(4, (per_layer - 30)/10));
}

layer_moves plan_layer(const llama_kv_cache & kv, const compaction_plan & plan, int32_t il, int64_t chunks_max) {
    layer_moves m;
    if (plan.counts[il] == 0) {
        return m; // a sliding-window layer: its K/V are in the other cache
    }
    m.j0 = first_moved_slot(plan, il);
    if (m.j0 == plan.counts[il]) {
        return m; // every row is already in place
    }
    const auto & hp    = access::hparams(kv);
    const auto & layer = access::layers(kv)[access::layer_index(kv, il)];
    m.dst_first = consecutive_from(plan.dst_cells, m.j0, plan.counts[il]);
    m.k_span = gathers_in_place(layer.k_stream[plan.strm], hp.n_embd_head_k(il), m.dst_first);
    m.v_span = access::v_trans(kv) || gathers_in_place(layer.v_stream[plan.strm], hp.n_embd_head_v(il), m.dst_first);
    if (m.k_span || m.v_span) {
        // a transposed V gathers from one transposed span
        plan_span(plan, il, (int64_t) layer.k_stream[plan.strm]->nb[1], access::v_trans(kv) ? 1 : chunks_max, m);
    }
    if (!m.k_span || !m.v_span) {
        plan_split(plan, il, m);
    }
    return m;
}

void build_move_rows(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * cache, int64_t head_dim, int64_t n_head_kv,
        const layer_moves & m, const layer_inputs & in, bool span) {
    const row_units u = view_row_units(ctx, cache, head_dim, n_head_kv);
    if (span) {
        build_move_span(ctx, gf, cache, u, n_head_kv, m, in.span_src);
    } else if (!m.empty()) {
        build_move_split(ctx, gf, u, n_head_kv, m, in, stage_sources(cache));
    }
}

ggml_cgraph * build_graph_compact(llm_graph_result * res, const llama_kv_cache & kv, const compaction_plan & plan,
        const std::vector<layer_moves> & moves, move_inputs & inp) {
    auto * ctx = res->get_ctx();
    auto * gf  = res->get_gf();
    const auto & hp = access::hparams(kv);
    const int64_t H = plan.n_head_kv;

    inp.dst_cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, plan.n_slots);
    ggml_set_input(inp.dst_cells);
    inp.layers.resize(plan.n_layer);

    for (int32_t il = 0; il < plan.n_layer; ++il) {
        const layer_moves & m = moves[il];
        if (m.span_src.empty() && m.empty()) {
            continue;
        }
        const auto & layer = access::layers(kv)[access::layer_index(kv, il)];
        layer_inputs & in = inp.layers[il];
        in.row_src  = new_index(ctx, m.row_src.size());
        in.row_dst  = new_index(ctx, m.row_dst.size());
        in.sub_src  = new_index(ctx, m.sub_src.size());
        in.sub_dst  = new_index(ctx, m.sub_dst.size());
        in.span_src = new_index(ctx, m.span_src.size());

        build_move_rows(ctx, gf, layer.k_stream[plan.strm], hp.n_embd_head_k(il), H, m, in, m.k_span);

        ggml_tensor * v = layer.v_stream[plan.strm];
        if (!access::v_trans(kv)) {
            build_move_rows(ctx, gf, v, hp.n_embd_head_v(il), H, m, in, m.v_span);
        } else {
            const int64_t n_move = plan.counts[il] - m.j0;
            ggml_tensor * dst_cells = ggml_view_1d(ctx, inp.dst_cells, n_move, m.j0*sizeof(int32_t));
            ggml_build_forward_expand(gf, build_move_columns(ctx, v, hp.n_embd_head_v(il), H, m, in.span_src, dst_cells,
                        m.dst_first));
        }
    }
    return gf;
}

void set_index(ggml_tensor * t, const std::vector<int32_t> & values) {
    if (t != nullptr) {
        ggml_backend_tensor_set(t, values.data(), 0, ggml_nbytes(t));
    }
}

void set_move_inputs(const compaction_plan & plan, const std::vector<layer_moves> & moves, const move_inputs & inp) {
    // only the element-wise path of a transposed V reads the plain cell list
    if (inp.dst_cells->buffer != nullptr) {
        std::vector<int32_t> dst(plan.dst_cells.begin(), plan.dst_cells.end());
        ggml_backend_tensor_set(inp.dst_cells, dst.data(), 0, ggml_nbytes(inp.dst_cells));
    }
    for (size_t il = 0; il < inp.layers.size(); ++il) {
        const layer_inputs & in = inp.layers[il];
        set_index(in.row_src,  moves[il].row_src);
        set_index(in.row_dst,  moves[il].row_dst);
        set_index(in.sub_src,  moves[il].sub_src);
        set_index(in.sub_dst,  moves[il].sub_dst);
        set_index(in.span_src, moves[il].span_src);
    }
}

// Which form each moved K / V tensor takes. Both forms give the same bytes, so only this line
// (read by the tests and the benchmark) shows when a backend stops getting the fast one.
struct move_forms {
    int32_t span = 0, chunks = 0, direct = 0, split = 0, staged = 0, columns = 0;

    void count(const layer_moves & m, bool span_form, const ggml_tensor * cache) {
        if (span_form) {
            span   += 1;
            chunks += (int32_t) m.chunks.size();
            direct += (int32_t) std::count_if(m.chunks.begin(), m.chunks.end(), [](const auto & c) { return c.direct; });
        } else if (!m.empty()) {
            split  += 1;
            staged += stage_sources(cache) ? 1 : 0;
        }
    }
};

void log_move_forms(const llama_kv_cache & kv, const compaction_plan & plan, const std::vector<layer_moves> & moves) {
    move_forms f;
    for (int32_t il = 0; il < plan.n_layer; ++il) {
        const layer_moves & m = moves[il];
        if (m.span_src.empty() && m.empty()) {
            continue;
        }
        const auto & layer = access::layers(kv)[access::layer_index(kv, il)];
        f.count(m, m.k_span, layer.k_stream[plan.strm]);
        if (access::v_trans(kv)) {
            f.columns += 1;
        } else {
            f.count(m, m.v_span, layer.v_stream[plan.strm]);
        }
    }
    LLAMA_LOG_DEBUG("%s: %d tensors gathered in place (%d chunks, %d of them direct), %d through a temporary (%d staged), "
            "%d transposed V\n", __func__, f.span, f.chunks, f.direct, f.split, f.staged, f.columns);
}

// The move runs through the context's scheduler, as llama.cpp's K-shift does. Resetting the
// scheduler invalidates the decode graph it last allocated, so llama.cpp must not reuse that
// graph: the next decode builds and allocates its own. (memory_update() also reserves the
// worst-case graph again after a K-shift; that is not needed for correctness -- the allocator's
// buffers only grow, and a decode allocates what it needs -- and costs 0.6-0.9 ms a call.)
int32_t move_rows(llama_context * lctx, llama_kv_cache & kv, const compaction_plan & plan) {
    auto * sched = lctx->get_sched();
    llama_synchronize(lctx);
    ggml_backend_sched_reset(sched);
    access::forget_graphs(*lctx);

    auto * res = lctx->get_gf_res_reserve();
    res->reset();

    std::vector<layer_moves> moves(plan.n_layer);
    const int64_t chunks_max = max_chunks(res, plan.n_layer);
    for (int32_t il = 0; il < plan.n_layer; ++il) {
        moves[il] = plan_layer(kv, plan, il, chunks_max);
    }
    log_move_forms(kv, plan, moves);

    move_inputs inp;
    ggml_cgraph * gf = build_graph_compact(res, kv, plan, moves, inp);
    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        LLAMA_LOG_ERROR("%s: failed to allocate the compaction graph\n", __func__);
        return LLAMA_KVCOMPOSE_ERR_COMPUTE;
    }
    set_move_inputs(plan, moves, inp);

    const ggml_status status = lctx->graph_compute(gf, false);
    ggml_backend_sched_synchronize(sched);
    return status == GGML_STATUS_SUCCESS ? LLAMA_KVCOMPOSE_OK : LLAMA_KVCOMPOSE_ERR_COMPUTE;
}

// a budget entry still referenced by a cell of any stream must keep its index
int32_t new_budget(llama_kv_cache & kv, const int32_t * counts, int32_t n_layer) {
    auto & budgets = access::budgets(kv);
    std::vector<bool> in_use(budgets.size(), false);
    for (uint32_t s = 0; s < access::n_stream(kv); ++s) {
        const auto & cells = access::cells(kv, s);
        for (uint32_t c = 0; c < cells.size(); ++c) {
            const int32_t b = cells.layers_get(c).budget;
            if (!cells.is_empty(c) && b >= 0) {
                in_use[b] = true;
            }
        }
    }
    std::vector<int32_t> entry(counts, counts + n_layer);
    for (size_t b = 0; b < budgets.size(); ++b) {
        if (!in_use[b]) {
            budgets[b] = std::move(entry);
            return (int32_t) b;
        }
    }
    budgets.push_back(std::move(entry));
    return (int32_t) budgets.size() - 1;
}

// equal counts over the layers this cache holds (the others are 0 and see none of its cells)
bool budgets_uniform(const llama_kv_cache & kv, const int32_t * counts, int32_t n_layer) {
    int32_t first = -1;
    for (int32_t il = 0; il < n_layer; ++il) {
        if (!holds_layer(kv, il)) {
            continue;
        }
        if (first >= 0 && counts[il] != first) {
            return false;
        }
        first = counts[il];
    }
    return true;
}

// whether the sequence holds every used cell of its stream, and none of them with another sequence
bool holds_stream_alone(const llama_kv_cells & cells, const std::vector<uint32_t> & seq_cells) {
    if (cells.get_used() != seq_cells.size()) {
        return false;
    }
    for (uint32_t c : seq_cells) {
        if (cells.seq_count(c) != 1) {
            return false;
        }
    }
    return true;
}

void rewrite_cells(llama_kv_cache & kv, llama_seq_id seq_id, const compaction_plan & plan, const llama_pos * slot_positions) {
    auto & cells = access::cells(kv, plan.strm);
    if (holds_stream_alone(cells, plan.seq_cells)) {
        // the same result (no K-shift is pending, see llama_kvcompose_compact_seq); cell by
        // cell, every removal updates the used set and the sequence's position map
        cells.reset();
    } else {
        for (uint32_t c : plan.seq_cells) {
            cells.seq_rm(c, seq_id);
        }
    }
    const int32_t budget = budgets_uniform(kv, plan.counts, plan.n_layer) ? -1 : new_budget(kv, plan.counts, plan.n_layer);
    for (int32_t j = 0; j < plan.n_slots; ++j) {
        const uint32_t c = plan.dst_cells[j];
        cells.pos_set(c, slot_positions[j]);
        cells.seq_add(c, seq_id);
        // a per-layer layout records every slot, so that a saved sequence restores into its cells
        if (budget >= 0 || access::n_recent(kv) > 0) {
            cells.layers_set(c, { budget, j });
        }
    }
    // new tokens go below n_recent in a per-layer layout
    access::set_head(kv, plan.strm, access::n_recent(kv) > 0 ? 0 : (plan.dst_cells.back() + 1) % cells.size());
}

} // namespace

int32_t llama_kvcompose_compact_seq(
        llama_context * ctx,
         llama_seq_id   seq_id,
              int32_t   n_layer,
              int32_t   n_head_kv,
              int32_t   n_slots,
        const int32_t * counts,
        const int32_t * cells,
      const llama_pos * slot_positions,
        const int32_t * layer_offsets,
              int32_t * slot_cells_out) {
    if (ctx == nullptr || counts == nullptr || cells == nullptr || slot_positions == nullptr || layer_offsets != nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    llama_kv_cache * kv = llama_kvcompose_compact_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (!seq_id_valid(*kv, seq_id) || n_head_kv < 1) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cache * swa = swa_cache(ctx);
    const int32_t rc_layers = check_layers(*kv, swa, ctx->get_model(), n_layer, n_head_kv);
    if (rc_layers != LLAMA_KVCOMPOSE_OK) {
        return rc_layers;
    }
    // a pending K-shift or stream copy would apply to rows that are about to move
    if (kv->get_has_shift() || access::pending_copies(*kv)) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    // The sliding-window cache keeps its cells and positions, and the slots keep the newest
    // position, so the next token lands at pos_max + 1 in both caches only if both already
    // end at the same position.
    if (swa != nullptr && swa->seq_pos_max(seq_id) != kv->seq_pos_max(seq_id)) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }

    compaction_plan plan;
    plan.strm      = access::stream_of(*kv, seq_id);
    plan.n_layer   = n_layer;
    plan.n_head_kv = n_head_kv;
    plan.n_slots   = n_slots;
    plan.counts    = counts;
    plan.cells     = cells;
    if (access::cells(*kv, plan.strm).seq_pos_max(seq_id) < 0) {
        return LLAMA_KVCOMPOSE_ERR_SEQUENCE;
    }
    const int32_t rc = validate(*kv, seq_id, slot_positions, plan);
    if (rc != LLAMA_KVCOMPOSE_OK) {
        return rc;
    }

    const int32_t rc_move = move_rows(ctx, *kv, plan);
    if (rc_move != LLAMA_KVCOMPOSE_OK) {
        return rc_move;
    }
    rewrite_cells(*kv, seq_id, plan, slot_positions);

    if (slot_cells_out != nullptr) {
        std::copy(plan.dst_cells.begin(), plan.dst_cells.end(), slot_cells_out);
    }
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_seq_cells(
        llama_context * ctx,
         llama_seq_id   seq_id,
              int32_t   capacity,
              int32_t * cells_out,
            llama_pos * positions_out,
              int32_t * n_cells,
              int32_t * n_kv_used,
              int32_t * n_used) {
    if (ctx == nullptr || n_cells == nullptr || capacity < 0 ||
        (capacity > 0 && (cells_out == nullptr || positions_out == nullptr))) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cache * kv = llama_kvcompose_compact_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (!seq_id_valid(*kv, seq_id)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const auto & cells = access::cells(*kv, access::stream_of(*kv, seq_id));
    *n_cells = list_seq_cells(cells, seq_id, capacity, cells_out, positions_out);
    if (n_kv_used != nullptr) {
        *n_kv_used = (int32_t) cells.used_max_p1();
    }
    if (n_used != nullptr) {
        *n_used = (int32_t) cells.get_used();
    }
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_cell_bytes(llama_context * ctx, uint64_t * bytes) {
    if (ctx == nullptr || bytes == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cache * kv = llama_kvcompose_compact_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    *bytes = cache_cell_bytes(*kv);
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_compact_layers(llama_context * ctx, uint8_t * out, int32_t n_layer) {
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    llama_kv_cache * kv = nullptr;
    const int32_t rc = llama_kvcompose_cache_for_layers(ctx, n_layer, kv);
    if (rc != LLAMA_KVCOMPOSE_OK) {
        return rc;
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        out[il] = holds_layer(*kv, il) ? 1 : 0;
    }
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_swa_cache_info(
        llama_context * ctx,
         llama_seq_id   seq_id,
              int32_t * n_cells,
              int32_t * n_seq_cells,
             uint64_t * cell_bytes,
              int32_t * n_window) {
    if (ctx == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cache * kv = llama_kvcompose_compact_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (!seq_id_valid(*kv, seq_id)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cache * swa = swa_cache(ctx);
    int32_t size = 0, held = 0;
    if (swa != nullptr) {
        const auto & cells = access::cells(*swa, access::stream_of(*swa, seq_id));
        size = (int32_t) cells.size();
        held = list_seq_cells(cells, seq_id, 0, nullptr, nullptr);
    }
    if (n_cells != nullptr)     { *n_cells     = size; }
    if (n_seq_cells != nullptr) { *n_seq_cells = held; }
    if (cell_bytes != nullptr)  { *cell_bytes  = swa != nullptr ? cache_cell_bytes(*swa) : 0; }
    if (n_window != nullptr)    { *n_window    = swa != nullptr ? (int32_t) ctx->get_model().hparams.n_swa : 0; }
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_seq_layer_counts(
        llama_context * ctx,
         llama_seq_id   seq_id,
              int32_t   n_layer,
              int32_t * counts_out,
              int32_t   capacity,
              int32_t * slot_of_cell_out) {
    if (ctx == nullptr || counts_out == nullptr || capacity < 0 || (capacity > 0 && slot_of_cell_out == nullptr)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    llama_kv_cache * kv = nullptr;
    const int32_t rc = llama_kvcompose_cache_for_layers(ctx, n_layer, kv);
    if (rc != LLAMA_KVCOMPOSE_OK) {
        return rc;
    }
    if (!seq_id_valid(*kv, seq_id)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const auto & cells = access::cells(*kv, access::stream_of(*kv, seq_id));
    const auto & budgets = access::budgets(*kv);
    for (int32_t il = 0; il < n_layer; ++il) {
        counts_out[il] = holds_layer(*kv, il) ? -1 : 0;
    }
    int32_t n = 0;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (cells.is_empty(c) || !cells.seq_has(c, seq_id)) {
            continue;
        }
        const auto & cl = cells.layers_get(c);
        if (cl.budget >= 0) {
            std::copy(budgets[cl.budget].begin(), budgets[cl.budget].end(), counts_out);
        }
        if (n < capacity) {
            slot_of_cell_out[n] = cl.slot;
        }
        ++n;
    }
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_seq_set_layer_counts(
        llama_context * ctx,
         llama_seq_id   seq_id,
              int32_t   n_layer,
        const int32_t * counts,
              int32_t   n_cells,
        const int32_t * slot_of_cell) {
    if (ctx == nullptr || counts == nullptr || slot_of_cell == nullptr || n_cells < 1) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    llama_kv_cache * kv = nullptr;
    const int32_t rc = llama_kvcompose_cache_for_layers(ctx, n_layer, kv);
    if (rc != LLAMA_KVCOMPOSE_OK) {
        return rc;
    }
    if (!seq_id_valid(*kv, seq_id)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const uint32_t strm = access::stream_of(*kv, seq_id);
    auto & cells = access::cells(*kv, strm);

    std::vector<uint32_t> seq_cells;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id)) {
            seq_cells.push_back(c);
        }
    }
    if ((int32_t) seq_cells.size() != n_cells) {
        return LLAMA_KVCOMPOSE_ERR_SEQUENCE;
    }
    int32_t n_slots = 0;
    for (int32_t i = 0; i < n_cells; ++i) {
        if (slot_of_cell[i] < -1 || slot_of_cell[i] >= n_cells) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
        n_slots = std::max(n_slots, slot_of_cell[i] + 1);
    }
    std::vector<bool> seen(n_slots, false);
    for (int32_t i = 0; i < n_cells; ++i) {
        if (slot_of_cell[i] >= 0) {
            if (seen[slot_of_cell[i]]) {
                return LLAMA_KVCOMPOSE_ERR_DUPLICATE;
            }
            seen[slot_of_cell[i]] = true;
        }
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        const bool held = holds_layer(*kv, il);
        if (held ? (counts[il] < 1 || counts[il] > n_slots) : counts[il] != 0) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
        // in a per-layer layout a layer owns no slot it holds no row for
        if (held && access::n_recent(*kv) > 0 && layer_width(*kv, il, access::n_recent(*kv) + counts[il]) < access::n_recent(*kv) + counts[il]) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
    }

    const int32_t budget = new_budget(*kv, counts, n_layer);
    for (int32_t i = 0; i < n_cells; ++i) {
        cells.layers_set(seq_cells[i], slot_of_cell[i] >= 0 ? llama_kv_cell_layers{ budget, slot_of_cell[i] } : llama_kv_cell_layers{});
    }
    return LLAMA_KVCOMPOSE_OK;
}

// --- attention graph hooks (kvcompose-compact-graph.h) -----------------------------------

namespace {

// per model layer: does any used cell of streams [s0, s1] hold a slot the layer does not own
// (never a layer whose K/V live in another cache: it does not attend to these cells at all)
std::vector<bool> masked_layers(const llama_kv_cache & kv, uint32_t s0, uint32_t s1) {
    const auto & budgets = access::budgets(kv);
    if (budgets.empty()) {
        return {};
    }
    std::vector<int32_t> max_slot(budgets.size(), -1);
    for (uint32_t s = s0; s <= s1; ++s) {
        const auto & cells = access::cells(kv, s);
        for (uint32_t c = 0; c < cells.size(); ++c) {
            const auto & cl = cells.layers_get(c);
            if (cl.budget >= 0 && !cells.is_empty(c)) {
                max_slot[cl.budget] = std::max(max_slot[cl.budget], cl.slot);
            }
        }
    }
    std::vector<bool> res;
    for (size_t b = 0; b < budgets.size(); ++b) {
        if (max_slot[b] < 0) {
            continue;
        }
        res.resize(budgets[b].size(), false);
        for (size_t il = 0; il < budgets[b].size(); ++il) {
            res[il] = res[il] || (max_slot[b] >= budgets[b][il] && holds_layer(kv, (int32_t) il));
        }
    }
    if (std::none_of(res.begin(), res.end(), [](bool m) { return m; })) {
        res.clear();
    }
    return res;
}

} // namespace

std::vector<ggml_tensor *> llama_kvcompose_build_layer_bias(
        ggml_context * ctx, const llama_kv_cache_context * mctx, const ggml_tensor * kq_mask) {
    const auto & sinfo = access::sinfo_of(*mctx);
    const std::vector<bool> masked = masked_layers(access::kv_of(*mctx), sinfo.s0, sinfo.s1);
    std::vector<ggml_tensor *> bias(masked.size(), nullptr);
    for (size_t il = 0; il < masked.size(); ++il) {
        if (masked[il]) {
            bias[il] = ggml_new_tensor_4d(ctx, kq_mask->type, layer_width(access::kv_of(*mctx), (int32_t) il, kq_mask->ne[0]), 1, 1, kq_mask->ne[3]);
            ggml_set_input(bias[il]);
            ggml_format_name(bias[il], "kvcompose_bias-%zu", il);
        }
    }
    return bias;
}

void llama_kvcompose_set_layer_bias(const llama_kv_cache_context * mctx, const std::vector<ggml_tensor *> & bias) {
    if (bias.empty()) {
        return;
    }
    const auto & kv      = access::kv_of(*mctx);
    const auto & budgets = access::budgets(kv);
    const uint32_t s0    = access::sinfo_of(*mctx).s0;
    for (size_t il = 0; il < bias.size(); ++il) {
        ggml_tensor * dst = bias[il];
        if (dst == nullptr || dst->buffer == nullptr) {
            continue;
        }
        GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
        const int64_t n_kv = dst->ne[0];
        for (int64_t s = 0; s < dst->ne[3]; ++s) {
            const auto & cells = access::cells(kv, s0 + (uint32_t) s);
            for (int64_t c = 0; c < n_kv; ++c) {
                float b = 0.0f;
                if ((uint32_t) c < cells.size() && !cells.is_empty(c)) {
                    const auto & cl = cells.layers_get(c);
                    if (cl.budget >= 0 && cl.slot >= budgets[cl.budget][il]) {
                        b = -INFINITY;
                    }
                }
                if (dst->type == GGML_TYPE_F16) {
                    ((ggml_fp16_t *) dst->data)[s*n_kv + c] = ggml_fp32_to_fp16(b);
                } else {
                    ((float *) dst->data)[s*n_kv + c] = b;
                }
            }
        }
    }
}

bool llama_kvcompose_can_reuse_layer_bias(const llama_kv_cache_context * mctx, const std::vector<ggml_tensor *> & bias) {
    const auto & sinfo = access::sinfo_of(*mctx);
    const std::vector<bool> masked = masked_layers(access::kv_of(*mctx), sinfo.s0, sinfo.s1);
    if (masked.size() != bias.size()) {
        return false;
    }
    for (size_t il = 0; il < masked.size(); ++il) {
        if (masked[il] != (bias[il] != nullptr)) {
            return false;
        }
    }
    return true;
}

ggml_tensor * llama_kvcompose_layer_mask(ggml_context * ctx, const llama_kv_cache_context * mctx,
        ggml_tensor * kq_mask, const std::vector<ggml_tensor *> & bias, int32_t il) {
    const int64_t width = layer_width(access::kv_of(*mctx), il, kq_mask->ne[0]);
    ggml_tensor * mask = kq_mask;
    if (width < kq_mask->ne[0]) {
        mask = ggml_view_4d(ctx, kq_mask, width, kq_mask->ne[1], kq_mask->ne[2], kq_mask->ne[3],
                kq_mask->nb[1], kq_mask->nb[2], kq_mask->nb[3], 0);
    }
    if (il >= 0 && (size_t) il < bias.size() && bias[il] != nullptr) {
        return ggml_add(ctx, mask, bias[il]);
    }
    // flash attention and soft_max take a contiguous mask only
    return ggml_is_contiguous(mask) ? mask : ggml_cont(ctx, mask);
}
