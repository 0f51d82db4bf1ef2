"""Attention statistics gathered inside llama_decode, as numpy arrays indexed by cell.

The patched libllama adds a few ops to the decode graph (flash attention on or
off): the observing queries times the cached K, with the attention's own mask,
scale, softcap, ALiBi and sinks, a softmax and a reduction over the observing
queries on the device. The host accumulates over any number of llama_decode
calls and micro-batches; see native/README.md, "Attention statistics".

Everything here is indexed by **cell** (a slot of the KV cache), never by
position. `cell_positions` gives the llama.cpp position each cell holds, and
`AttentionObserver.observation()` pairs scores with a per-layer/per-head table
of original positions, the form the policies read.

    observer = AttentionObserver(llm, n_last=64)
    with observer:                 # begin ... end
        llm.eval(tokens)           # any number of decode calls accumulate
        obs = observer.observation()

`ScoreMemory` carries scores from one observation to the next, keyed by original
position, for caches that are compressed again and again (`kv_observe="reread"`).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from . import native

QUERY_REDUCTIONS = tuple(native.STATS_QUERY_REDUCE)
HEAD_REDUCTIONS = tuple(native.STATS_HEAD_REDUCE)


def context_pointer(ctx: Any) -> int:
    """The llama_context pointer of a `llama_cpp.Llama`, a `_internals.LlamaContext` or a raw pointer."""
    inner = getattr(ctx, "_ctx", None)  # llama_cpp.Llama
    if inner is not None:
        ctx = inner
    inner = getattr(ctx, "ctx", None)  # llama_cpp._internals.LlamaContext
    if inner is not None:
        ctx = inner
    if isinstance(ctx, ctypes.c_void_p):
        ctx = ctx.value
    if not isinstance(ctx, int) or not ctx:
        raise TypeError(f"expected a llama_cpp.Llama or a llama_context pointer, got {type(ctx).__name__}")
    return ctx


def cell_positions(ctx: Any, seq_id: int = 0) -> np.ndarray:
    """int32 [n_cells]: the position each cell of seq_id's stream holds, -1 where empty or another sequence's."""
    lib = native.load()
    ptr = context_pointer(ctx)
    n_cells = _cache_cells(lib, ptr, seq_id)
    out = np.empty(n_cells, dtype=np.int32)
    status = lib.llama_kvcompose_stats_cell_positions(
        ptr, seq_id, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n_cells
    )
    native.check("llama_kvcompose_stats_cell_positions", status, f"seq_id={seq_id}")
    return out


def _cache_cells(lib: Any, ptr: int, seq_id: int) -> int:
    n_cells = ctypes.c_int32()
    status = lib.llama_kvcompose_stats_n_cells(ptr, seq_id, ctypes.byref(n_cells))
    native.check("llama_kvcompose_stats_n_cells", status, f"seq_id={seq_id}")
    return n_cells.value


def broadcast_positions(cell_pos: np.ndarray, n_layer: int, n_head_kv: int) -> np.ndarray:
    """The position table of an uncompacted cache: each cell's position for every layer and KV head."""
    return np.ascontiguousarray(np.broadcast_to(cell_pos.astype(np.int32), (n_layer, n_head_kv, cell_pos.shape[0])))


