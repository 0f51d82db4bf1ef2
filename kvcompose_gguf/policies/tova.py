"""TOVA (arXiv 2401.06104), as kvpress 0.5.5 `TOVAPress` scores it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Observation, Policy, head_mean_by_position

__all__ = ["TOVA"]


@dataclass
class TOVA(Policy):
    """TOVA: the newest query's attention, averaged over all heads of the layer.

    The observer records the last token's attention averaged over each GQA
    group; here it is averaged over the KV heads (= over all query heads, the
    groups being equal; per token after a compaction) and shared by every
    head, so heads holding the same tokens keep the same ones. The newest token gets the layer's maximum + 1 (it is protected
    anyway). Uniform budget: every layer keeps max(1, int(T * kv_budget)).
    No hyperparameters.
    """

    query_reduction = "last"
    group_reduction = "mean"
    observation_window = 1

    def score(self, obs: Observation) -> np.ndarray:
        valid = obs.positions >= 0
        newest = obs.positions == obs.positions.max()
        shared = head_mean_by_position(obs.scores, obs.positions)
        others = valid & ~newest
        layer_max = np.where(others, shared, -np.inf).max(axis=(1, 2))
        layer_max = np.where(np.isfinite(layer_max), layer_max, 0)
        return np.where(newest, (layer_max + 1)[:, None, None], shared)
