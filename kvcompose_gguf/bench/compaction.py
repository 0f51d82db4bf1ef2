"""Cost of in-place compaction against the physical limit, a plain copy of the same bytes.

    python -m kvcompose_gguf.bench.compaction [--cells 2048 4096 8192] [--kept 0.25 0.5 0.75]
    python -m kvcompose_gguf.bench.compaction --n-gpu-layers -1   # the cache in GPU memory

For each cache configuration, size, kept fraction and selection mode: a context of the
default model with exactly `cells` cells is filled through llama_state_seq_set_data with a
synthetic sequence (no prefill: the contents do not matter for the time a move takes), then
compacted. Selection modes (`--selections`):

- random: every head keeps its own random cells, the same count in every layer (heads never
  agree on a slot, nothing is in place: the scattered worst case);
- kvcompose: `policies.KVCompose` (per-layer counts from its global top-N) on synthetic
  statistics shaped like a prefill's: heavy-tailed token salience shared by the heads of a
  layer plus a per-head part (log-scores correlated 0.8), a recency trend, 4 attention-sink
  cells, and the sinks and the last 64 tokens protected. The run reports which share of
  (slot, layer) moves are whole rows (all heads agree) and in place.

Reported per run:

- compact_ms: wall time of Compactor.apply (validation, planning, the graph and its row
  moves, the cell metadata, the Python around them);
- bytes_moved: K and V bytes of the kept rows (kept slots x row bytes, summed over layers),
  whether or not a row had to move;
- copy_ms: a ggml_cpy of bytes_moved contiguous bytes on the same backend and thread count
  (the physical limit; in GPU memory with --n-gpu-layers), and ratio = compact_ms / copy_ms;
- compact_cpu_ms, copy_cpu_ms, ratio_cpu: the same runs in CPU time of the calling thread
  (with --threads 1 ggml computes on it), which other jobs on a shared machine inflate less;
- move_forms: how the K / V tensors moved (compactor.MoveForms): a cache in the CPU
  backend's memory should show every moved tensor gathered in place, in chunks that read
  staged copies or, where few cells are kept, the cache itself (direct_chunks); one in GPU
  memory every tensor moved through a temporary, unstaged.

Before every timed run a buffer of twice the largest CPU cache (at least 256 MiB) is written,
so both start from cold caches.

Compaction and copy runs alternate, as many of each, and the minimum of each is kept, since
on a shared machine noise only adds time. JSON goes to stdout and to results/compaction.json.
The target is ratio <= 3 for f16 K/V with flash attention on; the other configurations are
reported without a target.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np

from . import report_header, write_report

F16, Q4_0, Q8_0 = 1, 2, 8
CONFIGS = {
    "f16-fa": (True, F16, F16),
    "f16-transposedV": (False, F16, F16),
    "q8_0-fa": (True, Q8_0, Q8_0),
    "q4_0-fa": (True, Q4_0, Q4_0),
}

_SCRATCH: np.ndarray | None = None


def _largest_cpu_cache() -> int:
    """Bytes of the largest CPU cache Linux reports (0 where it reports none). Server parts
    reach hundreds of MiB of L3: one seen here had 300 MiB."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


