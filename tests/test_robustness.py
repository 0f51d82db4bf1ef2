"""Robustness: bad settings and calls get a clear exception and leave a usable context; the
native API survives fuzzing; a long compressed chat stays within its cells and memory.

The bad-input cases that other modules already cover are not repeated here: unknown policy,
budget outside (0, 1] and bad keywords (test_llama.test_bad_settings_raise_before_loading),
compress() on an empty cache and a budget below the protected cells (test_llama), a budget
above the cells a sequence holds (test_policies), corrupt saved states (test_llama,
test_compaction), a stock library or another ABI version (test_foundation), out-of-range,
duplicate and foreign cells passed to the native compaction (test_compaction), bad
sequence ids and sizes to the statistics (test_stats). Several sequences: test_compaction
checks that compacting one leaves the others' blobs byte-identical, shared (unified) and
separate streams, cells shared through seq_cp included.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from llama_helpers import compressing as _compressing, last_logits as _last_logits, stock as _stock

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 18  # ~830 byte tokens


# --- settings that can never fit n_ctx: refused at construction ---------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_budget": 1000}, r"kv_budget=1000 cells: at most 223 cells"),  # more cells than n_ctx can hold
        ({"kv_budget": 224}, r"at most 223 cells"),
        ({"kv_window": 129}, r"kv_window=129 .* kv_window <= 128"),
        ({"kv_window": 65, "kv_observe": "lookahead"}, r"kv_window=65 \(130 observing queries with lookahead\) .* kv_window <= 64"),
        ({"kv_budget": 192, "kv_observe": "lookahead"}, r"at most 191 cells"),
    ],
)
def test_settings_that_cannot_fit_n_ctx_are_refused_at_construction(tiny_model_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _compressing(tiny_model_path, n_ctx=256, **kwargs)
    _compressing(tiny_model_path, n_ctx=256, kv_budget=223, kv_window=32)  # the limits themselves work
    _compressing(tiny_model_path, n_ctx=256, kv_budget=191, kv_window=32, kv_observe="lookahead")


# --- bad calls at run time: a clear error, nothing lost --------------------------------


def test_compressing_a_one_or_two_token_cache_keeps_every_token(tiny_model_path):
    for n in (1, 2):
        llm = _compressing(tiny_model_path, n_ctx=128)
        tokens = list(range(5, 5 + n))
        llm.eval(tokens)
        record = llm.compress()
        assert record.result.cells_before == record.result.cells_after == n  # all of it is protected (recent)
        stock = _stock(tiny_model_path, n_ctx=128)
        stock.eval(tokens)  # the same batches on both sides: the same arithmetic
        stock.eval([42])
        llm.eval([42])
        np.testing.assert_allclose(_last_logits(llm), _last_logits(stock), atol=1e-4, rtol=1e-4)


def test_an_int_budget_above_the_cells_held_is_refused_and_changes_nothing(tiny_model_path):
    llm = _compressing(tiny_model_path, n_ctx=256, flash_attn=True)
    tokens = list(range(3, 60))
    llm.eval(tokens)
    before = llm.save_state().llama_state
    with pytest.raises(ValueError, match="occupies only 57 cells"):
        llm.compress(kv_budget=200)
    assert llm.save_state().llama_state == before
    llm.eval([42])  # and it goes on exactly like a twin that never saw the call
    twin = _compressing(tiny_model_path, n_ctx=256, flash_attn=True)
    twin.eval(tokens)
    twin.eval([42])
    np.testing.assert_array_equal(_last_logits(llm), _last_logits(twin))


def test_a_protected_prefix_larger_than_n_ctx_names_it_and_the_context_recovers(tiny_model_path):
    llm = _compressing(tiny_model_path, n_ctx=256, n_batch=64, kv_protect_prefix=300)
    with pytest.raises(ValueError, match=r"protected prefix \(\d+ tokens\) does not fit"):
        llm(LONG_TEXT, max_tokens=2)
    assert llm.kv_stats()["cells_used"] <= 256
    # a prompt that fits afterwards is answered like on a fresh stock context
    ours = llm("A short prompt", max_tokens=8, temperature=0)["choices"][0]["text"]
    stock = _stock(tiny_model_path, n_ctx=256, n_batch=64)
    assert ours == stock("A short prompt", max_tokens=8, temperature=0)["choices"][0]["text"]


# --- fuzzing the native API --------------------------------------------------------------


def test_native_api_fuzz_finds_no_crash_no_change_on_refusal_and_no_reference_mismatch(tiny_model_path):
    pytest.importorskip("hypothesis")
    from kvcompose_gguf.bench import fuzz

    report = fuzz.run(str(tiny_model_path), examples=150)
    assert report["failures"] == []
    calls = report["calls"]
    # the run exercised every function, with accepted and refused calls
    for op in fuzz.OPERATIONS:
        assert any(k.startswith(op + ":ok") for k in calls), (op, calls)
        assert any(k.startswith(op + ":") and not k.endswith(":ok") for k in calls), (op, calls)


# --- soak ----------------------------------------------------------------------------------


def test_a_thirty_turn_compressed_chat_stays_in_its_cells_memory_and_training_context(tmp_path):
    """The CI version of `python -m kvcompose_gguf.bench.soak` (300 turns on the default model).
    A 2-layer tiny fixture trained on 1024 positions, not SmolLM2: SmolLM2's 30 turns take ~15 s
    of CPU with one thread and stay far below its 8192-position training context, while the
    fixture's byte-level tokens (one per character) pass its training context several times in
    30 turns, so the positions are rebased as well as compressed."""
    from tiny_models import TinyConfig, write_tiny_model

    from kvcompose_gguf.bench import soak

    path = write_tiny_model(tmp_path / "tiny-2l-1024.gguf", TinyConfig(n_layer=2, n_ctx_train=1024))
    # ASCII letters and punctuation only: the fixture's vocabulary has no "\u2581" (SentencePiece
    # space) token, so a generated space byte or a multi-byte character would be tokenized
    # differently when the chat is re-read, and the history would be rebuilt (correctly, slowly)
    banned = list(range(128, 256)) + [ord(" "), ord("\n"), ord("\r")]
    report = soak.run(str(path), turns=30, n_ctx=512, max_tokens=24, chat_format="chatml", kv_window=16,
                      kv_protect_recent=16, completion_kwargs={"logit_bias": {str(3 + b): -100.0 for b in banned}})
    assert report["n_ctx"] == 512 and report["max_cells_used"] <= 512
    assert report["passed_training_context"] and report["logical_tokens"] > 3 * 1024 and report["rebases"] >= 2
    assert report["compressions"] >= 5
    assert report["rebuilds"] == 0  # every turn extended the compressed history
    assert report["system_prompt_kept"] == "3/3"  # every layer and KV head holds the whole system prompt
    assert report["empty_replies_last_third"] < 1.0
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # ASan holds freed memory in quarantine
        assert report["rss_growth_mib_after_warmup"] < 16
