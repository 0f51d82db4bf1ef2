"""Which models and contexts compression supports, decided before any work is done.

Compression moves K/V rows between cells and lets a cell's position stand for tokens
of several positions. That is exact for a plain attention KV cache under RoPE (the
rotation is applied before a row is stored, so a moved row keeps its meaning), and
wrong or impossible elsewhere:

- recurrent memories (Mamba, RWKV) hold a state, not one row per token;
- hybrid memories mix such a state with a KV cache;
- MLA (DeepSeek-2/3 style) caches a shared latent, not per-head K and V;
- ALiBi (and other models without RoPE) reads the distance between cell positions at
  every step, so a composite cell's single position would bias every head wrongly;
- M-RoPE gives a cell several position components that a compaction cannot merge;
- encoder-decoder and non-causal models decode differently;
- a context whose cache is shared by several sequences (embedding contexts) would
  have one sequence's compaction judged by another's attention.

`check_model` answers from the model's metadata; `check_context` asks the native side
too, which refuses with ERR_UNSUPPORTED any memory it does not handle.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

from . import native


class UnsupportedModelError(NotImplementedError):
    """Compression cannot run exactly on this model or context; `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"kv_compress does not support this model: {reason}. "
                         "Use kv_compress=None (stock llama.cpp) for it.")


_ROPE_MULTI = {
    llama_cpp.LLAMA_ROPE_TYPE_MROPE: "M-RoPE",
    llama_cpp.LLAMA_ROPE_TYPE_IMROPE: "interleaved M-RoPE",
    llama_cpp.LLAMA_ROPE_TYPE_VISION: "vision RoPE",
}


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else None


def check_model(model) -> None:
    """Raise UnsupportedModelError unless `model` (a llama_model pointer) is a decoder-only
    attention model with plain per-head K/V under standard RoPE."""
    arch = _meta(model, "general.architecture") or "?"
    if llama_cpp.llama_model_is_recurrent(model):
        raise UnsupportedModelError(f"{arch} has a recurrent memory (a state, not a KV cache of tokens)")
    if llama_cpp.llama_model_is_hybrid(model):
        raise UnsupportedModelError(f"{arch} has a hybrid memory (recurrent layers next to the KV cache)")
    if llama_cpp.llama_model_has_encoder(model):
        raise UnsupportedModelError(f"{arch} is an encoder-decoder model")
    if llama_cpp.llama_model_is_diffusion(model):
        raise UnsupportedModelError(f"{arch} is a diffusion (non-causal) model")
    if _meta(model, f"{arch}.attention.kv_lora_rank") is not None:
        raise UnsupportedModelError(f"{arch} uses multi-head latent attention (MLA): its cache holds a shared "
                                    "latent, not per-head K and V rows")
    rope = int(llama_cpp.llama_model_rope_type(model))
    if rope in _ROPE_MULTI:
        raise UnsupportedModelError(f"{arch} uses {_ROPE_MULTI[rope]}: a cell has several position components")
    if rope == llama_cpp.LLAMA_ROPE_TYPE_NONE:
        alibi = arch in ("bloom", "mpt", "jais", "refact") or _meta(model, f"{arch}.attention.max_alibi_bias")
        raise UnsupportedModelError(
            f"{arch} uses ALiBi, which biases attention by the distance between cell positions"
            if alibi else f"{arch} does not use RoPE"
        )


def check_context(ctx: Any, seq_id: int = 0) -> None:
    """Raise UnsupportedModelError when the context's memory is one compression cannot handle.

    ctx: a llama_cpp.Llama. Its cache must serve one sequence, and the native side must
    accept it (ERR_UNSUPPORTED names memories it refuses, e.g. cells with extra position data).
    """
    n_seq_max = int(ctx.context_params.n_seq_max)
    if n_seq_max > 1:
        raise UnsupportedModelError(
            f"the context's cache is shared by {n_seq_max} sequences (embedding=True sets this); "
            "compression needs a cache for one sequence"
        )
    from .compactor import Compactor

    try:
        Compactor(ctx).seq_cells(seq_id)
    except native.NativeError as exc:
        if exc.status != native.ERR_UNSUPPORTED:
            raise
        raise UnsupportedModelError(f"the native compaction refuses this memory ({exc})") from exc


def check_fits(window: int, kv_budget: float | int, n_ctx: int, probe_cells: int | None = None) -> None:
    """Raise ValueError when the settings leave compression no room in n_ctx cells.

    Before each chunk the observing queries (`probe_cells`: the window, twice that with
    lookahead) are decoded after the history, so at most n_ctx minus those cells can ever
    hold history; queries taking half the cells or more would compress the whole history
    to a handful of cells for every few tokens. An int budget must also be a count the
    history can exceed.
    """
    probe_cells = window if probe_cells is None else probe_cells
    if probe_cells > n_ctx // 2:
        with_lookahead = f" ({probe_cells} observing queries with lookahead)" if probe_cells != window else ""
        raise ValueError(f"kv_window={window}{with_lookahead} leaves too little of n_ctx={n_ctx} for the history: "
                         f"use kv_window <= {n_ctx // 2 * window // probe_cells} or a larger n_ctx")
    if isinstance(kv_budget, int) and kv_budget >= n_ctx - probe_cells:
        raise ValueError(f"kv_budget={kv_budget} cells: at most {n_ctx - probe_cells - 1} cells can be kept in "
                         f"n_ctx={n_ctx} beside the {probe_cells} observing queries")