def _evict_caches() -> None:
    """Write a buffer of twice the largest CPU cache (at least 256 MiB), so that neither the
    copy nor the compaction reads rows that an earlier step left in cache."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = np.empty(max(256 << 20, 2 * _largest_cpu_cache()), dtype=np.uint8)
    _SCRATCH.fill(1)


class _Best:
    """Minimum wall and calling-thread CPU time over repeats, in ms."""

    def __init__(self) -> None:
        self.wall = self.cpu = float("inf")

    @contextlib.contextmanager
    def timed(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        yield
        self.wall = min(self.wall, (time.perf_counter() - t0) * 1e3)
        self.cpu = min(self.cpu, (time.thread_time() - c0) * 1e3)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _declare(lib: ctypes.CDLL, specs) -> ctypes.CDLL:
    for name, args, res in specs:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


_vp = ctypes.c_void_p
_GRAPH_API = [
    ("ggml_init", [_InitParams], _vp),
    ("ggml_free", [_vp], None),
    ("ggml_new_tensor_1d", [_vp, ctypes.c_int, ctypes.c_int64], _vp),
    ("ggml_cpy", [_vp, _vp, _vp], _vp),
    ("ggml_new_graph", [_vp], _vp),
    ("ggml_build_forward_expand", [_vp, _vp], None),
    ("ggml_tensor_overhead", [], ctypes.c_size_t),
    ("ggml_graph_overhead", [], ctypes.c_size_t),
    ("ggml_get_data", [_vp], _vp),
]


class _GgmlCopy:
    """A ggml_cpy of n contiguous bytes computed by the CPU backend (libggml of the loaded libllama)."""

    name = "CPU"

    def __init__(self, lib_dir: Path, n_threads: int):
        self.base = _declare(ctypes.CDLL(str(lib_dir / "libggml-base.so")), _GRAPH_API)
        self.cpu = _declare(ctypes.CDLL(str(lib_dir / "libggml-cpu.so")),
                            [("ggml_graph_compute_with_ctx", [_vp, _vp, ctypes.c_int], ctypes.c_int)])
        self.n_threads = n_threads

    @contextlib.contextmanager
    def prepared(self, n_bytes: int) -> Iterator[Callable[[], None]]:
        """One copy of n_bytes to run again and again (its first run, which faults the pages in,
        done already); the caller evicts the caches before each run."""
        n = (n_bytes + 1) // 2  # f16 elements
        size = 2 * (2 * n + 64) + 8 * self.base.ggml_tensor_overhead() + self.base.ggml_graph_overhead()
        ctx = self.base.ggml_init(_InitParams(size, None, False))
        try:
            src = self.base.ggml_new_tensor_1d(ctx, F16, n)
            dst = self.base.ggml_new_tensor_1d(ctx, F16, n)
            # touch every page: an untouched source reads the shared zero page and flatters the copy
            ctypes.memset(self.base.ggml_get_data(src), 0x3C, 2 * n)
            ctypes.memset(self.base.ggml_get_data(dst), 0, 2 * n)
            graph = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(graph, self.base.ggml_cpy(ctx, src, dst))

            def run() -> None:
                if self.cpu.ggml_graph_compute_with_ctx(ctx, graph, self.n_threads) != 0:
                    raise RuntimeError("ggml_graph_compute failed")

            run()
            yield run
        finally:
            self.base.ggml_free(ctx)

    def time_ms(self, n_bytes: int, repeats: int) -> _Best:
        """The minimum over repeats of the copy, each from cold caches."""
        best = _Best()
        with self.prepared(n_bytes) as run:
            for _ in range(repeats):
                _evict_caches()
                with best.timed():
                    run()
        return best


class _DeviceCopy:
    """A ggml_cpy of n contiguous bytes in the memory of ggml's best backend (the GPU an
    offloaded cache lives on); ggml_backend_graph_compute returns once the copy is done."""

    def __init__(self, lib_dir: Path):
        self.base = _declare(ctypes.CDLL(str(lib_dir / "libggml-base.so")), _GRAPH_API + [
            ("ggml_backend_name", [_vp], ctypes.c_char_p),
            ("ggml_backend_free", [_vp], None),
            ("ggml_backend_alloc_ctx_tensors", [_vp, _vp], _vp),
            ("ggml_backend_buffer_free", [_vp], None),
            ("ggml_backend_tensor_memset", [_vp, ctypes.c_uint8, ctypes.c_size_t, ctypes.c_size_t], None),
            ("ggml_backend_graph_compute", [_vp, _vp], ctypes.c_int),
        ])
        registry = _declare(ctypes.CDLL(str(lib_dir / "libggml.so")), [("ggml_backend_init_best", [], _vp)])
        self.backend = registry.ggml_backend_init_best()
        if not self.backend:
            raise RuntimeError("ggml has no backend to run the reference copy on")
        self.name = self.base.ggml_backend_name(self.backend).decode()

    @contextlib.contextmanager
    def prepared(self, n_bytes: int) -> Iterator[Callable[[], None]]:
        """One copy of n_bytes in device memory to run again and again (its first run, which
        loads the kernel, done already)."""
        n = (n_bytes + 1) // 2  # f16 elements
        ctx = self.base.ggml_init(_InitParams(8 * self.base.ggml_tensor_overhead() + self.base.ggml_graph_overhead(),
                                              None, True))
        buf = None
        try:
            src = self.base.ggml_new_tensor_1d(ctx, F16, n)
            dst = self.base.ggml_new_tensor_1d(ctx, F16, n)
            buf = self.base.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
            if not buf:
                raise RuntimeError(f"could not allocate {2 * n_bytes} bytes on {self.name}")
            self.base.ggml_backend_tensor_memset(src, 0x3C, 0, 2 * n)
            self.base.ggml_backend_tensor_memset(dst, 0, 0, 2 * n)
            graph = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(graph, self.base.ggml_cpy(ctx, src, dst))

            def run() -> None:
                if self.base.ggml_backend_graph_compute(self.backend, graph) != 0:
                    raise RuntimeError("ggml_backend_graph_compute failed")

            run()
            yield run
        finally:
            if buf:
                self.base.ggml_backend_buffer_free(buf)
            self.base.ggml_free(ctx)

    def close(self) -> None:
        self.base.ggml_backend_free(self.backend)


class _Context:
    def __init__(self, model, cells: int, n_threads: int, flash_attn: bool, type_k: int, type_v: int):
        import llama_cpp

        from kvcompose_gguf import state_blob
        from kvcompose_gguf.compactor import Compactor

        self.lc = llama_cpp
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cells
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cp.type_k, cp.type_v = type_k, type_v
        self.ctx = llama_cpp.llama_init_from_model(model, cp)
        if not self.ctx:
            raise RuntimeError("could not create a context")
        self.compactor = Compactor(self.ctx)
        # one real token shows the blob's layout (types, row sizes, V transposed or not)
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 0, 1, 0, 1
        batch.n_tokens = 1
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("decode failed")
        llama_cpp.llama_batch_free(batch)
        template = state_blob.parse_seq_state(self._blob())
        self.blob = _synthetic(template, cells, np.random.default_rng(0))
        self.bytes_per_cell_layer = [
            (k.rows.shape[1], v.data.shape[0] * v.data.shape[2] if hasattr(v, "data") else v.rows.shape[1])
            for k, v in zip(template.only_stream().k, template.only_stream().v)
        ]

    def _blob(self) -> bytes:
        size = self.lc.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        self.lc.llama_state_seq_get_data(self.ctx, buf, size, 0)
        return bytes(buf)

    def refill(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        src = (ctypes.c_uint8 * len(self.blob)).from_buffer_copy(self.blob)
        if self.lc.llama_state_seq_set_data(self.ctx, src, len(self.blob), 0) != len(self.blob):
            raise RuntimeError("could not load the synthetic state")

    def close(self) -> None:
        self.lc.llama_free(self.ctx)


def _synthetic(template, cells: int, rng) -> bytes:
    from kvcompose_gguf import state_blob

    old = template.only_stream()

    def noise(shape) -> np.ndarray:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    k = [state_blob.LayerRows(layer.type, noise((cells, layer.rows.shape[1]))) for layer in old.k]
    v = []
    for layer in old.v:
        if isinstance(layer, state_blob.LayerColumns):
            v.append(state_blob.LayerColumns(layer.type, noise((layer.data.shape[0], cells, layer.data.shape[2]))))
        else:
            v.append(state_blob.LayerRows(layer.type, noise((cells, layer.rows.shape[1]))))
    stream = state_blob.StreamState(np.arange(cells, dtype=np.int32), [[0]] * cells, None, old.v_trans, k, v)
    return state_blob.SeqState(template.seq_id, [stream]).to_bytes()


def _selection(rng, cells: int, n_keep: int, n_layer: int, n_head_kv: int) -> SimpleNamespace:
    sel = np.empty((n_layer, n_head_kv, n_keep), dtype=np.int32)
    for layer in range(n_layer):
        for h in range(n_head_kv):
            sel[layer, h] = np.sort(np.append(rng.choice(cells - 1, n_keep - 1, replace=False), cells - 1))
    return SimpleNamespace(
        counts=np.full(n_layer, n_keep, dtype=np.int32),
        cells=sel,
        slot_positions=sel.max(axis=(0, 1)).astype(np.int32),
        kept_positions=sel.copy(),
        simulated=False,
    )


def _kvcompose_selection(rng, cells: int, kept: float, n_layer: int, n_head_kv: int):
    from kvcompose_gguf.policies import KVCompose, Observation, protect_positions

    shape = (n_layer, n_head_kv, cells)
    rho = 0.8  # correlation of the heads' log-scores within a layer
    z = np.sqrt(rho) * rng.standard_normal((n_layer, 1, cells)) + np.sqrt(1 - rho) * rng.standard_normal(shape)
    recency = 1.0 + 2.0 * (np.arange(cells) / cells) ** 4
    scores = np.exp(1.5 * z) * recency
    scores[..., :4] = scores.max() * 10  # attention sinks
    positions = np.broadcast_to(np.arange(cells, dtype=np.int32), shape).copy()
    obs = Observation(scores.astype(np.float32), positions)
    protected = protect_positions(obs, [(0, 4), (cells - 64, cells)])
    return KVCompose().select(obs, kept, protected=protected)


def _selection_shape(sel, dst_cells: np.ndarray) -> dict:
    """Share of (layer, slot) moves whose heads all agree (one whole row) and of those already in place."""
    whole = in_place = total = 0
    for layer, n in enumerate(sel.counts):
        c = sel.cells[layer, :, :n]
        agree = (c == c[:1]).all(axis=0)
        whole += int(agree.sum())
        in_place += int((agree & (c[0] == dst_cells[:n])).sum())
        total += int(n)
    return {"whole_row_slots": round(whole / total, 3), "in_place_slots": round(in_place / total, 3)}


def _measure(args: argparse.Namespace, model_path: Path) -> tuple[list[dict], str]:
    import llama_cpp

    from kvcompose_gguf.compactor import recorded_move_forms

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = args.n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise RuntimeError(f"could not load {model_path}")
    lib_dir = Path(llama_cpp.llama_cpp._lib._name).parent
    offloaded = args.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
    copier = _DeviceCopy(lib_dir) if offloaded else _GgmlCopy(lib_dir, args.threads)
    rng = np.random.default_rng(0)

    runs = []
    for name in args.configs:
        flash_attn, type_k, type_v = CONFIGS[name]
        for cells in args.cells:
            ctx = _Context(model, cells, args.threads, flash_attn, type_k, type_v)
            c = ctx.compactor
            try:
                for kept in args.kept:
                    for mode in args.selections:
                        if mode == "random":
                            n_keep = max(1, int(round(cells * kept)))
                            sel = _selection(rng, cells, n_keep, c.n_layer, c.n_head_kv)
                        else:
                            sel = _kvcompose_selection(rng, cells, kept, c.n_layer, c.n_head_kv)
                        bytes_moved = sum(int(n) * (k + v) for n, (k, v) in zip(sel.counts, ctx.bytes_per_cell_layer))
                        best, copy = _Best(), _Best()
                        with recorded_move_forms() as forms, copier.prepared(bytes_moved) as copy_once:
                            # compaction and copy alternate, so that on a shared machine both
                            # meet the same moments: the ratio of two minima then compares like
                            # with like (copies timed apart drifted 1.5x within minutes)
                            for _ in range(args.repeats):
                                ctx.refill()
                                _evict_caches()
                                with best.timed():
                                    result = c.apply(sel)
                                if not offloaded:
                                    _evict_caches()
                                with copy.timed():
                                    copy_once()
                        runs.append(
                            {
                                "config": name,
                                "flash_attn": flash_attn,
                                "selection": mode,
                                "cells": cells,
                                "kept": kept,
                                "slots": int(sel.counts.max()),
                                **_selection_shape(sel, result.slot_cells),
                                "move_forms": dataclasses.asdict(forms[-1]),
                                "bytes_moved": bytes_moved,
                                "compact_ms": round(best.wall, 3),
                                "copy_ms": round(copy.wall, 3),
                                "ratio": round(best.wall / copy.wall, 2),
                                "compact_cpu_ms": round(best.cpu, 3),
                                "copy_cpu_ms": round(copy.cpu, 3),
                                "ratio_cpu": round(best.cpu / copy.cpu, 2),
                            }
                        )
                        print(json.dumps(runs[-1]), file=sys.stderr)
            finally:
                ctx.close()
    llama_cpp.llama_model_free(model)
    if isinstance(copier, _DeviceCopy):
        copier.close()
    return runs, copier.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--kept", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--selections", nargs="+", default=["random", "kvcompose"], choices=["random", "kvcompose"])
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=10, help="timed runs of each compaction and of its copy")
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--n-gpu-layers", type=int, default=0,
                    help="layers (and their KV cache) offloaded to the GPU of a CUDA/Metal build; -1: all")
    ap.add_argument("--out", type=Path, default=Path("results/compaction.json"))
    args = ap.parse_args(argv)

    from kvcompose_gguf import models, native

    model_path = args.model or models.smollm2_path()
    with native.llama_log_to(None):  # keep stderr for the runs' JSON lines
        runs, backend = _measure(args, model_path)

    target = [r for r in runs if r["config"] == "f16-fa"]
    by_mode = {m: [r for r in target if r["selection"] == m] for m in args.selections}
    report = {
        **report_header("compaction", argv),
        "backend": backend,
        "n_gpu_layers": args.n_gpu_layers,
        "threads": args.threads,
        "repeats": args.repeats,
        "model": Path(model_path).name,
        "target": "compact_ms <= 3 x copy_ms for f16-fa",
        "target_met": bool(target) and all(r["ratio"] <= 3 for r in target),
        "target_met_by_selection": {m: bool(rs) and all(r["ratio"] <= 3 for r in rs) for m, rs in by_mode.items()},
        "runs": runs,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
