"""In-place composite-token compaction (kvcompose_gguf.compactor, native/kvcompose-compact.cpp).

Independent references:
- the state blob from llama_state_seq_get_data, rearranged in numpy (kvcompose_gguf.state_blob);
- the same tokens dropped with llama_memory_seq_rm (uniform budgets);
- logits of an unperturbed twin context (per-layer budgets must ignore unowned rows exactly).
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from kvcompose_gguf import native  # noqa: E402

try:
    native.load()
except native.LibraryNotPatchedError as exc:  # pragma: no cover - depends on the installed wheel
    pytestmark = pytest.mark.skip(reason=f"libllama without the kvcompose patch: {exc}")

from c_api import Session  # noqa: E402
from placement import kv_in_device_memory  # noqa: E402

from kvcompose_gguf import state, state_blob  # noqa: E402
from kvcompose_gguf.compactor import Compactor, recorded_move_forms  # noqa: E402

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 = 0, 1, 2, 3, 6, 7, 8, 30


class CompactionSession(Session):
    """This module's defaults: flash attention on, f16 K and V, n_batch = n_ubatch = n_ctx."""

    def __init__(self, model_path, *, flash_attn=True, type_k=F16, type_v=F16, **kwargs):
        super().__init__(model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v, **kwargs)


@pytest.fixture
def session_class():
    return CompactionSession


def random_selection(rng, seq_cells, seq_positions, n_layer, n_head_kv, counts):
    """A Selection-like object: per (layer, head) its own sorted kept cells; the newest cell
    is kept by every head so the sequence's maximum position stays put."""
    counts = np.asarray(counts, dtype=np.int32)
    n_slots = int(counts.max())
    newest = int(np.argmax(seq_positions))
    others = np.array([i for i in range(len(seq_cells)) if i != newest])
    cells = np.full((n_layer, n_head_kv, n_slots), -1, dtype=np.int32)
    kept = np.full_like(cells, -1)
    for layer in range(n_layer):
        for h in range(n_head_kv):
            idx = np.sort(np.append(rng.choice(others, counts[layer] - 1, replace=False), newest))
            idx = idx[np.argsort(seq_positions[idx], kind="stable")]
            cells[layer, h, : counts[layer]] = seq_cells[idx]
            kept[layer, h, : counts[layer]] = seq_positions[idx]
    slot_positions = kept.max(axis=(0, 1)).astype(np.int32)
    return SimpleNamespace(counts=counts, cells=cells, slot_positions=slot_positions, kept_positions=kept, simulated=False)


def expected_blob(before: bytes, sel, seq_cells, dst_cells, n_head_kv) -> tuple[state_blob.SeqState, list]:
    """The numpy rearrangement of a sequence's blob that the compaction must produce, and per
    layer a boolean [n_slots] of the rows whose content is known (owned slots, or unowned
    slots whose destination cell held this sequence's row before and was not written)."""
    st = state_blob.parse_seq_state(before)
    old = st.only_stream()
    row_of_cell = {int(c): i for i, c in enumerate(seq_cells)}
    n_slots = sel.cells.shape[2]
    keep_old = np.array([row_of_cell.get(int(c), -1) for c in dst_cells])
    known = []
    new_k, new_v = [], []
    for layer in range(len(old.k)):
        n_l = int(sel.counts[layer])
        src = np.array([row_of_cell[int(c)] for c in sel.cells[layer, :, :n_l].ravel()]).reshape(n_head_kv, n_l)
        k = np.zeros((n_slots, old.k[layer].rows.shape[1]), np.uint8)
        k[keep_old >= 0] = old.k[layer].rows[keep_old[keep_old >= 0]]
        for h in range(n_head_kv):
            state_blob.LayerRows(0, k).head(h, n_head_kv)[:n_l] = old.k[layer].head(h, n_head_kv)[src[h]]
        new_k.append(state_blob.LayerRows(old.k[layer].type, k))
        if old.v_trans:
            data = old.v[layer].data
            v = np.zeros((data.shape[0], n_slots, data.shape[2]), np.uint8)
            v[:, keep_old >= 0] = data[:, keep_old[keep_old >= 0]]
            hd = data.shape[0] // n_head_kv
            for h in range(n_head_kv):
                v[h * hd : (h + 1) * hd, :n_l] = data[h * hd : (h + 1) * hd][:, src[h]]
            new_v.append(state_blob.LayerColumns(old.v[layer].type, v))
        else:
            v = np.zeros((n_slots, old.v[layer].rows.shape[1]), np.uint8)
            v[keep_old >= 0] = old.v[layer].rows[keep_old[keep_old >= 0]]
            for h in range(n_head_kv):
                state_blob.LayerRows(0, v).head(h, n_head_kv)[:n_l] = old.v[layer].head(h, n_head_kv)[src[h]]
            new_v.append(state_blob.LayerRows(old.v[layer].type, v))
        known.append((np.arange(n_slots) < n_l) | (keep_old >= 0))
    stream = state_blob.StreamState(
        positions=sel.slot_positions.astype(np.int32),
        seq_ids=[[st.seq_id]] * n_slots,
        ext=None,
        v_trans=old.v_trans,
        k=new_k,
        v=new_v,
    )
    st.streams = [stream if s is not None else None for s in st.streams]
    return st, known


def assert_known_rows_equal(got: state_blob.SeqState, want: state_blob.SeqState, known: list) -> None:
    """Every layer's K and V rows of the cells whose content is known (`expected_blob`) match."""
    assert len(known) == len(got.k) == len(want.k)
    for layer in range(len(known)):
        np.testing.assert_array_equal(got.k[layer].rows[known[layer]], want.k[layer].rows[known[layer]])
        if got.v_trans:
            np.testing.assert_array_equal(got.v[layer].data[:, known[layer]], want.v[layer].data[:, known[layer]])
        else:
            np.testing.assert_array_equal(got.v[layer].rows[known[layer]], want.v[layer].rows[known[layer]])


