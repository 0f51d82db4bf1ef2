// kvcompose: see llama-kvcompose.h for the conventions (status codes, ABI version).
//
// Attention statistics: how much observing queries attend to each cached cell,
// computed by extra ops inside the running llama_decode graph (flash attention
// on or off) and reduced on the device over the observing queries (and over the
// GQA group where that commutes with accumulation). The host accumulates over
// micro-batches and decode calls; see native/README.md, "Attention statistics".
//
// Life cycle, per context:
//   llama_kvcompose_stats_begin     configure, clear, observation on
//   llama_decode ...                any number of calls and micro-batches accumulate
//   llama_kvcompose_stats_get       read [n_layer][n_head_kv][n_cells]
//   llama_kvcompose_stats_reset     clear, keep the configuration
//   llama_kvcompose_stats_set_enabled(false/true)  pause and resume, results kept
//   llama_kvcompose_stats_end       observation off, results freed
// With observation off (never begun, paused or ended) the decode graph is the
// stock graph and graph reuse works as without the patch.
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// How the scores of the observing queries of one query head are combined.
enum llama_kvcompose_stats_query_reduce {
    LLAMA_KVCOMPOSE_STATS_QUERY_MAX  = 0, // running maximum (the reference default)
    LLAMA_KVCOMPOSE_STATS_QUERY_MEAN = 1, // sum / number of observing queries
    LLAMA_KVCOMPOSE_STATS_QUERY_SUM  = 2,
};

// How the query heads of one GQA group are combined into their KV head.
enum llama_kvcompose_stats_head_reduce {
    LLAMA_KVCOMPOSE_STATS_HEAD_MEAN = 0, // the reference default
    LLAMA_KVCOMPOSE_STATS_HEAD_MAX  = 1,
};

struct llama_kvcompose_stats_params {
    // The sequence whose tokens observe. Its queries see only its own cells
    // (the KQ mask), so cells of other sequences score 0.
    llama_seq_id seq_id;
    // Observing queries: the last n_last tokens of seq_id in every llama_decode
    // batch (across its micro-batches). -1: every token of seq_id in the batch
    // (the whole batch is an observation). Must be -1 or >= 1.
    int32_t n_last;
    int32_t query_reduce; // enum llama_kvcompose_stats_query_reduce
    int32_t head_reduce;  // enum llama_kvcompose_stats_head_reduce
};

// seq_id 0, n_last -1, max over queries, mean over the GQA group.
LLAMA_API struct llama_kvcompose_stats_params llama_kvcompose_stats_default_params(void);

// Configure observation for ctx, clear the accumulators and switch observation
// on. Allocates n_layer * n_head * n_cells floats on the host. Calling it again
// replaces the configuration. ERR_UNSUPPORTED for a context without a KV cache
// (recurrent, encoder-only) or an encoder-decoder model.
LLAMA_API int32_t llama_kvcompose_stats_begin(
        struct llama_context * ctx,
        const struct llama_kvcompose_stats_params * params);

// Pause (false) or resume (true) observation without clearing. ERR_STATE before begin.
LLAMA_API int32_t llama_kvcompose_stats_set_enabled(struct llama_context * ctx, bool enabled);

// Clear the accumulators; configuration and on/off state are kept. ERR_STATE before begin.
LLAMA_API int32_t llama_kvcompose_stats_reset(struct llama_context * ctx);

// Switch observation off and free the accumulators. OK also when never begun.
LLAMA_API int32_t llama_kvcompose_stats_end(struct llama_context * ctx);

// Shape of the result: layers, KV heads and cells (the KV cache size of the
// observed sequence's stream). Any pointer may be NULL. ERR_STATE before begin.
LLAMA_API int32_t llama_kvcompose_stats_shape(
        struct llama_context * ctx,
        int32_t * n_layer,
        int32_t * n_head_kv,
        int32_t * n_cells);

// Number of observing queries accumulated since begin/reset.
LLAMA_API int32_t llama_kvcompose_stats_n_queries(struct llama_context * ctx, int64_t * n_queries);

// Per layer, 1 when the layer has statistics, 0 when it has none (sliding-window
// layers, layers with an attention bias or MLA, layers no observing query has
// reached yet). out holds n_layer bytes.
LLAMA_API int32_t llama_kvcompose_stats_layers(struct llama_context * ctx, uint8_t * out, int32_t n_layer);

// The scores of one (layer, KV head), one float per cell: out[cell].
// n_cells must equal the n_cells of llama_kvcompose_stats_shape.
// Cells no observing query could see (empty, other sequences, future) score 0.
// ERR_STATE when a micro-batch could not be observed (several attention
// streams in one micro-batch); nothing is written then.
LLAMA_API int32_t llama_kvcompose_stats_get(
        struct llama_context * ctx,
        int32_t il,
        int32_t head_kv,
        float * out,
        int32_t n_cells);

// All scores at once: out[(il*n_head_kv + head_kv)*n_cells + cell], n_out floats.
LLAMA_API int32_t llama_kvcompose_stats_get_all(struct llama_context * ctx, float * out, size_t n_out);

// The number of cells of seq_id's stream (the KV cache size, the base cache of a
// sliding-window model). Independent of observation.
LLAMA_API int32_t llama_kvcompose_stats_n_cells(struct llama_context * ctx, llama_seq_id seq_id, int32_t * n_cells);

// The llama.cpp position held by each cell of seq_id's stream, or -1 for a cell
// that is empty or not in seq_id. Independent of observation (works before begin).
// n_cells must equal the KV cache size of that stream.
LLAMA_API int32_t llama_kvcompose_stats_cell_positions(
        struct llama_context * ctx,
        llama_seq_id seq_id,
        int32_t * out,
        int32_t n_cells);

#ifdef __cplusplus
}
#endif
