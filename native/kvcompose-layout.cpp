// kvcompose: physical per-layer KV memory (llama-kvcompose-layout.h, kvcompose-layout.h).
//
// The layout is registered before the context exists because llama_kv_cache allocates its
// tensors in its constructor and llama_context_params (which llama-cpp-python mirrors field
// by field) has no room for it. The constructor takes it once; everything after reads the
// layout back from the cache: n_recent from the cache, a layer's rows from its tensors.

#include "llama-kvcompose.h"
#include "kvcompose-access.h"
#include "kvcompose-layout.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <vector>

using access = llama_kvcompose_access;

namespace {

constexpr int32_t LAYOUT_ALIGN = 256;

struct restore_plan {
    llama_seq_id         seq_id = -1;
    std::vector<int32_t> slot_of_cell;
};

std::mutex g_layout_mutex;
std::vector<int32_t> g_next_caps; // empty: nothing registered
std::map<const llama_kv_cache *, restore_plan> g_restore_plans;

uint32_t held_rows(const llama_kv_cache & kv, uint32_t strm, int32_t ikv) {
    return (uint32_t) access::layers(kv)[ikv].k_stream[strm]->ne[1];
}

} // namespace

llama_kvcompose_layout llama_kvcompose_take_layout(
        const llama_model & model, uint32_t kv_size, uint32_t n_stream, llama_swa_type swa_type, bool shares_cells) {
    std::vector<int32_t> caps;
    {
        std::lock_guard<std::mutex> lock(g_layout_mutex);
        caps.swap(g_next_caps);
    }
    if (caps.empty()) {
        return {};
    }
    const int32_t c_max = *std::max_element(caps.begin(), caps.end());
    const char * refusal =
        (int32_t) caps.size() != llama_model_n_layer(&model) ? "the layer count differs from the model's" :
        (int64_t) c_max >= (int64_t) kv_size                 ? "the largest capacity leaves no cell for new tokens" :
        n_stream != 1                                        ? "the cache has one stream per sequence" :
        swa_type != LLAMA_SWA_TYPE_NONE                      ? "a sliding-window cache" :
        shares_cells                                         ? "the cache shares layers or cells" : nullptr;
    if (refusal != nullptr) {
        LLAMA_LOG_WARN("%s: per-layer layout not applied: %s\n", __func__, refusal);
        return {};
    }
    llama_kvcompose_layout layout;
    layout.n_recent = kv_size - (uint32_t) c_max;
    for (int32_t cap : caps) {
        layout.rows.push_back(layout.n_recent + (uint32_t) cap);
    }
    LLAMA_LOG_INFO("%s: per-layer layout: %u cells for new tokens, %d to %d composite slots per layer\n", __func__,
            layout.n_recent, *std::min_element(caps.begin(), caps.end()), c_max);
    return layout;
}

// how many of cells [first, first + n) the layer tensor t holds a row for
static uint32_t held_cells(const ggml_tensor * t, uint32_t first, uint32_t n) {
    const uint32_t rows = (uint32_t) t->ne[1];
    return first >= rows ? 0 : std::min(n, rows - first);
}

void llama_kvcompose_write_cells(llama_io_write_i & io, ggml_tensor * t, size_t base, uint32_t first, uint32_t n, size_t cell_bytes) {
    const uint32_t held = held_cells(t, first, n);
    if (held > 0) {
        io.write_tensor(t, base + (size_t) first*cell_bytes, (size_t) held*cell_bytes);
    }
    if (held < n) {
        const std::vector<uint8_t> zeros((size_t) (n - held)*cell_bytes, 0);
        io.write(zeros.data(), zeros.size());
    }
}

void llama_kvcompose_read_cells(llama_io_read_i & io, ggml_tensor * t, size_t base, uint32_t first, uint32_t n, size_t cell_bytes) {
    const uint32_t held = held_cells(t, first, n);
    if (held > 0) {
        io.read_tensor(t, base + (size_t) first*cell_bytes, (size_t) held*cell_bytes);
    }
    if (held < n) {
        std::vector<uint8_t> skipped((size_t) (n - held)*cell_bytes);
        io.read(skipped.data(), skipped.size());
    }
}

