from __future__ import annotations

import pytest

from tiny_models import TinyConfig, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A 4-layer llama with 8 query heads, 2 KV heads, head_dim 64 (GQA group of 4)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", TinyConfig())


@pytest.fixture(scope="session")
def default_model_path():
    from kvcompose_gguf import models

    try:
        return models.smollm2_path()
    except models.ModelNotInstalledError as exc:
        pytest.skip(f"default model not installed: {exc}")
