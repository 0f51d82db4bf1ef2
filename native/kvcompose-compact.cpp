// kvcompose: in-place composite-token compaction of a llama_kv_cache (llama-kvcompose-compact.h).
//
// The K/V rows move inside the cache tensors with one small ggml graph, run through the
// context's scheduler the way llama_kv_cache::update() runs K-shift. The cell metadata is
// then rewritten on the host. Per-layer budgets are recorded per cell
// (llama_kv_cell_layers) and turned into a per-layer mask bias by the attention graph
// (kvcompose-compact-graph.h).

#include "llama-kvcompose.h"
#include "kvcompose-compact-graph.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <vector>

// friend of llama_kv_cache: the only place that reads or writes its private members
struct llama_kvcompose_access {
    static llama_kv_cells & cells(llama_kv_cache & kv, uint32_t strm) { return kv.v_cells[strm]; }
    static const llama_kv_cells & cells(const llama_kv_cache & kv, uint32_t strm) { return kv.v_cells[strm]; }

    static uint32_t stream_of(const llama_kv_cache & kv, llama_seq_id seq_id) { return kv.seq_to_stream[seq_id]; }
    static uint32_t n_seq_max(const llama_kv_cache & kv) { return kv.n_seq_max; }
    static uint32_t n_stream (const llama_kv_cache & kv) { return kv.n_stream; }
    static bool     v_trans  (const llama_kv_cache & kv) { return kv.v_trans; }
    static bool pending_copies(const llama_kv_cache & kv) { return !kv.sc_info.empty(); }
    static bool has_other    (const llama_kv_cache & kv) { return kv.other != nullptr; }
    static llama_swa_type swa_type(const llama_kv_cache & kv) { return kv.swa_type; }
    static const llama_hparams & hparams(const llama_kv_cache & kv) { return kv.hparams; }

    static const std::vector<llama_kv_cache::kv_layer> & layers(const llama_kv_cache & kv) { return kv.layers; }
    static int32_t layer_index(const llama_kv_cache & kv, int32_t il) {
        const auto it = kv.map_layer_ids.find(il);
        return it == kv.map_layer_ids.end() ? -1 : it->second;
    }

    static std::vector<std::vector<int32_t>> & budgets(llama_kv_cache & kv) { return kv.kvcompose_budgets; }
    static const std::vector<std::vector<int32_t>> & budgets(const llama_kv_cache & kv) { return kv.kvcompose_budgets; }

    static void set_head(llama_kv_cache & kv, uint32_t strm, uint32_t head) { kv.v_heads[strm] = head; }

    static const llama_kv_cache & kv_of(const llama_kv_cache_context & mctx) { return *mctx.kv; }
    static const llama_kv_cache::slot_info & sinfo_of(const llama_kv_cache_context & mctx) { return mctx.sinfos[mctx.i_cur]; }
};

using access = llama_kvcompose_access;

