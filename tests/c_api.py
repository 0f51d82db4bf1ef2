"""A model + context driven through llama-cpp-python's low-level C API, shared by the native tests.

Import only after `pytest.importorskip("llama_cpp")`.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
from placement import n_gpu_layers as default_gpu_layers


class Session:
    """One model and one context; one llama_decode per `decode` call.

    n_ubatch defaults to n_ctx; n_batch is max(n_ctx, n_ubatch). n_gpu_layers of None takes
    `placement.n_gpu_layers()`. type_k / type_v of None keep
    llama.cpp's default (f16). cb_eval is an optional ggml_backend_sched_eval_callback.
    """

    def __init__(
        self,
        model_path,
        *,
        n_ctx=256,
        n_ubatch=None,
        flash_attn=False,
        type_k=None,
        type_v=None,
        n_seq_max=1,
        kv_unified=True,
        n_threads=1,
        cb_eval=None,
        n_gpu_layers=None,
    ):
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mp)
        assert self.model
        n_ubatch = n_ctx if n_ubatch is None else n_ubatch
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = max(n_ctx, n_ubatch)
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = n_seq_max
        cp.kv_unified = kv_unified
        # one thread by default: on a shared, loaded CI core ggml's spinning workers / OpenMP barriers stall
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if type_k is not None:
            cp.type_k = type_k
        if type_v is not None:
            cp.type_v = type_v
        self._cb_eval = cb_eval  # keep the ctypes callback alive as long as the context
        if cb_eval is not None:
            cp.cb_eval = cb_eval
            cp.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        assert self.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_head = llama_cpp.llama_model_n_head(self.model)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(self.model)

    def decode(self, tokens, positions, seq_ids=None) -> np.ndarray:
        """Decode tokens[i] at positions[i] in sequence seq_ids[i] (default 0); returns the last token's logits."""
        n = len(tokens)
        seq_ids = [0] * n if seq_ids is None else list(seq_ids)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i in range(n):
                batch.token[i] = int(tokens[i])
                batch.pos[i] = int(positions[i])
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = int(seq_ids[i])
                batch.logits[i] = i == n - 1
            batch.n_tokens = n
            assert llama_cpp.llama_decode(self.ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def blob(self, seq_id=0) -> bytes:
        """The sequence's state as llama_state_seq_get_data writes it."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq_id) == size
        return bytes(buf)

    def set_blob(self, data: bytes, seq_id=0) -> None:
        src = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        assert llama_cpp.llama_state_seq_set_data(self.ctx, src, len(data), seq_id) == len(data)

    def n_reused(self) -> int:
        """How many decodes so far reused the previous graph."""
        return llama_cpp.llama_perf_context(self.ctx).n_reused

    def close(self):
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
