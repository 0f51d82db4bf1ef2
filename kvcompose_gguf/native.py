"""ctypes bindings to the kvcompose functions in the patched libllama.

llama-cpp-python loads libllama and binds its stock symbols at import. Ours are
looked up here, lazily and only after the ABI probe has answered, so a stock
library gives a clear `LibraryNotPatchedError` instead of a segfault or a ctypes
AttributeError somewhere later.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from typing import Any

# Must equal LLAMA_KVCOMPOSE_ABI_VERSION in native/llama-kvcompose.h.
ABI_VERSION = 2

FIX_COMMAND = "make build  (or: python scripts/build_patched_llama.py) in a kvcompose-gguf checkout"

# Status codes of native/llama-kvcompose.h.
OK = 0
ERR_ARGUMENT = -1
ERR_UNSUPPORTED = -2
ERR_RANGE = -3
ERR_SEQUENCE = -4
ERR_DUPLICATE = -5
ERR_STATE = -6
ERR_COMPUTE = -7


class LibraryNotPatchedError(ImportError):
    """The loaded libllama lacks the kvcompose patch, or has another ABI version."""


class NativeError(RuntimeError):
    """A kvcompose C function refused its input or failed; nothing was changed."""

    def __init__(self, function: str, status: int, detail: str = ""):
        self.function = function
        self.status = status
        message = f"{function} failed: {status_str(status)} (status {status})"
        super().__init__(message + (f": {detail}" if detail else ""))


_lib: ctypes.CDLL | None = None


def check_library(lib: Any, where: str = "the loaded libllama") -> int:
    """Return the library's kvcompose ABI version, or raise LibraryNotPatchedError.

    `lib` is any ctypes library object; the check never calls a symbol that it
    has not first found.
    """
    try:
        probe = lib.llama_kvcompose_abi_version
    except AttributeError:
        raise LibraryNotPatchedError(
            f"{where} is a stock llama.cpp build without the kvcompose patch "
            f"(no llama_kvcompose_abi_version symbol). Build and install the patched "
            f"llama-cpp-python with: {FIX_COMMAND}"
        ) from None
    probe.argtypes = []
    probe.restype = ctypes.c_int32
    version = int(probe())
    if version != ABI_VERSION:
        raise LibraryNotPatchedError(
            f"{where} has kvcompose ABI version {version}, but this kvcompose_gguf "
            f"needs version {ABI_VERSION}. Rebuild the patched llama-cpp-python with: {FIX_COMMAND}"
        )
    return version


def load() -> ctypes.CDLL:
    """The patched libllama that llama_cpp loaded, checked and bound once."""
    global _lib
    if _lib is None:
        try:
            import llama_cpp.llama_cpp as llama_cpp_module
        except Exception as exc:  # a missing or unloadable libllama surfaces as many types
            raise LibraryNotPatchedError(
                f"llama-cpp-python could not be imported ({exc}). Install the patched build with: {FIX_COMMAND}"
            ) from exc
        lib = llama_cpp_module._lib
        where = f"libllama at {getattr(lib, '_name', '?')}"
        check_library(lib, where=where)
        try:
            _bind_all(lib)
        except AttributeError as exc:  # probe present, but built from other native/ sources
            raise LibraryNotPatchedError(
                f"{where} has kvcompose ABI version {ABI_VERSION} but lacks {exc}; it was built from "
                f"other kvcompose sources. Rebuild the patched llama-cpp-python with: {FIX_COMMAND}"
            ) from None
        _lib = lib
    return _lib


def _bind(lib: ctypes.CDLL, name: str, argtypes: list, restype: Any) -> None:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype


def _bind_all(lib: ctypes.CDLL) -> None:
    _bind(lib, "llama_kvcompose_status_str", [ctypes.c_int32], ctypes.c_char_p)
    _bind_stats(lib)
    _bind_compaction(lib)
    _bind_layout(lib)


# --- attention statistics (native/kvcompose-stats.*) ---------------------------


class StatsParams(ctypes.Structure):
    """struct llama_kvcompose_stats_params (native/llama-kvcompose-stats.h)."""

    _fields_ = [
        ("seq_id", ctypes.c_int32),
        ("n_last", ctypes.c_int32),
        ("query_reduce", ctypes.c_int32),
        ("head_reduce", ctypes.c_int32),
    ]


# enum llama_kvcompose_stats_query_reduce / _head_reduce
STATS_QUERY_REDUCE = {"max": 0, "mean": 1, "sum": 2}
STATS_HEAD_REDUCE = {"mean": 0, "max": 1}


def _bind_stats(lib: ctypes.CDLL) -> None:
    ctx = ctypes.c_void_p
    i32, i32p = ctypes.c_int32, ctypes.POINTER(ctypes.c_int32)
    _bind(lib, "llama_kvcompose_stats_default_params", [], StatsParams)
    _bind(lib, "llama_kvcompose_stats_begin", [ctx, ctypes.POINTER(StatsParams)], i32)
    _bind(lib, "llama_kvcompose_stats_set_enabled", [ctx, ctypes.c_bool], i32)
    _bind(lib, "llama_kvcompose_stats_reset", [ctx], i32)
    _bind(lib, "llama_kvcompose_stats_end", [ctx], i32)
    _bind(lib, "llama_kvcompose_stats_shape", [ctx, i32p, i32p, i32p], i32)
    _bind(lib, "llama_kvcompose_stats_n_queries", [ctx, ctypes.POINTER(ctypes.c_int64)], i32)
    _bind(lib, "llama_kvcompose_stats_layers", [ctx, ctypes.POINTER(ctypes.c_uint8), i32], i32)
    _bind(lib, "llama_kvcompose_stats_get", [ctx, i32, i32, ctypes.POINTER(ctypes.c_float), i32], i32)
    _bind(lib, "llama_kvcompose_stats_get_all", [ctx, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t], i32)
    _bind(lib, "llama_kvcompose_stats_cell_positions", [ctx, i32, i32p, i32], i32)
    _bind(lib, "llama_kvcompose_stats_n_cells", [ctx, i32, i32p], i32)


# --- KV compaction (native/kvcompose-compact.*) --------------------------------


def _bind_compaction(lib: ctypes.CDLL) -> None:
    i32, p_i32, ctx = ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_void_p
    # llama_kvcompose_compact_seq(ctx, seq_id, n_layer, n_head_kv, n_slots, counts, cells,
    #                             slot_positions, layer_offsets, slot_cells_out)
    _bind(lib, "llama_kvcompose_compact_seq", [ctx, i32, i32, i32, i32, p_i32, p_i32, p_i32, p_i32, p_i32], i32)
    # llama_kvcompose_seq_cells(ctx, seq_id, capacity, cells_out, positions_out, n_cells, n_kv_used, n_used)
    _bind(lib, "llama_kvcompose_seq_cells", [ctx, i32, i32, p_i32, p_i32, p_i32, p_i32, p_i32], i32)
    # llama_kvcompose_seq_layer_counts(ctx, seq_id, n_layer, counts_out, capacity, slot_of_cell_out)
    _bind(lib, "llama_kvcompose_seq_layer_counts", [ctx, i32, i32, p_i32, i32, p_i32], i32)
    # llama_kvcompose_seq_set_layer_counts(ctx, seq_id, n_layer, counts, n_cells, slot_of_cell)
    _bind(lib, "llama_kvcompose_seq_set_layer_counts", [ctx, i32, i32, p_i32, i32, p_i32], i32)
    # llama_kvcompose_cell_bytes(ctx, bytes)
    _bind(lib, "llama_kvcompose_cell_bytes", [ctx, ctypes.POINTER(ctypes.c_uint64)], i32)
    # llama_kvcompose_compact_layers(ctx, out[n_layer], n_layer)
    _bind(lib, "llama_kvcompose_compact_layers", [ctx, ctypes.POINTER(ctypes.c_uint8), i32], i32)
    # llama_kvcompose_swa_cache_info(ctx, seq_id, n_cells, n_seq_cells, cell_bytes, n_window)
    _bind(lib, "llama_kvcompose_swa_cache_info", [ctx, i32, p_i32, p_i32, ctypes.POINTER(ctypes.c_uint64), p_i32], i32)


# --- per-layer KV memory (native/kvcompose-layout.*) ----------------------------


def _bind_layout(lib: ctypes.CDLL) -> None:
    i32, p_i32, ctx = ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_void_p
    p_u64 = ctypes.POINTER(ctypes.c_uint64)
    # llama_kvcompose_layout_next(n_layer, caps)
    _bind(lib, "llama_kvcompose_layout_next", [i32, p_i32], i32)
    # llama_kvcompose_layout_get(ctx, n_layer, n_recent, rows_out, bytes_out, buffer_bytes)
    _bind(lib, "llama_kvcompose_layout_get", [ctx, i32, p_i32, p_i32, p_u64, p_u64], i32)
    # llama_kvcompose_layout_restore_plan(ctx, seq_id, n_cells, slot_of_cell)
    _bind(lib, "llama_kvcompose_layout_restore_plan", [ctx, i32, i32, p_i32], i32)


def status_str(status: int) -> str:
    if _lib is None:
        return "unknown (library not loaded)"
    return _lib.llama_kvcompose_status_str(status).decode()


def check(function: str, status: int, detail: str = "") -> None:
    """Raise NativeError unless `status` is OK."""
    if status != OK:
        raise NativeError(function, status, detail)


@contextlib.contextmanager
def llama_log_to(handler: Callable[[int, str], None] | None) -> Iterator[None]:
    """Send llama.cpp's log lines to handler(level, text) inside the block (None drops them),
    then give the callback that was set before back.

    llama.cpp keeps only a raw function pointer, so the ctypes callback must outlive every
    call to it: setting one that a caller later drops crashes the next log line. The
    callback is process-wide: for benchmarks and tests, not for concurrent use."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data: Any) -> None:
        if handler is not None:
            handler(level, text.decode(errors="replace"))

    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    llama_cpp.llama_log_set(forward, user_data)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(previous, user_data)
