"""The KV cache in GPU memory (a CUDA or Metal build): it really lives there, and compaction
moves it there in the device form, byte-exactly against the numpy rearrangement of the state
blob. Skipped on a CPU build. The rest of the suite runs on the GPU too with
KVCOMPOSE_TEST_N_GPU_LAYERS=-1 (tests/placement.py)."""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from kvcompose_gguf import native  # noqa: E402

try:
    native.load()
except native.LibraryNotPatchedError as exc:  # pragma: no cover - depends on the installed wheel
    pytest.skip(f"libllama without the kvcompose patch: {exc}", allow_module_level=True)
if not llama_cpp.llama_supports_gpu_offload():
    pytest.skip("libllama was built without a GPU backend (CPU only)", allow_module_level=True)

from test_compaction import F16, Q8_0, assert_known_rows_equal, expected_blob, prompt, random_selection  # noqa: E402

from kvcompose_gguf import state_blob  # noqa: E402
from kvcompose_gguf.compactor import Compactor, recorded_move_forms  # noqa: E402


def kv_buffer_names(lines: list[str]) -> list[str]:
    """The buffers llama.cpp names in its "<buffer> KV buffer size" lines."""
    return [line.split("KV buffer size")[0].split(":")[-1].strip() for line in lines if "KV buffer size" in line]


@pytest.mark.parametrize("flash_attn,type_k,type_v", [(True, F16, F16), (False, F16, F16), (True, Q8_0, Q8_0)])
def test_offloaded_cache_lives_in_device_memory_and_compacts_there_byte_exactly(sessions, tiny_model_path, flash_attn,
                                                                                type_k, type_v):
    lines: list[str] = []
    with native.llama_log_to(lambda level, text: lines.append(text)):
        s = sessions(tiny_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v, n_seq_max=2,
                     n_gpu_layers=-1)
    names = kv_buffer_names(lines)
    assert names and not any(name.startswith("CPU") for name in names), names

    rng = np.random.default_rng(5)
    n = 48
    s.decode(prompt(rng, 2 * n), np.repeat(np.arange(n), 2), np.tile([0, 1], n))
    c = Compactor(s.ctx)
    before = {q: s.blob(q) for q in range(2)}
    seq = c.seq_cells(1)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, rng.integers(8, 30, c.n_layer))

    with recorded_move_forms() as forms:
        result = c.apply(sel, seq_id=1)

    (f,) = forms
    n_row_tensors = c.n_layer * (2 if flash_attn else 1)
    assert (f.in_place, f.through_temporary, f.staged) == (0, n_row_tensors, 0)
    expected, known = expected_blob(before[1], sel, seq.cells, result.slot_cells, c.n_head_kv)
    got = state_blob.parse_seq_state(s.blob(1)).only_stream()
    np.testing.assert_array_equal(got.positions, expected.only_stream().positions)
    assert_known_rows_equal(got, expected.only_stream(), known)
    assert s.blob(0) == before[0]


def test_stock_cpu_placement_keeps_the_cache_in_host_memory(sessions, tiny_model_path):
    """The other side of the check above: n_gpu_layers=0 on the same build names a CPU buffer."""
    lines: list[str] = []
    with native.llama_log_to(lambda level, text: lines.append(text)):
        sessions(tiny_model_path, n_gpu_layers=0)
    assert kv_buffer_names(lines) and all(name.startswith("CPU") for name in kv_buffer_names(lines))
