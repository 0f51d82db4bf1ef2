"""Parser and writer of llama.cpp's per-sequence state blob (`llama_state_seq_get_data`).

Layout for a plain `llama_kv_cache` (src/llama-context.cpp state_seq_get_data and
src/llama-kv-cache.cpp state_write / state_write_meta / state_write_data):

    u32 magic 0xaf143cd8, i32 seq_id, u32 n_stream
    per stream: u32 cell_count; when cell_count > 0:
        per cell: i32 pos, u32 n_seq_id, [i32 x, i32 y, i32 tok when the model has cell
                  extensions], i32 seq_id * n_seq_id
        u32 v_trans, u32 n_layer
        per layer: i32 k_type, u64 k_row_bytes, cell_count rows of K
        V, not transposed: per layer i32 v_type, u64 v_row_bytes, cell_count rows
        V, transposed:     per layer i32 v_type, u32 el_size, u32 n_embd_v_gqa,
                           n_embd_v_gqa channels of cell_count elements

An iSWA memory (sliding-window models such as Gemma-3) writes two caches after the seq_id,
each as above from u32 n_stream on: the base (global-attention layers) cache, then the
sliding-window cache (its cells outside the window are left out).

The rows are kept as raw bytes (uint8 arrays), so a parse followed by `to_bytes` gives the
same blob byte for byte, whatever the cache type. The compaction tests use it as the
independent reference for where every row must end up.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

SEQ_STATE_MAGIC = 0xAF143CD8


@dataclass
class LayerRows:
    """K (or plain V) of one layer: `rows` is uint8 [cell_count, row_bytes]."""

    type: int
    rows: np.ndarray

    def head(self, h: int, n_head_kv: int) -> np.ndarray:
        """uint8 [cell_count, row_bytes / n_head_kv]: KV head h's slice of every row (a view)."""
        width = self.rows.shape[1] // n_head_kv
        return self.rows[:, h * width : (h + 1) * width]


@dataclass
class LayerColumns:
    """Transposed V of one layer: `data` is uint8 [n_embd_v_gqa, cell_count, el_size]."""

    type: int
    data: np.ndarray


@dataclass
class StreamState:
    positions: np.ndarray  # int32 [cell_count]
    seq_ids: list[list[int]]  # per cell
    ext: np.ndarray | None  # int32 [cell_count, 3] (x, y, tok) when the model has cell extensions
    v_trans: bool
    k: list[LayerRows]
    v: list[LayerRows | LayerColumns]

    @property
    def cell_count(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class SeqState:
    seq_id: int
    streams: list[StreamState | None] = field(default_factory=list)  # None: the stream holds no cell
    # an iSWA memory's sliding-window cache, written after the base cache (`streams`); None: plain cache
    swa_streams: list[StreamState | None] | None = None

    def to_bytes(self) -> bytes:
        out = bytearray(struct.pack("<Ii", SEQ_STATE_MAGIC, self.seq_id))
        for streams in [self.streams] + ([] if self.swa_streams is None else [self.swa_streams]):
            out += struct.pack("<I", len(streams))
            for stream in streams:
                if stream is None:
                    out += struct.pack("<I", 0)
                    continue
                _write_stream(out, stream)
        return bytes(out)

    def only_stream(self) -> StreamState:
        """The single stream that holds cells (a sequence lives in one stream)."""
        present = [s for s in self.streams if s is not None]
        if len(present) != 1:
            raise ValueError(f"expected cells in exactly one stream, found {len(present)}")
        return present[0]


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.offset = 0

    def unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def bytes(self, n: int) -> np.ndarray:
        if self.offset + n > len(self.data):
            raise ValueError(f"state blob truncated at byte {self.offset} (need {n} more)")
        out = np.frombuffer(self.data, dtype=np.uint8, count=n, offset=self.offset).copy()
        self.offset += n
        return out


def parse_seq_state(data: bytes, has_cell_ext: bool = False, iswa: bool = False) -> SeqState:
    """Parse a blob from llama_state_seq_get_data of a plain KV cache (not recurrent), or with
    iswa=True of an iSWA memory (base cache in `streams`, sliding-window cache in `swa_streams`)."""
    r = _Reader(data)
    magic, seq_id = r.unpack("<Ii")
    if magic != SEQ_STATE_MAGIC:
        raise ValueError(f"not a sequence state blob (magic {magic:#x})")
    state = SeqState(seq_id=seq_id)
    state.streams = _read_streams(r, has_cell_ext)
    if iswa:
        state.swa_streams = _read_streams(r, has_cell_ext)
    if r.offset != len(r.data):
        raise ValueError(f"{len(r.data) - r.offset} trailing bytes after the state blob")
    return state


def _read_streams(r: _Reader, has_cell_ext: bool) -> list[StreamState | None]:
    (n_stream,) = r.unpack("<I")
    streams: list[StreamState | None] = []
    for _ in range(n_stream):
        (cell_count,) = r.unpack("<I")
        streams.append(_read_stream(r, cell_count, has_cell_ext) if cell_count else None)
    return streams


def _read_stream(r: _Reader, cell_count: int, has_cell_ext: bool) -> StreamState:
    positions = np.empty(cell_count, dtype=np.int32)
    ext = np.empty((cell_count, 3), dtype=np.int32) if has_cell_ext else None
    seq_ids = []
    for i in range(cell_count):
        positions[i], n_seq_id = r.unpack("<iI")
        if ext is not None:
            ext[i] = r.unpack("<iii")
        seq_ids.append(list(r.unpack(f"<{n_seq_id}i")))
    v_trans, n_layer = r.unpack("<II")
    k = []
    for _ in range(n_layer):
        k_type, row_bytes = r.unpack("<iQ")
        k.append(LayerRows(k_type, r.bytes(cell_count * row_bytes).reshape(cell_count, row_bytes)))
    v: list[LayerRows | LayerColumns] = []
    for _ in range(n_layer):
        if v_trans:
            v_type, el_size, n_embd_v_gqa = r.unpack("<iII")
            data = r.bytes(n_embd_v_gqa * cell_count * el_size).reshape(n_embd_v_gqa, cell_count, el_size)
            v.append(LayerColumns(v_type, data))
        else:
            v_type, row_bytes = r.unpack("<iQ")
            v.append(LayerRows(v_type, r.bytes(cell_count * row_bytes).reshape(cell_count, row_bytes)))
    return StreamState(positions, seq_ids, ext, bool(v_trans), k, v)


def _write_stream(out: bytearray, s: StreamState) -> None:
    out += struct.pack("<I", s.cell_count)
    for i in range(s.cell_count):
        out += struct.pack("<iI", int(s.positions[i]), len(s.seq_ids[i]))
        if s.ext is not None:
            out += struct.pack("<iii", *(int(x) for x in s.ext[i]))
        out += struct.pack(f"<{len(s.seq_ids[i])}i", *s.seq_ids[i])
    out += struct.pack("<II", int(s.v_trans), len(s.k))
    for layer in s.k:
        out += struct.pack("<iQ", layer.type, layer.rows.shape[1])
        out += np.ascontiguousarray(layer.rows).tobytes()
    for layer in s.v:
        if isinstance(layer, LayerColumns):
            n_embd_v_gqa, _, el_size = layer.data.shape
            out += struct.pack("<iII", layer.type, el_size, n_embd_v_gqa)
            out += np.ascontiguousarray(layer.data).tobytes()
        else:
            out += struct.pack("<iQ", layer.type, layer.rows.shape[1])
            out += np.ascontiguousarray(layer.rows).tobytes()
