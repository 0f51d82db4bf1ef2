"""Runs methods x budgets x observation modes over tasks and context lengths.

Budgets are given as kvpress compression ratios (the fraction dropped) so the
tables read like kvpress's; each record carries both the ratio and kv_budget
(= 1 - ratio): the fraction of the full cache's cells the method holds (its n_ctx, or
with kvcompose-layers its memory). Within that memory the `Llama` integration compresses
whenever the cells run out, each compression at its own default kv_budget, so a long
prompt is compressed several times, not once to kv_budget. Three kinds of task:

- generated questions (tasks.TASKS): one chat completion per sample, scored by answer recall;
- chat_recall: a multi-turn conversation longer than the compressing methods' n_ctx,
  the model answering every turn, then a recall question;
- kl: next-token distributions on long real text against the full cache
  (KL divergence in nats, and the negative log-likelihood of the real next token).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import profiles
from . import kvpress_reference, scoring, tasks, texts
from . import methods as _methods

DEFAULT_SYSTEM = "You are a helpful assistant. Answer the question about the text. Be brief."
KVPRESS_RATIOS = (0.25, 0.5, 0.75, 0.9)
QA_TASKS = tuple(tasks.TASKS)
# What runs unless --tasks says otherwise: variable tracking and common-word extraction
# are left out because the default 135M model fails them even with the full cache
# (docs/RESULTS.md); they run when named, for larger models.
TOO_HARD_FOR_SMOLLM2 = ("variable_tracking", "common_words")
DEFAULT_TASKS = tuple(t for t in QA_TASKS if t not in TOO_HARD_FOR_SMOLLM2)
SPECIAL_TASKS = ("chat_recall", "kl")
ALL_TASKS = QA_TASKS + SPECIAL_TASKS
# Replies long enough for every expected answer; longer ones only cost time.
MAX_REPLY_TOKENS = {"niah_multivalue": 64, "niah_multiquery": 64, "variable_tracking": 64,
                    "common_words": 48, "frequent_words": 48}
DEFAULT_REPLY_TOKENS = 32


@dataclass
class EvalConfig:
    model: str | None = None
    methods: tuple[str, ...] = ("full",)
    ratios: tuple[float, ...] = KVPRESS_RATIOS
    observe: tuple[str, ...] = ("window",)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    lengths: tuple[int, ...] = (1024,)
    samples: int = 10
    seed: int = 0
    system: str = DEFAULT_SYSTEM
    n_threads: int | None = None
    chat_turns: int = 6
    chat_reply_tokens: int = 32
    # n_ctx of compressing methods in chat_recall, as a fraction of the conversation's target length.
    chat_window: float = 0.5
    long_text: str = "python-docs"  # for kl, and as filler of qa_facts
    kl_tokens: int = 64


@dataclass(frozen=True)
class Setting:
    method: str
    ratio: float | None  # kvpress compression ratio; None for a method that does not compress
    observe: str | None

    @property
    def kv_budget(self) -> float:
        return 1.0 if self.ratio is None else round(1.0 - self.ratio, 6)

    @property
    def label(self) -> str:
        if self.ratio is None:
            return self.method
        return f"{self.method} r={self.ratio:g}" + (f" obs={self.observe}" if self.observe else "")


def kv_budget_for_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"a compression ratio lies in [0, 1), not {ratio}")
    return round(1.0 - ratio, 6)


def settings(config: EvalConfig) -> list[Setting]:
    """The grid; raises for unknown or unavailable methods before anything runs."""
    out: list[Setting] = []
    for name in config.methods:
        method = _methods.get_method(name)
        if not method.compresses:
            out.append(Setting(name, None, None))
            continue
        if not method.observation_modes:  # observes its own way (the kvpress reference)
            for ratio in config.ratios:
                kv_budget_for_ratio(ratio)
                out.append(Setting(name, ratio, None))
            continue
        for mode in config.observe:
            if mode not in method.observation_modes:
                raise ValueError(
                    f"method {name!r} has no observation mode {mode!r}; it has {', '.join(method.observation_modes)}"
                )
        for ratio in config.ratios:
            kv_budget_for_ratio(ratio)
            out.extend(Setting(name, ratio, mode) for mode in config.observe)
    return out


def check_config(config: EvalConfig) -> list[Setting]:
    unknown = [t for t in config.tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(ALL_TASKS)}")
    if config.samples < 1:
        raise ValueError("samples must be at least 1")
    if any(n < 64 for n in config.lengths):
        raise ValueError("context lengths must be at least 64 tokens")
    if {"kl", "qa_facts"} & set(config.tasks):
        texts.long_text(config.long_text)  # fails now, not after an hour of other tasks
    grid = settings(config)
    if any(kvpress_reference.is_reference(m) for m in config.methods):
        special = [t for t in config.tasks if t in SPECIAL_TASKS]
        if special:
            raise ValueError(
                f"the kvpress reference methods run the generated QA tasks only, not {', '.join(special)}"
            )
        from kvcompose_gguf import models

        try:
            model_path = models.model_path(config.model)
        except models.ModelNotInstalledError:
            model_path = None  # the command reports the missing model itself
        if model_path is not None:
            kvpress_reference.check_model(model_path)
    return grid


class _Progress:
    """tqdm where installed, else a plain one-line bar on stderr."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        self.total, self.done, self.enabled = total, 0, enabled
        self._start = time.monotonic()
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="sample", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(label, refresh=False)
            self._bar.update(1)
            return
        width = 30
        filled = width * self.done // max(1, self.total)
        elapsed = time.monotonic() - self._start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:.0f}s {label[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _round_up(n: int, step: int = 256) -> int:
    return -(-n // step) * step


@dataclass
class _Context:
    config: EvalConfig
    model_path: Any
    tokenizer: Any
    progress: _Progress
    records: list = field(default_factory=list)
    kl_reference: dict = field(default_factory=dict)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def create(self, setting: Setting, n_ctx: int, logits_all: bool = False):
        method = _methods.get_method(setting.method)
        return method.create(
            self.model_path,
            n_ctx=n_ctx,
            kv_budget=setting.kv_budget if method.compresses else None,
            observe=setting.observe,
            logits_all=logits_all,
            seed=self.config.seed,
            n_threads=self.config.n_threads,
        )

    def record(self, setting: Setting, llm, **fields) -> None:
        method = _methods.get_method(setting.method)
        usage = method.kv_usage(llm)
        details = method.details(llm) if method.details is not None else {}
        self.records.append(
            {
                "method": setting.method,
                "ratio": setting.ratio,
                "kv_budget": setting.kv_budget,
                "observe": setting.observe,
                **fields,
                **asdict(usage),
                "layer_slots": list(usage.layer_slots),
                **details,
            }
        )


def _complete(llm, messages: list[dict], max_tokens: int, question: str | None = None) -> tuple[str, int]:
    """question: named for methods that compress the context before the question (question_apart)."""
    extra = {} if question is None else {"question": question}
    out = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_tokens, **extra)
    return out["choices"][0]["message"]["content"] or "", int(out["usage"]["prompt_tokens"])


def _run_qa(ctx: _Context, setting: Setting, task: str, length: int) -> None:
    config = ctx.config
    # QA facts hide in real text: in RULER noise the 135M model echoes the noise instead of answering.
    options = {"filler_text": texts.long_text(config.long_text)} if task == "qa_facts" else {}
    samples = tasks.generate(task, config.samples, length, seed=config.seed, count_tokens=ctx.count_tokens, **options)
    max_tokens = MAX_REPLY_TOKENS.get(task, DEFAULT_REPLY_TOKENS)
    longest = max(ctx.count_tokens(s.user_message()) for s in samples)
    n_ctx = _round_up(longest + ctx.count_tokens(config.system) + max_tokens + 64)
    method = _methods.get_method(setting.method)
    if method.compresses:
        # kv_budget of the cells the full cache needs: every method holds the same memory.
        n_ctx = max(256, _round_up(int(n_ctx * setting.kv_budget), 64))
    llm = ctx.create(setting, n_ctx)
    try:
        for sample in samples:
            llm.reset()  # samples are independent: no prefix reuse across them
            start = time.monotonic()
            messages = [{"role": "system", "content": config.system}, {"role": "user", "content": sample.user_message()}]
            reply, prompt_tokens = _complete(llm, messages, max_tokens,
                                             sample.question if method.question_apart else None)
            ctx.record(
                setting, llm, task=task, length=length, index=sample.index, metric="accuracy",
                score=scoring.recall(reply, sample.answers), reply=reply, answers=list(sample.answers),
                prompt_tokens=prompt_tokens, n_ctx=n_ctx, seconds=round(time.monotonic() - start, 3),
            )
            ctx.progress.update(f"{setting.label} {task}@{length}")
    finally:
        llm.close()


def _run_chat(ctx: _Context, setting: Setting, length: int) -> None:
    config = ctx.config
    # RULER's noise as the filler turns: with real text the full cache itself recalls
    # the number in only 4 of 6 seeds (docs/RESULTS-llama.md)
    scenarios = [
        tasks.chat_recall(config.seed, i, length, ctx.count_tokens, n_turns=config.chat_turns)
        for i in range(config.samples)
    ]
    longest = max(sum(ctx.count_tokens(t) for t in s.turns) for s in scenarios)
    needed = longest + ctx.count_tokens(config.system) + (len(scenarios[0].turns) + 1) * (config.chat_reply_tokens + 16)
    method = _methods.get_method(setting.method)
    # The full cache holds everything; a compressing method gets a window the chat outgrows.
    n_ctx = _round_up(needed + 64) if not method.compresses else _round_up(int(length * config.chat_window))
    llm = ctx.create(setting, n_ctx)
    try:
        for scenario in scenarios:
            llm.reset()
            start = time.monotonic()
            error = None
            reply = ""
            try:
                # the question's 32 tokens: the key and 7 digits, one token each
                reply = scenario.play(lambda messages, n: _complete(llm, messages, n)[0], config.system,
                                      turn_tokens=config.chat_reply_tokens, question_tokens=32)
            except ValueError as exc:  # the conversation outgrew the method's context
                error = str(exc)
            ctx.record(
                setting, llm, task="chat_recall", length=length, index=scenario.index, metric="accuracy",
                score=0.0 if error else scoring.recall(reply, scenario.answers), reply=reply,
                answers=list(scenario.answers), prompt_tokens=int(llm.n_tokens), n_ctx=n_ctx,
                turns=len(scenario.turns) + 1, error=error, seconds=round(time.monotonic() - start, 3),
            )
            ctx.progress.update(f"{setting.label} chat@{length}")
    finally:
        llm.close()


def _kl_windows(ctx: _Context, length: int) -> list[list[int]]:
    """Seeded token windows of the long text: BOS, `length` context tokens, kl_tokens continuation tokens."""
    config = ctx.config
    span = length + config.kl_tokens
    # Windows come from the first 64 spans' worth of characters (several windows' worth of
    # tokens for any tokenizer): tokenizing the whole text is slow with a byte-level vocabulary.
    key = ("tokens", config.long_text, span)
    if key not in ctx.kl_reference:
        ctx.kl_reference[key] = ctx.tokenizer.tokenize(
            texts.long_text(config.long_text)[: 64 * span].encode("utf-8"), add_bos=False, special=False
        )
    all_tokens = ctx.kl_reference[key]
    if len(all_tokens) < span:
        raise ValueError(f"text {config.long_text!r} has {len(all_tokens)} tokens, fewer than {span}")
    rng = np.random.default_rng(config.seed)
    starts = rng.integers(0, len(all_tokens) - span + 1, size=config.samples)
    bos = ctx.tokenizer.token_bos()
    return [[bos] + list(all_tokens[s : s + span]) for s in starts]


def _continuation_logits(llm, window: list[int], length: int) -> np.ndarray:
    """Logits after each continuation token; the context goes in one eval call and the
    continuation in another, so a method may compress in between."""
    llm.reset()
    context, continuation = window[: length + 1], window[length + 1 :]
    llm.eval(context)
    llm.eval(continuation)
    first = len(context)
    return np.array(llm.scores[first : first + len(continuation) - 1], dtype=np.float32)


def _run_kl(ctx: _Context, setting: Setting, length: int) -> None:
    """The full cache's logits are the reference; the full method's own row is that reference
    run (KL 0 by definition, its NLL the baseline)."""
    windows = _kl_windows(ctx, length)
    n_ctx = _round_up(len(windows[0]) + 16)
    full = Setting("full", None, None)
    if setting.method != "full" and (length, "full") not in ctx.kl_reference:
        _run_kl_windows(ctx, full, length, windows, n_ctx, record=False)
    _run_kl_windows(ctx, setting, length, windows, n_ctx, record=True)


def _run_kl_windows(ctx: _Context, setting: Setting, length: int, windows, n_ctx: int, record: bool) -> None:
    is_reference = setting.method == "full"
    references = ctx.kl_reference.setdefault((length, "full"), {})
    llm = ctx.create(setting, n_ctx, logits_all=True)
    try:
        for i, window in enumerate(windows):
            start = time.monotonic()
            logits = _continuation_logits(llm, window, length)
            if is_reference:
                references[i] = logits
            if not record:
                continue
            kl = scoring.kl_divergence(references[i], logits)
            nll = scoring.negative_log_likelihood(logits, np.array(window[length + 2 :]))
            ctx.record(
                setting, llm, task="kl", length=length, index=i, metric="kl_nats",
                score=float(kl.mean()), nll=float(nll.mean()), positions=len(kl),
                prompt_tokens=len(window), n_ctx=n_ctx, seconds=round(time.monotonic() - start, 3),
            )
            ctx.progress.update(f"{setting.label} kl@{length}")
    finally:
        llm.close()


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run_eval(config: EvalConfig, progress: bool = True, command: str | None = None) -> dict:
    """Run the whole grid; returns the results document (see report.py for its views)."""
    grid = check_config(config)
    import llama_cpp

    from kvcompose_gguf import models

    model_path = models.model_path(config.model)
    tokenizer = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    total = len(grid) * len(config.lengths) * len(config.tasks) * config.samples
    ctx = _Context(config, model_path, tokenizer, _Progress(total, progress))
    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        for setting in grid:
            for length in config.lengths:
                for task in config.tasks:
                    if task == "chat_recall":
                        _run_chat(ctx, setting, length)
                    elif task == "kl":
                        _run_kl(ctx, setting, length)
                    else:
                        _run_qa(ctx, setting, task, length)
        agreement = _agreement(ctx)
    finally:
        ctx.progress.close()
        tokenizer.close()
    results = {
        "meta": {
            "command": command if command is not None else " ".join(sys.argv),
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1),
            "machine": machine_description(),
            "model": model_path.name,
            "llama_cpp_python": llama_cpp.__version__,
            "python": platform.python_version(),
            "long_text": texts.text_description(config.long_text),
            "config": asdict(config),
        },
        "records": ctx.records,
        "summary": summarise(ctx.records),
    }
    if agreement is not None:
        results["agreement"] = agreement
    return results


def _mean_scores(records: list[dict], method: str) -> dict[tuple, float]:
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r["method"] == method and r["metric"] == "accuracy":
            groups.setdefault((r["ratio"], r["observe"], r["task"], r["length"]), []).append(r["score"])
    return {key: float(np.mean(v)) for key, v in groups.items()}


def _agreement(ctx: _Context) -> dict | None:
    """Each of our methods against its kvpress counterpart on the same samples: accuracy per
    task, and for KVCompose the per-layer budgets both choose on the first sample's context."""
    config = ctx.config
    prefix = kvpress_reference.PREFIX
    pairs = [(m, prefix + m) for m in kvpress_reference.PRESSES if m in config.methods and prefix + m in config.methods]
    if not pairs:
        return None
    accuracy = []
    for ours, theirs in pairs:
        reference = _mean_scores(ctx.records, theirs)
        for (ratio, observe, task, length), score in _mean_scores(ctx.records, ours).items():
            ref = reference.get((ratio, None, task, length))
            if ref is None:
                continue
            accuracy.append({
                "method": ours, "reference": theirs, "ratio": ratio, "observe": observe, "task": task,
                "length": length, "accuracy": score, "reference_accuracy": ref,
                "difference_points": round(100 * (score - ref), 1),
                "ratio_to_reference": round(score / ref, 3) if ref > 0 else None,
            })
    budgets = []
    if ("kvcompose", prefix + "kvcompose") in pairs:
        budgets = _layer_budget_agreement(ctx)
    return {
        "note": (
            "kvpress runs in transformers on the GGUF's Q4_1 weights dequantized to float32 (float32 KV), "
            "llama.cpp on the quantized weights (f16 KV): replies can differ slightly without compression "
            "(compare full with kvpress:full). kvpress compresses the context once, before the question; "
            "our methods compress while the prompt is prefilled, in kv_budget of the full cache's cells, "
            "observed by the question."
        ),
        "accuracy": accuracy,
        "layer_budgets": budgets,
    }


def _layer_budget_agreement(ctx: _Context) -> list[dict]:
    """Per-layer counts on the first sample of each task: kvpress's KVComposePress, ours with
    kvpress's semantics (context observed by re-feeding it, compressed once), and what our
    eval run held at the end of that sample."""
    config = ctx.config
    rows = []
    for ratio in config.ratios:
        for length in config.lengths:
            for task in config.tasks:
                if task in SPECIAL_TASKS:
                    continue
                theirs = next((r for r in ctx.records if r["method"] == "kvpress:kvcompose" and r["ratio"] == ratio
                               and r["task"] == task and r["length"] == length and r["index"] == 0), None)
                in_eval = next((r for r in ctx.records if r["method"] == "kvcompose" and r["ratio"] == ratio
                                and r["task"] == task and r["length"] == length and r["index"] == 0), None)
                if theirs is None:
                    continue
                options = {"filler_text": texts.long_text(config.long_text)} if task == "qa_facts" else {}
                sample = tasks.generate(task, 1, length, seed=config.seed, count_tokens=ctx.count_tokens, **options)[0]
                messages = [{"role": "system", "content": config.system},
                            {"role": "user", "content": sample.user_message()}]
                context, _ = kvpress_reference.split_prompt(ctx.tokenizer, messages, sample.question)
                if len(context) != theirs["context_tokens"]:
                    raise RuntimeError("the reference compressed another context than the first sample's")
                ours = profiles.one_shot_layer_counts(ctx.model_path, context, round(1.0 - ratio, 6), config.n_threads)
                row = {
                    "ratio": ratio, "kv_budget": round(1.0 - ratio, 6), "task": task, "length": length, "index": 0,
                    "context_tokens": len(context), "our_observation": ours["observe"],
                    **kvpress_reference.layer_budget_comparison(
                        ours["layer_counts"], theirs["compressed_layer_counts"], len(context)
                    ),
                }
                if in_eval is not None:
                    row["ours_in_eval_layer_slots"] = in_eval["layer_slots"]
                    row["ours_in_eval_observe"] = in_eval["observe"]
                rows.append(row)
    return rows


def summarise(records: list[dict]) -> list[dict]:
    """One row per (method, ratio, observe, task, length): means over samples."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["ratio"], r["observe"], r["task"], r["length"]), []).append(r)
    rows = []
    for (method, ratio, observe, task, length), rs in groups.items():
        row = {
            "method": method, "ratio": ratio, "kv_budget": rs[0]["kv_budget"], "observe": observe,
            "task": task, "length": length, "metric": rs[0]["metric"], "n": len(rs),
            "score": float(np.mean([r["score"] for r in rs])),
            "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in rs])),
            "cells_used": float(np.mean([r["cells_used"] for r in rs])),
            "physical_bytes": float(np.mean([r["physical_bytes"] for r in rs])),
            "logical_entries": float(np.mean([r["logical_entries"] for r in rs])),
            "layer_slots": np.mean([r["layer_slots"] for r in rs], axis=0).tolist(),
        }
        if "nll" in rs[0]:
            row["nll"] = float(np.mean([r["nll"] for r in rs]))
        rows.append(row)
    return rows