bool llama_kvcompose_clear_cells(const llama_kv_cache & kv, uint32_t strm, const llama_kv_cache::slot_info & sinfo) {
    if (access::n_recent(kv) == 0) {
        return false;
    }
    const bool v_trans = access::v_trans(kv);
    for (const auto & layer : access::layers(kv)) {
        for (ggml_tensor * t : { layer.k_stream[strm], layer.v_stream[strm] }) {
            if (t == nullptr) {
                continue;
            }
            const bool by_channel = v_trans && t == layer.v_stream[strm];
            const int64_t rows = t->ne[1];
            const size_t  es   = ggml_type_size(t->type);
            for (uint32_t c : sinfo.idxs[0]) {
                if ((int64_t) c >= rows) {
                    continue;
                }
                if (!by_channel) {
                    ggml_backend_tensor_memset(t, 0, (size_t) c*t->nb[1], t->nb[1]);
                    continue;
                }
                for (int64_t j = 0; j < t->ne[0]; ++j) {
                    ggml_backend_tensor_memset(t, 0, ((size_t) j*rows + c)*es, es);
                }
            }
        }
    }
    return true;
}

bool llama_kvcompose_restore_slot(const llama_kv_cache & kv, uint32_t strm, llama_seq_id seq_id, uint32_t cell_count,
        llama_kv_cache::slot_info & sinfo) {
    restore_plan plan;
    {
        std::lock_guard<std::mutex> lock(g_layout_mutex);
        auto it = g_restore_plans.find(&kv);
        if (it == g_restore_plans.end()) {
            return true;
        }
        plan = std::move(it->second);
        g_restore_plans.erase(it);
    }
    if (plan.seq_id != seq_id || plan.slot_of_cell.size() != cell_count) {
        LLAMA_LOG_ERROR("%s: the restore plan is for sequence %d with %zu cells, the state holds sequence %d with %u\n",
                __func__, plan.seq_id, plan.slot_of_cell.size(), seq_id, cell_count);
        return false;
    }
    const auto & cells = access::cells(kv, strm);
    const uint32_t n_recent = access::n_recent(kv);
    std::vector<uint32_t> idxs;
    uint32_t next_free = 0;
    for (int32_t slot : plan.slot_of_cell) {
        uint32_t c = n_recent + (uint32_t) slot;
        if (slot < 0) {
            while (next_free < n_recent && !cells.is_empty(next_free)) {
                ++next_free;
            }
            c = next_free++;
        }
        if (c >= (slot < 0 ? n_recent : cells.size()) || !cells.is_empty(c)) {
            LLAMA_LOG_ERROR("%s: no free cell for cell %zu of the restored sequence\n", __func__, idxs.size());
            return false;
        }
        idxs.push_back(c);
    }
    sinfo.s0 = strm;
    sinfo.s1 = strm;
    sinfo.resize(1);
    sinfo.strm[0] = strm;
    sinfo.idxs[0] = std::move(idxs);
    return true;
}

ggml_tensor * llama_kvcompose_store_v_trans(ggml_context * ctx, ggml_tensor * v, ggml_tensor * v_cur, ggml_tensor * v_idxs) {
    const int64_t n_chan   = v->ne[0];
    const int64_t rows     = v->ne[1];
    const int64_t n_tokens = v_cur->ne[1];
    const size_t  es       = ggml_element_size(v);
    const size_t  es_cur   = ggml_element_size(v_cur);
    GGML_ASSERT(v_cur->ne[0] == n_chan && ggml_is_contiguous(v_cur) && v->ne[2] == 1);

    // one element per (token, channel): cell idx of channel j sits at j*rows + idx
    ggml_tensor * dst   = ggml_view_4d(ctx, v, 1, rows, n_chan, 1, es, rows*es, rows*n_chan*es, 0);
    ggml_tensor * src   = ggml_view_4d(ctx, v_cur, 1, n_tokens, n_chan, 1, n_chan*es_cur, es_cur, n_chan*n_tokens*es_cur, 0);
    ggml_tensor * cells = ggml_view_2d(ctx, v_idxs, n_tokens, 1, n_tokens*ggml_element_size(v_idxs), 0);
    return ggml_set_rows(ctx, dst, src, cells);
}

