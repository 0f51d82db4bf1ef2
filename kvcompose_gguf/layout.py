"""Physical per-layer KV memory: each layer allocates only the slots it is expected to keep.

In llama.cpp's cache every layer holds one K and one V row per cell. KVCompose gives each
layer its own budget, so a shared pool frees only the cells that no layer keeps, which is
almost none when one layer keeps nearly everything (docs/RESULTS.md). With a per-layer
layout (native/llama-kvcompose-layout.h) the cells split in two regions:

    cells [0, n_recent)           new tokens; every layer holds these rows
    cells n_recent + j            composite slot j; layer l holds it only for j < caps[l]

Layer l allocates n_recent + caps[l] rows. The capacities are fixed when the context is
created; they come from the model's layer profile (`profiles`, `kvcompose calibrate`),
scaled to the memory the user grants (`kv_memory`):

    plan, pool = plan_for_model(model_path, n_ctx=4096, kv_memory=0.6, kv_budget=0.5)
    with registered(plan.caps):
        ctx = ...                       # the next context takes the layout
    layout = Layout.read(ctx_pointer)   # as allocated, from the tensors and buffers
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import native, profiles

logger = logging.getLogger("kvcompose_gguf")

ALIGN = 256  # cells; keeps every layer's K/V view on CUDA's and Metal's fast flash-attention paths


@dataclass(frozen=True)
class Layout:
    """A context's KV layout as allocated. Without a per-layer layout n_recent is 0 and
    every held layer has n_cells rows."""

    n_cells: int
    n_recent: int
    rows: np.ndarray         # int [n_layer]: rows layer l holds; 0 for a layer in another cache
    layer_bytes: np.ndarray  # int [n_layer]: bytes of layer l's K and V tensors
    buffer_bytes: int        # the backend buffers holding this cache, as allocated

    @classmethod
    def read(cls, ctx: Any) -> "Layout":
        """The layout of a llama_context (pointer) as allocated."""
        import llama_cpp

        lib = native.load()
        n_layer = int(llama_cpp.llama_model_n_layer(llama_cpp.llama_get_model(ctx)))
        n_cells = int(llama_cpp.llama_n_ctx(ctx))
        n_recent = ctypes.c_int32(0)
        rows = np.zeros(n_layer, dtype=np.int32)
        layer_bytes = np.zeros(n_layer, dtype=np.uint64)
        buffer_bytes = ctypes.c_uint64(0)
        status = lib.llama_kvcompose_layout_get(
            ctx, n_layer, ctypes.byref(n_recent), rows.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            layer_bytes.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64)), ctypes.byref(buffer_bytes),
        )
        native.check("llama_kvcompose_layout_get", status)
        return cls(n_cells, int(n_recent.value), rows, layer_bytes.astype(np.int64), int(buffer_bytes.value))

    @property
    def per_layer(self) -> bool:
        return self.n_recent > 0

    @property
    def held(self) -> np.ndarray:
        return self.rows > 0

    @property
    def caps(self) -> np.ndarray:
        """Composite slots each layer can hold (n_cells for every held layer of a shared pool)."""
        start = self.n_recent if self.per_layer else 0
        return np.where(self.held, self.rows - start, 0).astype(np.int64)

    @property
    def row_bytes(self) -> np.ndarray:
        """K+V bytes of one row of each layer (0 for a layer in another cache)."""
        return np.where(self.held, self.layer_bytes // np.maximum(self.rows, 1), 0)

    @property
    def allocated_bytes(self) -> int:
        """Sum of the layers' K/V tensors; `buffer_bytes` adds the buffers' alignment."""
        return int(self.layer_bytes.sum())

    def full_cache_bytes(self, n_cells: int | None = None) -> int:
        """What a stock cache with a row per cell in every layer would take."""
        return int(self.row_bytes.sum()) * (self.n_cells if n_cells is None else n_cells)

    def cells_bytes(self, cells: np.ndarray) -> int:
        """Bytes the given cells take over the layers that hold a row for them."""
        cells = np.asarray(cells, dtype=np.int64)
        held_per_layer = (cells[None, :] < self.rows[:, None]).sum(axis=1)
        return int((held_per_layer * self.row_bytes).sum())


@dataclass(frozen=True)
class LayoutPlan:
    n_cells: int
    n_recent: int
    caps: np.ndarray         # int [n_layer]
    memory_fraction: float   # planned bytes / a full cache of n_cells

    def describe(self) -> str:
        return (f"{self.n_recent} cells for new tokens, {int(self.caps.min())}..{int(self.caps.max())} composite "
                f"slots per layer: {self.memory_fraction:.3f} of a full {self.n_cells}-cell cache")


def plan_layout(
    memory_fraction: float,
    n_cells: int,
    shape: Sequence[float],
    row_bytes: Sequence[int] | None = None,
    min_recent: int = ALIGN,
) -> LayoutPlan:
    """Capacities that fit `memory_fraction` of a full cache of n_cells cells.

    shape[l]: how much layer l keeps relative to the others (a profile's keep fractions);
    cap_l follows shape[l] / max(shape) of the compressed region, whose size is the
    smallest multiple of ALIGN that meets the memory; the rest of the cells take new
    tokens. Caps are multiples of ALIGN, at least ALIGN; what rounding leaves of the memory
    then raises the caps furthest below their share, ALIGN at a time. ValueError when even
    the fewest recent cells cannot meet the memory with this shape.
    """
    shape = np.asarray(shape, dtype=np.float64)
    n_layer = len(shape)
    if n_layer == 0 or not np.all(np.isfinite(shape)) or shape.max() <= 0 or shape.min() < 0:
        raise ValueError("the layer shape must be finite, non-negative and not all zero")
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"memory fraction must lie in (0, 1], got {memory_fraction}")
    if n_cells % ALIGN or n_cells < min_recent + ALIGN:
        raise ValueError(f"n_cells must be a multiple of {ALIGN} and at least {min_recent + ALIGN}, got {n_cells}")
    weights = np.ones(n_layer) if row_bytes is None else np.asarray(row_bytes, dtype=np.float64)
    relative = shape / shape.max()
    full = float(weights.sum()) * n_cells
    for compressed in range(ALIGN, n_cells - min_recent + 1, ALIGN):
        caps = np.clip(np.ceil(compressed * relative / ALIGN) * ALIGN, ALIGN, compressed).astype(np.int64)
        recent = n_cells - compressed
        used = float((weights * (recent + caps)).sum()) / full
        if used <= memory_fraction + 1e-12:
            caps = _fill(caps, compressed * relative, weights, (memory_fraction - used) * full)
            return LayoutPlan(n_cells, recent, caps, float((weights * (recent + caps)).sum()) / full)
    smallest = float((weights * (min_recent + np.clip(np.ceil((n_cells - min_recent) * relative / ALIGN) * ALIGN,
                                                          ALIGN, n_cells - min_recent))).sum()) / full
    raise ValueError(
        f"kv_memory={memory_fraction:g} of a full cache is below what this layer profile allows at n_ctx={n_cells} "
        f"(at least {smallest:.3f}, with {min_recent} cells for new tokens): raise kv_memory or lower n_ctx"
    )


def _fill(caps: np.ndarray, share: np.ndarray, weights: np.ndarray, spare: float) -> np.ndarray:
    """caps raised ALIGN at a time, the one furthest below its share first, within `spare`
    bytes (weights: bytes per row) and the largest cap."""
    caps = caps.copy()
    top = caps.max()
    while True:
        room = (caps + ALIGN <= top) & (weights * ALIGN <= spare) & (weights > 0)
        if not room.any():
            return caps
        l = int(np.argmax(np.where(room, share - caps, -np.inf)))
        caps[l] += ALIGN
        spare -= weights[l] * ALIGN


def plan_for_model(model_path, n_ctx: int, kv_memory: float | int, kv_budget: float | int,
                   type_k: int | None = None, type_v: int | None = None) -> tuple[LayoutPlan | None, int]:
    """(plan, cells) for `kv_memory` (a fraction in (0, 1) of a full cache of n_ctx cells, or
    bytes) on this model file: the plan from its profile, or, with no profile, no plan and the
    cells of a shared pool of those bytes (with a warning naming `kvcompose calibrate`).

    The profile measured nearest kv_budget (0.5 for a cell count) whose shape reaches the
    memory: a smaller budget's allocation is more skewed, so it reaches less memory.
    """
    if isinstance(kv_memory, bool) or not isinstance(kv_memory, (int, float)):
        raise TypeError(f"kv_memory must be a fraction in (0, 1) or an int number of bytes, got {kv_memory!r}")
    cells = cache_cells(n_ctx)
    row_bytes = model_row_bytes(model_path, type_k, type_v)
    found = {b: p for b, p in (profiles.load(model_path) or {}).items() if len(p.keep_fractions) == len(row_bytes)}
    if found:
        # 0: a sliding-window layer, whose K/V live in another cache
        compressed = np.asarray(next(iter(found.values())).keep_fractions) > 0
        row_bytes = np.where(compressed, row_bytes, 0)
    full = int(row_bytes.sum()) * cells
    fraction = float(kv_memory) if isinstance(kv_memory, float) else kv_memory / full
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"kv_memory={kv_memory!r} is {fraction:.3f} of a full cache of n_ctx={cells} cells ({full} bytes): "
            "give a fraction in (0, 1) or fewer bytes (or leave kv_memory out for the full cache)"
        )
    if not found:
        pool = max(ALIGN, int(fraction * cells) // ALIGN * ALIGN)
        logger.warning(
            "no layer profile for %s: every layer gets the same share, so kv_memory=%s means a shared pool of "
            "%d cells instead of %d (run `kvcompose calibrate %s` to let the layers differ)",
            model_path, kv_memory, pool, cells, model_path,
        )
        return None, pool
    target = kv_budget if isinstance(kv_budget, float) else 0.5
    refusal = None
    for budget in sorted(found, key=lambda b: (abs(b - target), b)):
        try:
            plan = plan_layout(fraction, cells, found[budget].keep_fractions, row_bytes)
        except ValueError as exc:
            refusal = refusal or exc
            continue
        logger.info("per-layer KV memory from the kv_budget %s profile: %s", budget, plan.describe())
        return plan, cells
    raise refusal


def register(caps: Sequence[int]) -> None:
    """The next KV cache created in this process takes these per-layer capacities."""
    caps = np.ascontiguousarray(caps, dtype=np.int32)
    status = native.load().llama_kvcompose_layout_next(len(caps), caps.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
    native.check("llama_kvcompose_layout_next", status, f"caps must be multiples of {ALIGN}, at least {ALIGN}")


def clear() -> None:
    native.check("llama_kvcompose_layout_next", native.load().llama_kvcompose_layout_next(0, None))


@contextlib.contextmanager
def registered(caps: Sequence[int]) -> Iterator[None]:
    """Register `caps` for the context created inside the block; never leaks past it."""
    register(caps)
    try:
        yield
    finally:
        clear()


def cache_cells(n_ctx: int) -> int:
    """The cells llama.cpp allocates for one unified sequence of n_ctx tokens."""
    return math.ceil(n_ctx / ALIGN) * ALIGN


def model_row_bytes(model_path: str | Path, type_k: int | None = None, type_v: int | None = None) -> np.ndarray:
    """K+V bytes of one cell in each layer, from the GGUF header (before any context exists).

    type_k / type_v are ggml type ids (llama.cpp's default, f16, when None).
    """
    import gguf

    reader = gguf.GGUFReader(str(model_path))

    def value(key: str, default=None):
        field = reader.fields.get(key)
        if field is None:
            return default
        parts = [field.parts[i] for i in field.data]
        return [int(p[0]) for p in parts] if len(parts) > 1 else int(parts[0][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_layer = value(f"{arch}.block_count")
    n_embd = value(f"{arch}.embedding_length")
    n_head = value(f"{arch}.attention.head_count")
    n_head = n_head[0] if isinstance(n_head, list) else n_head
    n_head_kv = value(f"{arch}.attention.head_count_kv", n_head)
    heads = np.broadcast_to(np.asarray(n_head_kv, dtype=np.int64), (n_layer,))
    dim_k = value(f"{arch}.attention.key_length", n_embd // n_head)
    dim_v = value(f"{arch}.attention.value_length", dim_k)

    def row(type_id: int | None, elements: np.ndarray) -> np.ndarray:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(1 if type_id is None else type_id)]
        return elements // block * size

    return row(type_k, heads * dim_k) + row(type_v, heads * dim_v)
