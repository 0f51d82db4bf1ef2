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
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import llama_cpp

from . import native  # noqa: F401  (the package import checks the patched library)
from . import layout as kv_layout
from . import state as kv_state
from . import support
from .compactor import CompactionResult, Compactor, SlotTable
from .policies import Observation, Policy, get_policy, protect_positions
from .stats import AttentionObserver, ScoreMemory, broadcast_positions, cell_positions, layers_only

logger = logging.getLogger("kvcompose_gguf")

SEQ_ID = 0  # llama-cpp-python decodes one sequence


# Named observation modes (`CompressionSettings.observe`); any other string is a task prompt.
OBSERVATION_MODES = ("window", "lookahead", "repeat", "reread")


@dataclass(frozen=True)
class CompressionSettings:
    """The keyword arguments `Llama` adds, validated once.

    policy: what chooses the kept tokens.
    kv_budget: fraction of the sequence's cells kept per compression, in (0, 1],
        or an int number of cells.
    observe: "window" (re-feed the last `window` tokens as observing queries),
        "lookahead" (the window's queries, then those of the model's own greedy
        continuation of up to `window` tokens, decoded one at a time and removed: the
        queries that would answer a question at the end of a long prompt; about `window`
        decode steps more than "window"; "window" on sliding-window models),
        "repeat" (re-feed the whole logical history, the reference's mode, plus the
        end of a long prompt's unread part; in pieces of the free cells when it does
        not fit at once, so it costs about one more prefill of the history per
        compression), "reread" (for chats compressed again and again: re-feed the tokens
        that arrived since the last compression, then the window, and let every cached
        token keep the best score any compression gave it, spread over its neighbours:
        `stats.ScoreMemory`; each token is re-read once, about one more prefill over a
        whole chat), or any other string: a task prompt whose tokens are the observing
        queries.
    window: observing queries in window mode.
    protect_prefix: the first tokens of the history are never dropped: an int, or "system":
        the tokens of the leading system message of the last `create_chat_completion`
        while the history still starts with them (`SystemPrompt`).
    protect_recent: the last tokens of the history are never dropped.
    fill: in a shared pool, every layer keeps up to the widest layer's slots
        (`Policy.select(fill=True)`).
    """

    policy: Policy
    kv_budget: float | int
    observe: str
    window: int
    protect_prefix: int | str
    protect_recent: int
    fill: bool = True

    @property
    def probe_cells(self) -> int:
        """Cells the observing queries take: the window, and the lookahead after it."""
        return 2 * self.window if self.observe == "lookahead" else self.window

    @classmethod
    def from_kwargs(cls, kv_compress, kv_budget, kv_observe, kv_window, kv_protect_prefix, kv_protect_recent,
                    kv_fill=True):
        policy = get_policy(kv_compress)
        if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)):
            raise TypeError(f"kv_budget must be a fraction in (0, 1] or an int cell count, got {kv_budget!r}")
        if isinstance(kv_budget, float) and not 0.0 < kv_budget <= 1.0:
            raise ValueError(f"kv_budget as a fraction must lie in (0, 1], got {kv_budget}")
        if isinstance(kv_budget, int) and kv_budget < 1:
            raise ValueError(f"kv_budget as a cell count must be >= 1, got {kv_budget}")
        if not isinstance(kv_observe, str) or not kv_observe:
            raise ValueError(f"kv_observe must be one of {OBSERVATION_MODES} or a task prompt, got {kv_observe!r}")
        checked = [("kv_window", kv_window, 1), ("kv_protect_recent", kv_protect_recent, 1)]
        if kv_protect_prefix != "system":
            checked.append(("kv_protect_prefix", kv_protect_prefix, 0))
        for name, value, low in checked:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}" + (' or "system"' if name == "kv_protect_prefix"
                                 else "") + f", got {value!r}")
        if getattr(policy, "accumulate", False):
            raise NotImplementedError(
                f"policy {kv_compress!r} accumulates attention over the whole history, which Llama does not "
                "observe yet; use it through policies + stats + compactor directly"
            )
        if not isinstance(kv_fill, bool):
            raise TypeError(f"kv_fill must be True or False, got {kv_fill!r}")
        return cls(policy, kv_budget, kv_observe, kv_window, kv_protect_prefix, kv_protect_recent, kv_fill)


@dataclass
class CompressionRecord:
    """One compaction: its time, what it freed and dropped, and the layers' budgets.

    layer_counts: the slots each layer kept; layer_allocation: what the policy's budget
    split gave each layer (in a shared pool the others then fill the widest layer's cells).
    """

    logical_tokens: int
    seconds: float
    result: CompactionResult
    layer_counts: np.ndarray
    observe: str
    layer_allocation: np.ndarray


