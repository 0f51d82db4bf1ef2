"""Fuzzing the native API: random and malformed calls against a live context.

    python -m kvcompose_gguf.bench.fuzz [--examples 2000] [--model PATH] [--seed 0]

Each example refills a context with two interleaved sequences (random lengths and cell
order; sometimes compacted once already, the bystander with per-layer budgets), then makes one call with random, often
malformed arguments: llama_kvcompose_compact_seq (mutated selections, wrong shapes,
foreign or out-of-range cells, bad sequence ids), llama_kvcompose_seq_cells,
llama_kvcompose_seq_layer_counts, llama_kvcompose_seq_set_layer_counts,
llama_kvcompose_stats_n_cells and llama_kvcompose_stats_cell_positions. Checked, by
hypothesis, for every call:

- the process does not crash (buffers always match the sizes the arguments claim: the
  native side cannot check a pointer, only everything else);
- a call that must be refused is refused, and a refused call leaves both sequences'
  state blobs (llama_state_seq_get_data) byte-identical and the per-layer budgets as they were;
- an accepted compaction produces, per layer and KV head, the K and V rows and slot
  positions that the numpy rearrangement of the old blob predicts; accepted queries
  agree with the blob's cells and positions;
- the context still decodes afterwards.

JSON (examples, calls per function and status, failures) goes to stdout and to
results/fuzz.json. Needs hypothesis (the `test` extra).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import report_header, write_report

N_PER_SEQ_MAX = 24
_P = ctypes.POINTER(ctypes.c_int32)


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(_P)


class _Target:
    """One context with two sequences, driven through the C API."""

    def __init__(self, model_path: str, n_ctx: int = 256, n_threads: int = 1):
        import llama_cpp

        from .. import native
        from ..compactor import Compactor

        self.llama_cpp = llama_cpp
        self.native = native
        self.lib = native.load()
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"cannot load {model_path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_ctx, n_ctx, 2
        cp.kv_unified = True  # one stream: the sequences' cells interleave, so foreign cells exist
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx
        self.compactor = Compactor(self.ctx)
        self.n_layer, self.n_head_kv = self.compactor.n_layer, self.compactor.n_head_kv
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def decode(self, tokens, positions, seq_ids) -> bool:
        lc = self.llama_cpp
        batch = lc.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, (t, p, q) in enumerate(zip(tokens, positions, seq_ids)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = int(t), int(p), 1, int(q)
                batch.logits[i] = i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            return lc.llama_decode(self.ctx, batch) == 0
        finally:
            lc.llama_batch_free(batch)

    def blob(self, seq_id: int) -> bytes:
        lc = self.llama_cpp
        size = lc.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        lc.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        return bytes(buf)

    def refill(self, rng: np.random.Generator, n: tuple[int, int], compact_first: bool, target: int) -> None:
        self.llama_cpp.llama_memory_clear(self.mem, True)
        seq_of = rng.permutation(np.repeat([0, 1], n))
        pos = np.zeros(len(seq_of), dtype=int)
        for q in (0, 1):
            pos[seq_of == q] = np.arange(n[q])
        tokens = rng.integers(3, min(self.n_vocab, 259), len(seq_of))
        assert self.decode(tokens, pos, seq_of)
        if compact_first:
            # the target uniformly (every layer still owns every slot, so any selection of its
            # cells stays valid); the bystander with per-layer budgets, which the target's
            # calls must leave exactly as they are
            for seq_id, per_layer in ((target, False), (1 - target, True)):
                seq = self.compactor.seq_cells(seq_id)
                k = max(1, len(seq.cells) // 2)
                counts = rng.integers(1, k + 1, self.n_layer) if per_layer else np.full(self.n_layer, k)
                counts[int(rng.integers(self.n_layer))] = k
                sel = random_selection(rng, seq.cells, seq.positions, self.n_layer, self.n_head_kv, counts)
                self.compactor.apply(sel, seq_id=seq_id)

    def layer_counts(self, seq_id: int) -> tuple[int, np.ndarray]:
        counts = np.zeros(self.n_layer, dtype=np.int32)
        status = self.lib.llama_kvcompose_seq_layer_counts(self.ctx, seq_id, self.n_layer, _ptr(counts), 0, None)
        return status, counts

    def close(self) -> None:
        self.llama_cpp.llama_free(self.ctx)
        self.llama_cpp.llama_model_free(self.model)


def random_selection(rng, seq_cells, seq_positions, n_layer, n_head_kv, counts) -> SimpleNamespace:
    """Per (layer, head) its own kept cells in position order; the newest cell is kept by
    every head so the sequence's maximum position stays put (the native side requires it)."""
    counts = np.asarray(counts, dtype=np.int32)
    n_slots = int(counts.max())
    newest = int(np.argmax(seq_positions))
    others = np.array([i for i in range(len(seq_cells)) if i != newest], dtype=int)
    cells = np.full((n_layer, n_head_kv, n_slots), -1, dtype=np.int32)
    kept = np.full_like(cells, -1)
    for layer in range(n_layer):
        for h in range(n_head_kv):
            idx = np.append(rng.choice(others, counts[layer] - 1, replace=False), newest).astype(int)
            idx = idx[np.argsort(seq_positions[idx], kind="stable")]
            cells[layer, h, : counts[layer]] = seq_cells[idx]
            kept[layer, h, : counts[layer]] = seq_positions[idx]
    return SimpleNamespace(counts=counts, cells=cells, slot_positions=kept.max(axis=(0, 1)).astype(np.int32),
                           kept_positions=kept, simulated=False)


