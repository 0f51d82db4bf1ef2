"""KVCompose (arXiv 2509.05165) as its authors implement it in kvpress 0.5.5 (`KVComposePress`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Budget, Observation, Policy, head_mean_by_position, target_rows, threshold_allocation

__all__ = ["KVCompose", "KVComposeUniform"]

# The reference lifts the first keep_token_lower_bound composite entries of every layer by this
# constant, so that they win the global top-N; kept verbatim so that allocations match it.
_LOWER_BOUND_BONUS = 1e9

_AGGREGATIONS = ("max", "mean")


@dataclass
class KVCompose(Policy):
    """KVCompose: composite tokens aligned across heads, one global budget over layers.

    Steps (reference defaults): token scores are the max attention over the
    observing queries (``agg_task="max"``), averaged over each GQA group
    (``agg_group="mean"``) -- both computed by the observer, see
    `query_reduction`/`group_reduction`. Then, here:

    1. optionally multiply by the value-row norm (``add_v_norm``);
    2. add the mean over the layer's KV heads (``add_mean_across_heads``; after
       a compaction, over the heads that hold the same token);
    3. sort every head's scores descending; the composite score of rank j is
       the mean (``agg_head``) over heads of the rank-j scores;
    4. the first ``keep_token_lower_bound`` composite entries of each layer are
       lifted by 1e9, then layer 0 takes the maximum over layers of every rank
       (it keeps the most);
    5. a global top-N over all layers, N = max(1, int(n_layer * T * kv_budget)),
       gives n_l; n_l >= max(1, keep_token_lower_bound);
    6. every head of layer l keeps its own n_l best tokens, laid out in
       original-position order (slot j = the j-th oldest kept token per head).

    Fields (defaults are the reference's):
    structured: True = one count per layer (the cache stays a rectangle);
        False = per-head counts from a global top-N over per-head ranked scores,
        returned as a ``simulated`` selection (no layout holds it).
    agg_task: "max" | "mean", reduction over observing queries (observer side).
    agg_group: "mean" | "max", reduction over a GQA group (observer side).
    agg_head: "mean" | "max", reduction over KV heads of the rank-j scores.
    add_v_norm: multiply each score by its value-row L2 norm (needs
        ``Observation.value_norms``). Default False.
    add_mean_across_heads: add the mean over KV heads to every head's scores
        (stabilises the per-head ranking). Default True.
    keep_token_lower_bound: minimum composite slots per layer. Default 0
        (the universal floor of 1 still applies).
    """

    structured: bool = True
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0

    def __post_init__(self) -> None:
        for name in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, name) not in _AGGREGATIONS:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {_AGGREGATIONS}")
        if isinstance(self.keep_token_lower_bound, bool) or not isinstance(self.keep_token_lower_bound, int):
            raise TypeError("keep_token_lower_bound must be an int")
        if self.keep_token_lower_bound < 0:
            raise ValueError("keep_token_lower_bound must be >= 0")

    @property
    def query_reduction(self) -> str:  # type: ignore[override]
        return self.agg_task

    @property
    def group_reduction(self) -> str:  # type: ignore[override]
        return self.agg_group

    def min_per_layer(self) -> int:
        return max(1, self.keep_token_lower_bound)

    def score(self, obs: Observation) -> np.ndarray:
        valid = obs.positions >= 0
        scores = obs.scores.astype(np.float32) if valid.all() else np.where(valid, obs.scores, 0).astype(np.float32)
        if self.add_v_norm:
            if obs.value_norms is None:
                raise ValueError("add_v_norm=True needs Observation.value_norms")
            scores *= np.where(valid, obs.value_norms, 0).astype(np.float32)
        if self.add_mean_across_heads:
            scores += head_mean_by_position(scores, obs.positions)
        return scores

    def _ranked(self, scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Every head's scores sorted descending, empty cells last as -inf."""
        key = np.where(valid, scores, -np.inf).astype(np.float32)
        return np.sort(key, axis=-1)[..., ::-1]

    def allocation_rows(
        self, scores: np.ndarray, valid: np.ndarray, n_tokens: np.ndarray, budget: Budget
    ) -> tuple[np.ndarray, int]:
        ranked = self._ranked(scores, valid)
        composite = ranked.mean(axis=1) if self.agg_head == "mean" else ranked.max(axis=1)
        composite[:, : self.keep_token_lower_bound] += _LOWER_BOUND_BONUS
        composite[0] = composite.max(axis=0)
        return composite, budget.total(n_tokens)

    def allocate(self, scores, valid, budget, *, reserve, floor, caps):  # type: ignore[override]
        if self.structured:
            return super().allocate(scores, valid, budget, reserve=reserve, floor=floor, caps=caps)
        n_layer, n_head, _ = valid.shape
        ranked = self._ranked(scores, valid)
        ranked[..., : self.keep_token_lower_bound] += _LOWER_BOUND_BONUS
        per_head_tokens = valid.sum(axis=-1).ravel()
        counts = threshold_allocation(
            ranked.reshape(n_layer * n_head, -1),
            budget.total(per_head_tokens),
            per_head_tokens,
            reserve=reserve.ravel(),
            floor=floor.ravel(),
            caps=None if caps is None else np.repeat(caps, n_head),
        )
        return counts.reshape(n_layer, n_head)


@dataclass
class KVComposeUniform(KVCompose):
    """KVCompose's head-specific composite selection with the same count in every layer.

    The ablation of step 5: every layer keeps max(1, int(T * kv_budget))
    slots (as kvpress's scorer presses do), no global allocation.
    """

    def allocation_rows(
        self, scores: np.ndarray, valid: np.ndarray, n_tokens: np.ndarray, budget: Budget
    ) -> tuple[np.ndarray, int]:
        targets = budget.per_layer(n_tokens)
        return target_rows(targets, int(n_tokens.max())), int(targets.sum())
