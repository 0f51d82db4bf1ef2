// kvcompose: physical per-layer KV memory (part of llama-kvcompose.h).
//
// In the stock cache every layer holds one K and one V row per cell. With a per-layer
// layout the cells split in two regions:
//   [0, n_recent)            new tokens; every layer holds these rows, as in the stock cache
//   [n_recent, kv_size)      composite slots: slot j lives in cell n_recent + j, and layer l
//                            holds rows for slots j < caps[l] only
// so layer l allocates n_recent + caps[l] rows instead of kv_size. Compaction
// (llama_kvcompose_compact_seq) then writes slot j to cell n_recent + j, and a layer never
// owns more than caps[l] slots. The layout is fixed when the cache is allocated.
#pragma once

#include "llama.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Registers the layout that the next KV cache created in this process takes
// (llama_init_from_model allocates it). kv_size is the cache's cell count; n_recent becomes
// kv_size - max(caps).
//   n_layer : entries in caps, llama_model_n_layer of the model; 0 with caps NULL clears a
//             registered layout
//   caps    : [n_layer] slots layer l can hold, each a multiple of 256 and at least 256
//             (multiples of 256 keep every layer's K/V view on the fast flash-attention
//             paths of CUDA and Metal); a sliding-window layer of an iSWA model takes none
//             whatever its entry says
// A cache that cannot take it (another layer count, max(caps) >= kv_size, one stream per
// sequence, a sliding-window-only or shared cache) is allocated as usual:
// llama_kvcompose_layout_get then reports n_recent 0. Either way the layout is used once.
LLAMA_API int32_t llama_kvcompose_layout_next(int32_t n_layer, const int32_t * caps);

// The layout of ctx's cache (the base cache of an iSWA memory), read from its tensors.
//   n_recent     : cells that take new tokens; 0 when every layer holds every cell
//   rows_out     : optional [n_layer] rows layer l holds; 0 for a layer this cache does not hold
//   bytes_out    : optional [n_layer] bytes of layer l's K and V tensors
//   buffer_bytes : optional; size of the backend buffers that hold the cache, as allocated
LLAMA_API int32_t llama_kvcompose_layout_get(
        struct llama_context * ctx,
                     int32_t   n_layer,
                     int32_t * n_recent,
                     int32_t * rows_out,
                    uint64_t * bytes_out,
                    uint64_t * buffer_bytes);

// Where the next llama_state_seq_set_data into seq_id puts the sequence's cells, for a cache
// with a per-layer layout: cell i of the saved sequence (in the saved cell order) goes to
// n_recent + slot_of_cell[i] when slot_of_cell[i] >= 0, else to a free cell below n_recent.
// Without a plan the restore places every cell below n_recent. The plan is used once; a
// restore that llama.cpp refuses before reading the cells leaves it pending, and n_cells 0
// drops it.
//   n_cells      : the saved sequence's cell count (0: drop the pending plan)
//   slot_of_cell : [n_cells] composite slot of each cell, -1 for a cell that is none
//                  (llama_kvcompose_seq_layer_counts reports it before saving)
LLAMA_API int32_t llama_kvcompose_layout_restore_plan(
        struct llama_context * ctx,
                llama_seq_id   seq_id,
                     int32_t   n_cells,
               const int32_t * slot_of_cell);

#ifdef __cplusplus
}
#endif