class AttentionObserver:
    """Switches observation on for one context and reads the accumulated statistics.

    seq_id: the observing sequence; its queries see only its own cells.
    n_last: observing queries are the last n_last tokens of seq_id in every
        llama_decode batch; None: every token of seq_id in the batch.
    query_reduce: "max" (reference default), "mean" or "sum" over observing queries.
    head_reduce: "mean" (default) or "max" over the query heads of a GQA group.
    """

    def __init__(
        self,
        ctx: Any,
        *,
        seq_id: int = 0,
        n_last: int | None = None,
        query_reduce: str = "max",
        head_reduce: str = "mean",
    ):
        if query_reduce not in native.STATS_QUERY_REDUCE:
            raise ValueError(f"query_reduce must be one of {QUERY_REDUCTIONS}, got {query_reduce!r}")
        if head_reduce not in native.STATS_HEAD_REDUCE:
            raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
        if n_last is not None and (not isinstance(n_last, int) or n_last < 1):
            raise ValueError(f"n_last must be None (whole batch) or an int >= 1, got {n_last!r}")
        if not isinstance(seq_id, int) or seq_id < 0:
            raise ValueError(f"seq_id must be an int >= 0, got {seq_id!r}")
        self._owner = ctx  # keeps a Llama alive while we hold its pointer
        self._ptr = context_pointer(ctx)
        self.seq_id = seq_id
        self.n_last = n_last
        self.query_reduce = query_reduce
        self.head_reduce = head_reduce
        self._lib = native.load()
        self._begun = False

    # -- life cycle -------------------------------------------------------------

    def begin(self) -> "AttentionObserver":
        """Clear the accumulators and switch observation on."""
        params = native.StatsParams(
            seq_id=self.seq_id,
            n_last=-1 if self.n_last is None else self.n_last,
            query_reduce=native.STATS_QUERY_REDUCE[self.query_reduce],
            head_reduce=native.STATS_HEAD_REDUCE[self.head_reduce],
        )
        status = self._lib.llama_kvcompose_stats_begin(self._ptr, ctypes.byref(params))
        native.check("llama_kvcompose_stats_begin", status, f"seq_id={self.seq_id}")
        self._begun = True
        return self

    def pause(self) -> None:
        """Observation off (the decode graph is the stock graph); results kept."""
        native.check("llama_kvcompose_stats_set_enabled", self._lib.llama_kvcompose_stats_set_enabled(self._ptr, False))

    def resume(self) -> None:
        native.check("llama_kvcompose_stats_set_enabled", self._lib.llama_kvcompose_stats_set_enabled(self._ptr, True))

    def reset(self) -> None:
        """Clear the accumulators, keep observing."""
        native.check("llama_kvcompose_stats_reset", self._lib.llama_kvcompose_stats_reset(self._ptr))

    def end(self) -> None:
        """Observation off, results freed."""
        if self._begun:
            native.check("llama_kvcompose_stats_end", self._lib.llama_kvcompose_stats_end(self._ptr))
            self._begun = False

    def __enter__(self) -> "AttentionObserver":
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.end()

    # -- results ----------------------------------------------------------------

    def shape(self) -> tuple[int, int, int]:
        """(n_layer, n_head_kv, n_cells) of the scores."""
        n_layer, n_head_kv, n_cells = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
        status = self._lib.llama_kvcompose_stats_shape(
            self._ptr, ctypes.byref(n_layer), ctypes.byref(n_head_kv), ctypes.byref(n_cells)
        )
        native.check("llama_kvcompose_stats_shape", status)
        return n_layer.value, n_head_kv.value, n_cells.value

    @property
    def n_queries(self) -> int:
        """Observing queries accumulated since begin/reset."""
        n = ctypes.c_int64()
        native.check("llama_kvcompose_stats_n_queries", self._lib.llama_kvcompose_stats_n_queries(self._ptr, ctypes.byref(n)))
        return n.value

    def layers_observed(self) -> np.ndarray:
        """bool [n_layer]: which layers have statistics (sliding-window layers have none)."""
        n_layer = self.shape()[0]
        out = np.zeros(n_layer, dtype=np.uint8)
        status = self._lib.llama_kvcompose_stats_layers(
            self._ptr, out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), n_layer
        )
        native.check("llama_kvcompose_stats_layers", status)
        return out.astype(bool)

    def scores(self) -> np.ndarray:
        """float32 [n_layer, n_head_kv, n_cells]: reduced attention per cell; 0 where nothing observed."""
        shape = self.shape()
        out = np.zeros(shape, dtype=np.float32)
        status = self._lib.llama_kvcompose_stats_get_all(
            self._ptr, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size
        )
        native.check("llama_kvcompose_stats_get_all", status)
        return out

    def cell_positions(self) -> np.ndarray:
        """int32 [n_cells]: the llama.cpp position held by each cell of the observed sequence, -1 if none."""
        return cell_positions(self._ptr, self.seq_id)

    def observation(self, positions: np.ndarray | None = None, value_norms: np.ndarray | None = None):
        """A `policies.base.Observation` of the current scores.

        positions: int32 [n_layer, n_head_kv, n_cells], the original position
            of what each cell holds per layer and head (the compactor's table
            once a cache has been compacted). None: the uncompacted table, each
            cell's own position broadcast over layers and heads.
        """
        scores = self.scores()
        if positions is None:
            positions = broadcast_positions(self.cell_positions(), scores.shape[0], scores.shape[1])
        else:
            positions = np.asarray(positions)
            if positions.shape != scores.shape:
                raise ValueError(f"positions must have shape {scores.shape}, got {positions.shape}")
            positions = positions.astype(np.int32, copy=False)
        return _make_observation(scores, positions, value_norms)


def layers_only(observation, layers: np.ndarray):
    """The observation of the layers in `layers` (bool [n_layer]) only, e.g. `Compactor.layers`.

    An iSWA model's sliding-window layers have no statistics (their cells are in another
    cache) and are never compacted; a policy that saw them would spend budget on them.
    Unchanged when every layer is in `layers`.
    """
    layers = np.asarray(layers, dtype=bool)
    if layers.all():
        return observation
    norms = observation.value_norms
    return _make_observation(
        np.ascontiguousarray(observation.scores[layers]),
        np.ascontiguousarray(observation.positions[layers]),
        None if norms is None else np.ascontiguousarray(np.asarray(norms)[layers]),
    )