namespace {

// the plain KV cache behind a context, or nullptr when the memory is something else
// (recurrent, hybrid, iSWA) or the cache shares its cells with another one
llama_kv_cache * plain_kv_cache(llama_context * ctx) {
    if (ctx == nullptr) {
        return nullptr;
    }
    auto * kv = dynamic_cast<llama_kv_cache *>(ctx->get_memory());
    if (kv == nullptr || access::has_other(*kv) || access::swa_type(*kv) != LLAMA_SWA_TYPE_NONE || kv->has_cell_ext()) {
        return nullptr;
    }
    return kv;
}

bool seq_id_valid(const llama_kv_cache & kv, llama_seq_id seq_id) {
    return seq_id >= 0 && (uint32_t) seq_id < access::n_seq_max(kv);
}

// every model layer must have K and V in this cache, with the same KV head count and whole
// quantisation blocks per head (so a head's slice of a row can move on its own)
int32_t check_layers(const llama_kv_cache & kv, const llama_model & model, int32_t n_layer, int32_t n_head_kv) {
    const auto & hp = access::hparams(kv);
    if (n_layer != llama_model_n_layer(&model)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        const int32_t ikv = access::layer_index(kv, il);
        if (ikv < 0) {
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
        }
        const auto & layer = access::layers(kv)[ikv];
        if (layer.k == nullptr || layer.v == nullptr) {
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
        }
        if ((int32_t) hp.n_head_kv(il) != n_head_kv) {
            return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
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
    const int32_t * counts = nullptr;
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
        if (plan.counts[il] < 1 || plan.counts[il] > plan.n_slots) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
        max_count = std::max(max_count, plan.counts[il]);
    }
    if (max_count != plan.n_slots) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }

    // the stream's seen-marks, one per cell, reused for every (layer, head) list
    std::vector<int64_t> seen(size, -1);
    for (int32_t il = 0; il < plan.n_layer; ++il) {
        for (int32_t h = 0; h < plan.n_head_kv; ++h) {
            const int64_t list = (int64_t) il*plan.n_head_kv + h;
            const int32_t * row = plan.cells + list*plan.n_slots;
            for (int32_t j = 0; j < plan.n_slots; ++j) {
                const int32_t c = row[j];
                if (j >= plan.counts[il]) {
                    if (c != -1) {
                        return LLAMA_KVCOMPOSE_ERR_RANGE;
                    }
                    continue;
                }
                if (c < 0 || (uint32_t) c >= size) {
                    return LLAMA_KVCOMPOSE_ERR_RANGE;
                }
                if (cells.is_empty(c) || !cells.seq_has(c, seq_id) || !layer_owns(kv, cells, c, il)) {
                    return LLAMA_KVCOMPOSE_ERR_SEQUENCE;
                }
                if (seen[c] == list) {
                    return LLAMA_KVCOMPOSE_ERR_DUPLICATE;
                }
                seen[c] = list;
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

    // destinations: the lowest cells that are free or held by this sequence alone, so that no
    // other sequence's rows are overwritten
    for (uint32_t c = 0; c < size; ++c) {
        const bool own = !cells.is_empty(c) && cells.seq_has(c, seq_id);
        if (own) {
            plan.seq_cells.push_back(c);
        }
        if ((int32_t) plan.dst_cells.size() < plan.n_slots && (cells.is_empty(c) || (own && cells.seq_count(c) == 1))) {
            plan.dst_cells.push_back(c);
        }
    }
    if ((int32_t) plan.dst_cells.size() < plan.n_slots) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    return LLAMA_KVCOMPOSE_OK;
}

// The bytes of a cache tensor typed as F32 words, so that rows move as raw 32-bit words:
// bit-exact for every cache type (no dequantise/requantise round trip) and no wider
// temporary than the rows themselves. ggml has no reinterpreting view, so the alias is a
// tensor of its own over the same buffer, already allocated like the cache itself.
ggml_tensor * view_as_words(ggml_context * ctx, ggml_tensor * cache) {
    GGML_ASSERT(cache->nb[1] % sizeof(float) == 0 && cache->data != nullptr);
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cache->nb[1]/sizeof(float), cache->ne[1]);
    t->view_src  = cache->view_src ? cache->view_src : cache;
    t->view_offs = cache->view_src ? cache->view_offs : 0;
    t->buffer    = cache->buffer;
    t->data      = cache->data;
    return t;
}

// A layer's K (or plain V) as one "sub-row" per (cell, head): sub-row cell*n_head_kv + h is
// head h's slice of cell's row. Gathering sub-rows in (slot, head) order reads each source
// row's heads together, which keeps the gather close to sequential in memory.
ggml_tensor * view_sub_rows(ggml_context * ctx, ggml_tensor * cache, int64_t head_dim, int64_t n_head_kv) {
    const size_t head_bytes = ggml_row_size(cache->type, head_dim);
    GGML_ASSERT(cache->nb[1] == head_bytes*n_head_kv);
    if (head_bytes % sizeof(float) == 0) {
        ggml_tensor * words = view_as_words(ctx, cache);
        return ggml_view_2d(ctx, words, head_bytes/sizeof(float), cache->ne[1]*n_head_kv, head_bytes, 0);
    }
    return ggml_view_2d(ctx, cache, head_dim, cache->ne[1]*n_head_kv, head_bytes, 0);
}

// K or plain V of one layer. The gather output is a new tensor, so reads never see the writes.
ggml_tensor * build_move_rows(ggml_context * ctx, ggml_tensor * cache, int64_t head_dim, int64_t n_head_kv,
        ggml_tensor * src_sub, ggml_tensor * dst_sub) {
    ggml_tensor * sub  = view_sub_rows(ctx, cache, head_dim, n_head_kv);
    ggml_tensor * rows = ggml_get_rows(ctx, sub, src_sub); // [head_len, n_keep*n_head_kv]
    return ggml_set_rows(ctx, sub, rows, dst_sub);
}

// transposed V of one layer: one row of kv_size cells per channel. The used cells are first
// transposed into channel-contiguous rows and gathered like K; the slots are then written
// back as columns: one strided copy when the slots are consecutive cells, else one element
// per (slot, channel)
ggml_tensor * build_move_columns(ggml_context * ctx, ggml_tensor * cache, int64_t head_dim, int64_t n_head_kv,
        int64_t n_used, ggml_tensor * src_sub, ggml_tensor * dst_cells, int64_t dst_first) {
    const int64_t kv_size = cache->ne[1];
    const size_t  es      = ggml_element_size(cache);
    const int64_t n_keep  = dst_cells->ne[0];

    ggml_tensor * by_channel = ggml_view_2d(ctx, cache, n_used, head_dim*n_head_kv, kv_size*es, 0);
    ggml_tensor * by_cell    = ggml_cont(ctx, ggml_transpose(ctx, by_channel)); // [n_chan, n_used]
    ggml_tensor * sub        = ggml_view_2d(ctx, by_cell, head_dim, n_used*n_head_kv, head_dim*es, 0);
    ggml_tensor * rows       = ggml_get_rows(ctx, sub, src_sub);                // F32 [head_dim, n_head_kv*n_keep]
    const size_t  fs         = ggml_element_size(rows);

    if (dst_first >= 0) {
        // [n_keep, head_dim, n_head_kv] from the gathered rows, into cells dst_first .. dst_first + n_keep - 1
        ggml_tensor * by_slot = ggml_view_3d(ctx, rows, head_dim, n_head_kv, n_keep, head_dim*fs, n_head_kv*head_dim*fs, 0);
        ggml_tensor * src = ggml_permute(ctx, by_slot, 1, 2, 0, 3);
        ggml_tensor * dst = ggml_view_3d(ctx, cache, n_keep, head_dim, n_head_kv, kv_size*es, head_dim*kv_size*es, dst_first*es);
        return ggml_cpy(ctx, src, dst);
    }

    ggml_tensor * elems = ggml_view_4d(ctx, rows, 1, n_keep, head_dim, n_head_kv,
            n_head_kv*head_dim*fs, fs, head_dim*fs, 0);                           // [1, n_keep, head_dim, n_head_kv]
    ggml_tensor * dst   = ggml_view_4d(ctx, cache, 1, kv_size, head_dim, n_head_kv,
            es, kv_size*es, head_dim*kv_size*es, 0);
    return ggml_set_rows(ctx, dst, elems, dst_cells);
}

struct move_inputs {
    std::vector<ggml_tensor *> src_sub; // per layer, I32 [counts[l]*n_head_kv]: cell*n_head_kv + h, slot-major
    std::vector<ggml_tensor *> dst_sub; // per layer, I32 [counts[l]*n_head_kv]
    ggml_tensor * dst_cells = nullptr;  // I32 [n_slots]
};

// the first of n cells when dst[0 .. n-1] are consecutive, else -1
int64_t consecutive_from(const std::vector<uint32_t> & dst, int64_t n) {
    for (int64_t j = 1; j < n; ++j) {
        if (dst[j] != dst[0] + j) {
            return -1;
        }
    }
    return dst[0];
}

ggml_cgraph * build_graph_compact(llm_graph_result * res, const llama_kv_cache & kv, const compaction_plan & plan,
        uint32_t n_used, move_inputs & inp) {
    auto * ctx = res->get_ctx();
    auto * gf  = res->get_gf();
    const auto & hp = access::hparams(kv);
    const int64_t H = plan.n_head_kv;

    inp.dst_cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, plan.n_slots);
    ggml_set_input(inp.dst_cells);

    for (int32_t il = 0; il < plan.n_layer; ++il) {
        const auto & layer = access::layers(kv)[access::layer_index(kv, il)];
        const int64_t n_keep = plan.counts[il];

        ggml_tensor * src_sub = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_keep*H);
        ggml_tensor * dst_sub = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_keep*H);
        ggml_set_input(src_sub);
        ggml_set_input(dst_sub);
        inp.src_sub.push_back(src_sub);
        inp.dst_sub.push_back(dst_sub);

        ggml_tensor * k = layer.k_stream[plan.strm];
        ggml_build_forward_expand(gf, build_move_rows(ctx, k, hp.n_embd_head_k(il), H, src_sub, dst_sub));

        ggml_tensor * v = layer.v_stream[plan.strm];
        if (access::v_trans(kv)) {
            ggml_tensor * dst_cells = ggml_view_1d(ctx, inp.dst_cells, n_keep, 0);
            ggml_build_forward_expand(gf, build_move_columns(ctx, v, hp.n_embd_head_v(il), H, n_used, src_sub, dst_cells,
                        consecutive_from(plan.dst_cells, n_keep)));
        } else {
            ggml_build_forward_expand(gf, build_move_rows(ctx, v, hp.n_embd_head_v(il), H, src_sub, dst_sub));
        }
    }
    return gf;
}

