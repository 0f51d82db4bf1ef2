"""Constructors shared by the `Llama`-level tests: stock and compressing contexts with
one thread unless asked (on a shared 2-core machine more threads only stall each other)
and the layers placed as `placement.n_gpu_layers()` says."""

from __future__ import annotations

import llama_cpp
import numpy as np

from kvcompose_gguf.llama import Llama
from placement import n_gpu_layers


def threads(kwargs: dict) -> dict:
    kwargs.setdefault("n_threads", 1)
    kwargs.setdefault("n_threads_batch", kwargs["n_threads"])
    kwargs.setdefault("n_gpu_layers", n_gpu_layers())
    return kwargs


def stock(path, **kwargs) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), verbose=False, **threads(kwargs))


def compressing(path, **kwargs) -> Llama:
    kwargs.setdefault("kv_compress", "kvcompose")
    return Llama(model_path=str(path), verbose=False, **threads(kwargs))


def last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()
