"""`kvcompose bench`: speed and memory of KV compression end to end, on a real model.

    kvcompose bench [--lengths 2048 4096 8192] [--budgets 0.25 0.5] [--repeats 3] [--threads N] [--quick]

For each logical context length L, one `kvcompose_gguf.Llama` (n_ctx about 2L, so that
repeat-mode observation fits) runs, in every repeat:

1. prefill: L tokens of real text from an empty cache, once without observation and once
   with attention statistics on (the last `--window` queries of every llama_decode call,
   as `bench.stats_overhead` measures it). The `Llama` itself does not observe during a
   prefill: it observes afterwards, in the compression below;
2. full-cache decode: the next `--decode-tokens` text tokens, one llama_decode each;
3. per kv_budget, from the prefilled state (saved once, loaded again for each budget): one
   `Llama.compress(kv_budget, observe="window")`, timed in its parts: observation
   (decoding the last `--window` tokens again with statistics on, reading them, removing
   them), selection (the policy), compaction (`Compactor.apply`); then the same tokens
   decoded at the same logical positions in the compressed cache;
4. lookahead and repeat modes (the first budget): the same compression observed by the
   window plus the model's greedy continuation of `--window` tokens, and by re-feeding the
   whole context (the reference's mode).

Reported per length: medians over repeats of every time, as wall time and as the
process's CPU time (on a shared machine the wall time includes waiting for a core; with
--threads 1 the CPU time is the work itself); ratios (compressed / full decode speed,
compression overhead as % of the prefill of the same context, lookahead or repeat / window) are taken
within a repeat, for each clock, then the median. Compaction's bytes per second beside a plain
ggml_cpy of the same bytes on the same backend and threads (`bench.compaction`'s
measurement). Memory: llama.cpp's per-cell K+V size (`llama_kvcompose_cell_bytes`) times
cells (full cache: L; compressed: cells in use), the logical entries apart, the KV buffer
llama.cpp allocated (n_ctx cells), and the process's peak resident memory.

The model's training context bounds positions (the `Llama` keeps the observing window and
the decoded tokens below it), so a length is shortened to n_ctx_train - window -
decode tokens where it would pass it (8192 -> 8128 on SmolLM2); the report gives both.
JSON goes to stdout and to --out (default results/bench.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import report_header, write_report

DEFAULT_LENGTHS = (2048, 4096, 8192)
DEFAULT_BUDGETS = (0.25, 0.5)
QUICK = {"lengths": (512,), "budgets": (0.5,), "repeats": 1, "decode_tokens": 8}
TARGET_OVERHEAD_PCT = 10.0


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="speed and memory of compression end to end (JSON to stdout and a file)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF path or known model name (default: smollm2-135m)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"logical context lengths (default {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help=f"kv_budget fractions kept (default {' '.join(map(str, DEFAULT_BUDGETS))})")
    p.add_argument("--policy", default="kvcompose", help="compression policy (default kvcompose)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per length, medians reported (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (default: all cores)")
    p.add_argument("--window", type=int, default=32, help="observing queries in window mode (default 32)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per measurement (default 32)")
    p.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fill", action=argparse.BooleanOptionalAction, default=True,
                   help="Llama(kv_fill=...): every layer fills the shared pool's cells (default), or --no-fill: "
                   "each keeps its allocation and the CPU's flash attention skips the rest")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 512 tokens, budget 0.5, 1 repeat, 8 decode tokens (unless given)")
    p.add_argument("--out", type=Path, default=Path("results/bench.json"))
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = QUICK if args.quick else {"lengths": DEFAULT_LENGTHS, "budgets": DEFAULT_BUDGETS, "repeats": 3,
                                      "decode_tokens": 32}
    s = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in quick.items()}
    if any(n < 64 for n in s["lengths"]):
        raise ValueError("lengths must be at least 64 tokens")
    if any(not 0.0 < b < 1.0 for b in s["budgets"]):
        raise ValueError("budgets are fractions kept, in (0, 1)")
    if s["repeats"] < 1 or s["decode_tokens"] < 1 or args.window < 1 or args.threads < 1:
        raise ValueError("repeats, decode tokens, window and threads must be at least 1")
    return s


def run_bench_command(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from kvcompose_gguf.cli import CliError

    try:
        settings = _settings(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    from kvcompose_gguf import models
    from kvcompose_gguf.policies import get_policy

    try:
        model_path = models.model_path(args.model)
        get_policy(args.policy)
    except (models.ModelNotInstalledError, ValueError) as exc:
        raise CliError(str(exc)) from None
    report = run(model_path, args, settings)
    args_text = sys.argv[2:] if argv is None else argv[1:]
    report["command"] = "kvcompose bench " + " ".join(args_text)
    write_report(report, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


# --- measurement -------------------------------------------------------------------------
#
# Every span is timed twice: wall time, and the process's CPU time. On a machine shared
# with other jobs the wall time includes waiting for a core; with --threads 1 the CPU time
# is the work itself (bench.stats_overhead reads it the same way).


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


class _Timed:
    """Wraps a callable; keeps (wall, cpu) seconds and the first argument of every call."""

    def __init__(self, fn):
        self.fn, self.spans, self.args = fn, [], []

    def __call__(self, *args, **kwargs):
        start = _clock()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.spans.append(_since(start))
            self.args.append(args[0] if args else None)

    def total(self) -> tuple[float, float]:
        return sum(s[0] for s in self.spans), sum(s[1] for s in self.spans)

    def clear(self) -> None:
        self.spans.clear()
        self.args.clear()


class _TimedPolicy:
    """The policy, with `select` timed; everything else is the policy's own."""

    def __init__(self, policy):
        self._policy = policy
        self.select = _Timed(policy.select)

    def __getattr__(self, name):
        return getattr(self._policy, name)


