"""A numpy forward pass of the tiny llama fixtures: the independent reference
for what llama.cpp computes on them (logits, attention probabilities)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Forward:
    logits: np.ndarray  # [n_tokens, n_vocab]
    attention: list[np.ndarray]  # per layer [n_head, n_tokens(query), n_tokens(key)], softmax probabilities


def load_weights(path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = np.asarray(t.data, dtype=np.float32).reshape(shape)
    return out


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_norm(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """llama.cpp's NORM rope: rotate adjacent pairs (x[2i], x[2i+1]). x: [n_tokens, n_head, d]."""
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [n_tokens, d/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x0, x1 = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    out = np.empty_like(x, dtype=np.float64)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out.astype(np.float32)


def forward(weights: dict[str, np.ndarray], config, tokens: list[int], eps: float = 1e-5) -> Forward:
    """Causal forward of `tokens` at positions 0..n-1 through a tiny llama."""
    c = config
    n = len(tokens)
    positions = np.arange(n)
    group = c.n_head // c.n_head_kv
    x = weights["token_embd.weight"][tokens]
    causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
    attention = []
    for il in range(c.n_layer):
        p = f"blk.{il}."
        h = _rms_norm(x, weights[p + "attn_norm.weight"], eps)
        q = (h @ weights[p + "attn_q.weight"].T).reshape(n, c.n_head, c.head_dim)
        k = (h @ weights[p + "attn_k.weight"].T).reshape(n, c.n_head_kv, c.head_dim)
        v = (h @ weights[p + "attn_v.weight"].T).reshape(n, c.n_head_kv, c.head_dim)
        q = _rope_norm(q, positions, c.rope_freq_base)
        k = _rope_norm(k, positions, c.rope_freq_base)
        k_full = np.repeat(k, group, axis=1)  # query head h reads KV head h // group
        v_full = np.repeat(v, group, axis=1)
        kq = np.einsum("qhd,khd->hqk", q, k_full) / np.sqrt(c.head_dim) + causal
        kq = kq - kq.max(axis=-1, keepdims=True)
        probs = np.exp(kq)
        probs /= probs.sum(axis=-1, keepdims=True)
        attention.append(probs)
        attn = np.einsum("hqk,khd->qhd", probs, v_full).reshape(n, c.n_embd)
        x = x + attn @ weights[p + "attn_output.weight"].T
        h = _rms_norm(x, weights[p + "ffn_norm.weight"], eps)
        gate = h @ weights[p + "ffn_gate.weight"].T
        up = h @ weights[p + "ffn_up.weight"].T
        x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ weights[p + "ffn_down.weight"].T
    x = _rms_norm(x, weights["output_norm.weight"], eps)
    return Forward(logits=x @ weights["output.weight"].T, attention=attention)