def reference_mismatch(before: bytes, after: bytes, sel, seq_cells: np.ndarray, n_head_kv: int) -> str | None:
    """Compare an accepted compaction with the numpy rearrangement of the old blob: slot
    positions, and per layer and KV head the K and V rows of the slots the layer owns."""
    from .. import state_blob

    old = state_blob.parse_seq_state(before).only_stream()
    new = state_blob.parse_seq_state(after).only_stream()
    n_slots = sel.cells.shape[2]
    if new.cell_count != n_slots:
        return f"{new.cell_count} cells after, {n_slots} slots selected"
    if not np.array_equal(new.positions, sel.slot_positions):
        return "slot positions differ"
    row_of_cell = {int(c): i for i, c in enumerate(seq_cells)}
    for layer in range(len(old.k)):
        n_l = int(sel.counts[layer])
        for h in range(n_head_kv):
            src = [row_of_cell[int(c)] for c in sel.cells[layer, h, :n_l]]
            if not np.array_equal(new.k[layer].head(h, n_head_kv)[:n_l], old.k[layer].head(h, n_head_kv)[src]):
                return f"K rows of layer {layer} head {h} differ"
            if old.v_trans:
                hd = old.v[layer].data.shape[0] // n_head_kv
                want = old.v[layer].data[h * hd : (h + 1) * hd][:, src]
                got = new.v[layer].data[h * hd : (h + 1) * hd][:, :n_l]
            else:
                want, got = old.v[layer].head(h, n_head_kv)[src], new.v[layer].head(h, n_head_kv)[:n_l]
            if not np.array_equal(got, want):
                return f"V rows of layer {layer} head {h} differ"
    return None


BAD_SEQ_IDS = [-1, 2, 7, 1 << 30]
COMPACT_MUTATIONS = ["none", "duplicate", "foreign_cell", "out_of_range", "tail", "count_zero", "count_high",
                     "max_pos", "negative_pos", "seq_id", "n_layer", "n_head_kv", "offsets", "null_counts"]
OPERATIONS = ["compact", "seq_cells", "layer_counts", "set_layer_counts", "stats_positions"]


