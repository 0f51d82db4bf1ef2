// kvcompose: hooks of llama_kv_cache for the per-layer layout (internal, C++).
//
// llama-kvcompose-layout.h describes the layout. llama_kv_cache calls these where it would
// otherwise assume that every layer holds a row for every cell: allocation, state I/O and
// a failed restore's clean-up, the restore's cell placement, and the transposed-V store.
// Without a layout each hook does exactly what the stock code did.
#pragma once

#include "llama-kv-cache.h"

#include <cstdint>
#include <vector>

class llama_io_read_i;
class llama_io_write_i;

struct llama_kvcompose_layout {
    uint32_t n_recent = 0;      // 0: no layout, every layer holds kv_size rows
    std::vector<uint32_t> rows; // per model layer
};

// takes the layout registered with llama_kvcompose_layout_next, if this cache can hold it
llama_kvcompose_layout llama_kvcompose_take_layout(
        const llama_model & model, uint32_t kv_size, uint32_t n_stream, llama_swa_type swa_type, bool shares_cells);

// State I/O of cells [first, first + n) of a layer tensor whose cell c starts at byte
// base + c*cell_bytes. Cells the layer holds no row for are written as zeros, so a saved
// sequence has the stock format, and skipped when read.
void llama_kvcompose_write_cells(llama_io_write_i & io, ggml_tensor * t, size_t base, uint32_t first, uint32_t n, size_t cell_bytes);
void llama_kvcompose_read_cells (llama_io_read_i  & io,       ggml_tensor * t, size_t base, uint32_t first, uint32_t n, size_t cell_bytes);

// zeroes the rows of a failed restore that the layers hold; false without a layout
bool llama_kvcompose_clear_cells(const llama_kv_cache & kv, uint32_t strm, const llama_kv_cache::slot_info & sinfo);

// the cells of a single-sequence restore from the plan registered for it; sinfo stays empty
// when there is none. false: a plan exists and does not fit (the restore fails)
bool llama_kvcompose_restore_slot(const llama_kv_cache & kv, uint32_t strm, llama_seq_id seq_id, uint32_t cell_count,
        llama_kv_cache::slot_info & sinfo);

// stores v_cur [n_embd_v, n_tokens] into the transposed V of a layer holding v->ne[1] rows;
// the first n_tokens entries of v_idxs are the destination cells
ggml_tensor * llama_kvcompose_store_v_trans(ggml_context * ctx, ggml_tensor * v, ggml_tensor * v_cur, ggml_tensor * v_idxs);