int32_t llama_kvcompose_layout_next(int32_t n_layer, const int32_t * caps) {
    if (n_layer < 0 || (n_layer > 0) != (caps != nullptr)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        if (caps[il] < LAYOUT_ALIGN || caps[il] % LAYOUT_ALIGN != 0) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
    }
    std::lock_guard<std::mutex> lock(g_layout_mutex);
    g_next_caps.assign(caps, caps + n_layer);
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_layout_get(
        llama_context * ctx,
              int32_t   n_layer,
              int32_t * n_recent,
              int32_t * rows_out,
             uint64_t * bytes_out,
             uint64_t * buffer_bytes) {
    if (ctx == nullptr || n_recent == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    llama_kv_cache * kv = nullptr;
    const int32_t rc = llama_kvcompose_cache_for_layers(ctx, n_layer, kv);
    if (rc != LLAMA_KVCOMPOSE_OK) {
        return rc;
    }
    *n_recent = (int32_t) access::n_recent(*kv);
    for (int32_t il = 0; il < n_layer; ++il) {
        const int32_t ikv = access::layer_index(*kv, il);
        const auto * layer = ikv >= 0 ? &access::layers(*kv)[ikv] : nullptr;
        if (rows_out != nullptr) {
            rows_out[il] = layer != nullptr ? (int32_t) held_rows(*kv, 0, ikv) : 0;
        }
        if (bytes_out != nullptr) {
            bytes_out[il] = layer == nullptr ? 0 : ggml_nbytes(layer->k) + (layer->v ? ggml_nbytes(layer->v) : 0);
        }
    }
    if (buffer_bytes != nullptr) {
        *buffer_bytes = access::buffer_bytes(*kv);
    }
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_layout_restore_plan(
        llama_context * ctx,
         llama_seq_id   seq_id,
              int32_t   n_cells,
        const int32_t * slot_of_cell) {
    if (ctx == nullptr || n_cells < 0 || (n_cells > 0 && slot_of_cell == nullptr)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cache * kv = llama_kvcompose_compact_cache(ctx);
    if (kv == nullptr || access::n_recent(*kv) == 0) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (seq_id < 0 || (uint32_t) seq_id >= access::n_seq_max(*kv)) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    if (n_cells == 0) {
        // a restore that failed before reading any cell left its plan unused
        std::lock_guard<std::mutex> lock(g_layout_mutex);
        g_restore_plans.erase(kv);
        return LLAMA_KVCOMPOSE_OK;
    }
    const uint32_t n_recent = access::n_recent(*kv);
    const uint32_t n_slots  = access::cells(*kv, 0).size() - n_recent;
    std::vector<bool> seen(n_slots, false);
    uint32_t n_plain = 0;
    for (int32_t i = 0; i < n_cells; ++i) {
        const int32_t s = slot_of_cell[i];
        if (s < -1 || s >= (int64_t) n_slots) {
            return LLAMA_KVCOMPOSE_ERR_RANGE;
        }
        if (s < 0) {
            ++n_plain;
        } else if (seen[s]) {
            return LLAMA_KVCOMPOSE_ERR_DUPLICATE;
        } else {
            seen[s] = true;
        }
    }
    if (n_plain > n_recent) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    std::lock_guard<std::mutex> lock(g_layout_mutex);
    g_restore_plans[kv] = { seq_id, std::vector<int32_t>(slot_of_cell, slot_of_cell + n_cells) };
    return LLAMA_KVCOMPOSE_OK;
}
