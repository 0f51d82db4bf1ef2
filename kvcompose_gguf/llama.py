"""`Llama`: a drop-in `llama_cpp.Llama` whose KV cache is compressed instead of overflowing.

llama-cpp-python equates three things that compression pulls apart:

- the **logical history**: every token of the conversation, at positions 0..n-1
  (`n_tokens`, `input_ids`, prefix reuse, the completion length checks);
- the **cells** the cache holds, at most `n_ctx`: after a compaction one cell
  (a composite slot) holds, per layer and KV head, a different original token;
- the **positions** llama.cpp gives cells, which only order and mask them.

Here `n_tokens` and `input_ids` stay logical, new tokens are decoded at their
true logical positions, and the cells are managed by `KVCompression`: when the
next batch would not fit, it observes attention (`stats`), lets the policy choose
(`policies`) and compacts (`compactor`). A prompt that extends the logical history
reuses the compressed cache; any other prompt rebuilds it from the history, never
silently reusing cells that hold tokens of another history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import llama_cpp

from . import native  # noqa: F401  (the package import checks the patched library)
from . import state as kv_state
from .compactor import CompactionResult, Compactor
from .policies import Policy, get_policy, protect_positions
from .stats import AttentionObserver, broadcast_positions

logger = logging.getLogger("kvcompose_gguf")

SEQ_ID = 0  # llama-cpp-python decodes one sequence


@dataclass(frozen=True)
class CompressionSettings:
    """The keyword arguments `Llama` adds, validated once.

    policy: what chooses the kept tokens.
    kv_budget: fraction of the sequence's cells kept per compression, in (0, 1],
        or an int number of cells.
    observe: "window" (re-feed the last `window` tokens as observing queries),
        "repeat" (re-feed the whole context, the reference's mode; needs twice the
        cells, otherwise it falls back to "window" and logs why), or any other string:
        a task prompt whose tokens are the observing queries.
    window: observing queries in window mode.
    protect_prefix: the first tokens of the history (e.g. the system prompt) are never dropped.
    protect_recent: the last tokens of the history are never dropped.
    """

    policy: Policy
    kv_budget: float | int
    observe: str
    window: int
    protect_prefix: int
    protect_recent: int

    @classmethod
    def from_kwargs(cls, kv_compress, kv_budget, kv_observe, kv_window, kv_protect_prefix, kv_protect_recent):
        policy = get_policy(kv_compress)
        if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)):
            raise TypeError(f"kv_budget must be a fraction in (0, 1] or an int cell count, got {kv_budget!r}")
        if isinstance(kv_budget, float) and not 0.0 < kv_budget <= 1.0:
            raise ValueError(f"kv_budget as a fraction must lie in (0, 1], got {kv_budget}")
        if isinstance(kv_budget, int) and kv_budget < 1:
            raise ValueError(f"kv_budget as a cell count must be >= 1, got {kv_budget}")
        if not isinstance(kv_observe, str) or not kv_observe:
            raise ValueError(f"kv_observe must be 'window', 'repeat' or a task prompt, got {kv_observe!r}")
        for name, value, low in (("kv_window", kv_window, 1), ("kv_protect_prefix", kv_protect_prefix, 0),
                                 ("kv_protect_recent", kv_protect_recent, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if getattr(policy, "accumulate", False):
            raise NotImplementedError(
                f"policy {kv_compress!r} accumulates attention over the whole history, which Llama does not "
                "observe yet; use it through policies + stats + compactor directly"
            )
        return cls(policy, kv_budget, kv_observe, kv_window, kv_protect_prefix, kv_protect_recent)


@dataclass
class CompressionRecord:
    """One compaction: its time, what it freed and dropped, and the layers' budgets."""

    logical_tokens: int
    seconds: float
    result: CompactionResult
    layer_counts: np.ndarray
    observe: str


