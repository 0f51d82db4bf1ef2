"""Per-model layer profiles: the share of the context KVCompose keeps in each layer.

KVCompose's global allocation gives each layer its own budget, and the shape of that
allocation is a property of the model more than of the prompt (layer 0 keeps nearly
everything on SmolLM2, docs/RESULTS.md). `kvcompose calibrate` measures it once per model
file, on text that ships with Python (`eval.texts`), with the reference's semantics:
prefill a window of text, re-feed it as the observing queries, select once. Profiles are
cached per model file; per-layer physical memory (`layout`, `Llama(kv_memory=...)`) sizes
each layer's rows from them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import models

# 2: keep_fractions has every model layer (0 for one outside the compressed cache)
PROFILE_VERSION = 2


@dataclass(frozen=True)
class LayerProfile:
    """keep_fractions[l]: mean over the windows of (slots layer l keeps) / (window tokens), for
    every model layer; 0 for a layer whose K/V are not compressed (an iSWA model's
    sliding-window layers)."""

    kv_budget: float
    keep_fractions: tuple[float, ...]
    spread: tuple[float, ...]  # standard deviation over the windows
    windows: int
    tokens: int
    text: str  # an `eval.texts` name
    seed: int


def one_shot_layer_counts(model_path, context: Sequence[int], kv_budget: float, n_threads: int | None) -> dict:
    """Our KVCompose on `context` with kvpress's semantics: prefill it, observe it by
    re-feeding it (repeat mode), compress once. Nothing is protected but the newest token
    (which every selection keeps)."""
    from .llama import Llama

    n = len(context)
    window = 32
    n_ctx = -(-(2 * n + window + 64) // 256) * 256
    # n_batch = n_ctx: the context is re-fed in one llama_decode call (one piece), so every
    # re-fed query also sees the re-fed tokens before it, as in kvpress's forward pass
    llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, verbose=False,
                kv_compress="kvcompose", kv_budget=kv_budget, kv_window=window,
                kv_protect_prefix=0, kv_protect_recent=1)
    try:
        llm.eval(list(context))
        record = llm.compress(kv_budget, observe="repeat")
        layers = llm._kv.compactor.layers
        return {"layer_counts": [int(x) for x in record.layer_allocation], "observe": record.observe,
                "compressed_layers": np.flatnonzero(layers).tolist(), "n_layer": len(layers)}
    finally:
        llm.close()


def model_key(model_path) -> str:
    """Identifies a model file by its size and its first and last MiB (hashing gigabytes
    on every load would cost more than the calibration it looks up)."""
    path = Path(model_path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:20]


def profile_path(model_path) -> Path:
    return models.models_cache_dir().parent / "profiles" / f"{model_key(model_path)}.json"


def calibrate(
    model_path,
    kv_budgets: Sequence[float] = (0.75, 0.5, 0.25, 0.1),
    *,
    tokens: int = 1024,
    windows: int = 3,
    text: str = "python-docs",
    seed: int = 0,
    n_threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[float, LayerProfile]:
    """Measure KVCompose's per-layer keep fractions on `windows` seeded windows of
    `tokens` tokens of `text`, at each budget."""
    for budget in kv_budgets:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"kv_budgets are fractions in (0, 1], got {budget}")
    if tokens < 64 or windows < 1:
        raise ValueError("need tokens >= 64 and windows >= 1")
    contexts = _text_windows(model_path, text, tokens, windows, seed)
    profiles = {}
    for budget in kv_budgets:
        fractions = []
        for i, context in enumerate(contexts):
            if progress:
                progress(f"kv_budget {budget}: window {i + 1}/{len(contexts)}")
            one_shot = one_shot_layer_counts(model_path, context, budget, n_threads)
            kept = np.zeros(one_shot["n_layer"])
            kept[one_shot["compressed_layers"]] = one_shot["layer_counts"]
            fractions.append(kept / len(context))
        stacked = np.stack(fractions)
        profiles[budget] = LayerProfile(
            kv_budget=budget,
            keep_fractions=tuple(round(float(x), 5) for x in stacked.mean(axis=0)),
            spread=tuple(round(float(x), 5) for x in stacked.std(axis=0)),
            windows=len(contexts),
            tokens=tokens,
            text=text,
            seed=seed,
        )
    return profiles


def _text_windows(model_path, text: str, tokens: int, windows: int, seed: int) -> list[list[int]]:
    """BOS + `tokens` tokens at seeded offsets of the text (tokenized by the model's vocabulary)."""
    import llama_cpp

    from .eval import texts

    vocab_only = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        # the first 64 windows' worth of characters: tokenizing 465k characters is slow
        ids = vocab_only.tokenize(texts.long_text(text)[: 64 * 8 * tokens].encode(), add_bos=False, special=False)
        bos = vocab_only.token_bos()
    finally:
        vocab_only.close()
    if len(ids) < tokens:
        raise ValueError(f"text {text!r} has {len(ids)} tokens, fewer than {tokens}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - tokens + 1, size=windows)
    return [[bos] + list(ids[s : s + tokens]) for s in starts]


def save(model_path, profiles: dict[float, LayerProfile]) -> Path:
    path = profile_path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": PROFILE_VERSION,
        "model_file": Path(model_path).name,
        "model_key": model_key(model_path),
        "observe": "repeat (one compression of the prefilled window)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profiles": [asdict(p) for p in profiles.values()],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def load(model_path) -> dict[float, LayerProfile] | None:
    """The cached profiles of this model file, or None (never calibrated, or stale)."""
    path = profile_path(model_path)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if payload.get("version") != PROFILE_VERSION or payload.get("model_key") != model_key(model_path):
        return None
    profiles = {}
    try:
        for p in payload["profiles"]:
            profile = LayerProfile(**{**p, "keep_fractions": tuple(p["keep_fractions"]), "spread": tuple(p["spread"])})
            profiles[profile.kv_budget] = profile
    except (KeyError, TypeError):  # written by another version of this file's layout
        return None
    return profiles