void set_move_inputs(const compaction_plan & plan, const move_inputs & inp) {
    // only the element-wise path of a transposed V reads the plain cell list
    if (inp.dst_cells->buffer != nullptr) {
        std::vector<int32_t> dst(plan.dst_cells.begin(), plan.dst_cells.end());
        ggml_backend_tensor_set(inp.dst_cells, dst.data(), 0, ggml_nbytes(inp.dst_cells));
    }

    const int32_t H = plan.n_head_kv;
    std::vector<int32_t> src_sub, dst_sub;
    for (int32_t il = 0; il < plan.n_layer; ++il) {
        const int32_t n_keep = plan.counts[il];
        src_sub.resize((size_t) n_keep*H);
        dst_sub.resize((size_t) n_keep*H);
        for (int32_t j = 0; j < n_keep; ++j) {
            for (int32_t h = 0; h < H; ++h) {
                const int32_t c = plan.cells[((int64_t) il*H + h)*plan.n_slots + j];
                src_sub[(size_t) j*H + h] = c*H + h;
                dst_sub[(size_t) j*H + h] = (int32_t) plan.dst_cells[j]*H + h;
            }
        }
        ggml_backend_tensor_set(inp.src_sub[il], src_sub.data(), 0, ggml_nbytes(inp.src_sub[il]));
        ggml_backend_tensor_set(inp.dst_sub[il], dst_sub.data(), 0, ggml_nbytes(inp.dst_sub[il]));
    }
}

