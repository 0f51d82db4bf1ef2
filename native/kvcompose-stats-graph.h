// kvcompose: the internal hooks of the attention statistics (kvcompose-stats.cpp),
// called from llama-context.cpp and llama-graph.cpp. Not part of the public API.
//
// The plan travels inside llama_cparams (a copy per graph): it alone decides
// whether the graph carries statistics ops and of which shape, so comparing
// plans is all graph reuse needs to know.
#pragma once

#include <cstdint>

struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;
struct llama_context;
struct llama_batch_allocr;
struct llama_ubatch;
struct llama_hparams;
class  llm_graph_result;
struct llama_kvcompose_stats;

struct llama_kvcompose_stats_plan {
    llama_kvcompose_stats * state = nullptr; // null: observation off, the graph is unchanged
    int32_t n_obs        = 0;  // observing queries in this micro-batch; 0: no ops are added
    int32_t query_reduce = 0;  // enum llama_kvcompose_stats_query_reduce
    int32_t head_reduce  = 0;  // enum llama_kvcompose_stats_head_reduce
    int32_t n_stream     = 1;  // attention streams of the micro-batch (only 1 is observed)

    bool operator==(const llama_kvcompose_stats_plan & other) const {
        return state == other.state && n_obs == other.n_obs &&
               query_reduce == other.query_reduce && head_reduce == other.head_reduce &&
               n_stream == other.n_stream;
    }
    bool operator!=(const llama_kvcompose_stats_plan & other) const { return !(*this == other); }
};

// The plan for one micro-batch of the llama_decode call in progress (batch: its allocator).
llama_kvcompose_stats_plan llama_kvcompose_stats_plan_ubatch(
        const llama_context      & lctx,
        const llama_batch_allocr & balloc,
        const llama_ubatch       & ubatch);

// Adds the statistics ops of layer il to gf; a no-op when the plan has none.
// q, k, kq_mask as build_attn_mha holds them after its permutes:
// q [d, n_tokens, n_head, n_stream], k [d, n_kv, n_head_kv, n_stream],
// kq_mask [n_kv, n_tokens, 1, n_stream].
void llama_kvcompose_stats_build(
        const llama_kvcompose_stats_plan & plan,
        ggml_context         * ctx0,
        ggml_cgraph          * gf,
        llm_graph_result     * res,
        const llama_hparams  & hparams,
        bool                   is_grok,
        ggml_tensor          * q,
        ggml_tensor          * k,
        ggml_tensor          * kq_mask,
        ggml_tensor          * kq_b,
        ggml_tensor          * sinks,
        ggml_tensor          * v_mla,
        int64_t                n_kv_max,
        float                  kq_scale,
        int                    il);

// After a micro-batch computed: copy its statistics to the host and accumulate.
void llama_kvcompose_stats_collect(
        const llama_context & lctx,
        const llama_kvcompose_stats_plan & plan,
        ggml_cgraph * gf);

// The context is going away: free its statistics state.
void llama_kvcompose_stats_release(const llama_context * lctx);
