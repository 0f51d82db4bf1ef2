"""Compression on a sliding-window model: Gemma-3-270M (18 layers, global attention in 5, 11, 17).

llama.cpp gives it an iSWA memory: a base cache for the global layers and a sliding-window
cache, bounded to the window, for the others. Only the base cache is compacted.

Independent references:
- the state blob (llama_state_seq_get_data writes the base cache, then the sliding-window
  cache), rearranged in numpy for the base cache and compared byte for byte;
- the model's own metadata for which layers and how many bytes a cell holds;
- stock `llama_cpp.Llama`: it refuses a prompt longer than n_ctx, and its logits are what a
  budget-1.0 compression must leave unchanged.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from kvcompose_gguf import native  # noqa: E402

try:
    native.load()
except native.LibraryNotPatchedError as exc:  # pragma: no cover - depends on the installed wheel
    pytestmark = pytest.mark.skip(reason=f"libllama without the kvcompose patch: {exc}")

from kvcompose_gguf import state_blob  # noqa: E402
from kvcompose_gguf.compactor import Compactor  # noqa: E402
from kvcompose_gguf.llama import Llama  # noqa: E402
from test_compaction import CompactionSession, expected_blob, random_selection  # noqa: E402

GLOBAL_LAYERS = [5, 11, 17]  # Gemma-3: every sixth layer attends globally
N_CTX_LLAMA = 768  # the sliding-window cache must hold the 512-token window plus a batch


@pytest.fixture
def session_class():
    return CompactionSession


def _meta_int(model, key: str) -> int:
    buf = ctypes.create_string_buffer(64)
    assert llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) > 0, key
    return int(buf.value)


def _f16_cell_bytes(model, n_layers: int) -> int:
    """K and V bytes of one cell of an f16 cache over n_layers layers, from the GGUF metadata."""
    heads = _meta_int(model, "gemma3.attention.head_count_kv")
    dims = _meta_int(model, "gemma3.attention.key_length") + _meta_int(model, "gemma3.attention.value_length")
    return n_layers * heads * dims * 2


def _parts(blob: bytes) -> tuple[state_blob.SeqState, bytes, bytes]:
    """(parsed iSWA blob, the base cache alone as a plain blob, the sliding-window cache's bytes)."""
    st = state_blob.parse_seq_state(blob, iswa=True)
    base = state_blob.SeqState(st.seq_id, st.streams).to_bytes()
    swa = state_blob.SeqState(st.seq_id, st.swa_streams).to_bytes()
    return st, base, swa


def _stream_cell_bytes(stream: state_blob.StreamState) -> int:
    k = sum(layer.rows.shape[1] for layer in stream.k)
    if stream.v_trans:
        return k + sum(layer.data.shape[0] * layer.data.shape[2] for layer in stream.v)
    return k + sum(layer.rows.shape[1] for layer in stream.v)


@pytest.mark.model
@pytest.mark.gemma
@pytest.mark.parametrize("flash_attn", [True, False])
def test_compaction_moves_the_global_layers_byte_exactly_and_leaves_the_window_cache_alone(
    sessions, gemma3_path, flash_attn
):
    rng = np.random.default_rng(31)
    toks = rng.integers(100, 5000, 80)
    s = sessions(gemma3_path, flash_attn=flash_attn)
    s.decode(toks[:79], range(79))
    c = Compactor(s.ctx)
    assert np.flatnonzero(c.layers).tolist() == GLOBAL_LAYERS
    before, base_before, swa_before = _parts(s.blob())
    assert len(before.only_stream().k) == len(GLOBAL_LAYERS) and len(before.swa_streams[0].k) == 15
    assert c.cell_bytes() == _stream_cell_bytes(before.only_stream()) == _f16_cell_bytes(s.model, 3)
    swa = c.swa_cache(0)
    assert swa.layers.tolist() == [i for i in range(18) if i not in GLOBAL_LAYERS]
    assert (swa.window, swa.n_cells, swa.n_seq_cells) == (512, 256, 79)
    assert swa.cell_bytes == _stream_cell_bytes(before.swa_streams[0]) == _f16_cell_bytes(s.model, 15)

    seq = c.seq_cells(0)
    counts = np.array([40, 25, 33])
    sel = random_selection(rng, seq.cells, seq.positions, len(GLOBAL_LAYERS), c.n_head_kv, counts)
    result = c.apply(sel)  # a selection over the compacted layers only

    expected, known = expected_blob(base_before, sel, seq.cells, result.slot_cells, c.n_head_kv)
    after, _, swa_after = _parts(s.blob())
    got, want = after.only_stream(), expected.only_stream()
    np.testing.assert_array_equal(got.positions, want.positions)
    for i in range(len(GLOBAL_LAYERS)):
        np.testing.assert_array_equal(got.k[i].rows[known[i]], want.k[i].rows[known[i]])
        if got.v_trans:
            np.testing.assert_array_equal(got.v[i].data[:, known[i]], want.v[i].data[:, known[i]])
        else:
            np.testing.assert_array_equal(got.v[i].rows[known[i]], want.v[i].rows[known[i]])
    assert swa_after == swa_before
    assert result.physical_bytes_freed == (79 - 40) * c.cell_bytes()
    assert result.logical_entries_dropped == c.n_head_kv * (3 * 79 - counts.sum())
    layer_counts = np.zeros(18, dtype=np.int32)
    layer_counts[GLOBAL_LAYERS] = counts
    np.testing.assert_array_equal(c.layer_counts(0)[0], layer_counts)
    np.testing.assert_array_equal(c.cells_owned(0), layer_counts)

    # the newest position is unchanged in both caches, and the next token goes right after it
    assert llama_cpp.llama_memory_seq_pos_max(s.mem, 0) == 78
    s.decode(toks[79:], [79])
    nxt, _, _ = _parts(s.blob())
    assert nxt.only_stream().positions.max() == nxt.swa_streams[0].positions.max() == 79
    np.testing.assert_array_equal(np.sort(nxt.swa_streams[0].positions), np.arange(80))


def _perturb_unowned_base_rows(blob: bytes, counts, rng) -> bytes:
    """Random finite f16 values in every base-cache row slot a global layer does not own."""
    st = state_blob.parse_seq_state(blob, iswa=True)
    stream = st.only_stream()
    for i, n_l in enumerate(counts):
        for rows in (stream.k[i].rows[n_l:], stream.v[i].rows[n_l:]):
            rows[:] = rng.standard_normal(rows.size // 2).astype(np.float16).view(np.uint8).reshape(rows.shape)
    return st.to_bytes()


@pytest.mark.model
@pytest.mark.gemma
def test_global_layers_do_not_see_slots_they_do_not_own(sessions, gemma3_path):
    """The per-layer mask bias reaches the iSWA attention path: noise in the rows a global layer
    does not own leaves the logits bit-identical; without the budgets restored it does not."""
    toks = np.random.default_rng(32).integers(100, 5000, 60)
    counts = np.array([30, 12, 21])
    pair = []
    for _ in range(3):
        s = sessions(gemma3_path, flash_attn=True)
        s.decode(toks[:57], range(57))
        c = Compactor(s.ctx)
        seq = c.seq_cells(0)
        c.apply(random_selection(np.random.default_rng(33), seq.cells, seq.positions, 3, c.n_head_kv, counts))
        pair.append((s, c))
    (a, ca), (b, cb), (n, cn) = pair
    layer_counts, slot_of_cell = ca.layer_counts(0)
    rng = np.random.default_rng(34)
    noisy = _perturb_unowned_base_rows(a.blob(), counts, rng)
    a.set_blob(noisy)
    ca.set_layer_counts(0, layer_counts, slot_of_cell)
    b.set_blob(b.blob())
    cb.set_layer_counts(0, layer_counts, slot_of_cell)
    n.set_blob(noisy)  # budgets not restored: every global layer sees the noise
    for tt, pp in [([57], [57]), ([58, 59], [58, 59])]:
        want = b.decode(toks[tt], pp)
        np.testing.assert_array_equal(a.decode(toks[tt], pp), want)
        assert not np.array_equal(n.decode(toks[tt], pp), want)


@pytest.mark.model
@pytest.mark.gemma
def test_bad_layer_counts_are_refused_and_change_nothing(sessions, gemma3_path):
    s = sessions(gemma3_path, flash_attn=True)
    s.decode(np.random.default_rng(35).integers(100, 5000, 40), range(40))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    before = s.blob()
    full = random_selection(np.random.default_rng(36), seq.cells, seq.positions, 18, c.n_head_kv, [20] * 18)
    with pytest.raises(ValueError, match="sliding-window cache"):
        c.apply(full)  # rows for the sliding-window layers
    lib = native.load()
    i32 = ctypes.POINTER(ctypes.c_int32)
    counts = np.array(full.counts, dtype=np.int32)
    cells = np.ascontiguousarray(full.cells, dtype=np.int32)
    slots = np.ascontiguousarray(full.slot_positions, dtype=np.int32)
    args = (s.ctx, 0, 18, c.n_head_kv, 20, counts.ctypes.data_as(i32), cells.ctypes.data_as(i32),
            slots.ctypes.data_as(i32), None, None)
    assert lib.llama_kvcompose_compact_seq(*args) == native.ERR_RANGE
    bad = np.zeros(18, dtype=np.int32)
    bad[GLOBAL_LAYERS] = 5
    bad[0] = 5
    slot_of_cell = np.where(np.arange(40) < 5, np.arange(40), -1).astype(np.int32)
    status = lib.llama_kvcompose_seq_set_layer_counts(s.ctx, 0, 18, bad.ctypes.data_as(i32), 40, slot_of_cell.ctypes.data_as(i32))
    assert status == native.ERR_RANGE
    assert s.blob() == before
    assert (c.layer_counts(0)[0][GLOBAL_LAYERS] == -1).all()


def _long_prompt() -> str:
    colours = ["red", "blue", "green"]
    return " ".join(f"Item {i}: the colour of box {i} is {colours[i % 3]}." for i in range(55))  # ~820 tokens


@pytest.mark.model
@pytest.mark.gemma
def test_prompt_longer_than_n_ctx_completes_and_stats_say_what_was_compressed(gemma3_path):
    kwargs = dict(n_ctx=N_CTX_LLAMA, n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False)
    text = _long_prompt() + " Question: what colour is box 7? Answer:"
    stock = llama_cpp.Llama(model_path=str(gemma3_path), **kwargs)
    n_prompt = len(stock.tokenize(text.encode()))
    assert n_prompt > N_CTX_LLAMA
    with pytest.raises(ValueError, match="exceed context window"):
        stock(text, max_tokens=4)
    stock.close()

    llm = Llama(model_path=str(gemma3_path), kv_compress="kvcompose", kv_budget=0.5, **kwargs)
    try:
        out = llm(text, max_tokens=6, temperature=0)
        assert out["usage"]["prompt_tokens"] == n_prompt
        assert out["usage"]["completion_tokens"] >= 1
        stats = llm.kv_stats()
        assert stats["compressions"] >= 1
        assert stats["compressed_layers"] == GLOBAL_LAYERS
        assert len(stats["layer_budgets"]) == len(GLOBAL_LAYERS)
        assert stats["cells_used"] <= stats["n_ctx"] == N_CTX_LLAMA
        cell_bytes = _f16_cell_bytes(llm._model.model, len(GLOBAL_LAYERS))
        assert stats["kv_bytes_free"] == (N_CTX_LLAMA - stats["cells_used"]) * cell_bytes
        assert stats["physical_bytes_freed"] > 0 and stats["physical_bytes_freed"] % cell_bytes == 0
        swa = stats["swa_cache"]
        assert swa["layers"] == [i for i in range(18) if i not in GLOBAL_LAYERS]
        assert (swa["window"], swa["cells"]) == (512, N_CTX_LLAMA)  # llama.cpp's default swa_full
        assert swa["bytes"] == N_CTX_LLAMA * _f16_cell_bytes(llm._model.model, 15)
        text_stats = llm.format_kv_stats()
        assert "not compressed: the sliding-window cache (15 layers, window 512" in text_stats
        assert text_stats.count("sliding window: not compressed") == 15
        # every token added one entry per global layer; only compactions dropped entries
        held = int(llm._kv.compactor.cells_owned(0).sum())
        assert held == len(GLOBAL_LAYERS) * stats["logical_tokens"] - stats["logical_entries_dropped"]

        # a saved state carries both caches and the global layers' budgets (0 for the others)
        fresh = Llama(model_path=str(gemma3_path), kv_compress="kvcompose", kv_budget=0.5, **kwargs)
        try:
            fresh.load_state(llm.save_state())
            assert _raw_blob(fresh) == _raw_blob(llm)
            counts = llm._kv.compactor.layer_counts(0)
            np.testing.assert_array_equal(fresh._kv.compactor.layer_counts(0)[0], counts[0])
            np.testing.assert_array_equal(fresh._kv.compactor.layer_counts(0)[1], counts[1])
            # the shared pool is filled: every global layer keeps the widest layer's slots, so no
            # per-layer budget is recorded (-1; 0 for the sliding-window layers), restored alike
            assert stats["layer_budgets"] == [max(stats["layer_allocation"])] * len(GLOBAL_LAYERS)
            assert (counts[0][GLOBAL_LAYERS] == -1).all() and not counts[0][~llm._kv.compactor.layers].any()
        finally:
            fresh.close()
    finally:
        llm.close()


def _raw_blob(llm) -> bytes:
    size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buf, size, 0) == size
    return bytes(buf)


@pytest.mark.model
@pytest.mark.gemma
def test_budget_one_compression_changes_no_logits_and_no_window_cell(gemma3_path):
    kwargs = dict(n_ctx=N_CTX_LLAMA, n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False)
    # 150 tokens: both sides decode them as one batch (Llama's chunks are (n_ctx - 32) // 4 = 184
    # here); another split changes Gemma's logits by whole units, compression or not
    tokens = [int(t) for t in np.random.default_rng(37).integers(100, 5000, 150)]
    stock = llama_cpp.Llama(model_path=str(gemma3_path), **kwargs)
    stock.eval(tokens)
    stock.eval([42])
    want = np.ctypeslib.as_array(stock._ctx.get_logits_ith(-1), shape=(stock.n_vocab(),)).copy()
    stock.close()

    llm = Llama(model_path=str(gemma3_path), kv_compress="kvcompose", **kwargs)
    try:
        llm.eval(tokens)
        _, base_before, swa_before = _parts(_raw_blob(llm))
        record = llm.compress(kv_budget=1.0)
        assert record.result.cells_after == record.result.cells_before == len(tokens)
        _, base_after, swa_after = _parts(_raw_blob(llm))
        assert base_after == base_before and swa_after == swa_before
        llm.eval([42])
        got = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()
        np.testing.assert_array_equal(got, want)
    finally:
        llm.close()


@pytest.mark.model
@pytest.mark.gemma
def test_n_ctx_below_the_window_is_refused_with_the_fix(gemma3_path):
    with pytest.raises(ValueError, match="raise n_ctx to at least 544"):
        Llama(model_path=str(gemma3_path), kv_compress="kvcompose", n_ctx=512, n_threads=1, verbose=False)


@pytest.mark.model
@pytest.mark.gemma
def test_kv_bytes_of_both_caches_agree_with_llama_cpp_buffer_report(gemma3_path, capfd):
    """Reference: the K/V buffer sizes llama.cpp logs for its two caches (global layers and
    sliding-window layers), each holding n_ctx cells."""
    import re

    from kvcompose_gguf import cli
    from kvcompose_gguf.eval.methods import compressed_kv_usage

    llm = Llama(model_path=str(gemma3_path), kv_compress="kvcompose", n_ctx=N_CTX_LLAMA, n_threads=1,
                n_threads_batch=1, flash_attn=True, verbose=True)
    reported = [float(x) * 2**20 for x in re.findall(r"KV buffer size\s*=\s*([0-9.]+) MiB", capfd.readouterr().err)]
    assert len(reported) == 2, "llama.cpp logs one KV buffer per cache"
    assert cli.kv_bytes_allocated(llm) == pytest.approx(sum(reported), abs=0.01 * 2**20)

    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 10)
    llm.eval(tokens)  # no compression yet: both caches hold one cell per token
    per_token = sum(reported) / N_CTX_LLAMA
    assert compressed_kv_usage(llm).physical_bytes == pytest.approx(len(tokens) * per_token, rel=1e-3)
    llm.close()