// llama_context::memory_update() does the same after K-shift: our graph reset the scheduler,
// so the previous decode graph must not be reused and the worst case is reserved again
void reserve_after_compute(llama_context * lctx, llama_kv_cache & kv) {
    const auto & cparams = lctx->get_cparams();
    const auto mctx = kv.init_full();
    const uint32_t n_tokens = std::min(cparams.n_ctx, cparams.n_ubatch);
    const uint32_t n_outputs_max = std::min(n_tokens, cparams.n_outputs_max);
    if (!lctx->graph_reserve(n_tokens, cparams.n_seq_max, n_outputs_max, mctx.get())) {
        LLAMA_LOG_ERROR("%s: failed to reserve graph after the compaction\n", __func__);
    }
}

int32_t move_rows(llama_context * lctx, llama_kv_cache & kv, const compaction_plan & plan) {
    auto * sched = lctx->get_sched();
    llama_synchronize(lctx);
    ggml_backend_sched_reset(sched);

    auto * res = lctx->get_gf_res_reserve();
    res->reset();

    const uint32_t n_used = access::cells(kv, plan.strm).used_max_p1();

    move_inputs inp;
    ggml_cgraph * gf = build_graph_compact(res, kv, plan, n_used, inp);
    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        LLAMA_LOG_ERROR("%s: failed to allocate the compaction graph\n", __func__);
        reserve_after_compute(lctx, kv);
        return LLAMA_KVCOMPOSE_ERR_COMPUTE;
    }
    set_move_inputs(plan, inp);

    const ggml_status status = lctx->graph_compute(gf, false);
    ggml_backend_sched_synchronize(sched);
    reserve_after_compute(lctx, kv);
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

