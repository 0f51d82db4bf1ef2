"""Applying a selection: in-place composite-token compaction of one sequence's KV cells.

The rows move on the device that holds the cache (native/kvcompose-compact.cpp); this
module validates the selection's shapes, calls the native function, keeps the table of
the original position (and token id) each slot holds per layer and KV head, and reports
the memory effect with its three different quantities kept apart.

    compactor = Compactor(ctx)                 # a llama_cpp.Llama or a llama_context pointer
    result = compactor.apply(selection, seq_id=0)
    result.physical_bytes_freed, result.logical_entries_dropped

After compaction a cell's llama.cpp position only orders and masks; statistics and
policies read `compactor.table(seq_id)` for where each slot's rows came from.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import native
from .layout import Layout
from .stats import context_pointer

_P_I32 = ctypes.POINTER(ctypes.c_int32)


def _i32(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_P_I32)


@dataclass(frozen=True)
class CompactionResult:
    """What one compaction did; the three memory figures are different things.

    cells_before / cells_after: cells the sequence occupied before and after.
    physical_bytes_freed: cells that no layer uses any more times the bytes a cell takes
        over all layers (K and V): memory available to new tokens. Negative when the old
        cells are shared with another sequence (seq_cp) and the slots needed free cells.
        With per-layer memory (`Compactor.layout`): the bytes of the sequence's old cells
        minus those of its slot cells, each counted in the layers that hold a row for it.
    logical_entries_dropped: (layer, KV head, token) row pairs no longer attended to,
        summed over layers and heads; per-layer budgets drop entries without freeing cells.
    """

    cells_before: int
    cells_after: int
    physical_bytes_freed: int
    logical_entries_dropped: int
    slot_cells: np.ndarray  # int32 [n_slots]: the cell now holding slot j


@dataclass(frozen=True)
class MoveForms:
    """How one compaction moved its K / V tensors (native/kvcompose-compact.cpp, `move_rows`).

    in_place: tensors gathered straight into the cache in chunks of slots (the fast form,
        chosen for caches in the CPU backend's own memory);
    chunks: the chunks those took;
    direct_chunks: how many of those gathered from the cache itself rather than from a
        staged copy of their source cells;
    through_temporary: tensors gathered into a temporary, then written with set_rows
        (device memory, or destinations that are not consecutive cells);
    staged: how many of those gathered from a staged copy;
    transposed_v: V tensors moved as columns (flash attention off).
    Both forms give the same bytes; only the time differs.
    """

    in_place: int
    chunks: int
    direct_chunks: int
    through_temporary: int
    staged: int
    transposed_v: int


_MOVE_FORMS = re.compile(
    r"(\d+) tensors gathered in place \((\d+) chunks, (\d+) of them direct\), (\d+) through a temporary "
    r"\((\d+) staged\), (\d+) transposed V"
)


@contextlib.contextmanager
def recorded_move_forms() -> Iterator[list[MoveForms]]:
    """The MoveForms of every compaction run inside the block, read from llama.cpp's debug log
    (native.llama_log_to: for benchmarks and tests)."""
    forms: list[MoveForms] = []

    def record(level: int, text: str) -> None:
        match = _MOVE_FORMS.search(text)
        if match:
            forms.append(MoveForms(*map(int, match.groups())))

    with native.llama_log_to(record):
        yield forms


@dataclass
class SlotTable:
    """Per layer and KV head, where each slot's rows came from.

    positions: int32 [n_layer, n_head_kv, n_slots], original position, -1 for slots a layer
        does not own.
    tokens: int32 [n_layer, n_head_kv, n_slots], original token id, -1 where unknown.
    counts: int32 [n_layer], slots owned per layer.
    slot_cells: int32 [n_slots], the cell holding slot j when the table was made.
    """

    positions: np.ndarray
    tokens: np.ndarray
    counts: np.ndarray
    slot_cells: np.ndarray


@dataclass(frozen=True)
class SWACache:
    """The sliding-window cache of an iSWA model (Gemma-2/3, ...), which compaction leaves alone.

    llama.cpp keeps the sliding-window layers' K/V in a cache of their own and reuses its
    cells once they fall out of the window; only the global-attention layers' cache (the
    base cache) is compacted.
    layers: int [n]: the model layers whose K/V live here.
    n_cells: its cells (n_ctx with llama.cpp's default swa_full=True).
    n_seq_cells: the cells the sequence holds in it now.
    cell_bytes: K and V bytes of one of its cells over its layers.
    window: the attention window of those layers, in tokens.
    """

    layers: np.ndarray
    n_cells: int
    n_seq_cells: int
    cell_bytes: int
    window: int

    @property
    def bytes(self) -> int:
        return self.n_cells * self.cell_bytes


@dataclass(frozen=True)
class SeqCells:
    cells: np.ndarray  # int32 [n]: cells of the sequence, ascending
    positions: np.ndarray  # int32 [n]: their llama.cpp positions
    n_kv_used: int  # last used cell of the stream + 1
    n_stream_used: int  # used cells of the stream, any sequence


class Compactor:
    """Compacts sequences of one llama_context in place and remembers their slot tables."""

    def __init__(self, ctx: Any):
        import llama_cpp

        self._lib = native.load()
        self._ctx = context_pointer(ctx)
        model = llama_cpp.llama_get_model(self._ctx)
        if not model:
            raise ValueError("the context has no model")
        self.n_layer = int(llama_cpp.llama_model_n_layer(model))
        self.n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
        self._tables: dict[int, SlotTable] = {}
        self._layers: np.ndarray | None = None
        self._layout: Layout | None = None

    @property
    def layout(self) -> Layout:
        """The cache's layout as allocated (fixed for the context's lifetime): a shared pool,
        or per-layer memory (`kvcompose_gguf.layout`), where slot j lives in cell n_recent + j."""
        if self._layout is None:
            self._layout = Layout.read(self._ctx)
        return self._layout

    @property
    def layers(self) -> np.ndarray:
        """bool [n_layer]: the layers whose K/V the compactor moves. Every layer of a plain
        cache; for an iSWA model only the global-attention layers (the base cache): its
        sliding-window layers keep their own cache (`swa_cache`), never compacted."""
        if self._layers is None:
            out = np.zeros(self.n_layer, dtype=np.uint8)
            status = self._lib.llama_kvcompose_compact_layers(
                self._ctx, out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), self.n_layer
            )
            native.check("llama_kvcompose_compact_layers", status)
            self._layers = out.astype(bool)
        return self._layers

    def swa_cache(self, seq_id: int = 0) -> SWACache | None:
        """The sliding-window cache compaction leaves alone, or None when the model has none."""
        n_cells, n_seq, window = ctypes.c_int32(0), ctypes.c_int32(0), ctypes.c_int32(0)
        cell_bytes = ctypes.c_uint64(0)
        status = self._lib.llama_kvcompose_swa_cache_info(
            self._ctx, seq_id, ctypes.byref(n_cells), ctypes.byref(n_seq), ctypes.byref(cell_bytes), ctypes.byref(window)
        )
        native.check("llama_kvcompose_swa_cache_info", status, f"seq_id={seq_id}")
        if n_cells.value == 0:
            return None
        return SWACache(np.flatnonzero(~self.layers), int(n_cells.value), int(n_seq.value), int(cell_bytes.value),
                        int(window.value))

    # --- queries -----------------------------------------------------------------

    def seq_cells(self, seq_id: int = 0) -> SeqCells:
        n, kv_used, used = ctypes.c_int32(0), ctypes.c_int32(0), ctypes.c_int32(0)
        outs = (ctypes.byref(n), ctypes.byref(kv_used), ctypes.byref(used))
        cells = np.empty(self._seq_counts(seq_id)[0], dtype=np.int32)
        positions = np.empty_like(cells)
        status = self._lib.llama_kvcompose_seq_cells(self._ctx, seq_id, len(cells), _i32(cells), _i32(positions), *outs)
        native.check("llama_kvcompose_seq_cells", status, f"seq_id={seq_id}")
        return SeqCells(cells, positions, int(kv_used.value), int(used.value))

    def _seq_counts(self, seq_id: int) -> tuple[int, int, int]:
        """(cells of the sequence, last used cell of the stream + 1, used cells of the stream)."""
        n, kv_used, used = ctypes.c_int32(0), ctypes.c_int32(0), ctypes.c_int32(0)
        status = self._lib.llama_kvcompose_seq_cells(
            self._ctx, seq_id, 0, None, None, ctypes.byref(n), ctypes.byref(kv_used), ctypes.byref(used)
        )
        native.check("llama_kvcompose_seq_cells", status, f"seq_id={seq_id}")
        return int(n.value), int(kv_used.value), int(used.value)

    def cell_bytes(self) -> int:
        """K and V bytes of one cell over the compacted layers (`layers`)."""
        out = ctypes.c_uint64(0)
        native.check("llama_kvcompose_cell_bytes", self._lib.llama_kvcompose_cell_bytes(self._ctx, ctypes.byref(out)))
        return int(out.value)

    def layer_counts(self, seq_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(counts int32 [n_layer] or -1 where a layer sees every cell (0 for a layer outside
        `layers`), slot of each of the sequence's cells in ascending cell order or -1)."""
        n_cells = self._seq_counts(seq_id)[0]
        counts = np.empty(self.n_layer, dtype=np.int32)
        slot_of_cell = np.empty(n_cells, dtype=np.int32)
        status = self._lib.llama_kvcompose_seq_layer_counts(
            self._ctx, seq_id, self.n_layer, _i32(counts), n_cells, _i32(slot_of_cell)
        )
        native.check("llama_kvcompose_seq_layer_counts", status, f"seq_id={seq_id}")
        return counts, slot_of_cell

    def cells_owned(self, seq_id: int = 0) -> np.ndarray:
        """int [n_layer]: the sequence's cells each layer attends to.

        After a per-layer compaction, layer l owns slots 0..counts[l]-1 and every cell
        filled since (those are not slots and every layer sees them). 0 for a layer outside
        `layers` (an iSWA sliding-window layer attends to its own cache instead).
        """
        counts, slot_of_cell = self.layer_counts(seq_id)
        slots = slot_of_cell[slot_of_cell >= 0]
        plain = len(slot_of_cell) - len(slots)
        owned_slots = (slots[None, :] < counts[:, None]).sum(axis=1)
        owned = np.where(counts >= 0, plain + owned_slots, len(slot_of_cell))
        return np.where(self.layers, owned, 0)

    def set_layer_counts(self, seq_id: int, counts: np.ndarray, slot_of_cell: np.ndarray) -> None:
        counts = np.ascontiguousarray(counts, dtype=np.int32)
        slot_of_cell = np.ascontiguousarray(slot_of_cell, dtype=np.int32)
        if counts.shape != (self.n_layer,):
            raise ValueError(f"counts must be [n_layer={self.n_layer}], got {counts.shape}")
        status = self._lib.llama_kvcompose_seq_set_layer_counts(
            self._ctx, seq_id, self.n_layer, _i32(counts), len(slot_of_cell), _i32(slot_of_cell)
        )
        native.check("llama_kvcompose_seq_set_layer_counts", status, f"seq_id={seq_id}")

    def plan_restore(self, seq_id: int, slot_of_cell: np.ndarray | None) -> None:
        """With per-layer memory: the next llama_state_seq_set_data into seq_id puts cell i of
        the saved sequence in slot slot_of_cell[i]'s own cell (-1: a cell for new tokens).
        None drops a plan that a refused restore left unused."""
        slot_of_cell = np.ascontiguousarray([] if slot_of_cell is None else slot_of_cell, dtype=np.int32)
        status = self._lib.llama_kvcompose_layout_restore_plan(self._ctx, seq_id, len(slot_of_cell), _i32(slot_of_cell))
        native.check("llama_kvcompose_layout_restore_plan", status, f"seq_id={seq_id}")

    def table(self, seq_id: int = 0) -> SlotTable | None:
        """The slot table of seq_id's last compaction, or None if it was never compacted."""
        return self._tables.get(seq_id)

    def original_positions(self, seq_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(cells int32 [n], positions int32 [n_layer, n_head_kv, n]) for the sequence's cells
        in ascending order: the original position each layer/head's row in that cell came from.

        A slot of the last compaction gives its table entry (-1 for a layer that does not own
        it); any other cell (a token decoded since) holds its own position in every layer and
        head. A slot cell counts as a slot while it still holds the slot's position.
        """
        seq = self.seq_cells(seq_id)
        out = np.broadcast_to(seq.positions, (self.n_layer, self.n_head_kv, len(seq.cells))).copy()
        table = self._tables.get(seq_id)
        if table is not None:
            index = {int(c): i for i, c in enumerate(seq.cells)}
            slot_pos = np.where(table.positions >= 0, table.positions, -1).max(axis=(0, 1))
            for j, cell in enumerate(table.slot_cells):
                i = index.get(int(cell))
                if i is not None and seq.positions[i] == slot_pos[j]:
                    out[:, :, i] = table.positions[:, :, j]
        return seq.cells, out

    def set_table(self, seq_id: int, table: SlotTable | None) -> None:
        if table is None:
            self._tables.pop(seq_id, None)
        else:
            self._tables[seq_id] = table

    # --- compaction --------------------------------------------------------------

    def apply(self, selection: Any, seq_id: int = 0, cell_tokens: np.ndarray | None = None) -> CompactionResult:
        """Compact seq_id as `selection` says (a policies.base.Selection or any object with
        counts, cells, slot_positions, kept_positions and simulated).

        The selection covers every model layer, or only the compacted ones (`layers`, in
        order; an iSWA model's global layers): the others then get 0 slots.

        cell_tokens: optional int32 [n_ctx] token id held by each cell, for the slot table.
        Raises ValueError for a malformed selection and NativeError when llama.cpp refuses
        it; in both cases the cache is unchanged.
        """
        counts, cells, slot_positions, kept = self._checked(selection)
        before = self.seq_cells(seq_id)
        entries_before = self.n_head_kv * int(self.cells_owned(seq_id).sum())
        slot_cells = np.empty(cells.shape[2], dtype=np.int32)
        status = self._lib.llama_kvcompose_compact_seq(
            self._ctx,
            seq_id,
            self.n_layer,
            self.n_head_kv,
            cells.shape[2],
            _i32(counts),
            _i32(cells),
            _i32(slot_positions),
            None,
            _i32(slot_cells),
        )
        native.check("llama_kvcompose_compact_seq", status, f"seq_id={seq_id}")

        n_before, n_after = len(before.cells), int(cells.shape[2])
        if self.layout.per_layer:
            # a slot cell takes a row only in the layers whose capacity reaches it
            bytes_freed = self.layout.cells_bytes(before.cells) - self.layout.cells_bytes(slot_cells)
        else:
            bytes_freed = (before.n_stream_used - self._seq_counts(seq_id)[2]) * self.cell_bytes()
        tokens = np.full(cells.shape, -1, dtype=np.int32)
        if cell_tokens is not None:
            owned = cells >= 0
            tokens[owned] = np.asarray(cell_tokens, dtype=np.int32)[cells[owned]]
        self._tables[seq_id] = SlotTable(kept.copy(), tokens, counts.copy(), slot_cells.copy())
        return CompactionResult(
            cells_before=n_before,
            cells_after=n_after,
            physical_bytes_freed=bytes_freed,
            # llama.cpp accepted the selection: exactly counts[l] cells per (layer, head)
            logical_entries_dropped=entries_before - self.n_head_kv * int(counts.sum()),
            slot_cells=slot_cells,
        )

    def _checked(self, selection: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if getattr(selection, "simulated", False):
            raise ValueError("a simulated (unstructured) selection can only be evaluated by masking, not compacted")
        counts = np.ascontiguousarray(selection.counts, dtype=np.int32)
        cells = np.ascontiguousarray(selection.cells, dtype=np.int32)
        slot_positions = np.ascontiguousarray(selection.slot_positions, dtype=np.int32)
        kept = np.ascontiguousarray(selection.kept_positions, dtype=np.int32)
        layers = self.layers
        if cells.ndim == 3 and cells.shape[0] == layers.sum() < self.n_layer:
            counts, cells, kept = _on_model_layers(layers, counts, cells, kept)
        if cells.ndim != 3 or cells.shape[:2] != (self.n_layer, self.n_head_kv):
            raise ValueError(f"cells must be [n_layer={self.n_layer}, n_head_kv={self.n_head_kv}, n_slots], got {cells.shape}")
        n_slots = cells.shape[2]
        if counts.shape != (self.n_layer,) or slot_positions.shape != (n_slots,) or kept.shape != cells.shape:
            raise ValueError("counts must be [n_layer], slot_positions [n_slots] and kept_positions like cells")
        if (counts[~layers] != 0).any() or (cells[~layers] != -1).any():
            raise ValueError(
                f"layers {np.flatnonzero(~layers).tolist()} keep their K/V in the sliding-window cache, which is not "
                "compacted: give them 0 slots, or pass a selection over the compacted layers only"
            )
        return counts, cells, slot_positions, kept


def _on_model_layers(layers: np.ndarray, counts: np.ndarray, cells: np.ndarray, kept: np.ndarray):
    """A selection over the compacted layers spread over all model layers (0 slots elsewhere)."""
    n_layer = len(layers)
    full_counts = np.zeros(n_layer, dtype=np.int32)
    full_cells = np.full((n_layer, *cells.shape[1:]), -1, dtype=np.int32)
    full_kept = np.full((n_layer, *kept.shape[1:]), -1, dtype=np.int32)
    full_counts[layers], full_cells[layers], full_kept[layers] = counts, cells, kept
    return full_counts, full_cells, full_kept
