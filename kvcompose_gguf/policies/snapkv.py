"""SnapKV (arXiv 2404.14469), as kvpress 0.5.5 `SnapKVPress` scores it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Observation, Policy

__all__ = ["SnapKV", "window_mask", "pool_by_position"]


def window_mask(positions: np.ndarray, window_size: int) -> np.ndarray:
    """bool mask of the cells holding one of the last ``window_size`` original positions."""
    return (positions >= 0) & (positions > positions.max() - window_size)


def pool_by_position(scores: np.ndarray, positions: np.ndarray, members: np.ndarray, kernel_size: int) -> np.ndarray:
    """Average-pool each layer/head's member cells over neighbouring original positions.

    Zero padding at both ends of the member sequence and a divisor of
    kernel_size everywhere (torch ``avg_pool1d`` with ``padding=k//2``), so
    that the cells next to the observation window are pooled with zeros,
    as in the reference. Non-member cells come back as 0.
    """
    n_cells = positions.shape[-1]
    flat_pos = positions.reshape(-1, n_cells)
    flat_members = members.reshape(-1, n_cells)
    # Members first, in original-position order; the rest behave as trailing zeros.
    order = np.argsort(np.where(flat_members, flat_pos, np.iinfo(flat_pos.dtype).max), axis=-1, kind="stable")
    gathered = np.take_along_axis(np.where(flat_members, scores.reshape(-1, n_cells), 0), order, axis=-1)
    half = kernel_size // 2
    padded = np.pad(gathered.astype(np.float32), ((0, 0), (half, half)))
    pooled = padded[:, 0:n_cells].copy()
    for offset in range(1, kernel_size):
        pooled += padded[:, offset : offset + n_cells]
    pooled /= np.float32(kernel_size)
    out = np.empty_like(pooled)
    np.put_along_axis(out, order, pooled, axis=-1)
    return np.where(flat_members, out, 0).reshape(positions.shape)


@dataclass
class SnapKV(Policy):
    """SnapKV: mean attention of the last ``window_size`` queries, pooled over neighbours.

    The observer averages the window's attention over its queries and over
    each GQA group. Here the non-window tokens' scores are average-pooled
    over ``kernel_size`` neighbouring positions (zero padded), and the window
    tokens get the layer's maximum + 1, so the window is kept first (a score,
    not a protection: a budget below the window size keeps only part of it).
    Uniform budget: every layer keeps max(1, int(T * kv_budget)).

    window_size: observing queries and always-favoured recent tokens. Default 64.
    kernel_size: odd pooling width. Default 5.
    """

    query_reduction = "mean"
    group_reduction = "mean"

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError("window_size must be >= 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd and >= 1 (an even kernel shifts the pooled scores)")

    @property
    def observation_window(self) -> int:  # type: ignore[override]
        return self.window_size

    def score(self, obs: Observation) -> np.ndarray:
        window = window_mask(obs.positions, self.window_size)
        context = (obs.positions >= 0) & ~window
        pooled = pool_by_position(obs.scores, obs.positions, context, self.kernel_size)
        layer_max = np.where(context, pooled, -np.inf).max(axis=(1, 2))
        layer_max = np.where(np.isfinite(layer_max), layer_max, 0)
        return np.where(window, (layer_max + 1)[:, None, None], pooled)
