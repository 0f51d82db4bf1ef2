"""KVCompose attention-guided KV cache compression for llama.cpp GGUF models.

Importing the package checks that llama-cpp-python carries the kvcompose patch
(see `kvcompose_gguf.native`) and raises `LibraryNotPatchedError`, naming the
command that fixes it, when it does not.
"""

from . import native
from .native import LibraryNotPatchedError, NativeError

native.load()

__version__ = "0.1.0"

__all__ = ["LibraryNotPatchedError", "NativeError", "native", "__version__"]
