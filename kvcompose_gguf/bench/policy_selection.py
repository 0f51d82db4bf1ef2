"""Time the step from attention statistics to a selection (pure numpy, no model).

Target: KVCompose over a 30-layer, 8k-cell, 3-KV-head observation takes well
under 50 ms on the CI CPU. Prints JSON and writes results/policy_selection.json.

    python -m kvcompose_gguf.bench.policy_selection [--layers 30 --heads 3 --cells 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from kvcompose_gguf.policies import Observation, get_policy

from . import report_header, write_report




def _observation(n_layer: int, n_head: int, n_cells: int, seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    # Attention-like statistics: heavy-tailed, a few dominant tokens per head.
    scores = rng.lognormal(mean=-6.0, sigma=2.0, size=(n_layer, n_head, n_cells)).astype(np.float32)
    positions = np.broadcast_to(np.arange(n_cells, dtype=np.int32), scores.shape).copy()
    return Observation(scores=scores, positions=positions)


def _time(fn, repeats: int) -> dict:
    """Wall time, and the process's CPU time: on a shared machine the wall time includes waiting."""
    fn()  # warm-up: first-touch allocations, lazy imports
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    wall_ms, cpu_ms = np.array(wall) * 1e3, np.array(cpu) * 1e3
    return {
        "min_ms": round(float(wall_ms.min()), 3),
        "median_ms": round(float(np.median(wall_ms)), 3),
        "median_cpu_ms": round(float(np.median(cpu_ms)), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=3, help="KV heads")
    ap.add_argument("--cells", type=int, default=8192)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--policies", nargs="+", default=["kvcompose", "kvcompose-uniform", "snapkv", "tova"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="results/policy_selection.json")
    args = ap.parse_args(argv)

    obs = _observation(args.layers, args.heads, args.cells, seed=0)
    rows = []
    for name in args.policies:
        policy = get_policy(name)
        for budget in args.budgets:
            row = {"policy": name, "kv_budget": budget, **_time(lambda: policy.select(obs, budget), args.repeats)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    result = {
        **report_header("policy_selection", argv),
        "numpy": np.__version__,
        "shape": {"n_layer": args.layers, "n_head_kv": args.heads, "n_cells": args.cells},
        "repeats": args.repeats,
        "target": "kvcompose < 50 ms for 30 layers x 3 KV heads x 8192 cells",
        "results": rows,
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main()