def prompt(rng, n):
    return rng.integers(3, 259, n)


# --- the state blob itself --------------------------------------------------------


@pytest.mark.parametrize("flash_attn", [True, False])
def test_state_blob_parse_and_write_round_trip_byte_identical(sessions, tiny_model_path, flash_attn):
    s = sessions(tiny_model_path, flash_attn=flash_attn)
    s.decode(prompt(np.random.default_rng(0), 30), range(30))
    blob = s.blob()
    parsed = state_blob.parse_seq_state(blob)
    assert parsed.only_stream().cell_count == 30
    assert parsed.only_stream().v_trans is (not flash_attn)
    np.testing.assert_array_equal(parsed.only_stream().positions, np.arange(30))
    assert parsed.to_bytes() == blob


# --- byte-exact moves ---------------------------------------------------------------

CACHE_TYPES = [
    pytest.param(False, F16, F16, id="f16-transposedV"),
    pytest.param(False, F32, F32, id="f32-transposedV"),
    pytest.param(False, BF16, BF16, id="bf16-transposedV"),
    pytest.param(False, Q8_0, F16, id="q8_0K-f16-transposedV"),
    pytest.param(True, F16, F16, id="f16-fa"),
    pytest.param(True, F32, F32, id="f32-fa"),
    pytest.param(True, BF16, BF16, id="bf16-fa"),
    pytest.param(True, Q8_0, Q8_0, id="q8_0-fa"),
    pytest.param(True, Q4_0, Q4_0, id="q4_0-fa"),
    pytest.param(True, Q4_1, Q4_1, id="q4_1-fa"),
    pytest.param(True, Q5_0, Q5_0, id="q5_0-fa"),
    pytest.param(True, Q5_1, Q5_1, id="q5_1-fa"),
]


@pytest.mark.parametrize("flash_attn,type_k,type_v", CACHE_TYPES)
@pytest.mark.parametrize("form", ["staged", "device"])
def test_compaction_equals_numpy_rearrangement_of_state_blob(sessions, tiny_model_path, flash_attn, type_k, type_v,
                                                             form, monkeypatch):
    """Three interleaved sequences; seq 1 is compacted with per-layer counts. Its blob must be
    the numpy rearrangement of the old blob; the other two blobs must not change at all.
    "device": the unstaged gather that GPU memory takes, forced on the CPU."""
    if form == "device":
        monkeypatch.setenv("KVCOMPOSE_COMPACT_UNSTAGED", "1")
    rng = np.random.default_rng(type_k * 7 + flash_attn)
    s = sessions(tiny_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v, n_seq_max=3)
    n = 36
    toks = prompt(rng, 3 * n)
    s.decode(toks, np.repeat(np.arange(n), 3), np.tile([0, 1, 2], n))
    c = Compactor(s.ctx)
    before = {q: s.blob(q) for q in range(3)}
    seq = c.seq_cells(1)
    counts = rng.integers(6, 20, c.n_layer)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)

    with recorded_move_forms() as forms:
        result = c.apply(sel, seq_id=1)

    # the other sequences' cells break the destinations' run: the split form, staged or not
    # (device memory is never staged)
    (f,) = forms
    n_row_tensors = c.n_layer * (2 if flash_attn else 1)
    assert (f.in_place, f.through_temporary) == (0, n_row_tensors)
    assert f.staged == (n_row_tensors if form == "staged" and not kv_in_device_memory() else 0)
    # destinations: the lowest cells that were free or held by seq 1 alone
    used_by_others = set(c.seq_cells(0).cells) | set(c.seq_cells(2).cells)
    free_or_own = [cell for cell in range(256) if cell not in used_by_others]
    np.testing.assert_array_equal(result.slot_cells, free_or_own[: sel.cells.shape[2]])
    expected, known = expected_blob(before[1], sel, seq.cells, result.slot_cells, c.n_head_kv)
    got = state_blob.parse_seq_state(s.blob(1)).only_stream()
    want = expected.only_stream()
    np.testing.assert_array_equal(got.positions, want.positions)
    assert_known_rows_equal(got, want, known)
    if (sel.counts == sel.counts.max()).all():
        assert s.blob(1) == expected.to_bytes()
    assert s.blob(0) == before[0]
    assert s.blob(2) == before[2]


@pytest.mark.parametrize("flash_attn", [True, False])
def test_uniform_compaction_blob_is_byte_identical_to_numpy_rearrangement(sessions, tiny_model_path, flash_attn):
    rng = np.random.default_rng(5)
    s = sessions(tiny_model_path, flash_attn=flash_attn, type_k=Q8_0 if flash_attn else F16, type_v=Q8_0 if flash_attn else F16)
    s.decode(prompt(rng, 50), range(50))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    before = s.blob()
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [21] * c.n_layer)
    result = c.apply(sel)
    expected, _ = expected_blob(before, sel, seq.cells, result.slot_cells, c.n_head_kv)
    assert s.blob() == expected.to_bytes()
    assert (result.cells_before, result.cells_after) == (50, 21)
    assert result.physical_bytes_freed == 29 * c.cell_bytes()
    assert result.logical_entries_dropped == c.n_layer * c.n_head_kv * 29
    assert c.seq_cells(0).n_kv_used == 21


def test_separate_streams_compact_only_their_own_stream(sessions, tiny_model_path):
    rng = np.random.default_rng(9)
    s = sessions(tiny_model_path, n_seq_max=2, kv_unified=False, n_ctx=512)
    s.decode(prompt(rng, 60), np.tile(np.arange(30), 2), np.repeat([0, 1], 30))
    c = Compactor(s.ctx)
    before0, before1 = s.blob(0), s.blob(1)
    seq = c.seq_cells(1)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [12] * c.n_layer)
    result = c.apply(sel, seq_id=1)
    expected, _ = expected_blob(before1, sel, seq.cells, result.slot_cells, c.n_head_kv)
    assert s.blob(1) == expected.to_bytes()
    assert s.blob(0) == before0


