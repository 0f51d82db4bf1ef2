"""StreamingLLM (arXiv 2309.17453): attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Observation, Policy

__all__ = ["StreamingLLM"]


@dataclass
class StreamingLLM(Policy):
    """StreamingLLM: keep the first ``n_sink`` positions and the most recent tokens.

    Reads positions only. Every layer keeps max(1, int(T * kv_budget)) tokens:
    the sinks, then the newest ones (kvpress ``StreamingLLMPress``). This is
    what llama.cpp's context shift does with ``n_keep = n_sink`` -- except
    that here the kept tokens keep their original positions (no K-shift).

    n_sink: leading positions always favoured. Default 4.
    """

    needs_attention = False

    n_sink: int = 4

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError("n_sink must be >= 0")

    def score(self, obs: Observation) -> np.ndarray:
        positions = obs.positions.astype(np.float64)
        sink_score = float(obs.positions.max()) + 1.0
        return np.where((obs.positions >= 0) & (obs.positions < self.n_sink), sink_score, positions)
