"""Soak: a long scripted chat in a small context, compressed over and over.

    python -m kvcompose_gguf.bench.soak [--turns 300] [--model PATH] [--n-ctx 512] [--max-tokens 48]

One `Llama(kv_compress="kvcompose")` with flash attention and a q8_0 K/V cache chats for
`--turns` turns. The system prompt holds two facts (protected with kv_protect_prefix="system");
every 10th user turn (the first included) asks for one of them, the others are scripted small talk. The chat's
logical history grows far past n_ctx and, for the default model over 300 turns, past the
model's training context (8192): the cells' positions are then rebased. Per turn it records
the cells in use, the logical tokens, compressions, rebases, cache rebuilds and the process'
resident memory. The report (stdout and results/soak.json):

- max_cells_used vs n_ctx (must never exceed it);
- rss_mib at the end of warm-up (the first 10 % of turns) and the largest growth after it;
- logical_tokens, n_ctx_train, rebases, compressions, rebuilds (a rebuild re-evaluates the
  whole history: a continued chat should need none);
- system_prompt_kept: at every 10th turn and the last, whether every layer and KV head still holds every
  position of the system prompt;
- fact_recall: replies to the fact questions that contain the fact, in the first and the
  last third of the turns (the first ones run before any compression: the model's own
  baseline);
- coherence: share of distinct replies among the turns (a chat stuck repeating one reply
  drives it towards 0), mean share of distinct word 3-grams within a reply and of empty
  replies, first vs last third.

`--no-compress` runs the same script on stock llama.cpp as the control (n_ctx must hold the
whole chat): what the model does with its full history over the same turns.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from . import report_header, write_report

FACTS = {"password": "BLUEBIRD", "name": "Maria"}
SYSTEM = (f"You are a friendly assistant. The secret password is {FACTS['password']}. "
          f"The user's name is {FACTS['name']}.")
QUESTIONS = [("What is the secret password?", FACTS["password"]), ("What is my name?", FACTS["name"])]
SMALL_TALK = [  # long enough that 300 turns pass the default model's training context (8192)
    "Tell me something interesting about the sea and the animals that live in it.",
    "What should I cook for dinner tonight? I have rice, eggs and some vegetables.",
    "Give me a tip for learning to play the guitar when I only have a little time each day.",
    "Why is the sky blue during the day and red at sunset? Explain it simply.",
    "Suggest a name for a small grey cat that likes to sleep on the windowsill.",
    "What is a good way to start the morning when I feel tired and slow?",
    "Describe a forest in autumn, with its colours, sounds and smells.",
    "How do bees make honey, and why do they need so much of it?",
    "What is your favourite season of the year, and what do you like about it?",
    "Recommend a board game for four people who like strategy but not long rules.",
    "How far away is the moon, and how long would it take to drive there by car?",
    "Write a few sentences about a night train travelling through the mountains.",
]


# Sampled, seeded (one thread: reproducible): greedy decoding makes a 135M model copy its
# previous reply turn after turn, with or without compression.
SAMPLING = dict(temperature=0.7, top_p=0.9, repeat_penalty=1.15)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _distinct_trigrams(text: str) -> float:
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _system_kept(llm) -> bool:
    n_system = len(llm._kv.system_tokens)
    if n_system == 0 or llm._kv.protected_prefix() == 0:
        return False
    logical = llm._kv.logical_positions()  # [n_layer, n_head_kv, cells]
    needed = np.arange(n_system)
    return all(np.isin(needed, logical[l, h]).all() for l in range(logical.shape[0]) for h in range(logical.shape[1]))


class _Rebuilds(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        if "rebuilding the cache" in record.getMessage():
            self.count += 1


def user_turn(i: int) -> tuple[str, str | None]:
    """The i-th user message and the fact its reply should contain (None for small talk)."""
    if i % 10 == 0:  # turn 0 asks before any compression: the model's own baseline
        question, fact = QUESTIONS[(i // 10) % len(QUESTIONS)]
        return question, fact
    return SMALL_TALK[i % len(SMALL_TALK)], None


def run(model_path: str, turns: int, n_ctx: int = 512, max_tokens: int = 48, n_threads: int = 1,
        chat_format: str | None = None, seed: int = 0, progress=None, completion_kwargs: dict | None = None,
        **llama_kwargs) -> dict:
    """The soak report (see the module doc). llama_kwargs go to `Llama`, completion_kwargs to
    each `create_chat_completion` (after SAMPLING)."""
    from .. import Llama
    from ..cli import _ggml_type

    kwargs = dict(n_ctx=n_ctx, n_batch=min(n_ctx, 256), flash_attn=True, type_k=_ggml_type("q8_0"),
                  type_v=_ggml_type("q8_0"), n_threads=n_threads, n_threads_batch=n_threads, seed=seed,
                  kv_compress="kvcompose", kv_budget=0.5, kv_protect_prefix="system", verbose=False)
    if llama_kwargs.get("kv_compress", "") is None:  # the full-cache control: stock llama.cpp
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("kv_")}
    if chat_format:
        kwargs["chat_format"] = chat_format
    kwargs.update(llama_kwargs)
    llm = Llama(model_path=str(model_path), **kwargs)
    rebuilds = _Rebuilds()
    logger = logging.getLogger("kvcompose_gguf")
    logger.addHandler(rebuilds)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    messages = [{"role": "system", "content": SYSTEM}]
    per_turn, facts, kept_checks = [], [], []
    start = time.perf_counter()
    error = None
    try:
        for i in range(turns):
            text, fact = user_turn(i)
            messages.append({"role": "user", "content": text})
            t0 = time.perf_counter()
            try:
                out = llm.create_chat_completion(messages, max_tokens=max_tokens, **{**SAMPLING, **(completion_kwargs or {})})
            except ValueError as exc:  # e.g. the full-cache control running out of n_ctx
                error = f"turn {i}: {exc}"
                break
            reply = out["choices"][0]["message"]["content"] or ""
            messages.append({"role": "assistant", "content": reply})
            stats = llm.kv_stats()
            per_turn.append(dict(turn=i, seconds=time.perf_counter() - t0, cells_used=stats["cells_used"],
                                 logical_tokens=stats["logical_tokens"], rss=_rss_bytes(),
                                 trigrams=_distinct_trigrams(reply), empty=not reply.strip(), reply=reply))
            if fact is not None:
                facts.append((i, fact, fact.lower() in reply.lower()))
            if i % 10 == 9 or i == turns - 1:
                kept_checks.append(_system_kept(llm) if llm._kv is not None else True)
            if progress:
                progress(i, stats, reply)
        final = llm.kv_stats()
        n_ctx_train = llm._model.n_ctx_train()
    finally:
        logger.removeHandler(rebuilds)
        logger.setLevel(old_level)
        llm.close()

    turns = len(per_turn)  # fewer than asked when a turn failed
    warm = max(1, turns // 10)
    rss = np.array([t["rss"] for t in per_turn])
    third = max(1, turns // 3)

    def share(rows, key):
        return round(float(np.mean([r[key] for r in rows])), 3) if rows else None

    def recall(first: int, last: int) -> dict:
        rows = [f for f in facts if first <= f[0] < last]
        return {fact: f"{sum(ok for _, f2, ok in rows if f2 == fact)}/{sum(f2 == fact for _, f2, _ in rows)}"
                for fact in FACTS.values()}

    def distinct_replies(rows) -> float:
        replies = [r["reply"] for r in rows]
        return round(len(set(replies)) / len(replies), 3) if replies else None

    return {
        "model": Path(model_path).name,
        "turns": turns,
        "error": error,
        "n_ctx": final["n_ctx"],  # llama.cpp rounds the requested n_ctx up to a multiple of 256
        "max_tokens": max_tokens,
        "n_threads": n_threads,
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_turn_max": round(max(t["seconds"] for t in per_turn), 3),
        "max_cells_used": max(t["cells_used"] for t in per_turn),
        "logical_tokens": final["logical_tokens"],
        "n_ctx_train": int(n_ctx_train),
        "passed_training_context": final["logical_tokens"] > n_ctx_train,
        "kv_compress": kwargs.get("kv_compress"),
        "compressions": final["compressions"],
        "rebases": final["rebases"],
        "rebuilds": rebuilds.count,
        "warmup_turns": warm,
        "rss_mib_after_warmup": round(rss[warm - 1] / 2**20, 1),
        "rss_mib_end": round(rss[-1] / 2**20, 1),
        "rss_growth_mib_after_warmup": round((rss[warm - 1 :].max() - rss[warm - 1]) / 2**20, 1),
        # at every tenth of the turns: a leak grows steadily, a one-off allocation steps once
        "rss_mib_by_tenth": [round(rss[min(turns - 1, k * turns // 10)] / 2**20, 1) for k in range(1, 11)],
        "system_prompt_kept": f"{sum(kept_checks)}/{len(kept_checks)}",
        "fact_recall_first_third": recall(0, third),
        "fact_recall_last_third": recall(turns - third, turns),
        "distinct_replies_first_third": distinct_replies(per_turn[:third]),
        "distinct_replies_last_third": distinct_replies(per_turn[-third:]),
        "distinct_trigrams_first_third": share(per_turn[:third], "trigrams"),
        "distinct_trigrams_last_third": share(per_turn[-third:], "trigrams"),
        "empty_replies_first_third": share(per_turn[:third], "empty"),
        "empty_replies_last_third": share(per_turn[-third:], "empty"),
        "last_replies": [m["content"] for m in messages[-6:] if m["role"] == "assistant"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--model", help="GGUF path (default: the default model)")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chat-format", help="for a GGUF without a chat template, e.g. chatml")
    parser.add_argument("--no-compress", action="store_true",
                        help="the full-cache control: stock llama.cpp (n_ctx must hold the whole chat)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default="results/soak.json")
    args = parser.parse_args(argv)
    if args.model is None:
        from .. import models

        args.model = str(models.smollm2_path())

    def progress(i, stats, reply):
        if not args.quiet:
            print(f"turn {i + 1}: cells {stats['cells_used']}/{stats['n_ctx']} tokens {stats['logical_tokens']} "
                  f"compressions {stats['compressions']} rebases {stats['rebases']} | {reply[:70]!r}",
                  file=sys.stderr, flush=True)

    report = report_header("soak", argv)
    extra = {"kv_compress": None} if args.no_compress else {}
    report.update(run(args.model, args.turns, args.n_ctx, args.max_tokens, args.threads, args.chat_format,
                      progress=progress, **extra))
    write_report(report, args.out)
    ok = report["error"] is None and report["max_cells_used"] <= report["n_ctx"] and report["rebuilds"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
