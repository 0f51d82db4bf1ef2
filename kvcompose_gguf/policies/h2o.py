"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Observation, Policy
from .snapkv import window_mask

__all__ = ["H2O"]


@dataclass
class H2O(Policy):
    """H2O: keep the tokens that have received the most attention so far.

    The observer sums attention over the observing queries and accumulates
    it over successive observations (``accumulate``), averaged over each GQA
    group. Uniform budget: every layer keeps max(1, int(T * kv_budget)).

    recent_window: the last w positions are favoured (H2O's recent tokens).
        Default 0.
    normalize: divide each token's sum by the number of causal queries that
        saw it (newest - position + 1), as kvpress's ``ObservedAttentionPress``
        does; meaningful when the observing queries are the whole prefill.
        Default False (plain accumulated attention, as in H2O).
    """

    query_reduction = "sum"
    group_reduction = "mean"
    accumulate = True

    recent_window: int = 0
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.recent_window < 0:
            raise ValueError("recent_window must be >= 0")

    def score(self, obs: Observation) -> np.ndarray:
        valid = obs.positions >= 0
        scores = np.where(valid, obs.scores, 0).astype(np.float32)
        if self.normalize:
            seen_by = (obs.positions.max() - obs.positions + 1).astype(np.float32)
            scores = np.where(valid, scores / np.maximum(seen_by, 1), 0)
        if self.recent_window:
            recent = window_mask(obs.positions, self.recent_window)
            layer_max = np.where(valid & ~recent, scores, -np.inf).max(axis=(1, 2))
            layer_max = np.where(np.isfinite(layer_max), layer_max, 0)
            scores = np.where(recent, (layer_max + 1)[:, None, None], scores)
        return scores
