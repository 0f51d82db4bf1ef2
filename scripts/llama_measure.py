"""Model-level measurements of `kvcompose_gguf.Llama` on the default model (SmolLM2-135M).

    python scripts/llama_measure.py passkey --samples 8 [--observe repeat] [--seed0 0]
    python scripts/llama_measure.py chat --samples 6
    python scripts/llama_measure.py passkey --samples 8 --policies kvcompose --n-ctx 1536 --kv-memory 0.5
    python scripts/llama_measure.py memory --n-ctx 2048,4096,8192 --kv-memory 0.5,0.6,0.75

passkey: a needle (eval.tasks.niah) in a ~1.5k-token prompt at n_ctx 768. Stock
llama_cpp.Llama refuses the prompt; each policy answers from a compressed cache.
chat: a multi-turn chat (eval.tasks.chat_recall, RULER's noise as filler turns) about
4x n_ctx long, the model's own replies in between; the last question recalls the magic
number of the first turn. For a compressing policy, each row also lists after every turn
how many (layer, KV head) pairs still hold all tokens of the number (of 30 x 3), and, per
compression while the number is cached, where its digits rank among the cached tokens'
scores (median over the pairs holding them; 0 = the most attended).
--mention-key: every filler turn asks whether the model still remembers the number for the
key (without restating it), a chat that keeps coming back to the fact.
memory: what per-layer memory allocates for each n_ctx and kv_memory (no prompt is run),
read from llama.cpp's tensors and buffers, beside the full cache.
--kv-memory gives the compressing policies per-layer physical memory (`Llama(kv_memory=...)`):
n_ctx cells, in that fraction of a full cache's bytes. --no-fill: `Llama(kv_fill=False)`, each
layer of the shared pool keeps exactly its allocation. --observe reread is the chat mode.
Prints one JSON object per policy and sample, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import llama_cpp
import numpy as np

from kvcompose_gguf import models
from kvcompose_gguf.cli import kv_bytes_allocated
from kvcompose_gguf.eval import tasks
from kvcompose_gguf.llama import Llama

SYSTEM = "You are a helpful assistant. Answer briefly."
CHAT_CTX = 512  # the chat is 4x this long, whatever n_ctx the run uses


def _llama(policy: str | None, n_ctx: int, observe: str = "window", kv_memory=None, fill=True) -> llama_cpp.Llama:
    kwargs = dict(model_path=str(models.smollm2_path()), n_ctx=n_ctx, n_batch=256, flash_attn=True, seed=0,
                  verbose=False, n_threads=2)
    if policy is None:
        return llama_cpp.Llama(**kwargs)
    return Llama(kv_compress=policy, kv_observe=observe, kv_memory=kv_memory, kv_fill=fill, **kwargs)


def _reply(llm, messages, max_tokens: int) -> str:
    out = llm.create_chat_completion(messages, temperature=0, max_tokens=max_tokens)
    return out["choices"][0]["message"]["content"]


def passkey(llm, seed: int, target_tokens: int = 1500) -> dict:
    count = lambda text: len(llm.tokenize(text.encode(), add_bos=False))  # noqa: E731
    sample = tasks.niah(seed, 0, target_tokens, count)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sample.user_message()}]
    try:
        reply = _reply(llm, messages, 24)
    except ValueError as exc:  # stock: the prompt exceeds the context window
        return {"seed": seed, "refused": str(exc)[:80], "correct": False}
    return {"seed": seed, "correct": all(a in reply for a in sample.answers), "reply": reply[:80],
            "answers": sample.answers}


def chat(llm, seed: int, n_ctx: int, mention_key: bool = False) -> dict:
    count = lambda text: len(llm.tokenize(text.encode(), add_bos=False))  # noqa: E731
    scenario = tasks.chat_recall(seed, 0, 4 * CHAT_CTX, count, n_turns=6, mention_key=mention_key)
    retention = []
    ranks = _record_number_ranks(llm, scenario.answers[0])
    reply = scenario.play(lambda messages, n: _reply(llm, messages, n), SYSTEM,
                          after_turn=lambda _: retention.append(_heads_holding(llm, scenario.answers[0])))
    row = {"seed": seed, "correct": all(a in reply for a in scenario.answers), "reply": reply[:80],
           "answers": scenario.answers, "logical_tokens": llm.n_tokens}
    if retention[0] is not None:
        row["heads_holding_number_after_each_turn"] = retention
        row["number_rank_at_each_compression"] = ranks
    return row


def _number_tokens(llm, number: str) -> list[int]:
    return llm.tokenize(f" {number}".encode(), add_bos=False)[-len(number):]


def _first_occurrence(llm, needle: list[int]) -> int:
    history = [int(t) for t in llm.input_ids[: llm.n_tokens]]
    return next(i for i in range(len(history)) if history[i : i + len(needle)] == needle)


def _record_number_ranks(llm, number: str) -> list:
    """Per compression, while any digit of the number is still cached: the median over the
    (layer, KV head) pairs holding some of its digits of their rank percentile among the
    cached tokens' scores (0 = the most attended), and how many of those pairs rank them in
    the top half. Empty for a stock cache."""
    ranks: list = []
    kv = getattr(llm, "_kv", None)
    if kv is None:
        return ranks
    observe = kv._observe

    def observed(upcoming, mode):
        observation, used = observe(upcoming, mode)
        first = _first_occurrence(llm, _number_tokens(llm, number))
        per_pair = []
        for scores, positions in zip(observation.scores.reshape(-1, observation.scores.shape[-1]),
                                     observation.positions.reshape(-1, observation.positions.shape[-1])):
            digits = scores[(positions >= first) & (positions < first + len(number))]
            valid = scores[positions >= 0]
            if digits.size:
                per_pair.append(float(np.median((valid[None, :] > digits[:, None]).mean(axis=1))))
        if per_pair:
            ranks.append({"median": round(float(np.median(per_pair)), 2),
                          "pairs_in_top_half": int((np.array(per_pair) < 0.5).sum()), "pairs": len(per_pair)})
        return observation, used

    kv._observe = observed
    return ranks


def _heads_holding(llm, number: str) -> int | None:
    """(layer, KV head) pairs whose cache still holds every token of `number` (None: stock cache)."""
    if getattr(llm, "_kv", None) is None:
        return None
    needle = _number_tokens(llm, number)
    first = _first_occurrence(llm, needle)
    held = np.isin(llm._kv.logical_positions(), np.arange(first, first + len(needle)))
    return int((held.sum(axis=-1) == len(needle)).sum())


def memory(n_ctx: int, kv_memory: float) -> dict:
    try:
        llm = _llama("kvcompose", n_ctx, kv_memory=kv_memory)
    except ValueError as exc:  # the profile's shape cannot reach this memory
        return {"n_ctx": n_ctx, "kv_memory": kv_memory, "refused": str(exc)}
    mem = llm.kv_stats()["kv_memory"]
    lay = llm._kv.compactor.layout
    llm.close()
    return {"n_ctx": n_ctx, "kv_memory": kv_memory, "per_layer": mem["per_layer"], "n_recent": mem["n_recent"],
            "caps_min": int(lay.caps.min()), "caps_max": int(lay.caps.max()),
            "allocated_bytes": lay.allocated_bytes, "buffer_bytes": lay.buffer_bytes,
            "full_cache_bytes": mem["full_cache_bytes"],
            "allocated_fraction": round(lay.allocated_bytes / mem["full_cache_bytes"], 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["passkey", "chat", "memory"])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--policies", default="stock,kvcompose,streaming")
    parser.add_argument("--observe", default="window", help="kv_observe of the compressing policies")
    parser.add_argument("--seed0", type=int, default=0, help="first seed")
    parser.add_argument("--kv-memory", default=None, help="per-layer memory of the compressing policies, "
                        "a fraction of a full n_ctx cache (memory: a comma-separated list)")
    parser.add_argument("--no-fill", action="store_true", help="kv_fill=False: each layer keeps exactly its "
                        "allocation (unowned rows masked) instead of filling the shared pool")
    parser.add_argument("--mention-key", action="store_true", help="chat: every filler turn asks whether the "
                        "model still remembers the number for the key (without the number)")
    parser.add_argument("--n-ctx", default=None, help="default 768 (passkey), 512 (chat); "
                        "a larger one with --policies stock gives the full-cache reference (memory: a list)")
    args = parser.parse_args(argv)
    if args.task == "memory":
        for n_ctx in (int(x) for x in (args.n_ctx or "2048,4096,8192").split(",")):
            for fraction in (float(x) for x in (args.kv_memory or "0.5,0.6,0.75").split(",")):
                print(json.dumps(memory(n_ctx, fraction)), flush=True)
        print(json.dumps({"machine": platform.platform(), "python": sys.version.split()[0],
                          "llama_cpp": llama_cpp.__version__}))
        return 0
    args.n_ctx = int(args.n_ctx) if args.n_ctx else None
    args.kv_memory = float(args.kv_memory) if args.kv_memory else None
    n_ctx = args.n_ctx or (768 if args.task == "passkey" else 512)
    summary = {}
    start = time.time()
    for name in args.policies.split(","):
        policy = None if name == "stock" else name
        correct = 0
        for seed in range(args.seed0, args.seed0 + args.samples):
            t0 = time.time()
            llm = _llama(policy, n_ctx, args.observe, args.kv_memory if policy else None, not args.no_fill)
            row = passkey(llm, seed) if args.task == "passkey" else chat(llm, seed, n_ctx, args.mention_key)
            row["kv_bytes_allocated"] = kv_bytes_allocated(llm)
            llm.close()
            correct += row["correct"]
            row["seconds"] = round(time.time() - t0, 1)
            print(json.dumps({"task": args.task, "policy": name, "observe": args.observe, "kv_memory": args.kv_memory,
                              "fill": not args.no_fill, **row}, default=str), flush=True)
        summary[name] = f"{correct}/{args.samples}"
    print(json.dumps({"summary": summary, "task": args.task, "observe": args.observe, "n_ctx": n_ctx,
                      "kv_memory": args.kv_memory, "seconds": round(time.time() - start),
                      "machine": platform.platform(), "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
