"""`kvcompose_gguf.Llama`: stock behaviour without compression, long prompts past n_ctx with it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import llama_cpp
from kvcompose_gguf import cli
from kvcompose_gguf.llama import Llama

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 18  # ~830 byte tokens


def _stock(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


def _compressing(path, **kwargs):
    kwargs.setdefault("kv_compress", "kvcompose")
    return Llama(model_path=str(path), verbose=False, **kwargs)


def _last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


def test_without_kv_compress_it_is_stock_llama_cpp(tiny_model_path):
    ours = Llama(model_path=str(tiny_model_path), n_ctx=256, logits_all=True, verbose=False)
    stock = _stock(tiny_model_path, n_ctx=256, logits_all=True)
    a = ours("Hello there", max_tokens=12, temperature=0, logprobs=3)
    b = stock("Hello there", max_tokens=12, temperature=0, logprobs=3)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["logprobs"] == b["choices"][0]["logprobs"]
    assert ours.kv_stats()["compressions"] == 0


def test_budget_one_compression_changes_no_logits(tiny_model_path):
    tokens = list(range(3, 103))
    # n_ctx 512: both sides decode the 100 tokens as one batch (same arithmetic).
    stock = _stock(tiny_model_path, n_ctx=512, flash_attn=True)
    stock.eval(tokens)
    stock.eval([42])
    ours = _compressing(tiny_model_path, n_ctx=512, flash_attn=True)
    ours.eval(tokens)
    record = ours.compress(kv_budget=1.0)
    assert record.result.cells_after == record.result.cells_before == len(tokens)
    ours.eval([42])
    np.testing.assert_allclose(_last_logits(ours), _last_logits(stock), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flash_attn, cache_type", [(True, "f16"), (False, "f16"), (True, "q8_0")])
def test_prompt_longer_than_n_ctx_is_compressed_instead_of_refused(tiny_model_path, flash_attn, cache_type):
    kwargs = dict(n_ctx=256, n_batch=64, flash_attn=flash_attn)
    kwargs.update(type_k=cli._ggml_type(cache_type), type_v=cli._ggml_type(cache_type))
    with pytest.raises(ValueError, match="exceed context window"):
        _stock(tiny_model_path, **kwargs)(LONG_TEXT, max_tokens=4)

    llm = _compressing(tiny_model_path, **kwargs)
    prompt_tokens = len(llm.tokenize(LONG_TEXT.encode()))
    out = llm(LONG_TEXT, max_tokens=16, temperature=0)
    stats = llm.kv_stats()
    generated = out["usage"]["completion_tokens"]
    assert out["usage"]["prompt_tokens"] == prompt_tokens > 3 * 256
    assert stats["logical_tokens"] in (prompt_tokens + generated, prompt_tokens + generated - 1)
    assert stats["compressions"] >= 3
    assert stats["cells_used"] <= stats["n_ctx"] == 256
    # The freed bytes are whole cells of every layer's K and V rows.
    cell_bytes = cli.kv_bytes_allocated(llm) // llm.n_ctx()
    assert stats["physical_bytes_freed"] % cell_bytes == 0 and stats["physical_bytes_freed"] > 0
    n_layer = llama_cpp.llama_model_n_layer(llm._model.model)
    n_head_kv = llama_cpp.llama_model_n_head_kv(llm._model.model)
    assert len(stats["layer_budgets"]) == n_layer
    # Every evaluated token added one entry per layer and KV head; only compactions
    # dropped entries: what the cache holds now must be the difference.
    held = n_head_kv * int(llm._kv.compactor.cells_owned(0).sum())
    assert held == n_layer * n_head_kv * stats["logical_tokens"] - stats["logical_entries_dropped"]


def test_a_different_prompt_rebuilds_the_cache_like_a_fresh_context(tiny_model_path, caplog):
    llm = _compressing(tiny_model_path, n_ctx=256, n_batch=64)
    llm(LONG_TEXT, max_tokens=4, temperature=0)
    assert llm.kv_stats()["compressions"] > 0
    with caplog.at_level(logging.INFO, logger="kvcompose_gguf"):
        ours = llm("A short and different prompt", max_tokens=16, temperature=0)
    assert "rebuilding the cache" in caplog.text
    fresh = _stock(tiny_model_path, n_ctx=256, n_batch=64)("A short and different prompt", max_tokens=16, temperature=0)
    assert ours["choices"][0]["text"] == fresh["choices"][0]["text"]


def test_a_prompt_extending_the_history_reuses_the_compressed_cache(tiny_model_path, caplog):
    llm = _compressing(tiny_model_path, n_ctx=256, n_batch=64)
    first = llm(LONG_TEXT, max_tokens=8, temperature=0)
    before = llm.kv_stats()
    with caplog.at_level(logging.INFO, logger="kvcompose_gguf"):
        llm(LONG_TEXT + first["choices"][0]["text"] + " And then?", max_tokens=8, temperature=0)
    assert "rebuilding" not in caplog.text
    after = llm.kv_stats()
    assert after["compressions"] >= before["compressions"]
    assert after["logical_tokens"] > before["logical_tokens"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"kv_compress": "no-such-policy"}, ValueError, "unknown policy 'no-such-policy'"),
        ({"kv_budget": 0.0}, ValueError, r"\(0, 1\]"),
        ({"kv_budget": 1.5}, ValueError, r"\(0, 1\]"),
        ({"kv_budget": -3}, ValueError, ">= 1"),
        ({"kv_budget": "half"}, TypeError, "kv_budget"),
        ({"kv_window": 0}, ValueError, "kv_window"),
        ({"kv_compress": "h2o"}, NotImplementedError, "accumulates"),
        ({"logits_all": True}, ValueError, "logits_all"),
    ],
)
def test_bad_settings_raise_before_loading(tiny_model_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        _compressing(tiny_model_path, n_ctx=256, **kwargs)


def test_compress_needs_a_compressing_llama_and_a_filled_cache(tiny_model_path):
    with pytest.raises(RuntimeError, match="without kv_compress"):
        Llama(model_path=str(tiny_model_path), n_ctx=128, verbose=False).compress()
    llm = _compressing(tiny_model_path, n_ctx=128, kv_protect_recent=8)
    with pytest.raises(ValueError, match="empty"):
        llm.compress()
    llm.eval(list(range(3, 40)))
    with pytest.raises(ValueError, match="protected cells need"):
        llm.compress(kv_budget=4)  # fewer cells than the protected recent tokens
    assert llm.kv_stats()["cells_used"] == 37  # the refused compression changed nothing
    llm.compress(kv_budget=0.5)
    stats = llm.kv_stats()
    n_layer = llama_cpp.llama_model_n_layer(llm._model.model)
    assert sum(stats["layer_budgets"]) == int(n_layer * 37 * 0.5)  # half of the entries kept, over all layers
    assert stats["cells_used"] == max(stats["layer_budgets"])  # layers share cells: the widest layer decides


def test_saved_compressed_state_continues_exactly_like_the_original(tiny_model_path):
    from kvcompose_gguf.state import StateFormatError

    llm = _compressing(tiny_model_path, n_ctx=256, n_batch=64)
    llm.eval(llm.tokenize(LONG_TEXT.encode()))
    assert llm.kv_stats()["compressions"] > 0
    saved = llm.save_state()
    llm.eval([42, 43])
    expected = _last_logits(llm)

    other = _compressing(tiny_model_path, n_ctx=256, n_batch=64)
    corrupt = llama_cpp.LlamaState(
        saved.input_ids, saved.scores, saved.n_tokens, saved.llama_state[:-1] + b"x", saved.llama_state_size, saved.seed
    )
    corrupt.kv_compressed_upto = saved.kv_compressed_upto
    with pytest.raises(StateFormatError, match="checksum"):
        other.load_state(corrupt)
    assert other.n_tokens == 0  # the refused state changed nothing
    other.load_state(saved)
    assert other.n_tokens == saved.n_tokens and other.kv_stats()["cells_used"] == llm.kv_stats()["cells_used"] - 2
    other.eval([42, 43])
    np.testing.assert_array_equal(_last_logits(other), expected)


@pytest.mark.parametrize("observe, n_ctx, mode", [("repeat", 512, "repeat"), ("repeat", 256, "window"),
                                                  ("what about the fox?", 256, "prompt")])
def test_observation_modes(tiny_model_path, caplog, observe, n_ctx, mode):
    llm = _compressing(tiny_model_path, n_ctx=n_ctx, kv_observe=observe, kv_protect_recent=8)
    tokens = llm.tokenize(LONG_TEXT.encode())[:150]
    llm.eval(tokens)
    with caplog.at_level(logging.INFO, logger="kvcompose_gguf"):
        record = llm.compress(kv_budget=0.5)
    assert record.observe == mode
    if observe == "repeat" and mode == "window":
        assert "observing a window instead" in caplog.text  # too few free cells to re-feed 150 tokens
    # The probe left no trace: the cache holds the compacted history only, and decoding goes on.
    assert llm.kv_stats()["cells_used"] == record.result.cells_after == max(record.layer_counts)
    llm.eval([42])
    assert llm.kv_stats()["logical_tokens"] == 151
