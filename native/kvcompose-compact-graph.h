// kvcompose: hooks of the attention graph for per-layer budgets (internal, C++).
//
// After a compaction with unequal per-layer counts, layer l must not see the composite
// slots it does not own. Those cells get -inf in a small per-layer bias [n_kv, 1, 1, n_stream]
// that is added to the shared KQ mask. Layers that see every cell get no bias and no op,
// so uniform budgets cost nothing.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <vector>

class llama_kv_cache_context;

// one entry per model layer: a new graph input for each layer that must mask some cell,
// nullptr for the others; empty when no layer needs one
std::vector<ggml_tensor *> llama_kvcompose_build_layer_bias(
        ggml_context * ctx, const llama_kv_cache_context * mctx, const ggml_tensor * kq_mask);

// fills the allocated bias inputs for the current ubatch
void llama_kvcompose_set_layer_bias(const llama_kv_cache_context * mctx, const std::vector<ggml_tensor *> & bias);

// a graph built with `bias` is reusable only if the same layers still need a bias
bool llama_kvcompose_can_reuse_layer_bias(const llama_kv_cache_context * mctx, const std::vector<ggml_tensor *> & bias);

// the mask layer il attends with: kq_mask itself, or kq_mask + bias[il]; in a per-layer
// layout only its first columns, the cells the layer holds rows for
ggml_tensor * llama_kvcompose_layer_mask(ggml_context * ctx, const llama_kv_cache_context * mctx,
        ggml_tensor * kq_mask, const std::vector<ggml_tensor *> & bias, int32_t il);