# --- logits --------------------------------------------------------------------------


@pytest.mark.parametrize("flash_attn", [True, False])
def test_identity_compaction_leaves_next_token_logits_unchanged(sessions, tiny_model_path, flash_attn):
    rng = np.random.default_rng(1)
    toks = prompt(rng, 41)
    ref = sessions(tiny_model_path, flash_attn=flash_attn)
    ref.decode(toks[:40], range(40))
    want = ref.decode(toks[40:], [40])
    s = sessions(tiny_model_path, flash_attn=flash_attn)
    s.decode(toks[:40], range(40))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    cells = np.broadcast_to(seq.cells, (c.n_layer, c.n_head_kv, 40)).astype(np.int32)
    kept = np.broadcast_to(seq.positions, cells.shape).astype(np.int32)
    c.apply(SimpleNamespace(counts=np.full(c.n_layer, 40), cells=cells, slot_positions=seq.positions, kept_positions=kept))
    got = s.decode(toks[40:], [40])
    np.testing.assert_array_equal(got, want)


def _identity(c: Compactor, seq_id: int = 0) -> SimpleNamespace:
    """Keep every cell of the sequence, in cell order: a pure move to the front."""
    seq = c.seq_cells(seq_id)
    shape = (c.n_layer, c.n_head_kv, len(seq.cells))
    return SimpleNamespace(
        counts=np.full(c.n_layer, len(seq.cells)),
        cells=np.broadcast_to(seq.cells, shape).astype(np.int32),
        slot_positions=seq.positions,
        kept_positions=np.broadcast_to(seq.positions, shape).astype(np.int32),
    )


@pytest.mark.parametrize("flash_attn", [True, False])
def test_uniform_budget_equals_seq_rm_of_the_dropped_tokens_then_a_move(sessions, tiny_model_path, flash_attn):
    rng = np.random.default_rng(2)
    toks = prompt(rng, 61)
    kept_idx = np.sort(np.append(rng.choice(59, 24, replace=False), 59))
    dropped = np.setdiff1d(np.arange(60), kept_idx)

    def dropped_by_seq_rm(move: bool):
        ref = sessions(tiny_model_path, flash_attn=flash_attn)
        ref.decode(toks[:60], range(60))
        for p in dropped:
            assert llama_cpp.llama_memory_seq_rm(ref.mem, 0, int(p), int(p) + 1)
        if move:
            Compactor(ref.ctx).apply(_identity(Compactor(ref.ctx)))
        return [ref.decode(toks[60:61], [60]), ref.decode(toks[10:11], [61])]

    s = sessions(tiny_model_path, flash_attn=flash_attn)
    s.decode(toks[:60], range(60))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    cells = np.broadcast_to(seq.cells[kept_idx], (c.n_layer, c.n_head_kv, 25)).astype(np.int32)
    kept = np.broadcast_to(seq.positions[kept_idx], cells.shape).astype(np.int32)
    result = c.apply(SimpleNamespace(counts=np.full(c.n_layer, 25), cells=cells, slot_positions=kept_idx, kept_positions=kept))
    assert c.seq_cells(0).n_kv_used == 25 and result.cells_after == 25
    got = [s.decode(toks[60:61], [60]), s.decode(toks[10:11], [61])]

    for g, w in zip(got, dropped_by_seq_rm(move=True)):
        np.testing.assert_array_equal(g, w)
    # without the move the same rows sit among holes; the kernels then sum in another order
    # (SIMD lanes, thread chunks), which the random tiny model amplifies to ~1e-3
    for g, w in zip(got, dropped_by_seq_rm(move=False)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-2)


# --- per-layer budgets --------------------------------------------------------------