@dataclass
class KVCompression:
    """Observes, selects and compacts the cells of one `Llama`; keeps the history of it."""

    llm: "Llama"
    settings: CompressionSettings
    compactor: Compactor
    compressed_upto: int = 0  # logical tokens older than this may live in composite slots
    records: list[CompressionRecord] = field(default_factory=list)

    def cells_used(self) -> int:
        return len(self.compactor.seq_cells(SEQ_ID).cells)

    def forget(self) -> None:
        """The cache no longer holds compacted cells (it was cleared)."""
        self.compressed_upto = 0
        self.compactor.set_table(SEQ_ID, None)

    def probe_reserve(self) -> int:
        """Cells kept free for the observing queries, which are decoded after the history."""
        return self.settings.window

    def compress(
        self, need_free: int, upcoming: Sequence[int] = (), kv_budget=None, observe: str | None = None
    ) -> CompressionRecord:
        """Compact until `need_free` cells plus the probe reserve are free.

        upcoming: tokens about to be evaluated (e.g. the rest of a long prompt); their
        end, usually the question, joins the observing queries.
        """
        llm, s = self.llm, self.settings
        start = time.perf_counter()
        cap = llm.n_ctx() - need_free - self.probe_reserve()
        if cap < 1:
            raise ValueError(
                f"{need_free} new tokens plus {self.probe_reserve()} observing queries cannot fit in "
                f"n_ctx={llm.n_ctx()} even after compression"
            )
        n = llm.n_tokens
        prefix = min(s.protect_prefix, n)
        if prefix >= cap:
            raise ValueError(
                f"the protected prefix ({prefix} tokens) does not fit in the {cap} cells left after reserving "
                f"{need_free} for new tokens and {self.probe_reserve()} for observation: raise n_ctx or lower "
                "kv_protect_prefix"
            )
        # Recent tokens are protected within what the cells allow: a long new turn in a
        # small context must not make compression impossible.
        recent = min(s.protect_recent, max(1, (cap - prefix) // 4))
        observation, mode = self._observe(list(upcoming), observe or s.observe)
        spans = [(0, prefix), (max(0, n - recent), n)]
        protected = protect_positions(observation, spans)
        selection = s.policy.select(
            observation, s.kv_budget if kv_budget is None else kv_budget, protected=protected, layer_caps=cap
        )
        result = self.compactor.apply(selection, seq_id=SEQ_ID, cell_tokens=self._cell_tokens(observation))
        self.compressed_upto = n
        record = CompressionRecord(n, time.perf_counter() - start, result, selection.counts.copy(), mode)
        self.records.append(record)
        logger.info(
            "compressed %d -> %d cells at %d logical tokens in %.3f s (%s observation): "
            "%d KV bytes free for new tokens, %d logical entries dropped",
            result.cells_before, result.cells_after, n, record.seconds, mode,
            result.physical_bytes_freed, result.logical_entries_dropped,
        )
        return record

    # --- observation ---------------------------------------------------------------

    def _probe(self, upcoming: list[int], observe: str) -> tuple[list[int], str]:
        """The observing queries, and the mode that chose them."""
        llm, s = self.llm, self.settings
        n = llm.n_tokens
        history = [int(t) for t in llm.input_ids[:n]]
        if observe == "repeat":
            free = llm.n_ctx() - self.cells_used()
            if n <= free:
                return history, "repeat"
            logger.info("repeat observation needs %d free cells, %d are free: observing a window instead", n, free)
        elif observe != "window":
            return llm.tokenize(observe.encode(), add_bos=False, special=False), "prompt"
        return (history + upcoming)[-s.window :], "window"

    def _observe(self, upcoming: list[int], observe: str):
        """Attention statistics of the cached tokens, and the observation mode used.

        The observing queries are decoded after the history, read, and removed: the
        cached cells, composite slots included, are never touched.
        """
        llm, policy = self.llm, self.settings.policy
        probe, mode = self._probe(upcoming, observe)
        n = llm.n_tokens
        last_only = policy.query_reduction == "last"
        observer = AttentionObserver(
            llm,
            seq_id=SEQ_ID,
            n_last=1 if last_only else None,
            query_reduce="max" if last_only else policy.query_reduction,
            head_reduce=policy.group_reduction,
        )
        with observer:
            llm._decode_at(probe, n)
            observation = observer.observation(positions=self._position_table(observer))
        llm._ctx.kv_cache_seq_rm(SEQ_ID, n, -1)
        llm._requires_eval = True  # the logits are the probe's
        return _without_positions_from(observation, n), mode

    def _position_table(self, observer: AttentionObserver) -> np.ndarray:
        """Original position per (layer, KV head, cell): composite slots from the slot table."""
        n_layer, n_head_kv, _ = observer.shape()
        table = broadcast_positions(observer.cell_positions(), n_layer, n_head_kv).copy()
        slots = self.compactor.table(SEQ_ID)
        if slots is not None:
            table[:, :, slots.slot_cells] = slots.positions
        return table

    def _cell_tokens(self, observation) -> np.ndarray:
        """Token id per cell for the slot table, from the logical history (-1 where ambiguous)."""
        positions = observation.positions.max(axis=(0, 1))
        history = self.llm.input_ids
        return np.where(positions >= 0, history[np.clip(positions, 0, len(history) - 1)], -1).astype(np.int32)


def _without_positions_from(observation, first: int):
    """The observation restricted to positions < first (probe tokens removed)."""
    from .policies import Observation

    positions = np.where(observation.positions >= first, -1, observation.positions)
    scores = np.where(positions >= 0, observation.scores, 0).astype(np.float32)
    return Observation(scores=scores, positions=positions.astype(np.int32), value_norms=observation.value_norms)


class Llama(llama_cpp.Llama):
    """`llama_cpp.Llama` with attention-guided KV cache compression.

    Every `llama_cpp.Llama` keyword works as before. Added keywords:

    kv_compress: a policy name ("kvcompose", "kvcompose-uniform", "snapkv", "pyramidkv",
        "tova", "streaming", "random") or a `policies.Policy`; None (default) is stock behaviour.
    kv_budget: fraction of the cells kept at each compression, in (0, 1], or an int cell count.
    kv_observe: "window" (default), "repeat", or a task prompt (see `CompressionSettings`).
    kv_window: observing queries in window mode (default 32).
    kv_protect_prefix: first tokens never dropped, e.g. the system prompt (default 0).
    kv_protect_recent: last tokens never dropped (default 64).
    """

    def __init__(
        self,
        *args: Any,
        kv_compress: str | Policy | None = None,
        kv_budget: float | int = 0.5,
        kv_observe: str = "window",
        kv_window: int = 32,
        kv_protect_prefix: int = 0,
        kv_protect_recent: int = 64,
        **kwargs: Any,
    ):
        settings = None
        if kv_compress is not None:
            settings = CompressionSettings.from_kwargs(
                kv_compress, kv_budget, kv_observe, kv_window, kv_protect_prefix, kv_protect_recent
            )
            if kwargs.get("logits_all"):
                raise ValueError("logits_all=True keeps logits for the whole logical history; not supported with kv_compress")
        super().__init__(*args, **kwargs)
        self._kv: KVCompression | None = None
        if settings is not None:
            self._kv = KVCompression(self, settings, Compactor(self))
            # The logical history may outgrow n_ctx up to the model's training context.
            self._n_ctx = max(self._n_ctx, self._model.n_ctx_train())
            self.input_ids = np.zeros(self._n_ctx, dtype=np.intc)

    # --- the llama_cpp.Llama seam -------------------------------------------------

    def close(self) -> None:
        # Settings are validated before llama_cpp.Llama.__init__ allocates anything;
        # when they are refused there is nothing to close.
        if hasattr(self, "_stack"):
            super().close()

    def eval(self, tokens: Sequence[int]) -> None:
        kv = self._kv
        if kv is None:
            return super().eval(tokens)
        if self.n_tokens < kv.compressed_upto:
            self._rebuild(self.n_tokens)
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        tokens = list(tokens)
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ValueError(
                f"the logical history would reach {self.n_tokens + len(tokens)} tokens, past the model's "
                f"training context of {self._n_ctx}"
            )
        # Chunks of at most a quarter of the cells: a compression before each chunk then
        # still keeps most of the history, even when n_batch is as large as n_ctx.
        chunk = max(1, min(self.n_batch, (self.n_ctx() - kv.probe_reserve()) // 4))
        for i in range(0, len(tokens), chunk):
            batch = tokens[i : i + chunk]
            if len(batch) + kv.probe_reserve() > self.n_ctx() - kv.cells_used():
                # The end of a long prompt (usually the question) is known before its
                # beginning is compressed: it joins the observing queries every round.
                kv.compress(len(batch), upcoming=tokens[i:])
            self._decode_at(batch, self.n_tokens)
            self.input_ids[self.n_tokens : self.n_tokens + len(batch)] = batch
            self.n_tokens += len(batch)
            self._requires_eval = False

    def _decode_at(self, tokens: Sequence[int], first_position: int) -> None:
        """Decode `tokens` at logical positions first_position.. (logits for the last one)."""
        for i in range(0, len(tokens), self.n_batch):
            batch = tokens[i : i + self.n_batch]
            self._batch.set_batch(batch=batch, n_past=first_position + i, logits_all=False)
            self._ctx.decode(self._batch)

    def _rebuild(self, n_keep: int) -> None:
        """Drop the cache and re-evaluate the first n_keep logical tokens (compressing as needed)."""
        logger.info("history diverged at token %d inside the compressed part: rebuilding the cache", n_keep)
        history = [int(t) for t in self.input_ids[:n_keep]]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), True)
        self._kv.forget()
        self.n_tokens = 0
        if history:
            self.eval(history)

    # --- public API -----------------------------------------------------------------

    def compress(self, kv_budget: float | int | None = None, *, observe: str | None = None) -> CompressionRecord:
        """Compress the cache now. kv_budget/observe default to the constructor's settings."""
        if self._kv is None:
            raise RuntimeError("this Llama was created without kv_compress; nothing to compress")
        if self.n_tokens == 0:
            raise ValueError("the cache is empty: nothing to compress")
        return self._kv.compress(0, kv_budget=kv_budget, observe=observe)

    def save_state(self) -> llama_cpp.LlamaState:
        """The state, compressed cache included (rows, per-layer budgets, slot table)."""
        if self._kv is None:
            return super().save_state()
        container = kv_state.save_seq(self._kv.compactor, SEQ_ID)
        saved = llama_cpp.LlamaState(
            scores=self._scores.copy(),
            input_ids=self.input_ids.copy(),
            n_tokens=self.n_tokens,
            llama_state=container,
            llama_state_size=len(container),
            seed=self._seed,
        )
        saved.kv_compressed_upto = self._kv.compressed_upto
        return saved

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        """Load a state from `save_state`; a corrupt one raises StateFormatError and changes nothing."""
        if self._kv is None:
            return super().load_state(state)
        if not hasattr(state, "kv_compressed_upto"):
            raise ValueError("this state was saved by a Llama without kv_compress; load it into one")
        kv_state.load_seq(self._kv.compactor, bytes(state.llama_state), SEQ_ID)
        self.scores[: state.n_tokens, :] = state.scores.copy()
        self.input_ids = state.input_ids.copy()
        self.n_tokens = state.n_tokens
        self._requires_eval = True
        self._seed = state.seed
        self._kv.compressed_upto = state.kv_compressed_upto

    def kv_stats(self) -> dict[str, Any]:
        """Logical tokens, cells, compressions and their memory effects (three kinds, kept apart)."""
        cells = self._kv.cells_used() if self._kv else self.n_tokens
        records = self._kv.records if self._kv else []
        last = records[-1] if records else None
        return {
            "logical_tokens": int(self.n_tokens),
            "cells_used": int(cells),
            "n_ctx": int(self.n_ctx()),
            "compressions": len(records),
            "last_compression_seconds": last.seconds if last else None,
            "physical_bytes_freed": sum(r.result.physical_bytes_freed for r in records),
            "logical_entries_dropped": sum(r.result.logical_entries_dropped for r in records),
            "layer_budgets": last.layer_counts.tolist() if last else None,
        }