class Fuzzer:
    def __init__(self, target: _Target):
        self.t = target
        self.calls: Counter = Counter()
        self.failures: list[dict] = []

    def fail(self, example: dict, why: str) -> None:
        self.failures.append({**example, "failure": why})

    def example(self, seed: int, op: str, mutation: str, n0: int, n1: int, compact_first: bool) -> None:
        t, native = self.t, self.t.native
        rng = np.random.default_rng(seed)
        record = dict(seed=seed, op=op, mutation=mutation, n=(n0, n1), compact_first=compact_first)
        target = int(rng.integers(2))
        t.refill(rng, (n0, n1), compact_first, target)
        before = (t.blob(0), t.blob(1))
        counts_before = (t.layer_counts(0)[1], t.layer_counts(1)[1])
        status, accepted_ok = getattr(self, "_" + op)(rng, target, mutation, before, record)
        self.calls[f"{op}:{native.status_str(status) if status <= 0 else status}"] += 1
        after = (t.blob(0), t.blob(1))
        if accepted_ok is not None and not accepted_ok[0]:
            self.fail(record, accepted_ok[1])
        if status != native.OK:
            if after != before:
                self.fail(record, f"refused with status {status} but a state blob changed")
            if any(not np.array_equal(t.layer_counts(q)[1], counts_before[q]) for q in (0, 1)):
                self.fail(record, f"refused with status {status} but the per-layer budgets changed")
        if op == "compact" and after[1 - target] != before[1 - target]:
            self.fail(record, "the other sequence's blob changed")
        if not np.array_equal(t.layer_counts(1 - target)[1], counts_before[1 - target]):
            self.fail(record, "the other sequence's per-layer budgets changed")
        if op != "compact" and status == native.OK and after != before:
            self.fail(record, f"{op} changed a state blob")  # queries and budgets move no row
        pos = int(t.llama_cpp.llama_memory_seq_pos_max(t.mem, target)) + 1
        if not t.decode([5], [pos], [target]):
            self.fail(record, "the context no longer decodes")

    # --- operations: (status, None | (ok, why)) ------------------------------------

    def _compact(self, rng, target, mutation, before, record):
        t, native = self.t, self.t.native
        seq, other = t.compactor.seq_cells(target), t.compactor.seq_cells(1 - target)
        counts = rng.integers(1, len(seq.cells) + 1, t.n_layer)
        sel = random_selection(rng, seq.cells, seq.positions, t.n_layer, t.n_head_kv, counts)
        n_slots = sel.cells.shape[2]
        layer, h = int(rng.integers(t.n_layer)), int(rng.integers(t.n_head_kv))
        n_l = int(sel.counts[layer])
        seq_id, n_layer, n_head_kv, offsets, counts_arg = target, t.n_layer, t.n_head_kv, None, sel.counts
        must_refuse = True
        if mutation == "none":
            must_refuse = False
        elif mutation == "duplicate":
            must_refuse = n_l > 1
            if must_refuse:
                sel.cells[layer, h, 1] = sel.cells[layer, h, 0]
        elif mutation == "foreign_cell":
            sel.cells[layer, h, int(rng.integers(n_l))] = other.cells[int(rng.integers(len(other.cells)))]
        elif mutation == "out_of_range":
            sel.cells[layer, h, int(rng.integers(n_l))] = int(rng.choice([-5, t.n_ctx, 10**6, -(2**31)]))
        elif mutation == "tail":
            must_refuse = n_l < n_slots
            if must_refuse:
                sel.cells[layer, h, n_slots - 1] = seq.cells[0]
        elif mutation == "count_zero":
            sel.counts[layer] = int(rng.choice([0, -1, -(2**31)]))
        elif mutation == "count_high":
            sel.counts[layer] = n_slots + int(rng.integers(1, 5))
        elif mutation == "max_pos":
            sel.slot_positions[sel.slot_positions == sel.slot_positions.max()] = 0  # the newest position moved
        elif mutation == "negative_pos":
            sel.slot_positions[0] = -int(rng.integers(1, 10))
        elif mutation == "seq_id":
            seq_id = int(rng.choice(BAD_SEQ_IDS))
        elif mutation == "n_layer":
            n_layer = int(rng.choice([0, -1, t.n_layer - 1]))
        elif mutation == "n_head_kv":
            n_head_kv = int(rng.choice([0, -1, t.n_head_kv + 1]))
        elif mutation == "offsets":
            offsets = np.zeros(t.n_layer, dtype=np.int32)
        elif mutation == "null_counts":
            counts_arg = None
        # buffers as large as the arguments claim (the native side reads that much)
        n_cells_arg = max(n_layer, 0) * max(n_head_kv, 0) * n_slots
        cells_buf = np.full(max(n_cells_arg, 1), -1, dtype=np.int32)
        flat = sel.cells.reshape(-1)
        cells_buf[: min(len(flat), n_cells_arg)] = flat[: min(len(flat), n_cells_arg)]
        counts_buf = None if counts_arg is None else np.resize(np.asarray(counts_arg, np.int32), max(n_layer, 1))
        slot_cells = np.empty(n_slots, dtype=np.int32)
        status = t.lib.llama_kvcompose_compact_seq(
            t.ctx, seq_id, n_layer, n_head_kv, n_slots, _ptr(counts_buf), _ptr(cells_buf),
            _ptr(np.ascontiguousarray(sel.slot_positions)), _ptr(offsets), _ptr(slot_cells))
        if must_refuse:
            return status, (status != native.OK, f"a malformed call ({mutation}) was accepted")
        if status != native.OK:
            return status, (False, f"a valid compaction was refused with status {status}")
        why = reference_mismatch(before[target], t.blob(target), sel, seq.cells, t.n_head_kv)
        return status, (why is None, why or "")

    def _seq_cells(self, rng, target, mutation, before, record):
        from .. import state_blob

        t, native = self.t, self.t.native
        truth = state_blob.parse_seq_state(before[target]).only_stream().positions
        n = len(truth)
        seq_id = int(rng.choice(BAD_SEQ_IDS)) if mutation == "seq_id" else target
        capacity = int(rng.choice([-1, 0, 1, max(n - 1, 0), n, n + 5]))
        null = mutation == "null_counts" and capacity > 0
        bufs = [None, None] if null or capacity <= 0 else [np.full(capacity, -7, np.int32) for _ in range(2)]
        n_cells, kv_used, used = ctypes.c_int32(-9), ctypes.c_int32(), ctypes.c_int32()
        status = t.lib.llama_kvcompose_seq_cells(t.ctx, seq_id, capacity, _ptr(bufs[0]), _ptr(bufs[1]),
                                                 ctypes.byref(n_cells), ctypes.byref(kv_used), ctypes.byref(used))
        if capacity < 0 or null or seq_id != target:
            return status, (status != native.OK, f"seq_cells accepted capacity={capacity} seq_id={seq_id}")
        if status != native.OK:
            return status, (False, f"seq_cells refused a valid call with {status}")
        k = min(capacity, n)
        ok = n_cells.value == n and (k == 0 or np.array_equal(bufs[1][:k], truth[:k]))
        return status, (ok, "seq_cells disagrees with the state blob")

    def _layer_counts(self, rng, target, mutation, before, record):
        t, native = self.t, self.t.native
        seq_id = int(rng.choice(BAD_SEQ_IDS)) if mutation == "seq_id" else target
        n_layer = int(rng.choice([0, -1, t.n_layer + 1])) if mutation == "n_layer" else t.n_layer
        capacity = int(rng.choice([-1, 0, 3, 64]))
        counts = np.zeros(max(n_layer, 1), np.int32)
        slots = None if capacity <= 0 or mutation == "null_counts" else np.zeros(capacity, np.int32)
        status = t.lib.llama_kvcompose_seq_layer_counts(t.ctx, seq_id, n_layer, _ptr(counts), capacity, _ptr(slots))
        valid = seq_id == target and n_layer == t.n_layer and capacity >= 0 and not (capacity > 0 and slots is None)
        if not valid:
            return status, (status != native.OK, f"layer_counts accepted seq_id={seq_id} n_layer={n_layer} capacity={capacity}")
        return status, (status == native.OK, f"layer_counts refused a valid call with {status}")

    def _set_layer_counts(self, rng, target, mutation, before, record):
        t, native = self.t, self.t.native
        n = len(t.compactor.seq_cells(target).cells)
        counts = rng.integers(1, n + 1, t.n_layer).astype(np.int32)
        slot_of_cell = np.arange(n, dtype=np.int32)
        seq_id, n_layer, n_cells = target, t.n_layer, n
        if mutation == "seq_id":
            seq_id = int(rng.choice(BAD_SEQ_IDS))
        elif mutation == "n_layer":
            n_layer = int(rng.choice([0, -1, t.n_layer - 1]))
        elif mutation in ("count_zero", "count_high"):
            counts[int(rng.integers(t.n_layer))] = 0 if mutation == "count_zero" else n + 1
        elif mutation == "duplicate" and n > 1:
            slot_of_cell[1] = slot_of_cell[0]
        elif mutation == "out_of_range":
            slot_of_cell[int(rng.integers(n))] = int(rng.choice([-2, n + 3, 1 << 30]))
        elif mutation == "tail":
            n_cells = int(rng.choice([0, -1, max(n - 1, 1) if n > 1 else 0]))
        valid = mutation not in ("seq_id", "n_layer", "count_zero", "count_high", "out_of_range", "tail") and not (
            mutation == "duplicate" and n > 1)
        counts_buf = np.resize(counts, max(n_layer, 1))
        slot_buf = np.resize(slot_of_cell, max(n_cells, 1))
        status = t.lib.llama_kvcompose_seq_set_layer_counts(t.ctx, seq_id, n_layer, _ptr(counts_buf), n_cells,
                                                            _ptr(slot_buf))
        if not valid:
            return status, (status != native.OK, f"set_layer_counts accepted a malformed call ({mutation})")
        if status != native.OK:
            return status, (False, f"set_layer_counts refused a valid call with {status}")
        _, got = t.layer_counts(target)
        # layers owning every slot are reported as unrestricted (-1)
        want = np.where(counts == n, -1, counts)
        ok = np.array_equal(got, want) or np.array_equal(got, counts)
        return status, (ok, f"layer_counts reads back {got.tolist()} after setting {counts.tolist()}")

    def _stats_positions(self, rng, target, mutation, before, record):
        from .. import state_blob

        t, native = self.t, self.t.native
        seq_id = int(rng.choice(BAD_SEQ_IDS)) if mutation == "seq_id" else target
        n_cells = ctypes.c_int32(-9)
        s1 = t.lib.llama_kvcompose_stats_n_cells(t.ctx, seq_id, ctypes.byref(n_cells))
        size = t.n_ctx + int(rng.choice([0, 0, -1, 1, -t.n_ctx])) if mutation != "none" else t.n_ctx
        buf = np.full(max(size, 1), -7, np.int32)
        status = t.lib.llama_kvcompose_stats_cell_positions(t.ctx, seq_id, _ptr(buf), size)
        if seq_id != target or size != t.n_ctx:
            return status, (status != native.OK and (seq_id == target or s1 != native.OK),
                            f"stats positions accepted seq_id={seq_id} size={size} (n_cells status {s1})")
        truth = np.sort(state_blob.parse_seq_state(before[target]).only_stream().positions)
        ok = s1 == native.OK and n_cells.value == t.n_ctx and status == native.OK and np.array_equal(
            np.sort(buf[buf >= 0]), truth)
        return status, (ok, "stats cell positions disagree with the state blob")


