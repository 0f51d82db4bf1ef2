from __future__ import annotations

import pytest

from tiny_models import TinyConfig, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A 4-layer llama with 8 query heads, 2 KV heads, head_dim 64 (GQA group of 4)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", TinyConfig())


def _installed(find, what: str):
    from kvcompose_gguf import models

    try:
        return find(models)
    except models.ModelNotInstalledError as exc:
        pytest.skip(f"{what} not installed: {exc}")


@pytest.fixture(scope="session")
def default_model_path():
    return _installed(lambda models: models.smollm2_path(), "default model")


@pytest.fixture(scope="session")
def gemma3_path():
    """Gemma-3-270M, the sliding-window (iSWA) model."""
    return _installed(lambda models: models.gemma3_path(), "sliding-window model")


@pytest.fixture
def session_class():
    """The class `sessions` opens; a test module overrides this fixture to use a subclass."""
    from c_api import Session  # imports llama_cpp: only for tests that ask for sessions

    return Session


@pytest.fixture
def sessions(session_class):
    """open_session(model_path, **kwargs) -> session_class(...); every one is closed at teardown."""
    opened = []

    def open_session(*args, **kwargs):
        s = session_class(*args, **kwargs)
        opened.append(s)
        return s

    yield open_session
    for s in opened:
        s.close()
