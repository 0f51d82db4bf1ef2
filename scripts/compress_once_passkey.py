#!/usr/bin/env python3
"""The passkey prompt compressed once after its context, the question after: kvpress's
semantics, run by the reference (kvpress KVComposePress on transformers, the GGUF weights
dequantised) or by us (kvcompose_gguf.Llama on llama.cpp, `compress()` then the question).

    python scripts/compress_once_passkey.py --impl kvpress [--press kvcompose|full] [--ratio 0.5]
    python scripts/compress_once_passkey.py --impl ours [--observe repeat|window] [--ratio 0.5]

One JSON line per sample (reply, per-layer kept counts), then a summary line. The prompt is
SmolLM2's chat template around eval.tasks.niah's ~1.5k-token context; `ratio` is kvpress's
compression ratio (kv_budget = 1 - ratio).
"""

from __future__ import annotations

import argparse
import json
import time

from kvcompose_gguf import models
from kvcompose_gguf.eval import tasks

SYSTEM = "You are a helpful assistant. Answer briefly."
MAX_NEW = 26


def _prompt(context: str, question: str) -> tuple[str, str]:
    head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{context}"
    tail = f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return head, tail


class Reference:
    """kvpress on transformers: one compression of the context inside the press, then greedy decoding."""

    def __init__(self, press: str, ratio: float):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        path = models.smollm2_path()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        self.press, self.ratio = press, ratio

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def answer(self, head: str, tail: str) -> tuple[str, list[int]]:
        from kvpress import KVComposePress
        from transformers.cache_utils import DynamicCache

        torch = self.torch
        context = self.tok(head, return_tensors="pt", add_special_tokens=False).input_ids
        question = self.tok(tail, return_tensors="pt", add_special_tokens=False).input_ids
        cache = DynamicCache()
        with torch.no_grad():
            if self.press == "full":
                self.model(context, past_key_values=cache)
            else:
                with KVComposePress(compression_ratio=self.ratio)(self.model):
                    self.model(context, past_key_values=cache)
            counts = [layer.keys.shape[2] for layer in cache.layers]
            position = context.shape[1]
            # One token per call: with per-layer cache lengths no multi-token mask fits every layer.
            for token in question[0].tolist():
                logits = self.model(torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[position]])).logits
                position += 1
            out = []
            for _ in range(MAX_NEW):
                nxt = int(logits[0, -1].argmax())
                if nxt == self.tok.eos_token_id or self.tok.decode([nxt]) == "<|im_end|>":
                    break
                out.append(nxt)
                logits = self.model(torch.tensor([[nxt]]), past_key_values=cache, position_ids=torch.tensor([[position]])).logits
                position += 1
        return self.tok.decode(out), counts


class Ours:
    """kvcompose_gguf.Llama with room for the whole prompt: prefill the context, compress() once, then the question."""

    def __init__(self, observe: str, ratio: float):
        from kvcompose_gguf.llama import Llama

        self.llm = Llama(model_path=str(models.smollm2_path()), n_ctx=4096, n_batch=512, flash_attn=True, verbose=False,
                         n_threads=2, kv_compress="kvcompose", kv_observe=observe, kv_protect_prefix=0,
                         kv_protect_recent=1)
        self.ratio = ratio

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False))

    def answer(self, head: str, tail: str) -> tuple[str, list[int]]:
        llm = self.llm
        context = llm.tokenize(head.encode(), add_bos=False, special=True)
        question = llm.tokenize(tail.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(context)
        counts = [] if self.ratio == 0 else llm.compress(1.0 - self.ratio).layer_allocation.tolist()
        reply = llm.create_completion(context + question, max_tokens=MAX_NEW, temperature=0)["choices"][0]["text"]
        return reply.split("<|im_end|>")[0], counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=["kvpress", "ours"], required=True)
    ap.add_argument("--press", choices=["kvcompose", "full"], default="kvcompose", help="kvpress only")
    ap.add_argument("--observe", default="repeat", help="ours only: kv_observe")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed0", type=int, default=0)
    args = ap.parse_args()
    runner = Reference(args.press, args.ratio) if args.impl == "kvpress" else Ours(args.observe, args.ratio)
    correct = 0
    for seed in range(args.seed0, args.seed0 + args.samples):
        sample = tasks.niah(seed, 0, 1500, runner.count)
        start = time.time()
        reply, counts = runner.answer(*_prompt(sample.context, sample.question))
        good = all(a in reply for a in sample.answers)
        correct += good
        print(json.dumps({"seed": seed, "correct": good, "reply": reply[:90], "answers": sample.answers,
                          "layer_counts": counts, "seconds": round(time.time() - start, 1)}), flush=True)
    print(json.dumps({"summary": f"{correct}/{args.samples}", **vars(args)}))


if __name__ == "__main__":
    main()
