"""Random eviction: the floor any attention-guided policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Observation, Policy

__all__ = ["RandomPolicy"]


@dataclass
class RandomPolicy(Policy):
    """Keep uniformly random tokens per layer/head (uniform budget per layer).

    seed: numpy seed for reproducible selections. Default None (fresh entropy).
    """

    needs_attention = False

    seed: int | None = None

    def score(self, obs: Observation) -> np.ndarray:
        return np.random.default_rng(self.seed).random(obs.positions.shape)
