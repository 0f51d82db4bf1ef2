"""Where the tests put the model's layers and KV cache.

KVCOMPOSE_TEST_N_GPU_LAYERS (default 0: everything on the CPU) is the n_gpu_layers every
shared constructor passes, so on a CUDA or Metal build the same suite runs with the cache
in device memory: `KVCOMPOSE_TEST_N_GPU_LAYERS=-1 pytest`.
"""

from __future__ import annotations

import os


def n_gpu_layers() -> int:
    return int(os.environ.get("KVCOMPOSE_TEST_N_GPU_LAYERS", "0"))


def kv_in_device_memory() -> bool:
    """Whether the shared constructors put the KV cache in GPU memory (a GPU build asked to offload)."""
    import llama_cpp

    return n_gpu_layers() != 0 and bool(llama_cpp.llama_supports_gpu_offload())


def assert_close(actual, desired, *, device_atol: float, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Equal within (rtol, atol) on the CPU (bitwise by default); within device_atol (absolute)
    with the cache in GPU memory. GPU kernels choose their tiling and reduction order from the
    batch and KV sizes, so two graphs of different shapes (a per-layer layout and the shared
    pool, one batch and two) round differently there. Seen on an H100: logits of the tiny test
    model apart by up to 0.007, attention weights by 0.004; a wrong row moves them by 0.1 or more."""
    import numpy as np

    if kv_in_device_memory():
        np.testing.assert_allclose(actual, desired, rtol=0, atol=device_atol)
    elif rtol == atol == 0:
        np.testing.assert_array_equal(actual, desired)
    else:
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol)