class _Instrumented:
    """A compressing `Llama` whose compression steps are timed, from outside: the instance's
    observation, its policy's selection and its compactor's apply are wrapped."""

    def __init__(self, llm):
        self.llm = llm
        kv = llm._kv
        self.observe = _Timed(kv._observe)
        kv._observe = self.observe
        self.policy = _TimedPolicy(kv.settings.policy)
        kv.settings = dataclasses.replace(kv.settings, policy=self.policy)
        self.apply = _Timed(kv.compactor.apply)
        kv.compactor.apply = self.apply

    def compress(self, kv_budget: float, observe: str) -> dict[str, Any]:
        for timed in (self.observe, self.policy.select, self.apply):
            timed.clear()
        start = _clock()
        record = self.llm.compress(kv_budget, observe=observe)
        total = _since(start)
        if not record.observe.startswith(observe):  # e.g. "repeat in 16 pieces"
            raise RuntimeError(f"asked for {observe} observation, the Llama used {record.observe}")
        selection = self.apply.args[-1]
        return {
            "observe": self.observe.total(),
            "select": self.policy.select.total(),
            "compact": self.apply.total(),
            "total": total,
            "mode": record.observe,
            "layer_counts": [int(x) for x in selection.counts],
            "layer_allocation": [int(x) for x in selection.allocation],
            "result": record.result,
        }


def _text_tokens(llm, n: int) -> list[int]:
    """n tokens of long real text (the Python Language Reference topics; a fixed English
    paragraph where the standard library has no pydoc_data)."""
    from kvcompose_gguf.eval import texts

    from .stats_overhead import TEXT

    try:
        text = texts.long_text("python-docs")
    except texts.TextNotAvailableError:
        text = TEXT * 64
    chars = 8 * n
    while True:
        tokens = llm.tokenize(text[:chars].encode("utf-8"), add_bos=False, special=False)
        if len(tokens) >= n or chars >= len(text):
            break
        chars *= 2
    while len(tokens) < n:
        tokens = tokens + tokens
    return [llm.token_bos()] + list(tokens[: n - 1])



def _clear(llm) -> None:
    import llama_cpp

    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    llm._kv.forget()