def run(model_path: str, examples: int, seed: int = 0, n_threads: int = 1) -> dict:
    """Fuzz `examples` calls; returns the report (failures empty when everything held)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    target = _Target(model_path, n_threads=n_threads)
    fuzzer = Fuzzer(target)
    start = time.perf_counter()

    @settings(max_examples=examples, deadline=None, derandomize=seed == 0, database=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=True)
    @given(seed=st.integers(0, 2**32 - 1) if seed == 0 else st.integers(seed, seed + 2**31),
           op=st.sampled_from(OPERATIONS), mutation=st.sampled_from(COMPACT_MUTATIONS),
           n0=st.integers(2, N_PER_SEQ_MAX), n1=st.integers(2, N_PER_SEQ_MAX), compact_first=st.booleans())
    def check(seed, op, mutation, n0, n1, compact_first):
        fuzzer.example(seed, op, mutation, n0, n1, compact_first)

    check()
    target.close()
    return {
        "examples": sum(fuzzer.calls.values()),
        "seconds": round(time.perf_counter() - start, 2),
        "calls": dict(sorted(fuzzer.calls.items())),
        "failures": fuzzer.failures[:50],
        "n_failures": len(fuzzer.failures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--model", help="GGUF path (default: the default model)")
    parser.add_argument("--seed", type=int, default=0, help="0: hypothesis' derandomized run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/fuzz.json")
    args = parser.parse_args(argv)
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise SystemExit("the fuzz run needs hypothesis: pip install -e '.[test]'")
    if args.model is None:
        from .. import models

        args.model = str(models.smollm2_path())
    report = report_header("fuzz", argv)
    report.update(model=Path(args.model).name, **run(args.model, args.examples, args.seed, args.threads))
    write_report(report, args.out)
    return 1 if report["n_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
