"""PyramidKV (arXiv 2406.02069), as kvpress 0.5.5 `PyramidKVPress` budgets it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Budget, target_rows
from .snapkv import SnapKV

__all__ = ["PyramidKV"]


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scores with per-layer budgets shrinking linearly with depth.

    For a layer of T tokens and kept fraction b: capacity = w + T*b,
    min = (capacity - w) / beta, max = 2 (capacity - w) - min (clipped at
    T - w, min raised to match), and layer l keeps round(max - l (max - min) /
    (n_layer - 1)). Where the pyramid does not fit (not T >= max >= min >= w)
    every layer keeps max(1, round(T*b)), as the reference does.

    beta: pyramid steepness (>= 1, larger = steeper). Default 20.
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError("beta must be >= 1")

    def layer_budget(self, n_tokens: int, fraction: float, layer: int, n_layer: int) -> int:
        window = self.window_size
        capacity = window + n_tokens * fraction
        min_num = (capacity - window) / self.beta
        max_num = (capacity - window) * 2 - min_num
        if max_num >= n_tokens - window:
            max_num = n_tokens - window
            min_num = (capacity - window) * 2 - max_num
        if not (n_tokens >= max_num >= min_num >= window):
            return max(1, round(n_tokens * fraction))
        steps = (max_num - min_num) / (n_layer - 1) if n_layer > 1 else 0.0
        return round(max_num - layer * steps)

    def allocation_rows(
        self, scores: np.ndarray, valid: np.ndarray, n_tokens: np.ndarray, budget: Budget
    ) -> tuple[np.ndarray, int]:
        n_layer = len(n_tokens)
        targets = np.array(
            [
                self.layer_budget(int(t), budget.fraction_of(int(t)), layer, n_layer)
                for layer, t in enumerate(n_tokens)
            ],
            dtype=np.int64,
        )
        targets = np.clip(targets, 1, n_tokens)
        return target_rows(targets, int(n_tokens.max())), int(targets.sum())
