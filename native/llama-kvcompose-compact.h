// kvcompose: see llama-kvcompose.h for the conventions (status codes, ABI version).
//
// In-place composite-token compaction of one sequence of a llama_kv_cache.
//
// Vocabulary:
//   cell  - an index into the KV cells of the sequence's stream (0 .. n_ctx_stream-1)
//   slot  - composite token j of the compacted sequence; every layer l owns the slots
//           0 .. counts[l]-1, and slot j of layer l holds, for KV head h, the K and V rows
//           that were in cell cells[l][h][j] before the call
//   position - the llama_pos a slot gets for masking and ordering (never a cell index)
//
// After a successful call the sequence occupies exactly n_slots cells: the lowest cells of
// its stream that were free or held by this sequence alone. Every other cell the sequence
// held is released (or, if another sequence shares it, no longer carries this sequence)
// and can take new tokens at once. Layers whose count is below n_slots must not see the
// slots they do not own: the library masks them per layer, exactly, for as long as those
// cells hold this sequence (see llama_kvcompose_seq_layer_counts).
//
// Sliding-window models (an iSWA memory: Gemma-2/3, ...): the compacted cache is the base
// cache, which holds the global-attention layers; the sliding-window layers keep their K/V in
// a second cache that llama.cpp bounds to the window, and no function here touches it. Layers
// are still indexed by model layer (0 .. n_layer-1, as the statistics are): a sliding-window
// layer takes count 0 and cells -1 (llama_kvcompose_compact_layers says which layers those
// are). Cells, positions and cell bytes are the base cache's.
#pragma once

#include "llama.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Compacts seq_id in place, on the device that holds the cache, with no host round trip
// of the K/V rows.
//   n_layer        : llama_model_n_layer(model)
//   n_head_kv      : KV heads per layer (every layer must have the same number)
//   n_slots        : max over l of counts[l]
//   counts         : [n_layer] slots owned by layer l, 1 .. n_slots; exactly 0 for a layer the
//                    compacted cache does not hold (a sliding-window layer of an iSWA memory)
//   cells          : [n_layer][n_head_kv][n_slots] row-major; source cell of slot j for
//                    (l, h), j < counts[l]; -1 for j >= counts[l]. No cell twice in one
//                    (l, h) list; every cell must hold seq_id.
//   slot_positions : [n_slots] positions given to the slots; each in [0, pos_max] and their
//                    maximum must equal llama_memory_seq_pos_max(seq_id), so the next token
//                    still goes at pos_max + 1
//   layer_offsets  : reserved; must be NULL. Per-layer physical capacities are fixed when the
//                    cache is allocated (llama-kvcompose-layout.h): there slot j goes to cell
//                    n_recent + j, and counts[l] may not exceed layer l's capacity (ERR_RANGE)
//   slot_cells_out : optional [n_slots]; receives the cell that now holds slot j
// Everything is validated before anything is touched; on any error the cache is unchanged.
// An iSWA memory's sliding-window cache keeps its cells; its newest position for seq_id must
// equal the base cache's (ERR_STATE otherwise), so the next token goes at pos_max + 1 in both.
// Returns LLAMA_KVCOMPOSE_OK or a negative llama_kvcompose_status.
LLAMA_API int32_t llama_kvcompose_compact_seq(
        struct llama_context * ctx,
                llama_seq_id   seq_id,
                     int32_t   n_layer,
                     int32_t   n_head_kv,
                     int32_t   n_slots,
               const int32_t * counts,
               const int32_t * cells,
             const llama_pos * slot_positions,
               const int32_t * layer_offsets,
                     int32_t * slot_cells_out);

// The cells seq_id occupies, in ascending cell order, with their positions.
//   capacity  : size of cells_out and positions_out (either may be NULL when capacity is 0)
//   n_cells   : receives the number of cells the sequence holds (may exceed capacity; only
//               min(capacity, *n_cells) entries are written)
//   n_kv_used : optional; receives the index of the stream's last used cell + 1 (before the
//               padding llama.cpp adds for attention)
//   n_used    : optional; receives the number of used cells in the stream (any sequence)
LLAMA_API int32_t llama_kvcompose_seq_cells(
        struct llama_context * ctx,
                llama_seq_id   seq_id,
                     int32_t   capacity,
                     int32_t * cells_out,
                   llama_pos * positions_out,
                     int32_t * n_cells,
                     int32_t * n_kv_used,
                     int32_t * n_used);

// Bytes one cell occupies over all layers of the compacted cache, K and V together: the
// physical memory a freed cell gives back (an iSWA memory: the global layers only).
LLAMA_API int32_t llama_kvcompose_cell_bytes(struct llama_context * ctx, uint64_t * bytes);

// out[l] = 1 when model layer l has its K/V in the compacted cache, 0 when they live in the
// sliding-window cache of an iSWA memory (never compacted). n_layer: llama_model_n_layer(model).
LLAMA_API int32_t llama_kvcompose_compact_layers(struct llama_context * ctx, uint8_t * out, int32_t n_layer);

// What compaction leaves alone: the sliding-window cache of an iSWA memory. Outputs optional;
// a memory without one answers OK with every output 0.
//   n_cells     : cells of that cache (with swa_full, n_ctx; else about the window + n_ubatch)
//   n_seq_cells : cells seq_id holds in it
//   cell_bytes  : K and V bytes one of its cells takes over its layers
//   n_window    : the attention window of its layers (hparams n_swa)
LLAMA_API int32_t llama_kvcompose_swa_cache_info(
        struct llama_context * ctx,
                llama_seq_id   seq_id,
                     int32_t * n_cells,
                     int32_t * n_seq_cells,
                    uint64_t * cell_bytes,
                     int32_t * n_window);

// Per-layer budgets currently in force for seq_id.
//   counts_out : [n_layer]; counts_out[l] = slots layer l owns, or -1 when layer l sees
//                every cell of the sequence (no compaction, or uniform budgets); always 0 for
//                a layer the compacted cache does not hold (iSWA sliding-window layers)
//   slot_of_cell_out : optional [capacity]; for the sequence's cells in ascending cell order
//                (as llama_kvcompose_seq_cells lists them), the slot index j of a cell
//                whose ownership is restricted or, in a per-layer layout
//                (llama-kvcompose-layout.h), of every composite slot; else -1
// A saved state records both; llama_kvcompose_seq_set_layer_counts restores them.
LLAMA_API int32_t llama_kvcompose_seq_layer_counts(
        struct llama_context * ctx,
                llama_seq_id   seq_id,
                     int32_t   n_layer,
                     int32_t * counts_out,
                     int32_t   capacity,
                     int32_t * slot_of_cell_out);

// Restores per-layer budgets for seq_id after llama_state_seq_set_data, from what
// llama_kvcompose_seq_layer_counts returned when the state was saved.
//   counts       : [n_layer], each in 1 .. n_slots where n_slots = 1 + max slot_of_cell; 0 for
//                  a layer the compacted cache does not hold
//   n_cells      : must equal the number of cells the sequence now holds
//   slot_of_cell : [n_cells] in ascending cell order; -1 or a slot index, each slot once
LLAMA_API int32_t llama_kvcompose_seq_set_layer_counts(
        struct llama_context * ctx,
                llama_seq_id   seq_id,
                     int32_t   n_layer,
               const int32_t * counts,
                     int32_t   n_cells,
               const int32_t * slot_of_cell);

#ifdef __cplusplus
}
#endif