def _per_layer_setup(sessions, model_path, flash_attn, rng):
    toks = prompt(rng, 48)
    counts = np.array([20, 9, 14, 5])
    pair = []
    for _ in range(2):
        s = sessions(model_path, flash_attn=flash_attn)
        s.decode(toks[:45], range(45))
        c = Compactor(s.ctx)
        seq = c.seq_cells(0)
        sel = random_selection(np.random.default_rng(3), seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
        c.apply(sel)
        pair.append((s, c))
    return toks, counts, pair


def _perturb_unowned_rows(blob: bytes, counts, n_head_kv, rng, owned=False) -> bytes:
    """Random finite f16 values in every row slot j >= counts[l] of layer l (K and V); with
    owned=True, one owned row of layer 1 instead (the negative control)."""
    st = state_blob.parse_seq_state(blob)
    stream = st.only_stream()
    for layer, n_l in enumerate(counts):
        rows = slice(0, 1) if owned else slice(n_l, max(counts))
        if owned and layer != 1:
            continue
        k = stream.k[layer].rows
        k[rows] = rng.standard_normal(k[rows].shape[0] * k.shape[1] // 2).astype(np.float16).view(np.uint8).reshape(k[rows].shape)
        if stream.v_trans:
            v = stream.v[layer].data
            v[:, rows] = rng.standard_normal(v[:, rows].size // 2).astype(np.float16).view(np.uint8).reshape(v[:, rows].shape)
        else:
            v = stream.v[layer].rows
            v[rows] = rng.standard_normal(v[rows].size // 2).astype(np.float16).view(np.uint8).reshape(v[rows].shape)
    return st.to_bytes()


@pytest.mark.parametrize("flash_attn", [True, False])
def test_per_layer_budget_ignores_rows_a_layer_does_not_own(sessions, tiny_model_path, flash_attn):
    rng = np.random.default_rng(4)
    toks, counts, [(a, ca), (b, cb)] = _per_layer_setup(sessions, tiny_model_path, flash_attn, rng)
    layer_counts, slot_of_cell = ca.layer_counts(0)
    np.testing.assert_array_equal(layer_counts, counts)
    np.testing.assert_array_equal(slot_of_cell, np.arange(20))

    # a: unowned rows replaced by noise, reloaded, budgets restored; b: reloaded unchanged
    a.set_blob(_perturb_unowned_rows(a.blob(), counts, ca.n_head_kv, rng))
    ca.set_layer_counts(0, layer_counts, slot_of_cell)
    b.set_blob(b.blob())
    cb.set_layer_counts(0, layer_counts, slot_of_cell)
    # several decodes: the budgets hold for every later token, one at a time and batched
    for i, (tt, pp) in enumerate([([45], [45]), ([46, 47], [46, 47]), ([3], [48])]):
        got = a.decode(toks[tt] if i < 2 else np.array([7]), pp)
        want = b.decode(toks[tt] if i < 2 else np.array([7]), pp)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("flash_attn", [True, False])
def test_per_layer_budget_perturbation_is_seen_without_the_budget(sessions, tiny_model_path, flash_attn):
    """Negative controls: the same noise changes the logits once the budgets are not restored,
    and noise in an owned row always changes them."""
    rng = np.random.default_rng(4)
    toks, counts, [(a, ca), (b, cb)] = _per_layer_setup(sessions, tiny_model_path, flash_attn, rng)
    layer_counts, slot_of_cell = ca.layer_counts(0)
    a.set_blob(_perturb_unowned_rows(a.blob(), counts, ca.n_head_kv, rng))  # budgets not restored
    assert (ca.layer_counts(0)[0] == -1).all()
    b.set_blob(_perturb_unowned_rows(b.blob(), counts, cb.n_head_kv, rng, owned=True))
    cb.set_layer_counts(0, layer_counts, slot_of_cell)
    ref_s, ref_c = _per_layer_setup(sessions, tiny_model_path, flash_attn, np.random.default_rng(4))[2][0]
    want = ref_s.decode(toks[45:46], [45])
    assert not np.array_equal(a.decode(toks[45:46], [45]), want)
    assert not np.array_equal(b.decode(toks[45:46], [45]), want)


def test_per_layer_budget_survives_seq_rm_and_clear(sessions, tiny_model_path):
    rng = np.random.default_rng(6)
    toks, counts, [(a, ca), (b, cb)] = _per_layer_setup(sessions, tiny_model_path, True, rng)
    a.decode(toks[45:47], [45, 46])
    b.decode(toks[45:47], [45, 46])
    # drop the newest token and decode another one in its place (it may reuse the freed cell)
    assert llama_cpp.llama_memory_seq_rm(a.mem, 0, 46, -1)
    assert llama_cpp.llama_memory_seq_rm(b.mem, 0, 46, -1)
    b.set_blob(_perturb_unowned_rows(b.blob(), counts, cb.n_head_kv, rng))
    cb.set_layer_counts(0, *ca.layer_counts(0))
    np.testing.assert_array_equal(a.decode([9], [46]), b.decode([9], [46]))

    # after clear, nothing of the budgets remains: a fresh prompt gives a fresh context's logits
    llama_cpp.llama_memory_clear(a.mem, True)
    assert (ca.layer_counts(0)[0] == -1).all()
    fresh = sessions(tiny_model_path)
    np.testing.assert_array_equal(a.decode(toks[:30], range(30)), fresh.decode(toks[:30], range(30)))


@pytest.mark.parametrize("flash_attn", [True, False])
def test_saved_state_after_per_layer_compaction_loads_into_fresh_context(sessions, tiny_model_path, flash_attn):
    rng = np.random.default_rng(8)
    toks, counts, [(a, ca), _] = _per_layer_setup(sessions, tiny_model_path, flash_attn, rng)
    saved = state.save_seq(ca, 0)
    fresh = sessions(tiny_model_path, flash_attn=flash_attn)
    cf = Compactor(fresh.ctx)
    fresh.decode(toks[:5], range(5), [0] * 5)  # something in the way: the state lands elsewhere
    llama_cpp.llama_memory_seq_rm(fresh.mem, 0, -1, -1)
    state.load_seq(cf, saved, 0)
    np.testing.assert_array_equal(cf.layer_counts(0)[0], counts)
    np.testing.assert_array_equal(cf.table(0).positions, ca.table(0).positions)
    np.testing.assert_array_equal(cf.table(0).slot_cells, cf.seq_cells(0).cells[:20])
    for t, p in [(45, 45), (46, 46)]:
        np.testing.assert_array_equal(fresh.decode(toks[t : t + 1], [p]), a.decode(toks[t : t + 1], [p]))


def test_corrupted_state_container_is_refused_before_loading(sessions, tiny_model_path):
    rng = np.random.default_rng(8)
    toks, counts, [(a, ca), (b, cb)] = _per_layer_setup(sessions, tiny_model_path, True, rng)
    saved = bytearray(state.save_seq(ca, 0))
    before = b.blob()
    saved[len(saved) // 2] ^= 1
    with pytest.raises(state.StateFormatError, match="checksum"):
        state.load_seq(cb, bytes(saved), 0)
    with pytest.raises(state.StateFormatError):
        state.load_seq(cb, b"nonsense" * 10, 0)
    assert b.blob() == before


# --- bad input -----------------------------------------------------------------------


def _call(c: Compactor, seq_id, counts, cells, slot_positions, offsets=None):
    counts = np.ascontiguousarray(counts, dtype=np.int32)
    cells = np.ascontiguousarray(cells, dtype=np.int32)
    slot_positions = np.ascontiguousarray(slot_positions, dtype=np.int32)
    p = ctypes.POINTER(ctypes.c_int32)
    off = None if offsets is None else np.ascontiguousarray(offsets, dtype=np.int32).ctypes.data_as(p)
    return c._lib.llama_kvcompose_compact_seq(
        c._ctx, seq_id, c.n_layer, c.n_head_kv, cells.shape[2],
        counts.ctypes.data_as(p), cells.ctypes.data_as(p), slot_positions.ctypes.data_as(p), off, None,
    )


def test_bad_input_gets_its_status_and_leaves_the_cache_untouched(sessions, tiny_model_path):
    rng = np.random.default_rng(10)
    s = sessions(tiny_model_path, n_seq_max=2)
    s.decode(prompt(rng, 40), np.tile(np.arange(20), 2), np.repeat([0, 1], 20))
    c = Compactor(s.ctx)
    seq0, seq1 = c.seq_cells(0), c.seq_cells(1)
    good = random_selection(rng, seq0.cells, seq0.positions, c.n_layer, c.n_head_kv, [8, 6, 8, 5])
    before = (s.blob(0), s.blob(1))

    def variant(**changes):
        v = SimpleNamespace(**{k: np.array(getattr(good, k)) for k in ("counts", "cells", "slot_positions")})
        for k, f in changes.items():
            f(getattr(v, k))
        return v

    dup = variant(cells=lambda a: a.__setitem__((1, 0, 1), a[1, 0, 0]))
    other_seq = variant(cells=lambda a: a.__setitem__((0, 1, 0), seq1.cells[0]))
    out_of_range = variant(cells=lambda a: a.__setitem__((2, 0, 0), 10_000))
    tail_not_empty = variant(cells=lambda a: a.__setitem__((1, 0, 7), seq0.cells[0]))
    zero_count = variant(counts=lambda a: a.__setitem__(3, 0))
    max_pos_moved = variant(slot_positions=lambda a: a.__setitem__(a == a.max(), 5))
    negative_pos = variant(slot_positions=lambda a: a.__setitem__(0, -3))
    cases = [
        (dup, 0, native.ERR_DUPLICATE),
        (other_seq, 0, native.ERR_SEQUENCE),
        (out_of_range, 0, native.ERR_RANGE),
        (tail_not_empty, 0, native.ERR_RANGE),
        (zero_count, 0, native.ERR_RANGE),
        (max_pos_moved, 0, native.ERR_RANGE),
        (negative_pos, 0, native.ERR_RANGE),
        (good, 7, native.ERR_ARGUMENT),  # seq_id beyond n_seq_max
    ]
    for v, seq_id, status in cases:
        assert _call(c, seq_id, v.counts, v.cells, v.slot_positions) == status
    assert _call(c, 0, good.counts, good.cells, good.slot_positions, offsets=np.zeros(4)) == native.ERR_ARGUMENT
    with pytest.raises(native.NativeError, match="duplicate"):
        c.apply(SimpleNamespace(counts=dup.counts, cells=dup.cells, slot_positions=dup.slot_positions, kept_positions=good.kept_positions))
    with pytest.raises(ValueError, match="simulated"):
        c.apply(SimpleNamespace(**vars(good) | {"simulated": True}))
    with pytest.raises(ValueError, match="cells must be"):
        c.apply(SimpleNamespace(**vars(good) | {"cells": good.cells[:, :1]}))
    assert (s.blob(0), s.blob(1)) == before
    assert c.table(0) is None


def test_compaction_accepts_a_policies_selection(sessions, tiny_model_path):
    base = pytest.importorskip("kvcompose_gguf.policies.base")
    rng = np.random.default_rng(12)
    s = sessions(tiny_model_path)
    s.decode(prompt(rng, 30), range(30))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    r = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [10] * c.n_layer)
    sel = base.Selection(counts=r.counts, cells=r.cells, slot_positions=r.slot_positions, kept_positions=r.kept_positions)
    assert c.apply(sel).cells_after == 10


def test_freed_cells_take_new_tokens_at_once(sessions, tiny_model_path):
    """A 256-cell cache holding 200 tokens compacted to 40 takes 150 more in one batch."""
    rng = np.random.default_rng(13)
    s = sessions(tiny_model_path)
    s.decode(prompt(rng, 200), range(200))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    c.apply(random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [40] * c.n_layer))
    assert llama_cpp.llama_memory_seq_pos_max(s.mem, 0) == 199
    s.decode(prompt(rng, 150), range(200, 350))
    after = c.seq_cells(0)
    assert len(after.cells) == 190 and after.positions.max() == 349
    np.testing.assert_array_equal(np.sort(after.positions[40:]), np.arange(200, 350))


def test_random_selections_never_corrupt_other_sequences_and_rejections_change_nothing(sessions, tiny_model_path):
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    s = sessions(tiny_model_path, n_seq_max=2)
    c = Compactor(s.ctx)
    toks = prompt(np.random.default_rng(14), 48)
    mutations = ["none", "duplicate", "foreign_cell", "out_of_range", "tail", "count_zero", "count_high", "max_pos"]

    @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
    @hypothesis.given(
        seed=st.integers(0, 2**32 - 1),
        target=st.integers(0, 1),
        mutation=st.sampled_from(mutations),
    )
    def check(seed, target, mutation):
        rng = np.random.default_rng(seed)
        llama_cpp.llama_memory_clear(s.mem, True)
        order = rng.permutation(48)  # interleave the two sequences' cells at random
        seq_of = (np.arange(48) % 2)[order]
        pos = np.zeros(48, dtype=int)
        for q in (0, 1):
            pos[seq_of == q] = np.arange(24)
        s.decode(toks, pos, seq_of)
        seq = c.seq_cells(target)
        other = c.seq_cells(1 - target)
        counts = rng.integers(1, 25, c.n_layer)
        sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
        n_slots = sel.cells.shape[2]
        layer, h = int(rng.integers(c.n_layer)), int(rng.integers(c.n_head_kv))
        n_l = int(sel.counts[layer])
        expect = {
            "none": native.OK,
            "duplicate": native.ERR_DUPLICATE if n_l > 1 else native.OK,
            "foreign_cell": native.ERR_SEQUENCE,
            "out_of_range": native.ERR_RANGE,
            "tail": native.ERR_RANGE if n_l < n_slots else native.OK,
            "count_zero": native.ERR_RANGE,
            "count_high": native.ERR_RANGE,
            "max_pos": native.ERR_RANGE,
        }[mutation]
        if mutation == "duplicate" and n_l > 1:
            sel.cells[layer, h, 1] = sel.cells[layer, h, 0]
        elif mutation == "foreign_cell":
            sel.cells[layer, h, int(rng.integers(n_l))] = other.cells[int(rng.integers(len(other.cells)))]
        elif mutation == "out_of_range":
            sel.cells[layer, h, int(rng.integers(n_l))] = int(rng.choice([-5, 256, 10**6]))
        elif mutation == "tail" and n_l < n_slots:
            sel.cells[layer, h, n_slots - 1] = seq.cells[0]
        elif mutation == "count_zero":
            sel.counts[layer] = 0
        elif mutation == "count_high":
            sel.counts[layer] = n_slots + 1
        elif mutation == "max_pos":
            sel.slot_positions[sel.slot_positions == sel.slot_positions.max()] = 0
        before = (s.blob(target), s.blob(1 - target))
        status = _call(c, target, sel.counts, sel.cells, sel.slot_positions)
        assert status == expect
        assert s.blob(1 - target) == before[1]
        if status != native.OK:
            assert s.blob(target) == before[0]
            return
        expected, known = expected_blob(before[0], sel, seq.cells, c.seq_cells(target).cells, c.n_head_kv)
        got = state_blob.parse_seq_state(s.blob(target)).only_stream()
        np.testing.assert_array_equal(got.positions, sel.slot_positions)
        for lay in range(c.n_layer):
            np.testing.assert_array_equal(got.k[lay].rows[known[lay]], expected.only_stream().k[lay].rows[known[lay]])
        s.decode([5], [24], [target])  # and the cache still decodes

    check()


def test_original_positions_follow_slots_and_later_tokens(sessions, tiny_model_path):
    rng = np.random.default_rng(15)
    s = sessions(tiny_model_path)
    s.decode(prompt(rng, 30), range(30))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [12, 8, 12, 10])
    c.apply(sel, cell_tokens=np.arange(256) + 1000)
    s.decode([7, 8], [30, 31])
    cells, positions = c.original_positions(0)
    assert len(cells) == 14
    np.testing.assert_array_equal(positions[:, :, :12], sel.kept_positions)
    np.testing.assert_array_equal(positions[:, :, 12:], np.broadcast_to([30, 31], (c.n_layer, c.n_head_kv, 2)))
    owned = sel.cells >= 0
    np.testing.assert_array_equal(c.table(0).tokens[owned], sel.cells[owned] + 1000)


@pytest.mark.parametrize("flash_attn,type_k,type_v", [(True, Q4_0, Q4_0), (False, F16, F16), (True, BF16, BF16)])
def test_heads_keeping_the_same_cells_move_whole_rows_byte_exactly(sessions, tiny_model_path, flash_attn, type_k, type_v):
    """Layers whose heads agree take the whole-row path; the blob must still be the numpy rearrangement."""
    rng = np.random.default_rng(16)
    s = sessions(tiny_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v, n_seq_max=2)
    s.decode(prompt(rng, 60), np.repeat(np.arange(30), 2), np.tile([0, 1], 30))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    before = (s.blob(0), s.blob(1))
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [11, 7, 11, 4])
    sel.cells[:, 1:] = sel.cells[:, :1]  # every head of a layer keeps the first head's cells
    sel.kept_positions[:, 1:] = sel.kept_positions[:, :1]
    sel.cells[2, 1] = random_selection(rng, seq.cells, seq.positions, 1, 1, [11]).cells[0, 0]  # layer 2 disagrees
    result = c.apply(sel)
    expected, known = expected_blob(before[0], sel, seq.cells, result.slot_cells, c.n_head_kv)
    got = state_blob.parse_seq_state(s.blob(0)).only_stream()
    assert_known_rows_equal(got, expected.only_stream(), known)
    assert s.blob(1) == before[1]


def _filled_with_noise(s, n_cells: int, rng) -> bytes:
    """Load n_cells cells of random bytes for seq 0 (positions 0..n-1) through a state blob: a
    cache large enough for the move to split into several chunks without a long prefill."""
    s.decode(prompt(rng, 1), [0])
    old = state_blob.parse_seq_state(s.blob()).only_stream()

    def noise(shape):
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    def finite_f16(shape):
        # a transposed V passes through F32 on its way (get_rows), which keeps every finite
        # f16 value, subnormals included, but not a NaN's payload
        bits = rng.integers(0, 1 << 16, size=shape[:-1] + (shape[-1] // 2,), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF
        return bits.view(np.uint8)

    k = [state_blob.LayerRows(layer.type, noise((n_cells, layer.rows.shape[1]))) for layer in old.k]
    if old.v_trans:
        v = [state_blob.LayerColumns(layer.type, finite_f16((layer.data.shape[0], n_cells, layer.data.shape[2]))) for layer in old.v]
    else:
        v = [state_blob.LayerRows(layer.type, noise((n_cells, layer.rows.shape[1]))) for layer in old.v]
    stream = state_blob.StreamState(np.arange(n_cells, dtype=np.int32), [[0]] * n_cells, None, old.v_trans, k, v)
    blob = state_blob.SeqState(0, [stream]).to_bytes()
    llama_cpp.llama_memory_clear(s.mem, True)
    s.set_blob(blob)
    return blob


@pytest.mark.parametrize("flash_attn,type_k,type_v", [(True, F16, F16), (True, Q4_0, Q8_0), (False, F16, F16)])
@pytest.mark.parametrize("layout", ["ascending", "shuffled", "agreeing-with-prefix"])
def test_large_cache_moves_in_chunks_byte_exactly(sessions, tiny_model_path, flash_attn, type_k, type_v, layout):
    """4096 cells of 256-byte K rows: the in-place move splits into chunks when every head's
    cells ascend with the slots (gathering the late slots of sparsely kept layers straight from
    the cache), stages one span when they do not (shuffled slot order), and moves whole rows
    after an in-place prefix when the heads agree."""
    rng = np.random.default_rng(23)
    s = sessions(tiny_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v, n_ctx=4096, n_ubatch=64)
    before = _filled_with_noise(s, 4096, rng)
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    assert len(seq.cells) == 4096
    counts = [1500, 1100, 1500, 700]
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
    if layout == "shuffled":
        for layer, n in enumerate(counts):
            order = rng.permutation(n)
            sel.cells[layer, :, :n] = sel.cells[layer, :, order].T
            sel.kept_positions[layer, :, :n] = sel.kept_positions[layer, :, order].T
    elif layout == "agreeing-with-prefix":
        sel.cells[:, 1:] = sel.cells[:, :1]
        sel.cells[:, :, :64] = np.arange(64)  # the first 64 slots already sit in their cells
        sel.kept_positions[:] = sel.cells
    sel.slot_positions = sel.kept_positions.max(axis=(0, 1)).astype(np.int32)

    with recorded_move_forms() as forms:
        result = c.apply(sel)

    # a cache in the CPU backend's memory takes the staged in-place form (the fast one; the
    # other form gives the same bytes, so only the log tells them apart); device memory the other
    n_row_tensors = c.n_layer * (2 if flash_attn else 1)
    (f,) = forms
    transposed_v = 0 if flash_attn else c.n_layer
    if kv_in_device_memory():
        assert (f.in_place, f.through_temporary, f.staged, f.transposed_v) == (0, n_row_tensors, 0, transposed_v)
    else:
        assert (f.in_place, f.through_temporary, f.transposed_v) == (n_row_tensors, 0, transposed_v)
        if layout == "shuffled":
            # a staged chunk could read a cell an earlier one wrote: one staged span per tensor
            # (a direct chunk is still possible where the last slots' sources all lie behind them)
            assert f.chunks - f.direct_chunks == f.in_place
        elif flash_attn:
            # 1 MiB of K rows: more than one ~512 KiB chunk (a transposed V takes one span for both)
            assert f.chunks > f.in_place
            # layers 1 and 3 keep under a third of the cells: their late slots gather straight
            # from the cache; layers 0 and 2 (37 %) only from staged copies
            assert f.direct_chunks >= 4
        else:
            assert f.direct_chunks == 0
    np.testing.assert_array_equal(result.slot_cells, np.arange(1500))
    expected, known = expected_blob(before, sel, seq.cells, result.slot_cells, c.n_head_kv)
    got = state_blob.parse_seq_state(s.blob()).only_stream()
    want = expected.only_stream()
    assert_known_rows_equal(got, want, known)


@pytest.mark.parametrize("flash_attn,type_k,type_v", [(True, F16, F16), (True, Q4_0, Q8_0)])
@pytest.mark.parametrize("last_source_behind", [False, True])
def test_direct_gathers_next_to_rows_already_in_place_are_byte_exact(sessions, tiny_model_path, flash_attn, type_k, type_v,
                                                                    last_source_behind):
    """The edge cases of gathering straight from the cache: head 0 keeps the first cells, so
    its rows are already their own destinations inside chunks that other heads fill from far
    behind; head 1 keeps every fourth cell, so a chunk of slots [a, b) reads cell b itself,
    the first cell it does not write (b = 512 reads 512..2044, b = 128 reads 128..508).
    last_source_behind: head 1's last slot reads cell 510, which slot 510 overwrites first
    (only a staged copy still holds it)."""
    rng = np.random.default_rng(31)
    n_cells, n_keep = 2048, 512
    s = sessions(tiny_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v, n_ctx=n_cells, n_ubatch=64)
    before = _filled_with_noise(s, n_cells, rng)
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    counts = np.full(c.n_layer, n_keep, dtype=np.int32)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
    sel.cells[:, 0] = np.arange(n_keep - 1).tolist() + [n_cells - 1]
    sel.cells[:, 1] = np.arange(0, n_cells, 4)
    if last_source_behind:
        sel.cells[:, 1, -1] = 510
    sel.kept_positions[:] = sel.cells
    sel.slot_positions = sel.kept_positions.max(axis=(0, 1)).astype(np.int32)

    with recorded_move_forms() as forms:
        result = c.apply(sel)

    (f,) = forms
    if not kv_in_device_memory() and not last_source_behind:
        assert f.direct_chunks > 0
    expected, known = expected_blob(before, sel, seq.cells, result.slot_cells, c.n_head_kv)
    assert_known_rows_equal(state_blob.parse_seq_state(s.blob()).only_stream(), expected.only_stream(), known)


@pytest.mark.parametrize("seed", range(12))
def test_random_mixes_of_sparse_and_dense_layers_move_byte_exactly(sessions, tiny_model_path, seed):
    """Random caches (512-2048 cells) and per-layer counts (4-50 % kept), so that direct and
    staged chunks mix within and across layers; some seeds give head 0 a dense prefix of rows
    already in place, others give a late slot of head 1 a cell up to 32 cells behind its
    destination, which an earlier slot of a direct chunk would have overwritten."""
    rng = np.random.default_rng(1000 + seed)
    n_cells = int(rng.choice([512, 1024, 2048]))
    flash_attn, type_k, type_v = [(True, F16, F16), (True, Q4_0, Q8_0)][seed % 2]
    s = sessions(tiny_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v, n_ctx=n_cells, n_ubatch=64)
    before = _filled_with_noise(s, n_cells, rng)
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    counts = rng.integers(max(2, n_cells // 25), n_cells // 2, c.n_layer)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
    for layer, k in enumerate(counts.tolist()):
        if seed % 3 == 0:
            prefix = int(rng.integers(1, k))
            rest = rng.choice(np.arange(prefix, n_cells - 1), k - prefix - 1, replace=False)
            sel.cells[layer, 0, :k] = np.sort(np.concatenate([np.arange(prefix), rest, [n_cells - 1]]))
        if seed % 4 == 1:
            j = int(rng.integers(k // 2, k - 1))
            free = np.setdiff1d(np.arange(max(0, j - 32), j), sel.cells[layer, 1, :k])
            sel.cells[layer, 1, j] = rng.choice(free)
    sel.kept_positions[:] = sel.cells  # cell c holds position c
    sel.slot_positions = sel.kept_positions.max(axis=(0, 1)).astype(np.int32)

    with recorded_move_forms() as forms:
        result = c.apply(sel)

    if not kv_in_device_memory():
        assert forms[-1].direct_chunks > 0
    expected, known = expected_blob(before, sel, seq.cells, result.slot_cells, c.n_head_kv)
    assert_known_rows_equal(state_blob.parse_seq_state(s.blob()).only_stream(), expected.only_stream(), known)


def test_a_second_compaction_cannot_give_a_layer_rows_it_does_not_own(sessions, tiny_model_path):
    rng = np.random.default_rng(17)
    s = sessions(tiny_model_path)
    s.decode(prompt(rng, 30), range(30))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    c.apply(random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [12, 4, 12, 12]))
    s.decode([5], [30])
    seq = c.seq_cells(0)
    before = s.blob()
    # layer 1 owns slots 0..3 only: the cell of slot 6 holds no row of layer 1
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [8] * c.n_layer)
    sel.cells[1, 0, 0] = seq.cells[6]
    assert _call(c, 0, sel.counts, sel.cells, sel.slot_positions) == native.ERR_SEQUENCE
    assert s.blob() == before
    # a selection that respects ownership (layer 1 from slots 0..3 and the new token) is accepted
    ok = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [8, 5, 8, 8])
    ok.cells[1, :, :5] = seq.cells[[0, 1, 2, 3, 12]]
    ok.slot_positions = np.maximum.reduce([np.where(ok.cells[l] >= 0, seq.positions[np.searchsorted(seq.cells, ok.cells[l])], -1).max(axis=0) for l in range(c.n_layer)]).astype(np.int32)
    assert _call(c, 0, ok.counts, ok.cells, ok.slot_positions) == native.OK


def test_cells_shared_with_a_copied_sequence_stay_with_the_copy(sessions, tiny_model_path):
    """After seq_cp every cell is shared: seq 0 compacts into free cells and seq 1 keeps all its rows."""
    rng = np.random.default_rng(18)
    s = sessions(tiny_model_path, n_seq_max=2)
    s.decode(prompt(rng, 30), range(30))
    llama_cpp.llama_memory_seq_cp(s.mem, 0, 1, -1, -1)
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    before0, before1 = s.blob(0), s.blob(1)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [10, 6, 10, 3])
    result = c.apply(sel)
    np.testing.assert_array_equal(result.slot_cells, np.arange(30, 40))  # the shared cells are not written
    assert result.physical_bytes_freed == -10 * c.cell_bytes()  # nothing freed, ten cells taken
    assert result.logical_entries_dropped == c.n_head_kv * (4 * 30 - 29)
    assert s.blob(1) == before1
    expected, known = expected_blob(before0, sel, seq.cells, result.slot_cells, c.n_head_kv)
    got = state_blob.parse_seq_state(s.blob(0)).only_stream()
    assert not got.v_trans
    assert_known_rows_equal(got, expected.only_stream(), known)


def test_pending_k_shift_is_refused_until_a_decode_applies_it(sessions, tiny_model_path):
    rng = np.random.default_rng(19)
    s = sessions(tiny_model_path)
    s.decode(prompt(rng, 20), range(20))
    c = Compactor(s.ctx)
    llama_cpp.llama_memory_seq_add(s.mem, 0, 0, -1, 3)  # positions 3..22, the K-shift runs at the next decode
    seq = c.seq_cells(0)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [8] * c.n_layer)
    with pytest.raises(native.NativeError) as err:
        c.apply(sel)
    assert err.value.status == native.ERR_STATE
    s.decode([4], [23])
    seq = c.seq_cells(0)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, [8] * c.n_layer)
    assert c.apply(sel).cells_after == 8


@pytest.mark.model
@pytest.mark.parametrize("flash_attn,type_k,type_v", [(True, F16, F16), (False, F16, F16), (True, Q8_0, Q4_0)])
def test_default_model_compaction_is_byte_exact_and_keeps_identity_logits(sessions, default_model_path, flash_attn, type_k, type_v):
    rng = np.random.default_rng(20)
    toks = rng.integers(100, 5000, 97)
    s = sessions(default_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v)
    s.decode(toks[:96], range(96))
    c = Compactor(s.ctx)
    seq = c.seq_cells(0)
    before = s.blob()
    counts = rng.integers(20, 50, c.n_layer)
    sel = random_selection(rng, seq.cells, seq.positions, c.n_layer, c.n_head_kv, counts)
    result = c.apply(sel)
    expected, known = expected_blob(before, sel, seq.cells, result.slot_cells, c.n_head_kv)
    got = state_blob.parse_seq_state(s.blob()).only_stream()
    assert_known_rows_equal(got, expected.only_stream(), known)

    ref = sessions(default_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v)
    ref.decode(toks[:96], range(96))
    want = ref.decode(toks[96:], [96])
    s2 = sessions(default_model_path, flash_attn=flash_attn, type_k=type_k, type_v=type_v)
    s2.decode(toks[:96], range(96))
    Compactor(s2.ctx).apply(_identity(Compactor(s2.ctx)))
    np.testing.assert_array_equal(s2.decode(toks[96:], [96]), want)