def _make_observation(scores: np.ndarray, positions: np.ndarray, value_norms: np.ndarray | None):
    try:
        from .policies.base import Observation
    except ImportError:  # policies not present in this checkout: a duck-typed stand-in
        from types import SimpleNamespace

        return SimpleNamespace(scores=scores, positions=positions, value_norms=value_norms)
    return Observation(scores=scores, positions=positions, value_norms=value_norms)


class ScoreMemory:
    """The best score each (layer, KV head, original position) got over successive observations.

    One observation scores the cached tokens by what its queries attend to. In a chat that
    is compressed again and again, a fact that later turns never attend to is scored low by
    every later observation and dropped, however important it looked when it arrived. The
    memory keeps, for every entry still cached, the maximum over all observations since it
    arrived, and first spreads each observation's scores over the entry's neighbours within
    `span` original positions (a max over that window, per layer and head): a number's digits,
    a name's pieces are kept or dropped together, as the token that drew the attention.

    Entries are keyed by original position, which compaction and position rebasing keep;
    entries no longer cached are forgotten at the next `merge`.
    """

    def __init__(self, span: int = 8):
        if isinstance(span, bool) or not isinstance(span, int) or span < 0:
            raise ValueError(f"span must be an int >= 0, got {span!r}")
        self.span = span
        # keys: (layer * n_head_kv + head) << 32 | position, ascending
        self._keys, self._scores = self.EMPTY_STATE

    # (keys, scores) of a memory that holds nothing: forget(), and states saved without one
    EMPTY_STATE = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))

    def __len__(self) -> int:
        return int(self._keys.size)

    def forget(self) -> None:
        self._keys, self._scores = self.EMPTY_STATE

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores) copies, for saving beside a cache state."""
        return self._keys.copy(), self._scores.copy()

    def restore(self, state: tuple[np.ndarray, np.ndarray]) -> None:
        keys, scores = (np.asarray(a) for a in state)
        if keys.shape != scores.shape or keys.ndim != 1 or (keys.size and (np.diff(keys) <= 0).any()):
            raise ValueError("a score memory state is two equal 1-D arrays with ascending keys")
        self._keys, self._scores = keys.astype(np.int64), scores.astype(np.float32)

    def merge(self, observation):
        """The observation with every entry's remembered maximum; the memory takes the result."""
        positions = observation.positions
        valid = positions >= 0
        spread = spread_by_position(observation.scores, positions, self.span)
        keys = _entry_keys(positions)[valid]
        merged = spread[valid]
        if self._keys.size:
            at = np.clip(np.searchsorted(self._keys, keys), 0, self._keys.size - 1)
            known = self._keys[at] == keys
            merged[known] = np.maximum(merged[known], self._scores[at[known]])
        order = np.argsort(keys, kind="stable")
        self._keys, self._scores = keys[order], merged[order]
        scores = np.zeros(positions.shape, dtype=np.float32)
        scores[valid] = merged
        return _make_observation(scores, positions, observation.value_norms)


def _entry_keys(positions: np.ndarray) -> np.ndarray:
    n_layer, n_head_kv, _ = positions.shape
    rows = np.arange(n_layer * n_head_kv, dtype=np.int64).reshape(n_layer, n_head_kv, 1)
    return (rows << 32) | np.maximum(positions, 0).astype(np.int64)


def spread_by_position(scores: np.ndarray, positions: np.ndarray, span: int) -> np.ndarray:
    """Per layer/head, each held entry's score raised to the maximum over the held entries
    whose original positions lie within `span` of its own (empty cells, -1, take no part)."""
    if span == 0:
        return np.where(positions >= 0, scores, 0).astype(np.float32)
    n_cells = positions.shape[-1]
    flat_pos = positions.reshape(-1, n_cells).astype(np.int64)
    held = flat_pos >= 0
    order = np.argsort(np.where(held, flat_pos, np.iinfo(np.int64).max), axis=-1, kind="stable")
    pos = np.take_along_axis(np.where(held, flat_pos, -(1 << 40)), order, axis=-1)
    val = np.take_along_axis(np.where(held, scores.reshape(-1, n_cells), -np.inf), order, axis=-1)
    best = val.copy()
    # distinct positions per row, so the neighbours within `span` positions are within `span` entries
    for shift in range(1, min(span, n_cells - 1) + 1):
        near = np.abs(pos[:, shift:] - pos[:, :-shift]) <= span
        best[:, shift:] = np.where(near, np.maximum(best[:, shift:], val[:, :-shift]), best[:, shift:])
        best[:, :-shift] = np.where(near, np.maximum(best[:, :-shift], val[:, shift:]), best[:, :-shift])
    out = np.empty_like(best)
    np.put_along_axis(out, order, best, axis=-1)
    return np.where(held, out, 0).reshape(positions.shape).astype(np.float32)
