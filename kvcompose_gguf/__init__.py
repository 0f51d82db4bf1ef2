"""KVCompose attention-guided KV cache compression for llama.cpp GGUF models.

Importing the package checks that llama-cpp-python carries the kvcompose patch
(see `kvcompose_gguf.native`) and raises `LibraryNotPatchedError`, naming the
command that fixes it, when it does not.
"""

from . import native
from .native import LibraryNotPatchedError, NativeError

native.load()

from .llama import Llama  # noqa: E402  (needs the checked library)
from .support import UnsupportedModelError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Llama", "LibraryNotPatchedError", "NativeError", "UnsupportedModelError", "native", "__version__"]