bool budgets_uniform(const int32_t * counts, int32_t n_layer) {
    return std::all_of(counts, counts + n_layer, [&](int32_t n) { return n == counts[0]; });
}

void rewrite_cells(llama_kv_cache & kv, llama_seq_id seq_id, const compaction_plan & plan, const llama_pos * slot_positions) {
    auto & cells = access::cells(kv, plan.strm);
    for (uint32_t c : plan.seq_cells) {
        cells.seq_rm(c, seq_id);
    }
    const int32_t budget = budgets_uniform(plan.counts, plan.n_layer) ? -1 : new_budget(kv, plan.counts, plan.n_layer);
    for (int32_t j = 0; j < plan.n_slots; ++j) {
        const uint32_t c = plan.dst_cells[j];
        cells.pos_set(c, slot_positions[j]);
        cells.seq_add(c, seq_id);
        if (budget >= 0) {
            cells.layers_set(c, { budget, j });
        }
    }
    access::set_head(kv, plan.strm, (plan.dst_cells.back() + 1) % cells.size());
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
    llama_kv_cache * kv = plain_kv_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (!seq_id_valid(*kv, seq_id) || n_head_kv < 1) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const int32_t rc_layers = check_layers(*kv, ctx->get_model(), n_layer, n_head_kv);
    if (rc_layers != LLAMA_KVCOMPOSE_OK) {
        return rc_layers;
    }
    // a pending K-shift or stream copy would apply to rows that are about to move
    if (kv->get_has_shift() || access::pending_copies(*kv)) {
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
    const llama_kv_cache * kv = plain_kv_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (!seq_id_valid(*kv, seq_id)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const auto & cells = access::cells(*kv, access::stream_of(*kv, seq_id));
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
    *n_cells = n;
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
    const llama_kv_cache * kv = plain_kv_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    uint64_t total = 0;
    for (const auto & layer : access::layers(*kv)) {
        total += layer.k ? layer.k->nb[1] : 0;
        total += layer.v ? ggml_row_size(layer.v->type, layer.v->ne[0]) : 0;
    }
    *bytes = total;
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
    const llama_kv_cache * kv = plain_kv_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (!seq_id_valid(*kv, seq_id) || n_layer != llama_model_n_layer(&ctx->get_model())) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const auto & cells = access::cells(*kv, access::stream_of(*kv, seq_id));
    const auto & budgets = access::budgets(*kv);
    std::fill(counts_out, counts_out + n_layer, -1);
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
            slot_of_cell_out[n] = cl.budget >= 0 ? cl.slot : -1;
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
    llama_kv_cache * kv = plain_kv_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (!seq_id_valid(*kv, seq_id) || n_layer != llama_model_n_layer(&ctx->get_model())) {
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
        if (counts[il] < 1 || counts[il] > n_slots) {
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
            res[il] = res[il] || max_slot[b] >= budgets[b][il];
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
            bias[il] = ggml_new_tensor_4d(ctx, kq_mask->type, kq_mask->ne[0], 1, 1, kq_mask->ne[3]);
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

ggml_tensor * llama_kvcompose_layer_mask(
        ggml_context * ctx, ggml_tensor * kq_mask, const std::vector<ggml_tensor *> & bias, int32_t il) {
    if (il < 0 || (size_t) il >= bias.size() || bias[il] == nullptr) {
        return kq_mask;
    }
    return ggml_add(ctx, kq_mask, bias[il]);
}
