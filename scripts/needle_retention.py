#!/usr/bin/env python3
"""Where a needle's tokens rank in the attention statistics, and how many (layer, KV head)
pairs a policy keeps them in: one compression of a passkey prompt, observed by its question.

    python scripts/needle_retention.py [--seed 0] [--tokens 1500] [--budget 0.5] [--policy kvcompose]

Full cache (n_ctx 2048), flash attention on; the observing queries are the question's
tokens (max over queries, mean over the GQA group). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import llama_cpp
import numpy as np

from kvcompose_gguf import models
from kvcompose_gguf.eval import tasks
from kvcompose_gguf.policies import get_policy
from kvcompose_gguf.stats import AttentionObserver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--policy", default="kvcompose")
    args = ap.parse_args()

    llm = llama_cpp.Llama(model_path=str(models.smollm2_path()), n_ctx=2048, n_batch=512, flash_attn=True, verbose=False)
    sample = tasks.niah(args.seed, 0, args.tokens, lambda s: len(llm.tokenize(s.encode(), add_bos=False)))
    text = sample.user_message()
    tokens = llm.tokenize(text.encode())
    needle = llm.tokenize(sample.answers[0].encode(), add_bos=False)
    start = next(i for i in range(len(tokens)) if tokens[i : i + len(needle)] == needle)
    question = llm.tokenize(text[text.rfind("What") :].encode(), add_bos=False)

    llm.eval(tokens[: len(tokens) - len(question)])
    observer = AttentionObserver(llm, query_reduce="max", head_reduce="mean")
    with observer:
        llm.eval(question)
        obs = observer.observation()
    selection = get_policy(args.policy).select(obs, args.budget)

    n_layer, n_head_kv, _ = obs.scores.shape
    rank = np.zeros((n_layer, n_head_kv, len(needle)))
    kept = np.zeros((n_layer, n_head_kv, len(needle)), dtype=bool)
    for layer in range(n_layer):
        for head in range(n_head_kv):
            valid = obs.positions[layer, head] >= 0
            scores, positions = obs.scores[layer, head][valid], obs.positions[layer, head][valid]
            order_rank = np.empty(len(scores))
            order_rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores)) / len(scores)
            held = set(selection.kept_positions[layer, head].tolist())
            for k in range(len(needle)):
                rank[layer, head, k] = order_rank[np.flatnonzero(positions == start + k)[0]]
                kept[layer, head, k] = start + k in held
    print(json.dumps({
        "command": "python scripts/needle_retention.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "answer": sample.answers[0], "prompt_tokens": len(tokens), "needle_at": start,
        "median_rank_percentile_per_needle_token": np.round(np.median(rank, axis=(0, 1)), 3).tolist(),
        "kept_fraction_of_layer_heads_per_needle_token": np.round(kept.mean(axis=(0, 1)), 2).tolist(),
        "layers_keeping_every_needle_token_in_every_head": int(kept.all(axis=(1, 2)).sum()),
        "layer_counts_min_max": [int(selection.counts.min()), int(selection.counts.max())],
    }))


if __name__ == "__main__":
    main()
