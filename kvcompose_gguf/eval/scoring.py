"""Scores: answer recall for generated tasks, KL divergence for next-token distributions."""

from __future__ import annotations

import re

import numpy as np


def contains_answer(reply: str, answer: str) -> bool:
    """Case-insensitive whole-word match, so '123' does not count inside '91234'."""
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])"
    return re.search(pattern, reply, flags=re.IGNORECASE) is not None


def recall(reply: str, answers: tuple[str, ...] | list[str]) -> float:
    """Fraction of the expected answers the reply names (RULER's string_match_all)."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    return sum(contains_answer(reply, a) for a in answers) / len(answers)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_reference || P) in nats for each row of [n_positions, n_vocab] logits."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {reference_logits.shape} vs {logits.shape}")
    log_p = log_softmax(reference_logits)
    log_q = log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def negative_log_likelihood(logits: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """-log P(next token) per row, in nats."""
    log_p = log_softmax(logits)
    return -log_p[np.arange(len(next_tokens)), np.asarray(next_tokens)]
