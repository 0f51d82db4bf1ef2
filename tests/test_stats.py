"""Attention statistics from the decode graph (kvcompose_gguf.stats, native/kvcompose-stats.cpp).

The independent reference is llama.cpp's own `kq_soft_max-{il}` tensors,
captured through cb_eval with flash attention off and aggregated in numpy.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

try:
    from kvcompose_gguf import native, stats
except ImportError as exc:  # LibraryNotPatchedError: a stock libllama
    pytest.skip(f"libllama without the kvcompose patch: {exc}", allow_module_level=True)

from c_api import Session  # noqa: E402
from placement import assert_close  # noqa: E402

# --- a low-level session with an optional kq_soft_max capture ------------------


class _GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the vendored ggml (ggml/include/ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    """libggml-base beside the loaded libllama."""
    lib_dir = Path(llama_cpp.llama_cpp._lib._name).parent
    base = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.*"))))
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    base.ggml_backend_tensor_get.restype = None
    return base


class StatsSession(Session):
    """This module's defaults (flash attention off, n_ubatch 512, n_batch max(n_ctx, n_ubatch)),
    an optional kq_soft_max capture, and decode(tokens, pos0, seq_ids) with consecutive positions."""

    def __init__(self, model_path, *, n_ubatch=512, capture=False, **kwargs):
        self.captured: list[tuple[int, np.ndarray]] = []  # (layer, probs [n_head, n_tokens, n_kv]) per ubatch
        cb = llama_cpp.ggml_backend_sched_eval_callback(self._eval_callback) if capture else None
        super().__init__(model_path, n_ubatch=n_ubatch, cb_eval=cb, **kwargs)

    def _eval_callback(self, tensor_p, ask, user_data):
        t = _GgmlTensor.from_address(tensor_p)
        name = t.name.decode()
        if not name.startswith("kq_soft_max-"):
            return not ask
        if ask:
            return True
        assert t.type == 0  # f32
        ne = list(t.ne)
        raw = (ctypes.c_uint8 * (t.nb[3] * ne[3]))()
        _ggml_base().ggml_backend_tensor_get(tensor_p, raw, 0, len(raw))  # the tensor may be in GPU memory
        arr = np.frombuffer(raw, dtype=np.float32).reshape(ne[3], ne[2], ne[1], ne[0])[0].copy()
        self.captured.append((int(name.split("-")[1]), arr))
        return True

    def decode(self, tokens, pos0, seq_ids=None):
        """Decode tokens[i] at position pos0 + i (per sequence when seq_ids is given; pos0 may be a
        {seq_id: first position} dict)."""
        seq_ids = [0] * len(tokens) if seq_ids is None else list(seq_ids)
        positions, next_pos = [], {}
        for sid in seq_ids:
            p0 = pos0[sid] if isinstance(pos0, dict) else pos0
            positions.append(p0 + next_pos.get(sid, 0))
            next_pos[sid] = next_pos.get(sid, 0) + 1
        return super().decode(tokens, positions, seq_ids)


@pytest.fixture
def session_class():
    return StatsSession


def tokens_for(n: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 259, size=n)]


def reference(session: StatsSession, observing, n_cells, query_reduce="max", head_reduce="mean"):
    """Aggregate the captured kq_soft_max rows of the observing queries in numpy.

    observing: per captured ubatch (in order), the token rows that observe.
    Returns float [n_layer, n_head_kv, n_cells].
    """
    per_layer: dict[int, list[np.ndarray]] = {}
    n_ubatch_seen: dict[int, int] = {}
    for il, probs in session.captured:
        k = n_ubatch_seen.get(il, 0)
        n_ubatch_seen[il] = k + 1
        rows = observing[k]
        if len(rows) == 0:
            continue
        sel = probs[:, rows, :]  # [n_head, n_obs, n_kv]
        padded = np.zeros((sel.shape[0], sel.shape[1], n_cells), dtype=np.float64)
        padded[:, :, : sel.shape[2]] = sel
        per_layer.setdefault(il, []).append(padded)
    out = np.zeros((session.n_layer, session.n_head_kv, n_cells))
    G = session.n_head // session.n_head_kv
    for il, chunks in per_layer.items():
        a = np.concatenate(chunks, axis=1)  # [n_head, n_obs_total, n_cells]
        s = {"max": a.max(axis=1), "mean": a.mean(axis=1), "sum": a.sum(axis=1)}[query_reduce]
        grouped = s.reshape(session.n_head_kv, G, n_cells)
        out[il] = grouped.mean(axis=1) if head_reduce == "mean" else grouped.max(axis=1)
    return out


# --- flash attention off: equality with kq_soft_max ------------------------------


@pytest.mark.parametrize(
    "query_reduce,head_reduce", [("max", "mean"), ("mean", "mean"), ("sum", "mean"), ("max", "max"), ("mean", "max")]
)
def test_flash_off_equals_kq_soft_max_over_last_queries(tiny_model_path, sessions, query_reduce, head_reduce):
    # 100 tokens in micro-batches of 32: the 20-token window straddles two of them
    s = sessions(tiny_model_path, n_ubatch=32, capture=True)
    toks = tokens_for(100)
    obs = stats.AttentionObserver(s.ctx, n_last=20, query_reduce=query_reduce, head_reduce=head_reduce)
    with obs:
        s.decode(toks, 0)
        got = obs.scores()
        assert obs.n_queries == 20
        assert obs.layers_observed().all()
        n_cells = got.shape[2]
    observing = [[], [], [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [0, 1, 2, 3]]
    want = reference(s, observing, n_cells, query_reduce, head_reduce)
    assert got.shape == (s.n_layer, s.n_head_kv, n_cells)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[:, :, :100].max() > 0


def test_whole_batch_observation_and_per_head_reads(tiny_model_path, sessions):
    s = sessions(tiny_model_path, capture=True)
    toks = tokens_for(40, seed=3)
    obs = stats.AttentionObserver(s.ctx)  # n_last=None: the whole batch observes
    with obs:
        s.decode(toks, 0)
        got = obs.scores()
        lib = native.load()
        one = np.zeros(got.shape[2], dtype=np.float32)
        status = lib.llama_kvcompose_stats_get(
            s.ctx, 2, 1, one.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), got.shape[2]
        )
        native.check("llama_kvcompose_stats_get", status)
        np.testing.assert_array_equal(one, got[2, 1])
    want = reference(s, [list(range(40))], got.shape[2])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- flash attention on -----------------------------------------------------------


def test_flash_on_agrees_with_plain_attention(tiny_model_path, sessions):
    toks = tokens_for(120, seed=5)
    ref_session = sessions(tiny_model_path, n_ubatch=64, capture=True)
    ref_session.decode(toks, 0)
    fa = sessions(tiny_model_path, n_ubatch=64, flash_attn=True)
    with stats.AttentionObserver(fa.ctx, n_last=32) as obs:
        fa.decode(toks, 0)
        got = obs.scores()
    want = reference(ref_session, [[], list(range(24, 56))], got.shape[2])
    # layer 0 sees the same q and K with flash attention on or off: same numbers.
    # Deeper layers get hidden states that went through flash attention's own
    # numerics (f16 accumulation of V), which moves probabilities by up to ~3e-3
    # on this random model.
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-2, rtol=0)


def _topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    ta = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    tb = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    out = np.empty(a.shape[:-1])
    for idx in np.ndindex(*a.shape[:-1]):
        out[idx] = len(np.intersect1d(ta[idx], tb[idx])) / k
    return out


PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished "
    "the great lens and wrote the weather into a leather logbook. Ships passing the rocky headland trusted "
    "the steady beam; fishermen said they could set their clocks by it. One winter a storm tore the slates "
    "from the roof and flooded the oil store, yet the light never failed. When the keeper retired, the village "
    "gave him a brass telescope engraved with the words: for forty years of faithful watches. "
    "Question: what did the village give the keeper when he retired?"
)


@pytest.mark.model
def test_flash_on_topk_overlap_on_default_model(default_model_path, sessions):
    ref_session = sessions(default_model_path, n_ctx=512, capture=True)
    vocab = llama_cpp.llama_model_get_vocab(ref_session.model)
    buf = (llama_cpp.llama_token * 512)()
    n = llama_cpp.llama_tokenize(vocab, PROMPT.encode(), len(PROMPT.encode()), buf, 512, True, False)
    toks = list(buf[:n])
    ref_session.decode(toks, 0)
    fa = sessions(default_model_path, n_ctx=512, flash_attn=True)
    with stats.AttentionObserver(fa.ctx, n_last=32) as obs:
        fa.decode(toks, 0)
        got = obs.scores()
    want = reference(ref_session, [list(range(n - 32, n))], got.shape[2])
    k = n // 4
    overlap = _topk_overlap(got[:, :, :n], want[:, :, :n], k)
    assert overlap.mean() >= 0.95, f"mean top-25% overlap {overlap.mean():.3f}, min {overlap.min():.3f}"
    # stated tolerance (measured: layer 0 exact, mean |diff| ~1e-3, max ~0.05 in layer 17,
    # all from flash attention's own numerics feeding the deeper layers)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert np.abs(got - want).mean(axis=-1).max() < 5e-3
    np.testing.assert_allclose(got, want, atol=0.1, rtol=0)


# --- cells, sequences, accumulation --------------------------------------------


def test_empty_cells_score_zero_and_have_no_position(tiny_model_path, sessions):
    s = sessions(tiny_model_path, n_ctx=256)
    with stats.AttentionObserver(s.ctx, n_last=8) as obs:
        s.decode(tokens_for(50), 0)
        o = obs.observation()
    assert o.scores.shape == o.positions.shape == (s.n_layer, s.n_head_kv, 256)
    assert o.positions.dtype == np.int32 and o.scores.dtype == np.float32
    np.testing.assert_array_equal(o.positions[:, :, :50], np.broadcast_to(np.arange(50), (s.n_layer, s.n_head_kv, 50)))
    assert (o.positions[:, :, 50:] == -1).all()
    assert (o.scores[:, :, 50:] == 0).all()
    # each query's probabilities sum to 1; max over queries keeps at least that much mass per head group
    assert (o.scores[:, :, :50].sum(axis=-1) >= 1.0 - 1e-4).all()
    # a selection of the top-scoring cells never picks an empty one, even asking for more than exist
    top = np.argsort(-o.scores, axis=-1, kind="stable")[..., :50]
    assert (np.take_along_axis(o.positions, top, axis=-1) >= 0).all()


@pytest.mark.parametrize("kv_budget", [1.0, 0.25])
def test_policy_on_native_statistics_never_selects_empty_cells(tiny_model_path, sessions, kv_budget):
    policies = pytest.importorskip("kvcompose_gguf.policies")
    s = sessions(tiny_model_path, n_ctx=256)
    with stats.AttentionObserver(s.ctx, n_last=8) as obs:
        s.decode(tokens_for(50), 0)
        o = obs.observation()
    sel = policies.KVCompose().select(o, kv_budget)
    chosen = sel.cells[sel.cells >= 0]
    assert chosen.size > 0 and (chosen < 50).all()
    assert (sel.kept_positions[sel.cells >= 0] >= 0).all()


def test_positions_seam_takes_the_compactor_table(tiny_model_path, sessions):
    s = sessions(tiny_model_path)
    with stats.AttentionObserver(s.ctx, n_last=4) as obs:
        s.decode(tokens_for(20), 0)
        shape = obs.shape()
        table = np.full(shape, -1, dtype=np.int32)
        table[:, :, :20] = np.arange(100, 120)
        o = obs.observation(positions=table)
        np.testing.assert_array_equal(o.positions, table)
        with pytest.raises(ValueError):
            obs.observation(positions=table[:, :, :10])


def test_several_sequences_score_only_the_observed_sequence(tiny_model_path, sessions):
    s = sessions(tiny_model_path, n_seq_max=2, capture=True)
    a, b = tokens_for(30, seed=7), tokens_for(25, seed=8)
    # interleaved tokens of two sequences in one batch
    toks, sids = [], []
    for i in range(30):
        toks.append(a[i])
        sids.append(0)
        if i < 25:
            toks.append(b[i])
            sids.append(1)
    with stats.AttentionObserver(s.ctx, seq_id=1, n_last=10) as obs:
        s.decode(toks, {0: 0, 1: 0}, sids)
        got = obs.scores()
        pos1 = obs.cell_positions()
        assert obs.n_queries == 10
    pos0 = stats.cell_positions(s.ctx, 0)
    rows_b = [i for i, sid in enumerate(sids) if sid == 1][-10:]
    want = reference(s, [rows_b], got.shape[2])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    cells_a = np.flatnonzero(pos0 >= 0)
    assert len(cells_a) == 30 and (pos1[cells_a] == -1).all()
    assert (got[:, :, cells_a] == 0).all()
    assert (got[:, :, np.flatnonzero(pos1 >= 0)].sum(axis=-1) > 0).all()


def test_separate_streams_observe_their_own_cells(tiny_model_path, sessions):
    # kv_unified=False: each sequence has its own stream of cells
    s = sessions(tiny_model_path, n_ctx=256, n_seq_max=2, kv_unified=False, capture=True)
    a, b = tokens_for(30, seed=7), tokens_for(25, seed=8)
    s.decode(a, 0, [0] * 30)
    obs = stats.AttentionObserver(s.ctx, seq_id=1, n_last=10)
    with obs:
        n_captured = len(s.captured)
        s.decode(b, 0, [1] * 25)
        got = obs.scores()
        pos1 = obs.cell_positions()
        s.captured = s.captured[n_captured:]
        want = reference(s, [list(range(15, 25))], got.shape[2])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert (pos1 >= 0).sum() == 25
        # both sequences in one micro-batch means two streams: refused, not silently wrong
        s.decode([a[0], b[0]], {0: 30, 1: 25}, [0, 1])
        with pytest.raises(native.NativeError) as err:
            obs.scores()
        assert err.value.status == native.ERR_STATE


@pytest.mark.parametrize("query_reduce", ["max", "mean"])
def test_accumulation_over_two_decode_calls_equals_one_call(tiny_model_path, sessions, query_reduce):
    toks = tokens_for(100, seed=11)
    one = sessions(tiny_model_path, n_ubatch=32)
    with stats.AttentionObserver(one.ctx, n_last=30, query_reduce=query_reduce) as obs:
        one.decode(toks, 0)
        want = obs.scores()

    two = sessions(tiny_model_path, n_ubatch=32)
    obs = stats.AttentionObserver(two.ctx, query_reduce=query_reduce)  # whole batches observe
    obs.begin()
    obs.pause()
    two.decode(toks[:70], 0)
    obs.resume()
    two.decode(toks[70:85], 70)
    two.decode(toks[85:], 85)
    got = obs.scores()
    assert obs.n_queries == 30
    obs.reset()
    assert obs.n_queries == 0 and not obs.scores().any()
    obs.end()
    assert_close(got, want, rtol=1e-5, atol=1e-6, device_atol=1e-2)


def test_h2o_style_sum_over_generated_tokens(tiny_model_path, sessions):
    # one token per decode call, every call observed: the graph is reused between steps
    s = sessions(tiny_model_path, capture=True)
    toks = tokens_for(26, seed=29)
    s.decode(toks[:20], 0)
    n_prefill = len(s.captured)
    reused = s.n_reused()
    with stats.AttentionObserver(s.ctx, query_reduce="sum", head_reduce="max") as obs:
        for i in range(20, 26):
            s.decode([toks[i]], i)
        got = obs.scores()
        assert obs.n_queries == 6
    assert s.n_reused() - reused >= 4
    s.captured = s.captured[n_prefill:]
    want = reference(s, [[0]] * 6, got.shape[2], "sum", "max")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("type_k", [llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0], ids=["q8_0", "q4_0"])
def test_quantized_k_cache(tiny_model_path, sessions, type_k):
    toks = tokens_for(60, seed=13)
    plain = sessions(tiny_model_path, type_k=type_k, capture=True)
    with stats.AttentionObserver(plain.ctx, n_last=12) as obs:
        plain.decode(toks, 0)
        got = obs.scores()
    want = reference(plain, [list(range(48, 60))], got.shape[2])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    fa = sessions(tiny_model_path, type_k=type_k, flash_attn=True)
    with stats.AttentionObserver(fa.ctx, n_last=12) as obs:
        fa.decode(toks, 0)
        got_fa = obs.scores()
    # flash attention with a quantised K runs the model on other numerics: layer 0
    # (same inputs) is exact, deeper layers drift (up to ~0.07 with q4_0 on this
    # random model) but rank cells alike
    np.testing.assert_allclose(got_fa[0], want[0], rtol=1e-5, atol=1e-6)
    assert _topk_overlap(got_fa[:, :, :60], want[:, :, :60], 15).mean() >= 0.9


# --- observation off costs nothing -------------------------------------------------


def test_graph_reuse_survives_observation_off_and_paused(tiny_model_path, sessions):
    s = sessions(tiny_model_path)
    toks = tokens_for(40, seed=17)
    s.decode(toks[:30], 0)
    before = s.n_reused()
    for i in range(30, 34):
        s.decode([toks[i]], i)
    assert s.n_reused() - before >= 3  # never begun: the stock graph is reused

    obs = stats.AttentionObserver(s.ctx, n_last=1)
    obs.begin()
    before = s.n_reused()
    for i in range(34, 37):
        s.decode([toks[i]], i)
    assert s.n_reused() - before >= 2  # same plan on every single-token decode: reused too
    assert obs.n_queries == 3
    obs.pause()
    before = s.n_reused()
    for i in range(37, 40):
        s.decode([toks[i]], i)
    assert s.n_reused() - before >= 2
    assert obs.n_queries == 3  # paused: nothing observed
    obs.end()


# --- bad input -------------------------------------------------------------------


def test_bad_input_raises_and_keeps_the_context_usable(tiny_model_path, sessions):
    s = sessions(tiny_model_path)
    with pytest.raises(ValueError):
        stats.AttentionObserver(s.ctx, n_last=0)
    with pytest.raises(ValueError):
        stats.AttentionObserver(s.ctx, query_reduce="median")
    obs = stats.AttentionObserver(s.ctx, seq_id=5)
    with pytest.raises(native.NativeError) as err:
        obs.begin()
    assert err.value.status == native.ERR_ARGUMENT  # as every function answers a bad seq_id
    with pytest.raises(native.NativeError) as err:
        obs.scores()  # never begun
    assert err.value.status == native.ERR_STATE
    lib = native.load()
    with stats.AttentionObserver(s.ctx, n_last=2) as good:
        s.decode(tokens_for(10), 0)
        buf = np.zeros(3, dtype=np.float32)
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert lib.llama_kvcompose_stats_get(s.ctx, 99, 0, ptr, 3) == native.ERR_RANGE
        assert lib.llama_kvcompose_stats_get(s.ctx, 0, 0, ptr, 3) == native.ERR_RANGE  # wrong n_cells
        assert good.scores()[:, :, :10].sum() > 0
    with pytest.raises(native.NativeError):
        stats.cell_positions(s.ctx, seq_id=-1)


# --- sliding-window models ---------------------------------------------------------


@pytest.mark.gemma
def test_sliding_window_layers_report_no_statistics(gemma3_path, sessions):
    s = sessions(gemma3_path, n_ctx=256, capture=True)
    toks = tokens_for(60, seed=19)
    with stats.AttentionObserver(s.ctx, n_last=8) as obs:
        s.decode(toks, 0)
        got = obs.scores()
        observed = obs.layers_observed()
    # Gemma-3 interleaves five sliding-window layers with one global layer
    assert 0 < observed.sum() < s.n_layer
    assert not got[~observed].any()
    want = reference(s, [list(range(52, 60))], got.shape[2])
    # the sliding-window layers' kq_soft_max index the other cache's cells: compare the global ones
    np.testing.assert_allclose(got[observed], want[observed], rtol=1e-5, atol=1e-6)


def test_observer_accepts_a_llama_object(tiny_model_path):
    llm = llama_cpp.Llama(
        model_path=str(tiny_model_path), n_ctx=128, n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False
    )
    try:
        with stats.AttentionObserver(llm, n_last=4) as obs:
            llm.eval(tokens_for(30, seed=23))
            o = obs.observation()
            assert obs.n_queries == 4
        assert (o.positions[:, :, :30] == np.arange(30)).all() and (o.positions[:, :, 30:] == -1).all()
        assert (o.scores[:, :, :30].sum(axis=-1) >= 1.0 - 1e-4).all()
    finally:
        llm.close()


# --- the score memory ("reread" observation) -------------------------------------


def _brute_spread(scores, positions, span):
    """Per layer/head and held cell: the max score over held cells within `span` positions."""
    out = np.zeros(scores.shape, np.float32)
    for layer, head, cell in zip(*np.nonzero(positions >= 0)):
        row = positions[layer, head]
        near = (row >= 0) & (np.abs(row - row[cell]) <= span)
        out[layer, head, cell] = scores[layer, head, near].max()
    return out


def _scattered(rng, n_layer=3, n_head=2, n_cells=40, n_positions=90):
    """Random scores over a compacted-looking layout: each head its own positions in random cells."""
    positions = np.full((n_layer, n_head, n_cells), -1, np.int32)
    for layer in range(n_layer):
        for head in range(n_head):
            n = int(rng.integers(1, n_cells + 1))
            positions[layer, head, rng.choice(n_cells, n, replace=False)] = rng.choice(n_positions, n, replace=False)
    return stats._make_observation(rng.random(positions.shape, np.float32), positions, None)


@pytest.mark.parametrize("span", [0, 1, 3, 8])
def test_spread_is_the_max_over_held_neighbours_by_original_position(span):
    rng = np.random.default_rng(span)
    obs = _scattered(rng)
    got = stats.spread_by_position(obs.scores, obs.positions, span)
    np.testing.assert_array_equal(got, _brute_spread(obs.scores, obs.positions, span))


def test_score_memory_keeps_each_entrys_best_score_while_it_stays_cached():
    """Reference: a dict (layer, head, position) -> the max of the spread scores of every
    observation that held the entry since it last appeared."""
    rng = np.random.default_rng(7)
    memory, best = stats.ScoreMemory(span=2), {}
    for _ in range(6):
        obs = _scattered(rng)
        merged = memory.merge(obs)
        spread = _brute_spread(obs.scores, obs.positions, 2)
        now = {}
        for layer, head, cell in zip(*np.nonzero(obs.positions >= 0)):
            key = (layer, head, int(obs.positions[layer, head, cell]))
            now[key] = max(best.get(key, -np.inf), spread[layer, head, cell])
            assert merged.scores[layer, head, cell] == np.float32(now[key])
        best = now  # entries not held by this observation are forgotten
        assert len(memory) == len(best)
        assert not merged.scores[obs.positions < 0].any()
        np.testing.assert_array_equal(merged.positions, obs.positions)


def test_score_memory_state_round_trips_and_rejects_malformed_states():
    rng = np.random.default_rng(3)
    memory = stats.ScoreMemory()
    memory.merge(_scattered(rng))
    copy = stats.ScoreMemory()
    copy.restore(memory.state())
    obs = _scattered(rng)
    np.testing.assert_array_equal(copy.merge(obs).scores, memory.merge(obs).scores)
    keys, scores = memory.state()
    for bad in [(keys[::-1], scores), (keys, scores[:-1]), (keys.reshape(1, -1), scores.reshape(1, -1))]:
        with pytest.raises(ValueError, match="ascending"):
            stats.ScoreMemory().restore(bad)
    with pytest.raises(ValueError, match="span"):
        stats.ScoreMemory(span=-1)
