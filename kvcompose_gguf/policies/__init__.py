"""Selection policies: attention statistics in, a per-layer/per-head selection of cells out.

Pure numpy; nothing here touches llama.cpp. One class per method, in the
spirit of a kvpress press; the step from scores to a selection (budgets,
caps, protection, top-k, slot order) lives once in `base`.
"""

from __future__ import annotations

import dataclasses

from .base import Budget, Observation, Policy, Selection, protect_positions
from .h2o import H2O
from .kvcompose import KVCompose, KVComposeUniform
from .pyramidkv import PyramidKV
from .random import RandomPolicy
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

POLICIES: dict[str, type[Policy]] = {
    "kvcompose": KVCompose,
    "kvcompose-uniform": KVComposeUniform,
    "streaming": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "tova": TOVA,
    "h2o": H2O,
    "random": RandomPolicy,
}


def get_policy(name_or_obj: str | Policy, **kwargs) -> Policy:
    """A policy from its registry name (kwargs are its hyperparameters), or a given policy (kwargs replace fields)."""
    if isinstance(name_or_obj, Policy):
        return dataclasses.replace(name_or_obj, **kwargs) if kwargs else name_or_obj
    if not isinstance(name_or_obj, str):
        raise TypeError(f"policy must be a name or a Policy, got {type(name_or_obj).__name__}")
    try:
        cls = POLICIES[name_or_obj]
    except KeyError:
        raise ValueError(f"unknown policy {name_or_obj!r}; choose one of {sorted(POLICIES)}") from None
    return cls(**kwargs)


__all__ = [
    "POLICIES",
    "Budget",
    "H2O",
    "KVCompose",
    "KVComposeUniform",
    "Observation",
    "Policy",
    "PyramidKV",
    "RandomPolicy",
    "Selection",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "get_policy",
    "protect_positions",
]