@pytest.mark.model
@pytest.mark.gemma
def test_per_layer_memory_sizes_the_global_layers_and_leaves_the_window_cache_alone(gemma3_path, tmp_path, monkeypatch):
    from kvcompose_gguf import layout, profiles

    monkeypatch.setenv("KVCOMPOSE_CACHE_DIR", str(tmp_path))  # a profile shaped like Gemma's at kv_budget 0.5
    shape = np.zeros(18)
    shape[GLOBAL_LAYERS] = (0.73, 0.73, 0.05)
    profiles.save(gemma3_path, {0.5: profiles.LayerProfile(0.5, tuple(shape), (0.0,) * 18, 1, 64, "python-docs", 0)})
    kwargs = dict(n_ctx=2048, n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False)
    llm = Llama(model_path=str(gemma3_path), kv_compress="kvcompose", kv_memory=0.8, **kwargs)
    try:
        lay = llm._kv.compactor.layout
        plan = layout.plan_layout(0.8, 2048, shape, (shape > 0).astype(int))
        assert lay.n_recent == plan.n_recent
        np.testing.assert_array_equal(lay.rows[GLOBAL_LAYERS], plan.n_recent + plan.caps[GLOBAL_LAYERS])
        assert not lay.rows[[i for i in range(18) if i not in GLOBAL_LAYERS]].any()  # in the window cache
        per_layer_cell = _f16_cell_bytes(llm._model.model, 1)
        np.testing.assert_array_equal(lay.layer_bytes[GLOBAL_LAYERS], lay.rows[GLOBAL_LAYERS] * per_layer_cell)

        text = _long_prompt() * 3 + " Question: what colour is box 7? Answer:"
        out = llm(text, max_tokens=4, temperature=0)
        assert out["usage"]["prompt_tokens"] > 2048 and out["usage"]["completion_tokens"] >= 1
        stats = llm.kv_stats()
        assert stats["compressions"] >= 1 and stats["swa_cache"]["cells"] == 2048
        owned = llm._kv.compactor.cells_owned(0)[GLOBAL_LAYERS]
        assert (owned <= lay.rows[GLOBAL_LAYERS]).all()
    finally:
        llm.close()
