"""A saved sequence state that survives compaction: llama.cpp's blob plus our metadata.

`llama_state_seq_get_data` holds the K/V rows and the cell positions, but not what a
compaction adds: the per-layer budgets (which layers own which slot) and the slot table
(the original position and token of every slot per layer and KV head). Both travel beside
the blob in one container:

    b"KVCSEQ\\0\\0" | u32 version | u32 header_bytes | header (JSON, utf-8)
    | blob | positions int32 | tokens int32 | sha256 of everything before it (32 bytes)

`save_seq` and `load_seq` are the only readers and writers; the Llama integration, the CLI
and the robustness tests use them. A corrupted, truncated or foreign container raises
`StateFormatError` before anything is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct
from typing import Any

import numpy as np

from .compactor import Compactor, SlotTable

MAGIC = b"KVCSEQ\0\0"
VERSION = 1
_DIGEST = 32


class StateFormatError(ValueError):
    """The bytes are not a kvcompose sequence state this version can load."""


def save_seq(compactor: Compactor, seq_id: int = 0) -> bytes:
    """The state of seq_id (rows, positions, per-layer budgets, slot table) as one container."""
    import llama_cpp

    ctx = compactor._ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id)
    if written != size:
        raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")

    seq = compactor.seq_cells(seq_id)
    counts, slot_of_cell = compactor.layer_counts(seq_id)
    table = compactor.table(seq_id)
    header: dict[str, Any] = {
        "n_layer": compactor.n_layer,
        "n_head_kv": compactor.n_head_kv,
        "blob_bytes": size,
        "n_cells": len(seq.cells),
        # -1: every layer sees every cell; 0: a layer outside the compacted cache (iSWA)
        "layer_counts": counts.tolist() if (counts > 0).any() else None,
        "slot_of_cell": slot_of_cell.tolist(),
        "table": None,
    }
    arrays = b""
    if table is not None:
        # the slots are found again after loading by their rank among the sequence's cells
        rank = {int(c): i for i, c in enumerate(seq.cells)}
        header["table"] = {
            "shape": list(table.positions.shape),
            "counts": table.counts.tolist(),
            "slot_ranks": [rank.get(int(c), -1) for c in table.slot_cells],
        }
        arrays = table.positions.astype("<i4").tobytes() + table.tokens.astype("<i4").tobytes()

    head = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + struct.pack("<II", VERSION, len(head)) + head + bytes(buf) + arrays
    return body + hashlib.sha256(body).digest()


def load_seq(compactor: Compactor, data: bytes, seq_id: int = 0) -> None:
    """Load a container from `save_seq` into seq_id of the compactor's context (replacing it)."""
    import llama_cpp

    header, blob, arrays = _unpack(data)
    if (header["n_layer"], header["n_head_kv"]) != (compactor.n_layer, compactor.n_head_kv):
        raise StateFormatError(
            f"state for n_layer={header['n_layer']}, n_head_kv={header['n_head_kv']}; "
            f"this model has {compactor.n_layer}, {compactor.n_head_kv}"
        )
    layout = compactor.layout
    slot_of_cell = np.asarray(header["slot_of_cell"], dtype=np.int32)
    counts = None if header["layer_counts"] is None else np.asarray(header["layer_counts"], dtype=np.int32)
    if layout.per_layer and counts is None and (slot_of_cell >= 0).any():
        # equal budgets leave no per-layer record; the slots keep theirs for the next save
        counts = np.where(compactor.layers, int(slot_of_cell.max()) + 1, 0).astype(np.int32)
    if layout.per_layer:
        _check_fits_layout(layout, counts, slot_of_cell)
        compactor.plan_restore(seq_id, slot_of_cell)
    src = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    if llama_cpp.llama_state_seq_set_data(compactor._ctx, src, len(blob), seq_id) != len(blob):
        if layout.per_layer:
            compactor.plan_restore(seq_id, None)  # else the next restore would take it
        raise RuntimeError("llama_state_seq_set_data refused the blob (model, cache type, size or layout mismatch)")

    seq = compactor.seq_cells(seq_id)
    if len(seq.cells) != header["n_cells"]:
        raise RuntimeError(f"loaded {len(seq.cells)} cells, the state has {header['n_cells']}")
    if counts is not None:
        compactor.set_layer_counts(seq_id, counts, slot_of_cell)

    table = header["table"]
    if table is None:
        compactor.set_table(seq_id, None)
        return
    shape = tuple(table["shape"])
    n = int(np.prod(shape))
    positions = np.frombuffer(arrays, dtype="<i4", count=n).reshape(shape).astype(np.int32)
    tokens = np.frombuffer(arrays, dtype="<i4", count=n, offset=4 * n).reshape(shape).astype(np.int32)
    slot_cells = np.array([seq.cells[r] if r >= 0 else -1 for r in table["slot_ranks"]], dtype=np.int32)
    compactor.set_table(seq_id, SlotTable(positions, tokens, np.array(table["counts"], dtype=np.int32), slot_cells))


def _check_fits_layout(layout, counts: np.ndarray | None, slot_of_cell: np.ndarray) -> None:
    """Refuse, before anything is loaded, a state whose slots this per-layer layout cannot hold."""
    over = np.flatnonzero(layout.held & (counts > layout.caps)) if counts is not None else []
    if len(over):
        l = int(over[0])
        raise ValueError(f"the state's layer {l} owns {int(counts[l])} composite slots; this context's per-layer "
                         f"memory holds {int(layout.caps[l])} there")
    plain = int((slot_of_cell < 0).sum())
    if plain > layout.n_recent:
        raise ValueError(f"the state holds {plain} uncompressed cells; this context's per-layer memory has "
                         f"{layout.n_recent} cells for them")


def _unpack(data: bytes) -> tuple[dict, bytes, bytes]:
    if len(data) < len(MAGIC) + 8 + _DIGEST or data[: len(MAGIC)] != MAGIC:
        raise StateFormatError("not a kvcompose sequence state")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise StateFormatError("checksum mismatch: the state is corrupted or truncated")
    version, head_len = struct.unpack_from("<II", body, len(MAGIC))
    if version != VERSION:
        raise StateFormatError(f"state format version {version}; this kvcompose_gguf reads version {VERSION}")
    start = len(MAGIC) + 8
    header = json.loads(body[start : start + head_len])
    blob_start = start + head_len
    blob_end = blob_start + header["blob_bytes"]
    return header, body[blob_start:blob_end], body[blob_end:]
