// kvcompose: the one door into llama.cpp's private members (internal, C++).
//
// The kvcompose patch makes this struct a friend of llama_kv_cache, llama_kv_cache_context
// and llama_context; every native source that needs the cache's cells, layer tensors, per-layer
// layout or the context's graph results goes through it, so the patch exposes nothing else.
#pragma once

#include "llama-context.h"
#include "llama-kv-cache.h"

#include <vector>

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

    // per-layer layout: cells [0, n_recent) take new tokens; 0 when every layer holds every cell
    static uint32_t n_recent(const llama_kv_cache & kv) { return kv.kvcompose_recent; }
    static size_t buffer_bytes(const llama_kv_cache & kv) { return kv.total_size(); }

    static void set_head(llama_kv_cache & kv, uint32_t strm, uint32_t head) { kv.v_heads[strm] = head; }

    // no decode graph built before this call may be reused (the scheduler was reset)
    static void forget_graphs(llama_context & ctx) {
        for (auto & res : ctx.gf_res_prev) {
            if (res) {
                res->reset();
            }
        }
        ctx.gf_res_prev_active = nullptr;
    }

    static const llama_kv_cache & kv_of(const llama_kv_cache_context & mctx) { return *mctx.kv; }
    static const llama_kv_cache::slot_info & sinfo_of(const llama_kv_cache_context & mctx) { return mctx.sinfos[mctx.i_cur]; }
};

// The cache compaction and the per-layer layout work on: a plain KV cache, or the base
// (full-attention) cache of an iSWA memory; nullptr for any other memory.
llama_kv_cache * llama_kvcompose_compact_cache(llama_context * ctx);

// that cache, for a C API call about all n_layer model layers of a non-null ctx: returns
// LLAMA_KVCOMPOSE_OK with kv set, or the status the call answers with
int32_t llama_kvcompose_cache_for_layers(llama_context * ctx, int32_t n_layer, llama_kv_cache *& kv);
