"""Physical per-layer KV memory (kvcompose_gguf.layout, native/kvcompose-layout.cpp).

Independent references:
- the shared-pool cache with per-layer masks, holding the same selection in the same cells
  (the layout must give bit-identical logits: same keys, same order, fewer rows);
- the K/V row sizes computed from the GGUF header, and llama.cpp's own buffer sizes;
- the state blob from llama_state_seq_get_data;
- numpy recomputation of the capacity plan.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from kvcompose_gguf import native  # noqa: E402

try:
    native.load()
except native.LibraryNotPatchedError as exc:  # pragma: no cover - depends on the installed wheel
    pytestmark = pytest.mark.skip(reason=f"libllama without the kvcompose patch: {exc}")

from c_api import Session  # noqa: E402
from llama_helpers import compressing, last_logits  # noqa: E402
from placement import assert_close  # noqa: E402
from test_compaction import prompt, random_selection  # noqa: E402

from kvcompose_gguf import layout, profiles, state, state_blob  # noqa: E402
from kvcompose_gguf.compactor import Compactor  # noqa: E402
from kvcompose_gguf.stats import AttentionObserver  # noqa: E402

F16, Q8_0 = 1, 8
N_CTX = 1024
CAPS = [256, 256, 256, 512]  # 512 cells for new tokens; layers 0-2 hold 768 rows, layer 3 all 1024
COUNTS = np.array([200, 60, 130, 300])  # layer 3 owns slots its neighbours hold no row for


def layout_session(model_path, caps=CAPS, **kwargs) -> Session:
    with layout.registered(caps):
        return Session(model_path, n_ctx=N_CTX, **kwargs)


# --- planning the capacities --------------------------------------------------------


def test_plan_meets_the_memory_with_the_smallest_compressed_region():
    shape = np.array([1.0, 0.1, 0.4, 0.25, 0.9, 0.05])
    row_bytes = np.array([100, 100, 100, 100, 100, 0])  # the last layer lives in another cache
    full = row_bytes.sum() * 4096

    def memory(compressed):
        caps = np.clip(np.ceil(compressed * shape / shape.max() / 256) * 256, 256, compressed)
        return (row_bytes * (4096 - compressed + caps)).sum() / full, caps

    filled = 0
    for target in (0.6, 0.63, 0.66, 0.7, 0.8):
        plan = layout.plan_layout(target, 4096, shape, row_bytes)
        compressed = 4096 - plan.n_recent
        used = (row_bytes * (plan.n_recent + plan.caps)).sum() / full
        assert plan.caps.max() == compressed and (plan.caps % 256 == 0).all()
        assert used == pytest.approx(plan.memory_fraction) and used <= target
        assert memory(compressed)[0] <= target < memory(compressed - 256)[0]  # the smallest region that fits
        # what rounding left is spent: caps only grow, and no held layer can grow by 256 rows more
        assert (plan.caps >= memory(compressed)[1]).all()
        grows = (plan.caps + 256 <= compressed) & (row_bytes > 0)
        assert not (grows & (used + row_bytes * 256 / full <= target)).any()
        filled += used > memory(compressed)[0]
    assert filled >= 2


def test_plan_refuses_a_memory_the_shape_cannot_reach():
    with pytest.raises(ValueError, match="raise kv_memory or lower n_ctx"):
        layout.plan_layout(0.3, 2048, [1.0, 0.9, 1.0])
    with pytest.raises(ValueError, match="multiple of 256"):
        layout.plan_layout(0.5, 1000, [1.0, 0.2])


# --- allocation ---------------------------------------------------------------------


def test_layers_allocate_their_rows_and_the_buffers_agree_with_the_formula(tiny_model_path):
    stock = Session(tiny_model_path, n_ctx=N_CTX)
    full = layout.Layout.read(stock.ctx)
    s = layout_session(tiny_model_path)
    got = layout.Layout.read(s.ctx)
    row_bytes = layout.model_row_bytes(tiny_model_path)  # from the GGUF header, f16 K and V

    assert full.n_recent == 0 and (full.rows == N_CTX).all()
    assert got.n_recent == N_CTX - max(CAPS)
    np.testing.assert_array_equal(got.rows, got.n_recent + np.array(CAPS))
    np.testing.assert_array_equal(got.layer_bytes, got.rows * row_bytes)
    np.testing.assert_array_equal(full.layer_bytes, N_CTX * row_bytes)
    # llama.cpp's buffers: the tensors plus at most the backend's alignment per tensor
    for lay in (full, got):
        assert lay.allocated_bytes <= lay.buffer_bytes <= lay.allocated_bytes + 2 * len(CAPS) * 512
    assert got.buffer_bytes < full.buffer_bytes
    assert got.full_cache_bytes() == full.allocated_bytes


def test_a_layout_that_cannot_apply_leaves_the_cache_stock_and_bad_caps_are_refused(tiny_model_path):
    with pytest.raises(native.NativeError, match="multiples of 256"):
        layout.register([256, 300, 256, 256])
    for caps, kwargs in [([256] * 3, {}), ([1024] * 4, {}), (CAPS, {"n_seq_max": 2, "kv_unified": False})]:
        s = layout_session(tiny_model_path, caps, **kwargs)
        assert layout.Layout.read(s.ctx).n_recent == 0
    # used once: the next context is stock again
    layout.register(CAPS)
    Session(tiny_model_path, n_ctx=N_CTX)
    assert layout.Layout.read(Session(tiny_model_path, n_ctx=N_CTX).ctx).n_recent == 0
    layout.clear()


# --- exactness against the shared pool ----------------------------------------------


def _compacted_pair(model_path, flash_attn, type_kv, toks):
    """The same selection compacted in a shared pool and in the per-layer layout, into the same
    cells: in the pool a second sequence holds cells [0, 512) while the slots are placed."""
    pair = []
    for per_layer in (False, True):
        kwargs = dict(n_seq_max=2, flash_attn=flash_attn, type_k=type_kv, type_v=type_kv)
        s = layout_session(model_path, **kwargs) if per_layer else Session(model_path, n_ctx=N_CTX, **kwargs)
        s.decode(toks[:350], range(350))
        if not per_layer:
            llama_cpp.llama_memory_seq_cp(s.mem, 0, 1, -1, -1)
            s.decode(toks[:162], range(350, 512), [1] * 162)
        c = Compactor(s.ctx)
        seq = c.seq_cells(0)
        sel = random_selection(np.random.default_rng(3), seq.cells, seq.positions, c.n_layer, c.n_head_kv, COUNTS)
        result = c.apply(sel)
        if not per_layer:
            assert llama_cpp.llama_memory_seq_rm(s.mem, 1, -1, -1)
        np.testing.assert_array_equal(result.slot_cells, 512 + np.arange(COUNTS.max()))
        pair.append((s, c))
    return pair


@pytest.mark.parametrize("flash_attn,type_kv", [(True, F16), (False, F16), (True, Q8_0)])
def test_per_layer_layout_equals_the_shared_pool_with_per_layer_masks(tiny_model_path, flash_attn, type_kv):
    toks = prompt(np.random.default_rng(0), 400)
    (pool, _), (lay, c) = _compacted_pair(tiny_model_path, flash_attn, type_kv, toks)
    # one token, a batch, one more; then a position shift (K-shift re-rotates every layer's rows)
    for t, p in [([350], [350]), (range(351, 360), range(351, 360)), ([360], [360])]:
        assert_close(lay.decode(toks[list(t)], p), pool.decode(toks[list(t)], p), device_atol=2e-2)
    # the freed cells took the new tokens: all of them lie below the slots
    seq = c.seq_cells(0)
    np.testing.assert_array_equal(seq.cells, np.r_[np.arange(11), 512 + np.arange(COUNTS.max())])
    for s in (pool, lay):
        llama_cpp.llama_memory_seq_add(s.mem, 0, 0, -1, -100)
    assert_close(lay.decode(toks[361:362], [261]), pool.decode(toks[361:362], [261]), device_atol=2e-2)
    # seq_rm of the newest tokens, then new ones in their place
    for s in (pool, lay):
        assert llama_cpp.llama_memory_seq_rm(s.mem, 0, 255, -1)
    assert_close(lay.decode(toks[370:374], range(255, 259)), pool.decode(toks[370:374], range(255, 259)),
                 device_atol=2e-2)
    # after clear nothing of the slots remains: a fresh prompt gives a stock context's logits
    llama_cpp.llama_memory_clear(lay.mem, True)
    assert (c.layer_counts(0)[0] == -1).all()
    stock = Session(tiny_model_path, n_ctx=N_CTX, flash_attn=flash_attn, type_k=type_kv, type_v=type_kv)
    np.testing.assert_array_equal(lay.decode(toks[:300], range(300)), stock.decode(toks[:300], range(300)))


@pytest.mark.parametrize("flash_attn", [True, False])
def test_attention_statistics_equal_the_shared_pool_and_skip_rows_a_layer_lacks(tiny_model_path, flash_attn):
    toks = prompt(np.random.default_rng(9), 400)
    (pool, _), (lay, c) = _compacted_pair(tiny_model_path, flash_attn, F16, toks)
    scores = []
    for s in (pool, lay):
        with AttentionObserver(s.ctx) as observer:
            s.decode(toks[350:366], range(350, 366))
            scores.append(observer.scores())
    assert_close(scores[1], scores[0], device_atol=2e-3)
    rows = c.layout.rows
    for layer in range(len(rows)):
        assert not scores[1][layer, :, rows[layer]:].any()
        assert scores[1][layer, :, 512 : 512 + COUNTS[layer]].all()  # the slots it owns are seen


def test_compaction_refuses_slots_beyond_a_layer_capacity_and_changes_nothing(tiny_model_path):
    toks = prompt(np.random.default_rng(1), 400)
    s = layout_session(tiny_model_path, flash_attn=True)
    s.decode(toks[:350], range(350))
    c = Compactor(s.ctx)
    before = s.blob()
    seq = c.seq_cells(0)
    too_many = np.array([200, 300, 130, 300])  # layer 1 holds 256 slots
    sel = random_selection(np.random.default_rng(3), seq.cells, seq.positions, c.n_layer, c.n_head_kv, too_many)
    with pytest.raises(native.NativeError) as err:
        c.apply(sel)
    assert err.value.status == native.ERR_RANGE
    assert s.blob() == before


def test_a_second_sequence_cannot_take_slot_cells_another_one_holds(tiny_model_path):
    toks = prompt(np.random.default_rng(4), 300)
    s = layout_session(tiny_model_path, n_seq_max=2, flash_attn=True)
    s.decode(toks[:200], range(200))
    s.decode(toks[:100], range(100), [1] * 100)
    c = Compactor(s.ctx)
    counts = np.array([50, 20, 30, 60])
    for seq_id in (0, 1):
        seq = c.seq_cells(seq_id)
        sel = random_selection(np.random.default_rng(3), seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
        if seq_id == 0:
            c.apply(sel, seq_id=0)
            continue
        before = s.blob(0), s.blob(1)
        with pytest.raises(native.NativeError) as err:
            c.apply(sel, seq_id=1)
        assert err.value.status == native.ERR_RANGE and (s.blob(0), s.blob(1)) == before


# --- state ----------------------------------------------------------------------------


def _compacted_layout_session(model_path, toks, flash_attn: bool) -> tuple[Session, Compactor]:
    """A layout session holding toks[:350], compacted to COUNTS slots per layer."""
    s = layout_session(model_path, flash_attn=flash_attn)
    s.decode(toks[:350], range(350))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    c.apply(random_selection(np.random.default_rng(3), seq.cells, seq.positions, c.n_layer, c.n_head_kv, COUNTS))
    return s, c


@pytest.mark.parametrize("flash_attn", [True, False])
def test_saved_sequence_restores_into_its_slot_cells_of_a_fresh_layout(tiny_model_path, flash_attn):
    toks = prompt(np.random.default_rng(2), 400)
    a, ca = _compacted_layout_session(tiny_model_path, toks, flash_attn)
    a.decode(toks[350:360], range(350, 360))
    saved = state.save_seq(ca, 0)

    # the blob keeps the stock format: a layer's rows past its capacity are written as zeros
    blob = state_blob.parse_seq_state(a.blob()).only_stream()
    cells = ca.seq_cells(0).cells
    for layer, rows in enumerate(ca.layout.rows):
        beyond = cells >= rows
        assert beyond.any() == (layer < 3)
        assert not blob.k[layer].rows[beyond].any()

    b = layout_session(tiny_model_path, flash_attn=flash_attn)
    cb = Compactor(b.ctx)
    b.decode(toks[:40], range(40))  # something in the way
    llama_cpp.llama_memory_seq_rm(b.mem, 0, -1, -1)
    state.load_seq(cb, saved, 0)
    np.testing.assert_array_equal(cb.seq_cells(0).cells, cells)
    np.testing.assert_array_equal(cb.layer_counts(0)[0], COUNTS)
    for t in (360, 361):
        assert_close(b.decode(toks[t : t + 1], [t]), a.decode(toks[t : t + 1], [t]), device_atol=2e-2)


def test_a_state_the_layout_cannot_hold_is_refused_before_loading(tiny_model_path):
    toks = prompt(np.random.default_rng(5), 400)
    pool = Session(tiny_model_path, n_ctx=N_CTX, flash_attn=True)
    pool.decode(toks[:350], range(350))
    cp = Compactor(pool.ctx)
    seq = cp.seq_cells(0)
    counts = np.array([200, 300, 130, 300])  # layer 1 owns more than the layout holds there
    cp.apply(random_selection(np.random.default_rng(3), seq.cells, seq.positions, cp.n_layer, cp.n_head_kv, counts))
    saved = state.save_seq(cp, 0)

    s = layout_session(tiny_model_path, flash_attn=True)
    s.decode(toks[:20], range(20))
    before = s.blob()
    with pytest.raises(ValueError, match="layer 1 owns 300 composite slots"):
        state.load_seq(Compactor(s.ctx), saved, 0)
    assert s.blob() == before
    # the whole-context state would put cells where layers hold no rows: refused by llama.cpp
    size = llama_cpp.llama_state_get_size(s.ctx)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_get_data(s.ctx, buf, size) == size
    assert llama_cpp.llama_state_set_data(s.ctx, buf, size) == 0


def test_a_restore_refused_before_its_cells_leaves_no_plan_for_the_next_one(tiny_model_path, monkeypatch):
    toks = prompt(np.random.default_rng(6), 400)
    a, ca = _compacted_layout_session(tiny_model_path, toks, flash_attn=True)  # a keeps the context alive
    saved = state.save_seq(ca, 0)
    plain = Session(tiny_model_path, n_ctx=N_CTX, flash_attn=True)
    plain.decode(toks[:30], range(30))
    plain_blob = plain.blob()

    b = layout_session(tiny_model_path, flash_attn=True)
    cb = Compactor(b.ctx)
    # llama.cpp refusing the blob before it reads any cell (e.g. another stream count)
    with monkeypatch.context() as m:
        m.setattr(llama_cpp, "llama_state_seq_set_data", lambda ctx, src, size, seq_id: 0)
        with pytest.raises(RuntimeError, match="refused the blob"):
            state.load_seq(cb, saved, 0)
    # the plan for the refused state is gone: a plain sequence restores below n_recent
    b.set_blob(plain_blob)
    np.testing.assert_array_equal(cb.seq_cells(0).cells, np.arange(30))
    np.testing.assert_array_equal(b.decode(toks[30:31], [30]), plain.decode(toks[30:31], [30]))


# --- the Llama integration ------------------------------------------------------------


@pytest.fixture
def tiny_profile(tiny_model_path, tmp_path, monkeypatch):
    """A layer profile for the tiny model (what `kvcompose calibrate` would cache)."""
    monkeypatch.setenv("KVCOMPOSE_CACHE_DIR", str(tmp_path))
    shape = (1.0, 0.2, 0.45, 0.3)
    profiles.save(tiny_model_path, {0.5: profiles.LayerProfile(0.5, shape, (0.0,) * 4, 1, 64, "python-docs", 0)})
    return shape


def test_llama_with_kv_memory_holds_a_long_prompt_in_less_memory(tiny_model_path, tiny_profile):
    llm = compressing(tiny_model_path, n_ctx=N_CTX, kv_memory=0.7, kv_window=16, n_batch=256, flash_attn=True)
    mem = llm.kv_stats()["kv_memory"]
    assert mem["per_layer"] and mem["allocated_bytes"] <= 0.7 * mem["full_cache_bytes"] + 4096
    lay = llm._kv.compactor.layout
    np.testing.assert_array_equal(lay.caps, layout.plan_layout(0.7, N_CTX, tiny_profile).caps)

    toks = [int(t) for t in prompt(np.random.default_rng(7), 3000)]
    llm.eval(toks)
    stats = llm.kv_stats()
    assert stats["compressions"] >= 3 and stats["logical_tokens"] == 3000
    owned = llm._kv.compactor.cells_owned(0)
    assert (owned <= lay.n_recent + lay.caps).all()  # every layer within its own rows
    # the memory is allocated either way: each compression fills every layer's capacity
    np.testing.assert_array_equal(llm._kv.records[-1].layer_counts, lay.caps)
    assert stats["kv_memory"]["logical_full_bytes"] > 4 * stats["kv_memory"]["allocated_bytes"]
    assert "per-layer" in llm.format_kv_stats()

    # a fresh context of the same layout continues exactly like this one
    saved = llm.save_state()
    llm.eval([42, 43])
    other = compressing(tiny_model_path, n_ctx=N_CTX, kv_memory=0.7, kv_window=16, n_batch=256, flash_attn=True)
    other.load_state(saved)
    other.eval([42, 43])
    np.testing.assert_array_equal(last_logits(other), last_logits(llm))


def test_llama_kv_memory_without_a_profile_is_a_smaller_shared_pool(tiny_model_path, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVCOMPOSE_CACHE_DIR", str(tmp_path))  # no profile there
    with caplog.at_level(logging.WARNING, logger="kvcompose_gguf"):
        llm = compressing(tiny_model_path, n_ctx=2048, kv_memory=0.5, kv_window=16)
    assert "kvcompose calibrate" in caplog.text
    assert llm.n_ctx() == 1024 and not llm.kv_stats()["kv_memory"]["per_layer"]


def test_llama_kv_memory_bad_values_are_refused(tiny_model_path, tiny_profile):
    # 0.6 is below what this profile reaches at n_ctx 1024 (0.6875, with 256 cells for new tokens)
    for bad, error in [(1.5, ValueError), (0.6, ValueError), ("half", TypeError), (True, TypeError)]:
        with pytest.raises(error):
            compressing(tiny_model_path, n_ctx=N_CTX, kv_memory=bad)
    with pytest.raises(ValueError, match="give kv_compress too"):
        compressing(tiny_model_path, n_ctx=N_CTX, kv_memory=0.6, kv_compress=None)


def test_eval_per_layer_method_runs_in_the_bytes_of_the_shared_pool(tiny_model_path, tiny_profile):
    from kvcompose_gguf.eval import methods

    n_ctx, kv_budget = 700, 0.7  # the pool allocates 768 cells; the full cache needs 1024
    layers = methods.get_method("kvcompose-layers").create(tiny_model_path, n_ctx=n_ctx, kv_budget=kv_budget, n_threads=1)
    pool = methods.get_method("kvcompose").create(tiny_model_path, n_ctx=n_ctx, kv_budget=kv_budget, n_threads=1)
    got, want = methods.memory_details(layers), methods.memory_details(pool)
    assert got["per_layer"] and not want["per_layer"] and layers.n_ctx() == 1024 and pool.n_ctx() == 768
    assert 0.9 * want["allocated_bytes"] <= got["allocated_bytes"] <= want["allocated_bytes"]


def test_cli_chat_reports_the_per_layer_allocation(tiny_model_path, tiny_profile, capsys):
    from kvcompose_gguf import cli

    parser = cli.build_parser()
    llm = cli.load_model(parser.parse_args(["chat", str(tiny_model_path), "--n-ctx", "1024", "--kv-memory", "0.7"]))
    lay = llm._kv.compactor.layout
    expected = int((lay.rows * layout.model_row_bytes(tiny_model_path)).sum())  # rows from the plan, bytes from GGUF
    np.testing.assert_array_equal(lay.rows, lay.n_recent + layout.plan_layout(0.7, 1024, tiny_profile).caps)
    assert cli.kv_bytes_allocated(llm) == expected
    assert cli.kv_bytes_full_cache(llm, 1024) == 1024 * int(layout.model_row_bytes(tiny_model_path).sum())
    for bad in (["--kv-memory", "1.5"], ["--kv-memory", "lots"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["chat", *bad])
    assert "kv-memory" in capsys.readouterr().err
    with pytest.raises(cli.CliError, match="needs a --policy"):
        cli.load_model(parser.parse_args(["chat", str(tiny_model_path), "--policy", "none", "--kv-memory", "0.7"]))


def test_the_budget_is_lowered_to_what_the_capacities_hold():
    from kvcompose_gguf.llama import _within_capacities
    from kvcompose_gguf.policies import KVCompose, Observation

    rng = np.random.default_rng(0)
    n_layer, n_head, n_cells = 4, 2, 600
    positions = np.broadcast_to(np.arange(n_cells, dtype=np.int32), (n_layer, n_head, n_cells)).copy()
    positions[1, :, 99:-1] = -1  # layer 1 holds 100 tokens only (slots it does not own), the newest one too
    obs = Observation(scores=rng.random((n_layer, n_head, n_cells)).astype(np.float32), positions=positions)
    caps = np.array([256, 256, 256, 512])
    budget = _within_capacities(0.6, obs, caps)
    assert budget == pytest.approx((256 + 100 + 256 + 512) / (600 * 3 + 100))
    counts = KVCompose().select(obs, budget, layer_caps=caps).counts
    assert (counts <= np.minimum(caps, [600, 100, 600, 600])).all()
    assert _within_capacities(0.1, obs, caps) == 0.1
    assert _within_capacities(300, obs, caps) == 256


def test_llama_kv_memory_in_bytes_is_that_fraction_of_the_full_cache(tiny_model_path, tiny_profile):
    full = N_CTX * int(layout.model_row_bytes(tiny_model_path).sum())
    by_bytes = compressing(tiny_model_path, n_ctx=N_CTX, kv_memory=int(0.75 * full), kv_window=16)
    by_fraction = compressing(tiny_model_path, n_ctx=N_CTX, kv_memory=0.75, kv_window=16)
    np.testing.assert_array_equal(by_bytes._kv.compactor.layout.rows, by_fraction._kv.compactor.layout.rows)
    assert by_bytes.kv_stats()["kv_memory"]["allocated_bytes"] <= int(0.75 * full)
    assert by_bytes.kv_stats()["kv_memory"]["full_cache_bytes"] == full
