"""Architectures: the supported attention families work end to end; the others are refused
at construction with the reason, never answered wrongly.

Supported, each a tiny random fixture (tests/tiny_models.py): qwen2 (MHA with Q/K/V biases),
qwen3 (GQA with per-head q/k norms and a head width independent of n_embd), mistral3
(GQA 3:1 under Mistral's architecture name); llama is the default fixture of every other test.
References: the state blob rearranged in numpy (test_compaction.expected_blob), a stock
llama_cpp.Llama's logits, and the cache's own entry count.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest
from test_compaction import expected_blob, random_selection
from tiny_models import TinyConfig, write_tiny_model

from kvcompose_gguf import native, support
from kvcompose_gguf.compactor import Compactor
from kvcompose_gguf.llama import Llama
from llama_helpers import compressing as _compressing, last_logits as _last_logits, stock as _stock, threads

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 18  # ~830 byte tokens

SUPPORTED = {
    "qwen2": TinyConfig(arch="qwen2", n_layer=3, n_head=4, n_head_kv=4),
    "qwen3": TinyConfig(arch="qwen3", n_layer=3, n_head=8, n_head_kv=2, embedding_length=256),
    "mistral3": TinyConfig(arch="mistral3", n_layer=3, n_head=6, n_head_kv=2),
}
UNSUPPORTED = {
    "qwen2vl": (TinyConfig(arch="qwen2vl", n_layer=2, n_head=4, n_head_kv=2), "M-RoPE"),
    "bloom": (TinyConfig(arch="bloom", n_layer=2, n_head=4, n_head_kv=4), "ALiBi"),
    "mamba": (TinyConfig(arch="mamba", n_layer=2, n_head=4, head_dim=32), "recurrent memory"),
}


@pytest.fixture(scope="module")
def arch_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    configs = {**SUPPORTED, **{name: cfg for name, (cfg, _) in UNSUPPORTED.items()}}
    return {name: write_tiny_model(root / f"tiny-{name}.gguf", cfg) for name, cfg in configs.items()}




@pytest.mark.parametrize("arch", SUPPORTED)
def test_llama_cpp_loads_the_fixture_with_its_layout(arch_paths, sessions, arch):
    cfg = SUPPORTED[arch]
    s = sessions(arch_paths[arch])
    assert (s.n_layer, s.n_head, s.n_head_kv) == (cfg.n_layer, cfg.n_head, cfg.n_head_kv)
    assert llama_cpp.llama_model_n_embd(s.model) == cfg.n_embd
    assert llama_cpp.llama_model_rope_type(s.model) in (llama_cpp.LLAMA_ROPE_TYPE_NORM, llama_cpp.LLAMA_ROPE_TYPE_NEOX)
    logits = s.decode(list(range(3, 40)), range(37))
    assert np.isfinite(logits).all() and logits.std() > 0.1
    support.check_model(s.model)  # nothing to refuse
    c = Compactor(s.ctx)
    # one K and one V row of n_head_kv * head_dim f16 values per layer and cell
    assert c.cell_bytes() == cfg.n_layer * 2 * cfg.n_head_kv * cfg.head_dim * 2


@pytest.mark.parametrize("arch", SUPPORTED)
def test_prompt_longer_than_n_ctx_is_compressed(arch_paths, arch):
    llm = _compressing(arch_paths[arch], n_ctx=256, n_batch=64, flash_attn=True)
    out = llm(LONG_TEXT, max_tokens=8, temperature=0)
    stats = llm.kv_stats()
    assert out["usage"]["prompt_tokens"] > 3 * 256
    assert stats["compressions"] >= 3 and stats["cells_used"] <= stats["n_ctx"] == 256
    # every evaluated token added one entry per layer and KV head; only compactions dropped some
    cfg = SUPPORTED[arch]
    held = cfg.n_head_kv * int(llm._kv.compactor.cells_owned(0).sum())
    assert held == cfg.n_layer * cfg.n_head_kv * stats["logical_tokens"] - stats["logical_entries_dropped"]


@pytest.mark.parametrize("arch", SUPPORTED)
def test_budget_one_compression_changes_no_logits(arch_paths, arch):
    tokens = list(range(3, 103))
    stock = _stock(arch_paths[arch], n_ctx=512, flash_attn=True)
    stock.eval(tokens)
    stock.eval([42])
    ours = _compressing(arch_paths[arch], n_ctx=512, flash_attn=True)
    ours.eval(tokens)
    record = ours.compress(kv_budget=1.0)
    assert record.result.cells_after == record.result.cells_before == len(tokens)
    ours.eval([42])
    np.testing.assert_allclose(_last_logits(ours), _last_logits(stock), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flash_attn", [True, False])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_compaction_is_byte_exact_on_the_state_blob(arch_paths, sessions, arch, flash_attn):
    rng = np.random.default_rng(list(SUPPORTED).index(arch))
    s = sessions(arch_paths[arch], n_seq_max=2, flash_attn=flash_attn)
    n = 30
    s.decode(rng.integers(3, 259, 2 * n), np.repeat(np.arange(n), 2), np.tile([0, 1], n))
    c = Compactor(s.ctx)
    before = (s.blob(0), s.blob(1))
    seq = c.seq_cells(0)
    counts = np.full(c.n_layer, 12)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
    result = c.apply(sel)
    expected, _ = expected_blob(before[0], sel, seq.cells, result.slot_cells, c.n_head_kv)
    assert s.blob(0) == expected.to_bytes()
    assert s.blob(1) == before[1]


# --- refused architectures ------------------------------------------------------------


@pytest.mark.parametrize("arch", UNSUPPORTED)
def test_unsupported_architectures_are_refused_at_construction(arch_paths, arch):
    _, reason = UNSUPPORTED[arch]
    with pytest.raises(support.UnsupportedModelError, match=reason) as err:
        _compressing(arch_paths[arch], n_ctx=256)
    assert isinstance(err.value, NotImplementedError) and "kv_compress=None" in str(err.value)
    # without kv_compress it is stock llama.cpp and works
    stock = Llama(model_path=str(arch_paths[arch]), n_ctx=256, verbose=False, **threads({}))
    assert stock("Hello", max_tokens=4, temperature=0)["usage"]["completion_tokens"] > 0


def _seq_cells_status(ctx) -> int:
    n, a, b = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
    return native.load().llama_kvcompose_seq_cells(ctx, 0, 0, None, None, ctypes.byref(n), ctypes.byref(a), ctypes.byref(b))


@pytest.mark.parametrize("arch, status", [("qwen2vl", native.ERR_UNSUPPORTED), ("mamba", native.ERR_UNSUPPORTED),
                                          ("bloom", native.OK)])
def test_what_the_native_side_answers_for_refused_architectures(arch_paths, sessions, arch, status):
    """M-RoPE cells carry extra position data and a recurrent memory is no KV cache: the native
    compaction refuses both. ALiBi is a plain KV cache to it, so only the Python check stands
    between an ALiBi model and wrong attention biases."""
    s = sessions(arch_paths[arch])
    s.decode(list(range(3, 20)), range(17))
    assert _seq_cells_status(s.ctx) == status


def test_a_native_refusal_is_reported_as_unsupported(arch_paths, monkeypatch):
    # qwen2vl is caught by the metadata check first; without it the native probe must catch it
    monkeypatch.setattr(support, "check_model", lambda model: None)
    with pytest.raises(support.UnsupportedModelError, match="native compaction refuses"):
        _compressing(arch_paths["qwen2vl"], n_ctx=256)


def test_a_cache_shared_by_several_sequences_is_refused(tiny_model_path):
    with pytest.raises(support.UnsupportedModelError, match="shared by"):
        _compressing(tiny_model_path, n_ctx=256, embedding=True)