@dataclass
class KVCompression:
    """Observes, selects and compacts the cells of one `Llama`; keeps the history of it."""

    llm: "Llama"
    settings: CompressionSettings
    compactor: Compactor
    compressed_upto: int = 0  # logical tokens older than this may live in composite slots
    records: list[CompressionRecord] = field(default_factory=list)
    positions: "CachePositions" = field(init=False)
    system_tokens: list[int] = field(default_factory=list)  # the leading system message, for protect_prefix="system"
    max_decode: int = field(init=False)  # most tokens one llama_decode may carry
    memory: ScoreMemory = field(default_factory=ScoreMemory)  # scores carried over compressions ("reread")
    reread_upto: int = 0  # logical tokens "reread" observation has re-fed so far

    def __post_init__(self) -> None:
        self.positions = CachePositions(self)
        # one decode call per lookahead token would let new tokens overwrite history cells
        # of the sliding-window cache that its window no longer covers (see _max_decode)
        self.can_look_ahead = self.compactor.swa_cache(SEQ_ID) is None
        self.max_decode = self._max_decode()

    def _max_decode(self) -> int:
        """n_batch; less on an iSWA model, whose sliding-window cache (never compressed) keeps
        the last window - 1 tokens for the next one and takes new tokens only in its other
        cells. The observing queries must fit in one call, or they would push tokens still in
        the window out of that cache."""
        swa = self.compactor.swa_cache(SEQ_ID)
        if swa is None:
            return self.llm.n_batch
        room = swa.n_cells - (swa.window - 1)
        if room < self.probe_reserve() + 1:
            raise ValueError(
                f"the sliding-window cache holds {swa.n_cells} cells, but the window of {swa.window} tokens plus "
                f"{self.probe_reserve()} observing queries and a new token need {swa.window + self.probe_reserve()}: "
                f"raise n_ctx to at least {swa.window + self.probe_reserve()} (and keep swa_full=True)"
            )
        return min(self.llm.n_batch, room)

    def protected_prefix(self) -> int:
        """Logical tokens at the start of the history that compression must keep."""
        n, wanted = self.llm.n_tokens, self.settings.protect_prefix
        if wanted != "system":
            return min(wanted, n)
        k = min(len(self.system_tokens), n)
        return k if [int(t) for t in self.llm.input_ids[:k]] == self.system_tokens[:k] else 0

    def cells_used(self) -> int:
        return len(self.compactor.seq_cells(SEQ_ID).cells)

    def room(self) -> int:
        """Cells new tokens can ever take: n_ctx, or with per-layer memory the cells below the
        composite slots (a compression moves every kept token out of them)."""
        layout = self.compactor.layout
        return layout.n_recent if layout.per_layer else self.llm.n_ctx()

    def free_cells(self) -> int:
        """Cells free for new tokens now."""
        seq = self.compactor.seq_cells(SEQ_ID)
        return self.room() - int((seq.cells < self.room()).sum())

    def forget(self) -> None:
        """The cache no longer holds compacted cells (it was cleared)."""
        self.compressed_upto = 0
        self.reread_upto = 0
        self.memory.forget()
        self.positions.offset = 0
        self.compactor.set_table(SEQ_ID, None)

    def probe_reserve(self) -> int:
        """Cells kept free for the observing queries, which are decoded after the history."""
        return self.settings.probe_cells if self.can_look_ahead else self.settings.window

    def compress(
        self, need_free: int, upcoming: Sequence[int] = (), kv_budget=None, observe: str | None = None
    ) -> CompressionRecord:
        """Compact until `need_free` cells plus the probe reserve are free.

        upcoming: tokens about to be evaluated (e.g. the rest of a long prompt); their
        end, usually the question, joins the observing queries.
        """
        llm, s = self.llm, self.settings
        start = time.perf_counter()
        layout = self.compactor.layout
        if need_free + self.probe_reserve() > self.room():
            where = f"the {self.room()} cells per-layer memory keeps for them" if layout.per_layer else f"n_ctx={llm.n_ctx()}"
            raise ValueError(
                f"{need_free} new tokens plus {self.probe_reserve()} observing queries cannot fit in {where} "
                "even after compression"
            )
        # every kept token becomes a slot: within n_ctx beside the new tokens in a shared pool,
        # within each layer's own capacity with per-layer memory
        caps = layout.caps[self.compactor.layers] if layout.per_layer else None
        cap = int(caps.min()) if caps is not None else llm.n_ctx() - need_free - self.probe_reserve()
        n = llm.n_tokens
        prefix = self.protected_prefix()
        if prefix >= cap:
            raise ValueError(
                f"the protected prefix ({prefix} tokens) does not fit in the {cap} cells left after reserving "
                f"{need_free} for new tokens and {self.probe_reserve()} for observation: raise n_ctx or "
                "shorten the system prompt / lower kv_protect_prefix"
            )
        # Recent tokens are protected within what the cells allow: a long new turn in a
        # small context must not make compression impossible.
        recent = min(s.protect_recent, max(1, (cap - prefix) // 4))
        observation, mode = self._observe(list(upcoming), observe or s.observe)
        spans = [(0, prefix), (max(0, n - recent), n)]
        protected = protect_positions(observation, spans)
        if kv_budget is None:
            # per-layer memory is allocated whatever is kept: a compression fills the capacities
            kv_budget = 1.0 if caps is not None else self._covering_protection(s.kv_budget, observation, protected, cap)
        # a budget that keeps more than the layers can hold (kv_budget near 1 in a full pool)
        # keeps what they hold: the compression must free what the new tokens need
        layer_caps = caps if caps is not None else np.full(observation.positions.shape[0], cap)
        kv_budget = _within_capacities(kv_budget, observation, layer_caps)
        # in a shared pool the widest layer holds its cells for every layer: the others fill them
        selection = s.policy.select(
            observation, kv_budget, protected=protected, layer_caps=layer_caps, fill=s.fill and caps is None
        )
        selection = replace(selection, slot_positions=self.positions.slot_cache_positions(observation, selection))
        result = self.compactor.apply(selection, seq_id=SEQ_ID, cell_tokens=self._cell_tokens(observation))
        self.compressed_upto = n
        record = CompressionRecord(
            n, time.perf_counter() - start, result, selection.counts.copy(), mode, selection.allocation.copy()
        )
        self.records.append(record)
        logger.info(
            "compressed %d -> %d cells at %d logical tokens in %.3f s (%s observation): "
            "%d KV bytes free for new tokens, %d logical entries dropped",
            result.cells_before, result.cells_after, n, record.seconds, mode,
            result.physical_bytes_freed, result.logical_entries_dropped,
        )
        return record

    @staticmethod
    def _covering_protection(kv_budget, observation, protected: np.ndarray, cap: int):
        """The configured budget, raised when it would keep fewer cells than are protected
        (a long system prompt in a small context): then the protected cells plus half of
        the remaining room. An explicit `Llama.compress(kv_budget=...)` is never raised."""
        layer_tokens = (observation.positions >= 0).any(axis=1).sum(axis=1)
        n_protected = int(protected.sum(axis=-1).max())
        want = min(cap, n_protected + max(1, (cap - n_protected) // 2))
        fewest = int(layer_tokens.min())
        kept = int(fewest * kv_budget) if isinstance(kv_budget, float) else min(kv_budget, fewest)
        if kept > n_protected:
            return kv_budget
        # an int budget: every layer may keep `want` (<= cap), which a global fraction cannot promise
        raised = int(min(want, layer_tokens.max()))
        logger.info("kv_budget %s keeps %d cells but %d are protected: keeping %s this time", kv_budget, kept,
                    n_protected, raised)
        return raised

    # --- observation ---------------------------------------------------------------

    def _probe(self, upcoming: list[int], observe: str) -> tuple[list[int], str]:
        """The observing queries, and the mode that chose them."""
        llm, s = self.llm, self.settings
        history = [int(t) for t in llm.input_ids[: llm.n_tokens]]
        if observe == "repeat":
            # the whole logical history again, dropped tokens included, then the end of a
            # long prompt's unread part (usually the question)
            return history + upcoming[-s.window :], "repeat"
        if observe == "reread":
            # what arrived since the last re-read, then the newest tokens as in window mode
            return history[self.reread_upto :] + (history + upcoming)[-s.window :], "reread"
        if observe == "lookahead" and not self.can_look_ahead:
            return (history + upcoming)[-s.window :], "window (no lookahead on sliding-window models)"
        if observe not in ("window", "lookahead"):
            return llm.tokenize(observe.encode(), add_bos=False, special=False), "prompt"
        return (history + upcoming)[-s.window :], observe

    def _observe(self, upcoming: list[int], observe: str):
        """Attention statistics of the cached tokens, and the observation mode used.

        The observing queries are decoded after the history, read, and removed: the
        cached cells, composite slots included, are never touched. Queries that do not
        fit in the free cells are decoded in pieces, each removed before the next; the
        statistics accumulate over the pieces.
        """
        llm, policy = self.llm, self.settings.policy
        n = llm.n_tokens
        if not policy.needs_attention:  # it reads positions only: nothing to decode
            positions = self.logical_positions()
            observation = Observation(scores=np.zeros(positions.shape, np.float32), positions=positions)
            return _without_positions_from(layers_only(observation, self.compactor.layers), n), "positions"
        probe, mode = self._probe(upcoming, observe)
        last_only = policy.query_reduction == "last"
        observer = AttentionObserver(
            llm,
            seq_id=SEQ_ID,
            n_last=1 if last_only else None,
            query_reduce="max" if last_only else policy.query_reduction,
            head_reduce=policy.group_reduction,
        )
        # llama.cpp continues a sequence at its next position, so every piece starts at n;
        # one decode call per piece keeps an iSWA window cache from evicting history
        piece = max(1, min(self.free_cells(), self.max_decode))
        looked = 0
        with observer:
            for start in range(0, len(probe), piece):
                part = probe[start : start + piece]
                llm._decode_at(part, n)
                if mode == "lookahead" and start + piece >= len(probe):
                    looked = self._look_ahead(n + len(part), min(self.settings.window, self.free_cells()))
                llm._ctx.kv_cache_seq_rm(SEQ_ID, self.positions.cache(n), -1)
            observation = observer.observation(positions=self.logical_positions())
        llm._requires_eval = True  # the logits are the probe's
        pieces = -(-len(probe) // piece)
        # the policy allocates over the compacted layers only (an iSWA model's global layers)
        observation = _without_positions_from(layers_only(observation, self.compactor.layers), n)
        if mode == "reread":
            observation = self.memory.merge(observation)
            self.reread_upto = n
        if mode == "lookahead" and looked < self.settings.window:
            mode = f"lookahead of {looked} tokens"
        return observation, mode if pieces == 1 else f"{mode} in {pieces} pieces"

    def _look_ahead(self, first_position: int, count: int) -> int:
        """Decode the model's greedy continuation of what was just decoded, one token per
        call from `first_position`, at most `count` tokens; stops at an end-of-generation
        token. Returns how many were decoded."""
        llm = self.llm
        for i in range(count):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            token = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                return i
            llm._decode_at([token], first_position + i)
        return count

    def logical_positions(self) -> np.ndarray:
        """Original (logical) position per (layer, KV head, cell) of the stream, -1 where empty.

        Cells decoded since the last compaction or rebase hold cache position + offset;
        the others (composite slots, rebased cells) are in the slot table.
        """
        cache = cell_positions(self.llm, SEQ_ID)
        logical = np.where(cache >= 0, cache + self.positions.offset, -1)
        table = broadcast_positions(logical, self.compactor.n_layer, self.compactor.n_head_kv).copy()
        slots = self.compactor.table(SEQ_ID)
        if slots is not None:
            table[:, :, slots.slot_cells] = slots.positions
        return table

    def _cell_tokens(self, observation) -> np.ndarray:
        """Token id per cell for the slot table, from the logical history (-1 where ambiguous)."""
        positions = observation.positions.max(axis=(0, 1))
        history = self.llm.input_ids
        return np.where(positions >= 0, history[np.clip(positions, 0, len(history) - 1)], -1).astype(np.int32)


class _Captured(Exception):
    def __init__(self, prompt):
        self.prompt = prompt


class SystemPrompt:
    """The tokens of a chat's leading system message, as the chat format lays them out.

    The chat handler formats and tokenizes; its prompt is captured (the completion is not
    run) for the system message alone and for the whole chat, and their common token
    prefix is the system message's span, whatever the template appends after it.
    """

    def __init__(self, llm: "Llama"):
        self.llm = llm

    def tokens(self, messages: Sequence[dict]) -> list[int]:
        if not messages or messages[0].get("role") != "system":
            return []
        alone, whole = self._prompt(list(messages[:1])), self._prompt(list(messages))
        if alone is None or whole is None:
            logger.info("the chat handler did not call create_completion: no system prompt protected")
            return []
        k = 0
        for a, b in zip(alone, whole):
            if a != b:
                break
            k += 1
        return whole[:k]

    def _prompt(self, messages: list[dict]) -> list[int] | None:
        llm = self.llm
        handler = (
            llm.chat_handler
            or llm._chat_handlers.get(llm.chat_format)
            or llama_cpp.llama_chat_format.get_chat_completion_handler(llm.chat_format)
        )

        def capture(prompt, *args, **kwargs):
            raise _Captured(prompt)

        llm.create_completion = capture  # the instance attribute shadows the method for this call only
        try:
            handler(llama=llm, messages=messages)
        except _Captured as captured:
            prompt = captured.prompt
            return llm.tokenize(prompt.encode(), special=True) if isinstance(prompt, str) else [int(t) for t in prompt]
        finally:
            del llm.create_completion
        return None


class CachePositions:
    """Maps logical positions to the positions llama.cpp's cells hold, and rebases them.

    A RoPE model is trained on distances below n_ctx_train. A compressed history grows
    past it while the cache holds at most n_ctx cells, so before the next position would
    reach `limit` the cells are moved down to consecutive positions 0..k-1 (order kept)
    with llama.cpp's position shift, which re-rotates K (K-shift). Rotations compose, so
    this is valid for composite cells whose heads hold tokens of different positions.
    Afterwards a new token at logical index i is decoded at i - offset.
    """

    def __init__(self, kv: "KVCompression"):
        self.kv = kv
        self.offset = 0
        self.rebases = 0

    @property
    def limit(self) -> int:
        return self.kv.llm._model.n_ctx_train()

    def can_shift(self) -> bool:
        # an iSWA model's sliding-window cache holds recent tokens the compressed cache may have
        # dropped; a rebase moves only the compressed cache's positions and would strand them
        return bool(llama_cpp.llama_memory_can_shift(self._memory())) and self.kv.compactor.swa_cache(SEQ_ID) is None

    def cache(self, logical: int) -> int:
        return logical - self.offset

    def ensure_room(self, n_new: int) -> None:
        """Rebase unless n_new tokens plus the observing queries fit below `limit`."""
        kv, llm = self.kv, self.kv.llm
        if self.cache(llm.n_tokens) + n_new + kv.probe_reserve() <= self.limit:
            return
        if not self.can_shift():
            raise ValueError(
                f"the logical history would pass the model's training context ({self.limit}) and this "
                "memory cannot shift positions"
            )
        if llm.n_ctx() + n_new + kv.probe_reserve() > self.limit:
            raise ValueError(
                f"n_ctx={llm.n_ctx()} plus {n_new} new tokens and {kv.probe_reserve()} observing queries "
                f"do not fit below the model's training context ({self.limit}): lower n_ctx"
            )
        self.rebase()

    def rebase(self) -> None:
        """Shift the sequence's cells to positions 0..k-1 (in their order) and record where they came from."""
        kv, llm = self.kv, self.kv.llm
        logical = kv.logical_positions()
        seq = kv.compactor.seq_cells(SEQ_ID)
        # Every cell becomes a slot of the table: its llama.cpp position no longer says
        # which token it holds.
        table = logical[:, :, seq.cells]
        tokens = np.where(table >= 0, llm.input_ids[np.clip(table, 0, None)], -1).astype(np.int32)
        owned = (table >= 0).any(axis=1).sum(axis=1).astype(np.int32)
        kv.compactor.set_table(SEQ_ID, SlotTable(table, tokens, owned, seq.cells.copy()))
        old = np.unique(seq.positions)
        memory = self._memory()
        for new, pos in enumerate(old.tolist()):  # ascending: a moved cell never meets a later range
            if new != pos:
                llama_cpp.llama_memory_seq_add(memory, SEQ_ID, pos, pos + 1, new - pos)
        self.offset = llm.n_tokens - len(old)
        kv.compressed_upto = max(kv.compressed_upto, llm.n_tokens)
        self.rebases += 1
        logger.info("rebased %d cells from positions %d..%d to 0..%d at %d logical tokens",
                    len(seq.cells), old[0], old[-1], len(old) - 1, llm.n_tokens)

    def slot_cache_positions(self, observation, selection) -> np.ndarray:
        """The selection's slot positions (logical) as cache positions, order kept.

        A slot goes to the cache position of the first cell whose newest token is at or
        after the slot's logical position: the identity while nothing was rebased.
        """
        cache = cell_positions(self.kv.llm, SEQ_ID)
        newest = observation.positions.max(axis=(0, 1))
        held = newest >= 0
        order = np.argsort(newest[held], kind="stable")
        logical_sorted, cache_sorted = newest[held][order], cache[held][order]
        index = np.searchsorted(logical_sorted, selection.slot_positions, side="left")
        return cache_sorted[np.clip(index, 0, len(cache_sorted) - 1)].astype(np.int32)

    def _memory(self):
        return llama_cpp.llama_get_memory(self.kv.llm._ctx.ctx)


def _within_capacities(kv_budget, observation, caps: np.ndarray):
    """The budget, lowered to what the layers can hold: a layer keeps at most its capacity
    (per-layer memory, or the cells a shared pool leaves beside the new tokens) and at most
    its tokens. A fraction of all layers' tokens, or an int count per layer."""
    layer_tokens = (observation.positions >= 0).any(axis=1).sum(axis=1)
    if isinstance(kv_budget, float):
        holdable = int(np.minimum(caps, layer_tokens).sum())
        return min(kv_budget, holdable / float(max(1, layer_tokens.sum())))
    return min(kv_budget, int(caps.min()))


def _without_positions_from(observation, first: int):
    """The observation restricted to positions < first (probe tokens removed)."""
    positions = np.where(observation.positions >= first, -1, observation.positions)
    scores = np.where(positions >= 0, observation.scores, 0).astype(np.float32)
    return Observation(scores=scores, positions=positions.astype(np.int32), value_norms=observation.value_norms)


class Llama(llama_cpp.Llama):
    """`llama_cpp.Llama` with attention-guided KV cache compression.

    Every `llama_cpp.Llama` keyword works as before. Added keywords:

    kv_compress: a policy name ("kvcompose", "kvcompose-uniform", "snapkv", "pyramidkv",
        "tova", "streaming", "random") or a `policies.Policy`; None (default) is stock behaviour.
    kv_budget: fraction of the cells kept at each compression, in (0, 1], or an int cell count;
        at most what fits beside the tokens the compression makes room for.
    kv_observe: "window" (default), "lookahead", "repeat", "reread" (chats), or a task prompt
        (see `CompressionSettings`).
    kv_window: observing queries in window mode (default 32).
    kv_protect_prefix: first tokens never dropped: an int, or "system" (default): the leading
        system message of `create_chat_completion`.
    kv_protect_recent: last tokens never dropped (default 64).
    kv_fill: in a shared pool (no kv_memory) llama.cpp holds a row in every layer for each of
        the widest layer's cells; True (default): the other layers fill those rows with their
        next-best tokens, so they keep more logical entries in the same memory, at the cost of
        the attention compute their unowned rows would have skipped (the CPU's flash attention
        skips masked cells). False: each layer keeps exactly the policy's allocation.
    kv_max_history: longest logical history (prompt plus completion) accepted, default 2**20;
        `max_tokens=None` generates up to it. Past the model's training context the cells'
        positions are rebased (`CachePositions`); a memory that cannot shift positions keeps
        the training context as the limit.
    kv_memory: physical KV memory, kept apart from kv_budget: a fraction in (0, 1) of a full
        cache of n_ctx cells, or an int number of bytes; None (default) allocates the full
        cache. Each layer then allocates only its share of composite slots, sized from the
        model's layer profile (`kvcompose calibrate`, the one measured nearest kv_budget);
        see `kvcompose_gguf.layout`. A compression then keeps what the layers' capacities
        hold (the memory is allocated either way; `compress(kv_budget=...)` can keep less). Without
        a profile every layer gets the same share, which is a smaller shared pool: n_ctx is
        lowered to fit, with a warning. On an iSWA model (Gemma-3) it sizes the global
        layers' cache; the sliding-window cache is not compressed.
    """

    def __init__(
        self,
        *args: Any,
        kv_compress: str | Policy | None = None,
        kv_budget: float | int = 0.5,
        kv_observe: str = "window",
        kv_window: int = 32,
        kv_protect_prefix: int | str = "system",
        kv_protect_recent: int = 64,
        kv_max_history: int = 1 << 20,
        kv_memory: float | int | None = None,
        kv_fill: bool = True,
        **kwargs: Any,
    ):
        settings = None
        if kv_memory is not None and kv_compress is None:
            raise ValueError("kv_memory sizes a compressed cache: give kv_compress too")
        if kv_compress is not None:
            settings = CompressionSettings.from_kwargs(
                kv_compress, kv_budget, kv_observe, kv_window, kv_protect_prefix, kv_protect_recent, kv_fill
            )
            if not isinstance(kv_max_history, int) or kv_max_history < 1:
                raise ValueError(f"kv_max_history must be an int >= 1, got {kv_max_history!r}")
            if kwargs.get("logits_all"):
                raise ValueError("logits_all=True keeps logits for the whole logical history; not supported with kv_compress")
        plan = None
        if kv_memory is not None:
            model_path, n_ctx = kwargs.get("model_path", args[0] if args else None), kwargs.get("n_ctx", 512)
            if model_path is None or not isinstance(n_ctx, int) or n_ctx < 1:
                raise ValueError("kv_memory needs model_path and n_ctx >= 1")
            plan, cells = kv_layout.plan_for_model(
                model_path, n_ctx, kv_memory, settings.kv_budget, kwargs.get("type_k"), kwargs.get("type_v")
            )
            if plan is None:  # no profile: a smaller shared pool of the same bytes
                kwargs = {**kwargs, "n_ctx": cells}
        if plan is None:
            super().__init__(*args, **kwargs)
        else:
            with kv_layout.registered(plan.caps):
                super().__init__(*args, **kwargs)
        self._kv: KVCompression | None = None
        if settings is not None:
            try:
                support.check_model(self._model.model)
                support.check_context(self, SEQ_ID)
                compactor = Compactor(self)
                if plan is not None and not compactor.layout.per_layer:
                    raise ValueError(
                        "llama.cpp did not take the per-layer memory layout (it needs one unified sequence "
                        "and a model whose compressed layers are not shared or sliding-window only; the "
                        "library log says why)"
                    )
                kv = KVCompression(self, settings, compactor)
                support.check_fits(settings.window, settings.kv_budget, kv.room(), settings.probe_cells)
                self._kv = kv
            except (support.UnsupportedModelError, ValueError):
                self.close()
                raise
            if self.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED:
                logger.info(
                    "flash attention is off (llama-cpp-python's default): V is stored transposed, which a "
                    "compaction moves element by element, several times slower than with flash_attn=True"
                )
            # The logical history may outgrow n_ctx and, when positions can be rebased,
            # the model's training context; completions check prompts against _n_ctx.
            limit = kv_max_history if self._kv.positions.can_shift() else self._model.n_ctx_train()
            self._n_ctx = max(self._n_ctx, limit)
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
        self._ctx.kv_cache_seq_rm(-1, kv.positions.cache(self.n_tokens), -1)
        tokens = list(tokens)
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ValueError(
                f"the logical history would reach {self.n_tokens + len(tokens)} tokens, past "
                f"kv_max_history={self._n_ctx}"
            )
        # Chunks of at most a quarter of the cells: a compression before each chunk then
        # still keeps most of the history, even when n_batch is as large as n_ctx.
        # With per-layer memory a compression empties the cells new tokens go to.
        spare = kv.room() - kv.probe_reserve()
        chunk = max(1, min(self.n_batch, spare if kv.compactor.layout.per_layer else spare // 4))
        for i in range(0, len(tokens), chunk):
            batch = tokens[i : i + chunk]
            if len(batch) + kv.probe_reserve() > kv.free_cells():
                # The end of a long prompt (usually the question) is known before its
                # beginning is compressed: it joins the observing queries every round.
                # Free a whole chunk even for one generated token: one compression then
                # serves many tokens instead of one each.
                kv.positions.ensure_room(0)
                kv.compress(max(len(batch), chunk), upcoming=tokens[i:])
            kv.positions.ensure_room(len(batch))
            self._decode_at(batch, self.n_tokens)
            self.input_ids[self.n_tokens : self.n_tokens + len(batch)] = batch
            self.n_tokens += len(batch)
            self._requires_eval = False

    def _decode_at(self, tokens: Sequence[int], first_position: int) -> None:
        """Decode `tokens` at logical positions first_position.. (logits for the last one)."""
        first_cache = self._kv.positions.cache(first_position)
        for i in range(0, len(tokens), self._kv.max_decode):
            batch = tokens[i : i + self._kv.max_decode]
            self._batch.set_batch(batch=batch, n_past=first_cache + i, logits_all=False)
            self._ctx.decode(self._batch)

    def create_chat_completion(self, messages, *args: Any, **kwargs: Any):
        """`llama_cpp.Llama.create_chat_completion`; with kv_protect_prefix="system" the
        leading system message is protected from compression."""
        if self._kv is not None and self._kv.settings.protect_prefix == "system":
            self._kv.system_tokens = SystemPrompt(self).tokens(messages)
        return super().create_chat_completion(messages, *args, **kwargs)

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
        self._kv.positions.ensure_room(0)
        return self._kv.compress(0, kv_budget=kv_budget, observe=observe)

    def save_state(self) -> llama_cpp.LlamaState:
        """The state, compressed cache included (rows, per-layer budgets, slot table).

        `set_cache(LlamaRAMCache())` / `LlamaDiskCache` work unchanged: they store these
        states and a cache hit restores one through `load_state`, compressed cells and
        position offset included, instead of re-evaluating (and recompressing) the prompt.
        """
        if self._kv is None:
            return super().save_state()
        container = kv_state.save_seq(self._kv.compactor, SEQ_ID)
        saved = llama_cpp.LlamaState(
            scores=self._scores.copy(),
            # the logical history only: input_ids is sized for kv_max_history, and a
            # LlamaRAMCache compares this array with prompts
            input_ids=self.input_ids[: self.n_tokens].copy(),
            n_tokens=self.n_tokens,
            llama_state=container,
            llama_state_size=len(container),
            seed=self._seed,
        )
        saved.kv_compressed_upto = self._kv.compressed_upto
        saved.kv_position_offset = self._kv.positions.offset
        saved.kv_reread_upto = self._kv.reread_upto
        saved.kv_score_memory = self._kv.memory.state()
        return saved

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        """Load a state from `save_state`; a corrupt one raises StateFormatError and changes nothing."""
        if self._kv is None:
            return super().load_state(state)
        if not hasattr(state, "kv_compressed_upto"):
            raise ValueError("this state was saved by a Llama without kv_compress; load it into one")
        memory = ScoreMemory(self._kv.memory.span)  # checked before anything changes
        memory.restore(getattr(state, "kv_score_memory", ScoreMemory.EMPTY_STATE))
        kv_state.load_seq(self._kv.compactor, bytes(state.llama_state), SEQ_ID)
        self.scores[: len(state.scores), :] = state.scores
        self.input_ids[:] = 0
        self.input_ids[: state.n_tokens] = state.input_ids[: state.n_tokens]
        self.n_tokens = state.n_tokens
        self._requires_eval = True
        self._seed = state.seed
        self._kv.compressed_upto = state.kv_compressed_upto
        self._kv.positions.offset = getattr(state, "kv_position_offset", 0)
        # without a remembered score memory (an older state) "reread" starts afresh from the
        # tokens after the last compression rather than re-reading the whole history
        self._kv.reread_upto = getattr(state, "kv_reread_upto", state.kv_compressed_upto)
        self._kv.memory = memory

    def kv_stats(self) -> dict[str, Any]:
        """Logical tokens, cells, compressions and their memory effects, kept apart:

        kv_bytes_free: K/V bytes of the cells free for new tokens now;
        physical_bytes_freed: bytes of the cells all compressions so far released (cumulative);
        logical_entries_dropped: (layer, KV head, token) rows compressions dropped (cumulative).
        kv_memory: the compressed cache's bytes, read from llama.cpp's tensors and buffers:
            allocated_bytes (the backend buffers), in_use_bytes (the rows of the sequence's
            cells), full_cache_bytes (a stock cache of n_ctx cells), logical_full_bytes (a
            stock cache holding every logical token), and with per-layer memory
            (`per_layer`) the cells for new tokens (`n_recent`) and each layer's rows.

        What is compressed: the cells of `compressed_layers` (every layer, or on a sliding-window
        model such as Gemma-3 its global-attention layers); `cells_used`, `n_ctx`, the byte
        figures and `layer_budgets` (one per compressed layer) are those layers' cache only.
        layer_budgets: the slots each layer kept at the last compression; layer_allocation:
        what the policy's budget split gave each layer. In a shared pool every layer holds a
        row for each of the widest layer's cells, so the others fill them with their next-best
        tokens (`Policy.select(fill=True)`): more logical entries, the same memory.
        `swa_cache` (None without one) is the sliding-window layers' cache, never compressed:
        llama.cpp reuses its cells once they leave the window; its layers, cells, the cells the
        sequence holds there, the window and its bytes.
        """
        cells = self._kv.cells_used() if self._kv else self.n_tokens
        records = self._kv.records if self._kv else []
        last = records[-1] if records else None
        cell_bytes = self._kv.compactor.cell_bytes() if self._kv else None
        swa = self._kv.compactor.swa_cache(SEQ_ID) if self._kv else None
        return {
            "logical_tokens": int(self.n_tokens),
            "cells_used": int(cells),
            "n_ctx": int(self.n_ctx()),
            "kv_bytes_free": self._kv.free_cells() * cell_bytes if cell_bytes is not None else None,
            "kv_memory": self._memory_stats() if self._kv else None,
            "compressions": len(records),
            "rebases": self._kv.positions.rebases if self._kv else 0,
            "position_offset": self._kv.positions.offset if self._kv else 0,
            "last_compression_seconds": last.seconds if last else None,
            "physical_bytes_freed": sum(r.result.physical_bytes_freed for r in records),
            "logical_entries_dropped": sum(r.result.logical_entries_dropped for r in records),
            "layer_budgets": last.layer_counts.tolist() if last else None,
            "layer_allocation": last.layer_allocation.tolist() if last else None,
            "protected_prefix": self._kv.protected_prefix() if self._kv else 0,
            "compressed_layers": np.flatnonzero(self._kv.compactor.layers).tolist() if self._kv else None,
            "swa_cache": None if swa is None else {
                "layers": swa.layers.tolist(), "cells": swa.n_cells, "cells_used": swa.n_seq_cells,
                "window": swa.window, "bytes": swa.bytes,
            },
        }

    def _memory_stats(self) -> dict[str, Any]:
        layout = self._kv.compactor.layout
        seq = self._kv.compactor.seq_cells(SEQ_ID)
        return {
            "per_layer": layout.per_layer,
            "n_recent": layout.n_recent if layout.per_layer else None,
            "layer_rows": layout.rows.tolist(),
            "allocated_bytes": layout.buffer_bytes,
            "in_use_bytes": layout.cells_bytes(seq.cells),
            "full_cache_bytes": layout.full_cache_bytes(),
            "logical_full_bytes": layout.full_cache_bytes(int(self.n_tokens)),
        }

    def format_kv_stats(self) -> str:
        """`kv_stats()` as readable text: a summary line and a per-layer table."""
        stats = self.kv_stats()
        lines = [
            f"logical tokens {stats['logical_tokens']} | cells used {stats['cells_used']} of n_ctx {stats['n_ctx']} | "
            f"compressions {stats['compressions']} | rebases {stats['rebases']} | "
            f"protected prefix {stats['protected_prefix']}",
            f"KV bytes free for new tokens {stats['kv_bytes_free']} | released by compressions so far "
            f"{stats['physical_bytes_freed']} | logical entries dropped {stats['logical_entries_dropped']}",
        ]
        if self._kv is None:
            return "\n".join(lines)
        mem = stats["kv_memory"]
        lines.append(
            f"KV memory allocated {mem['allocated_bytes']} bytes ({'per-layer' if mem['per_layer'] else 'shared pool'}"
            + (f", {mem['n_recent']} cells for new tokens" if mem["per_layer"] else "")
            + f") | in use {mem['in_use_bytes']} | full cache of n_ctx {mem['full_cache_bytes']} | "
            f"full cache of the logical history {mem['logical_full_bytes']}"
        )
        swa = stats["swa_cache"]
        if swa is not None:
            lines.append(
                f"compressed: the global-attention layers' cache ({len(stats['compressed_layers'])} layers, the figures "
                f"above) | not compressed: the sliding-window cache ({len(swa['layers'])} layers, window "
                f"{swa['window']}, {swa['cells_used']} of {swa['cells']} cells, {swa['bytes']} bytes)"
            )
        attended = self._kv.compactor.cells_owned(SEQ_ID)
        compressed = stats["compressed_layers"]
        none = [None] * len(compressed)
        budgets = dict(zip(compressed, zip(stats["layer_budgets"] or none, stats["layer_allocation"] or none)))
        lines.append("layer | slots kept at last compression | policy's budget | cells attended now | rows allocated")
        for layer, now in enumerate(attended.tolist()):
            if layer not in budgets:
                lines.append(f"{layer:5d} | {'sliding window: not compressed':>30} | {'-':>15} | {'-':>18} | {'-':>14}")
                continue
            kept, allocated = ("-" if v is None else v for v in budgets[layer])
            lines.append(f"{layer:5d} | {kept:>30} | {allocated:>15} | {now:>18} | {mem['layer_rows'][layer]:>14}")
        return "\n".join(lines)

