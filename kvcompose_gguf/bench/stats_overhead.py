"""Cost of attention statistics during prefill.

    python -m kvcompose_gguf.bench.stats_overhead [--lengths 1024 2048 4096] [--windows 32 64]

Prefills n tokens of the default model in one llama_decode call (micro-batches
of 512), with observation off and with observation on over the last w queries
of the batch, and reports the time of each and the overhead in percent. The
runs of one length are interleaved and repeated; the minimum of each is kept,
since on a shared machine noise only ever adds time. JSON goes to stdout and
to results/stats_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import report_header, write_report

TEXT = (
    "The committee met on Tuesday to review the harbour accounts. Fishing licences rose, the ferry ran late "
    "twice, and the lighthouse needed a new lens. Members argued about the budget for the winter festival "
    "and agreed to ask the school choir to sing. "
)




class _Prefill:
    def __init__(self, model_path: Path, n_ctx: int, n_threads: int, flash_attn: bool):
        import llama_cpp

        self.llama_cpp = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"could not load {model_path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("could not create a context")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        text = (TEXT * (n_ctx // 8 + 1)).encode()
        buf = (llama_cpp.llama_token * (len(text) + 8))()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
        self.tokens = list(buf[:n])

    def run(self, n_tokens: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one prefill of n_tokens from an empty cache."""
        lc = self.llama_cpp
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        batch = lc.llama_batch_init(n_tokens, 0, 1)
        try:
            for i in range(n_tokens):
                batch.token[i] = self.tokens[i]
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n_tokens - 1
            batch.n_tokens = n_tokens
            t0, c0 = time.perf_counter(), time.process_time()
            if lc.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            lc.llama_synchronize(self.ctx)
            return time.perf_counter() - t0, time.process_time() - c0
        finally:
            lc.llama_batch_free(batch)

    def close(self) -> None:
        self.llama_cpp.llama_free(self.ctx)
        self.llama_cpp.llama_model_free(self.model)


def main(argv: list[str] | None = None) -> dict:
    from kvcompose_gguf import models, native, stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model name or GGUF path (default: SmolLM2-135M)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on")
    ap.add_argument("--out", default="results/stats_overhead.json")
    args = ap.parse_args(argv)

    native.load()
    model_path = models.model_path(args.model)
    rows = []
    # keep stdout/stderr for the JSON: silence llama.cpp's loading chatter
    with native.llama_log_to(None):
        bench = _Prefill(model_path, max(args.lengths), args.threads, args.flash_attn == "on")
        try:
            bench.run(min(args.lengths))  # warm-up: page in weights, size the compute buffers
            for n in args.lengths:
                modes = ["off"] + [f"on_{w}" for w in args.windows]
                wall = {m: float("inf") for m in modes}
                cpu = {m: float("inf") for m in modes}
                for _ in range(args.repeats):
                    for mode in modes:
                        if mode == "off":
                            w, c = bench.run(n)
                        else:
                            obs = stats.AttentionObserver(bench.ctx, n_last=int(mode.split("_")[1]))
                            with obs:
                                w, c = bench.run(n)
                                assert obs.n_queries == int(mode.split("_")[1])
                        wall[mode], cpu[mode] = min(wall[mode], w), min(cpu[mode], c)
                row = {
                    "n_prompt": n,
                    "prefill_wall_s": {m: round(t, 4) for m, t in wall.items()},
                    "prefill_cpu_s": {m: round(t, 4) for m, t in cpu.items()},
                    "overhead_wall_pct": {m: round(100.0 * (wall[m] / wall["off"] - 1.0), 2) for m in modes if m != "off"},
                    "overhead_cpu_pct": {m: round(100.0 * (cpu[m] / cpu["off"] - 1.0), 2) for m in modes if m != "off"},
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            bench.close()

    result = {
        **report_header("stats_overhead", argv),
        "model": str(model_path.name),
        "flash_attn": args.flash_attn,
        "n_threads": args.threads,
        "n_ubatch": 512,
        "repeats": args.repeats,
        "target": "overhead < 5% of prefill time (CPU)",
        "note": "minimum over repeats; with --threads 1 the process CPU time is robust to other load on a shared machine",
        "results": rows,
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main()