def _timed(fn) -> tuple[float, float]:
    start = _clock()
    fn()
    return _since(start)


def _decode(llm, tokens: list[int]) -> tuple[float, float]:
    """Decode `tokens` one llama_decode each after the cached history (no sampling)."""
    start = _clock()
    for t in tokens:
        llm.eval([t])
    return _since(start)


def _drop_after(llm, n_logical: int) -> None:
    """Forget the tokens decoded after n_logical (no compression since: cache = logical positions)."""
    llm.n_tokens = n_logical
    llm._ctx.kv_cache_seq_rm(-1, llm._kv.positions.cache(n_logical), -1)


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _seconds(spans) -> dict[str, float]:
    """Median wall and CPU seconds of (wall, cpu) spans."""
    return {"wall_s": round(float(np.median([s[0] for s in spans])), 5),
            "cpu_s": round(float(np.median([s[1] for s in spans])), 5)}


def _ratio(numerators, denominators, scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    """Median over repeats of scale x numerator / denominator, for wall and for CPU time."""
    return {clock: round(float(np.median([scale * n[i] / d[i] for n, d in zip(numerators, denominators)])), digits)
            for i, clock in enumerate(("wall", "cpu"))}


def _context_length(model_path) -> int:
    """The model's training context, from the GGUF metadata (0 if absent)."""
    from kvcompose_gguf.eval.kvpress_reference import gguf_architecture

    arch, meta = gguf_architecture(model_path)
    return int(meta.get(f"{arch}.context_length", 0))


PARTS = ("observe", "select", "compact", "total")


def _compression_summary(spans: dict[str, list], prefill_off: list) -> dict[str, Any]:
    out: dict[str, Any] = {part: _seconds(spans[part]) for part in PARTS}
    out["overhead_pct_of_prefill"] = _ratio(spans["total"], prefill_off, scale=100.0, digits=2)
    return out


def _measure_length(model_path, requested: int, s: dict, args, n_ctx_train: int) -> dict[str, Any]:
    from kvcompose_gguf.llama import Llama
    from kvcompose_gguf.stats import AttentionObserver

    window, n_decode = args.window, s["decode_tokens"]
    length = requested
    if n_ctx_train and length + window + n_decode > n_ctx_train:
        length = n_ctx_train - window - n_decode
    n_ctx = -(-(2 * length + window + n_decode + 64) // 256) * 256
    rss_before = _rss_bytes()
    llm = Llama(
        model_path=str(model_path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
        n_threads_batch=args.threads, flash_attn=args.flash_attn, seed=0, verbose=False,
        kv_compress=args.policy, kv_budget=s["budgets"][0], kv_window=window, kv_fill=args.fill,
        # nothing protected: the policy alone chooses, as in the evaluation of one compression
        kv_protect_prefix=0, kv_protect_recent=1,
    )
    try:
        timed = _Instrumented(llm)
        tokens = _text_tokens(llm, length + n_decode)
        context, decoded = tokens[:length], tokens[length:]
        compactor = llm._kv.compactor
        cell_bytes = compactor.cell_bytes()
        n_layer, n_head_kv = compactor.n_layer, compactor.n_head_kv
        rss_allocated = _rss_bytes()

        _clear(llm)
        llm.eval(context[: min(256, length)])  # warm-up: pages in the weights, sizes the compute buffers
        prefill_off, prefill_stats, full_decode = [], [], []
        per_budget: dict[float, dict[str, Any]] = {b: {p: [] for p in (*PARTS, "decode")} for b in s["budgets"]}
        other_modes: dict[str, dict[str, list]] = {m: {p: [] for p in PARTS} for m in ("lookahead", "repeat")}
        mode_labels: dict[str, str] = {}
        full_cells = None
        for _ in range(s["repeats"]):
            _clear(llm)
            with AttentionObserver(llm, n_last=window):
                prefill_stats.append(_timed(lambda: llm.eval(context)))
            _clear(llm)
            prefill_off.append(_timed(lambda: llm.eval(context)))
            full_cells = llm.kv_stats()["cells_used"]
            full_decode.append(_decode(llm, decoded))
            _drop_after(llm, length)
            saved = llm.save_state()
            for b in s["budgets"]:
                llm.load_state(saved)
                parts = timed.compress(b, "window")
                stats = llm.kv_stats()  # right after the compression, before the decoded tokens
                owned = compactor.cells_owned(0)
                acc = per_budget[b]
                for part in PARTS:
                    acc[part].append(parts[part])
                acc["decode"].append(_decode(llm, decoded))
                acc["last"] = {
                    "cells_used": stats["cells_used"],
                    "layer_counts": parts["layer_counts"],
                    "layer_allocation": parts["layer_allocation"],
                    "logical_entries": n_head_kv * int(owned.sum()),
                    "kv_bytes_free_after_compression": stats["kv_bytes_free"],
                    "physical_bytes_freed": parts["result"].physical_bytes_freed,
                }
            for mode, acc in other_modes.items():
                llm.load_state(saved)
                parts = timed.compress(s["budgets"][0], mode)
                mode_labels[mode] = parts["mode"]
                for part in PARTS:
                    acc[part].append(parts[part])
        budgets_out = []
        for b in s["budgets"]:
            acc = per_budget[b]
            last = acc["last"]
            # bytes the compaction writes: the kept slots of every layer, K and V
            # (the layers of these models have equal rows, so a cell's bytes split evenly)
            bytes_moved = int(sum(last["layer_counts"]) * cell_bytes // n_layer)
            compact_wall = float(np.median([c[0] for c in acc["compact"]]))
            compact_cpu = float(np.median([c[1] for c in acc["compact"]]))
            budgets_out.append({
                "kv_budget": b,
                "cells_used": last["cells_used"],
                "kv_bytes": last["cells_used"] * cell_bytes,
                "logical_entries": last["logical_entries"],
                "layer_counts": last["layer_counts"],
                "layer_allocation": last["layer_allocation"],
                "kv_bytes_free_after_compression": last["kv_bytes_free_after_compression"],
                "physical_bytes_freed": last["physical_bytes_freed"],
                "window_mode": _compression_summary(acc, prefill_off),
                "compaction": {  # the plain copy is timed after every length (see run)
                    "bytes_moved": bytes_moved,
                    "compact_s": round(compact_wall, 7),
                    "bytes_per_s": round(bytes_moved / compact_wall),
                    "bytes_per_cpu_s": round(bytes_moved / compact_cpu) if compact_cpu > 0 else None,
                },
                "decode_tokens_per_s": _ratio([(n_decode, n_decode)] * len(acc["decode"]), acc["decode"], digits=2),
                "decode_speedup_vs_full": _ratio(full_decode, acc["decode"]),
                "samples": {k: [[round(x, 5) for x in span] for span in v] for k, v in acc.items() if k != "last"},
            })
        window_total = per_budget[s["budgets"][0]]["total"]
        return {
            "requested_tokens": requested,
            "logical_tokens": length,
            "n_ctx": n_ctx,
            "kv_buffer_bytes": n_ctx * cell_bytes,
            "prefill": {
                "off": _seconds(prefill_off),
                "stats_on": _seconds(prefill_stats),
                "stats_overhead_pct": {k: round(v - 100.0, 2)
                                       for k, v in _ratio(prefill_stats, prefill_off, 100.0, 4).items()},
                "tokens_per_s": _ratio([(length, length)] * len(prefill_off), prefill_off, digits=1),
            },
            "full_cache": {
                "cells_used": full_cells,
                "kv_bytes": full_cells * cell_bytes,
                "logical_entries": n_layer * n_head_kv * full_cells,
                "decode_tokens_per_s": _ratio([(n_decode, n_decode)] * len(full_decode), full_decode, digits=2),
            },
            "budgets": budgets_out,
            **{f"{mode}_mode": {
                "kv_budget": s["budgets"][0],
                "observation": mode_labels[mode],
                **_compression_summary(acc, prefill_off),
                "ratio_to_window_mode": _ratio(acc["total"], window_total, digits=2),
            } for mode, acc in other_modes.items()},
            "memory": {
                "rss_before_context_bytes": rss_before,
                "rss_after_context_bytes": rss_allocated,
                "peak_rss_bytes_so_far": _peak_rss_bytes(),
            },
            "samples": {
                name: [[round(x, 5) for x in span] for span in spans]
                for name, spans in (("prefill_off", prefill_off), ("prefill_stats", prefill_stats),
                                    ("full_decode", full_decode))
            },
        }
    finally:
        llm.close()


def _copy_seconds(copier, n_bytes: int) -> float:
    """Wall seconds of bench.compaction's plain copy (its time_ms gives ms, as a number or as
    an object with the minimum wall time in .wall)."""
    best = copier.time_ms(n_bytes, 4)
    return float(getattr(best, "wall", best)) / 1e3


def run(model_path, args: argparse.Namespace, s: dict) -> dict[str, Any]:
    import llama_cpp

    from kvcompose_gguf import native

    from .compaction import _GgmlCopy

    native.load()
    try:
        copier = _GgmlCopy(Path(llama_cpp.llama_cpp._lib._name).parent, args.threads)
    except OSError:  # a backend without a separate libggml-cpu (the plain copy is then not measured)
        copier = None
    n_ctx_train = _context_length(model_path)
    lengths = []
    for n in s["lengths"]:
        row = _measure_length(model_path, n, s, args, n_ctx_train)
        lengths.append(row)
        overhead = row["budgets"][0]["window_mode"]["overhead_pct_of_prefill"]
        print(f"length {row['logical_tokens']}: prefill {row['prefill']['off']['wall_s']:.2f} s wall, "
              f"{row['prefill']['off']['cpu_s']:.2f} s CPU; window-mode compression {overhead['wall']:.1f} % "
              f"of it (wall), {overhead['cpu']:.1f} % (CPU)", file=sys.stderr, flush=True)
    # The plain copies come last: their cache-evicting scratch buffer (twice the largest CPU
    # cache, at least 256 MiB) would otherwise count in the peak resident memory of the
    # lengths measured after them.
    for row in lengths:
        for b in row["budgets"]:
            c = b["compaction"]
            copy_s = _copy_seconds(copier, c["bytes_moved"]) if copier is not None else None
            # the minimum over 4 runs from cold caches, bench.compaction's measurement
            c["plain_copy_s"] = None if copy_s is None else round(copy_s, 7)
            c["plain_copy_bytes_per_s"] = None if copy_s is None else round(c["bytes_moved"] / copy_s)
            c["ratio_to_copy"] = None if copy_s is None else round(c["compact_s"] / copy_s, 2)
    overheads = [b["window_mode"]["overhead_pct_of_prefill"] for r in lengths for b in r["budgets"]]
    first = lengths[0]
    return {
        **report_header("end_to_end", None),
        "model": Path(model_path).name,
        "n_ctx_train": n_ctx_train,
        "policy": args.policy,
        "threads": args.threads,
        "flash_attn": args.flash_attn,
        "fill": args.fill,
        "window": args.window,
        "decode_tokens": s["decode_tokens"],
        "repeats": s["repeats"],
        "quick": args.quick,
        "llama_cpp_python": llama_cpp.__version__,
        "cell_bytes": first["full_cache"]["kv_bytes"] // first["full_cache"]["cells_used"],
        "statistic": "medians over repeats of wall and process CPU seconds; ratios taken within a repeat, "
                     "then the median",
        "target": f"window-mode compression (observation + selection + compaction) <= {TARGET_OVERHEAD_PCT:g} % "
                  "of the prefill time of the same context",
        "target_met": {clock: all(o[clock] <= TARGET_OVERHEAD_PCT for o in overheads) for clock in ("wall", "cpu")},
        "lengths": lengths,
    }
