"""Selection policies: budgets, protection, caps, layout and tie-break, checked against numpy references.

The reference behaviour of each method (kvpress) is pinned in
tests/test_policies_kvpress.py; here: the shared mechanics, on random
layouts including compacted ones (cells out of position order, empty cells).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompose_gguf.policies import (
    POLICIES,
    KVCompose,
    Observation,
    Selection,
    SnapKV,
    get_policy,
    protect_positions,
)
from kvcompose_gguf.policies.base import threshold_allocation
from kvcompose_gguf.policies.snapkv import pool_by_position

# Policies that keep max(1, int(T_l * b)) in every layer (PyramidKV's budgets are pinned against kvpress).
UNIFORM = ["kvcompose-uniform", "streaming", "snapkv", "tova", "h2o", "random"]


def _policy(name: str):
    kwargs = {"snapkv": {"window_size": 3}, "pyramidkv": {"window_size": 3, "beta": 2}, "random": {"seed": 0}}
    return get_policy(name, **kwargs.get(name, {}))


def _observation(seed: int, n_layer: int, n_head: int, n_cells: int, *, compacted: bool) -> Observation:
    """Random scores; fresh layout (cell i holds position i) or a compacted one.

    Compacted: layer l holds T_l <= n_cells tokens per head, each head its own
    subset of the positions (always including the newest), scattered over
    random cells, the other cells empty.
    """
    rng = np.random.default_rng(seed)
    scores = rng.random((n_layer, n_head, n_cells), dtype=np.float32)
    if not compacted:
        positions = np.broadcast_to(np.arange(n_cells, dtype=np.int32), scores.shape).copy()
        return Observation(scores=scores, positions=positions, value_norms=rng.random(scores.shape, np.float32))
    n_positions = n_cells + int(rng.integers(0, 3 * n_cells))
    positions = np.full(scores.shape, -1, dtype=np.int32)
    for layer in range(n_layer):
        n_tokens = int(rng.integers(1, n_cells + 1))
        for head in range(n_head):
            older = rng.choice(n_positions - 1, size=n_tokens - 1, replace=False)
            held = np.append(older, n_positions - 1)
            positions[layer, head, rng.choice(n_cells, size=n_tokens, replace=False)] = held
    return Observation(scores=scores, positions=positions, value_norms=rng.random(scores.shape, np.float32))


observations = st.builds(
    _observation,
    seed=st.integers(0, 2**32 - 1),
    n_layer=st.integers(1, 5),
    n_head=st.integers(1, 4),
    n_cells=st.integers(2, 40),
    compacted=st.booleans(),
)


def _tokens_per_layer(obs: Observation) -> np.ndarray:
    return (obs.positions >= 0).sum(axis=-1).min(axis=1)


def _check_layout(obs: Observation, selection: Selection) -> None:
    """The selection is well formed and only references occupied cells, with their true positions."""
    n_cells = obs.positions.shape[-1]
    selection.validate(n_cells)
    used = selection.cells >= 0
    layer, head, _ = np.nonzero(used)
    held = obs.positions[layer, head, selection.cells[used]]
    assert (held >= 0).all()
    np.testing.assert_array_equal(held, selection.kept_positions[used])
    newest = obs.positions.max()
    assert ((selection.kept_positions == newest).sum(axis=-1) == 1).all()


# --------------------------------------------------------------------------- budgets


@settings(max_examples=60, deadline=None)
@given(obs=observations, fraction=st.floats(0.01, 1.0), name=st.sampled_from(sorted(POLICIES)))
def test_every_policy_returns_a_valid_selection_of_occupied_cells(obs, fraction, name):
    selection = _policy(name).select(obs, fraction)
    _check_layout(obs, selection)
    assert not selection.simulated


@settings(max_examples=60, deadline=None)
@given(obs=observations, fraction=st.floats(0.01, 1.0))
def test_kvcompose_keeps_the_global_budget_up_to_the_floor_of_one(obs, fraction):
    selection = KVCompose().select(obs, fraction)
    _check_layout(obs, selection)
    n_total = max(1, int(int(_tokens_per_layer(obs).sum()) * fraction))
    excess = int(selection.counts.sum()) - n_total
    # A layer that the global top-N left empty is raised to one slot; nothing else exceeds the budget.
    assert 0 <= excess <= int((selection.counts == 1).sum())


@settings(max_examples=60, deadline=None)
@given(obs=observations, fraction=st.floats(0.01, 1.0), name=st.sampled_from(UNIFORM))
def test_uniform_policies_keep_the_same_fraction_in_every_layer(obs, fraction, name):
    selection = _policy(name).select(obs, fraction)
    expected = [max(1, int(int(t) * fraction)) for t in _tokens_per_layer(obs)]
    np.testing.assert_array_equal(selection.counts, expected)


@settings(max_examples=40, deadline=None)
@given(obs=observations, data=st.data())
def test_an_int_budget_keeps_that_many_cells_per_layer(obs, data):
    n_used = int((obs.positions >= 0).any(axis=(0, 1)).sum())
    k = data.draw(st.integers(1, n_used))
    tokens = _tokens_per_layer(obs)
    uniform = _policy("kvcompose-uniform").select(obs, k)
    np.testing.assert_array_equal(uniform.counts, np.minimum(k, tokens))
    glob = KVCompose().select(obs, k)
    excess = int(glob.counts.sum()) - int(np.minimum(k, tokens).sum())
    assert 0 <= excess <= int((glob.counts == 1).sum())


@pytest.mark.parametrize(
    ("budget", "error"),
    [
        (0.0, ValueError),
        (-0.5, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (0, ValueError),
        (-3, ValueError),
        (21, ValueError),  # more cells than the sequence occupies
        ("0.5", TypeError),
        (None, TypeError),
        (True, TypeError),
        ([0.5], TypeError),
    ],
)
def test_a_bad_budget_raises_a_clear_error(budget, error):
    obs = _observation(0, 2, 2, 20, compacted=False)
    with pytest.raises(error, match="kv_budget"):
        KVCompose().select(obs, budget)


def test_numpy_scalars_are_accepted_as_budgets():
    obs = _observation(0, 2, 2, 20, compacted=False)
    assert KVCompose().select(obs, np.float32(0.5)).counts.sum() == 20
    np.testing.assert_array_equal(KVCompose().select(obs, np.int64(7), layer_caps=7).counts, [7, 7])


# --------------------------------------------------------------------------- protection


@settings(max_examples=60, deadline=None)
@given(obs=observations, fraction=st.floats(0.05, 1.0), name=st.sampled_from(sorted(POLICIES)), data=st.data())
def test_protected_positions_survive_every_policy(obs, fraction, name, data):
    newest = int(obs.positions.max())
    start = data.draw(st.integers(0, newest))
    span = (start, start + data.draw(st.integers(0, 6)))
    protected = protect_positions(obs, [span])
    reserve = protected.sum(axis=-1).max(axis=1)
    try:
        selection = _policy(name).select(obs, fraction, protected=protected)
    except ValueError as exc:
        # Only when the protected cells alone exceed the budget.
        assert "protected" in str(exc)
        return
    _check_layout(obs, selection)
    for layer, head in np.ndindex(*obs.positions.shape[:2]):
        held = obs.positions[layer, head]
        wanted = held[(held >= span[0]) & (held < span[1])]
        assert set(wanted.tolist()) <= set(selection.kept_positions[layer, head].tolist())
    assert (selection.counts >= reserve).all()


def test_protection_too_large_for_the_budget_is_refused():
    obs = _observation(1, 3, 2, 30, compacted=False)
    with pytest.raises(ValueError, match="protected cells need"):
        KVCompose().select(obs, 0.1, protected=protect_positions(obs, [(0, 20)]))


def test_protected_mask_broadcasts_over_layers_and_heads():
    obs = _observation(2, 3, 2, 30, compacted=False)
    mask = np.zeros(30, dtype=bool)
    mask[[0, 1, 2]] = True
    selection = KVCompose().select(obs, 0.3, protected=mask)
    assert (selection.kept_positions[:, :, :3] == [0, 1, 2]).all()
    with pytest.raises(ValueError, match="broadcast"):
        KVCompose().select(obs, 0.3, protected=np.zeros(7, dtype=bool))
    with pytest.raises(TypeError, match="bool"):
        KVCompose().select(obs, 0.3, protected=np.zeros(30, dtype=np.int8))


def test_the_newest_token_is_kept_even_when_it_scores_lowest():
    obs = _observation(3, 4, 2, 24, compacted=False)
    scores = obs.scores.copy()
    scores[..., -1] = 0.0
    selection = KVCompose().select(Observation(scores=scores, positions=obs.positions), 0.2)
    assert (selection.kept_positions[np.arange(4)[:, None], :, selection.counts[:, None] - 1] == 23).all()


# --------------------------------------------------------------------------- caps


@settings(max_examples=60, deadline=None)
@given(obs=observations, fraction=st.floats(0.05, 1.0), data=st.data())
def test_layer_caps_bound_counts_and_redistribute_the_rest(obs, fraction, data):
    n_layer = obs.positions.shape[0]
    tokens = _tokens_per_layer(obs)
    caps = np.array([data.draw(st.integers(1, int(t))) for t in tokens])
    n_total = max(1, int(int(tokens.sum()) * fraction))
    if n_total > caps.sum():
        with pytest.raises(ValueError, match="caps"):
            KVCompose().select(obs, fraction, layer_caps=caps)
        return
    selection = KVCompose().select(obs, fraction, layer_caps=caps)
    _check_layout(obs, selection)
    assert (selection.counts <= caps).all()
    excess = int(selection.counts.sum()) - n_total
    assert 0 <= excess <= int((selection.counts == 1).sum())
    single = int(caps.min())
    if n_total <= n_layer * single:
        shared = KVCompose().select(obs, fraction, layer_caps=single)
        assert shared.cells_needed() <= single


@settings(max_examples=60, deadline=None)
@given(obs=observations, fraction=st.floats(0.05, 1.0), name=st.sampled_from(sorted(set(POLICIES) - {"random"})),
       data=st.data())
def test_fill_keeps_each_layers_next_best_tokens_up_to_the_widest_layer(obs, fraction, name, data):
    """Reference: the unfilled selection's counts, then per head the protected cells and the
    top-k of the policy's own scores in numpy (ties by position), k = min(widest, tokens, cap)."""
    policy = _policy(name)
    tokens = _tokens_per_layer(obs)
    caps = np.array([data.draw(st.integers(1, int(t))) for t in tokens])
    try:
        plain = policy.select(obs, fraction, layer_caps=caps)
    except ValueError:  # the caps cannot hold this budget: not what is tested here
        return
    filled = policy.select(obs, fraction, layer_caps=caps, fill=True)
    _check_layout(obs, filled)
    want = np.minimum(plain.counts.max(), np.minimum(tokens, caps))
    np.testing.assert_array_equal(filled.counts, np.maximum(plain.counts, want))
    assert filled.cells_needed() == plain.cells_needed()  # no more cells than the allocation takes
    scores = policy.score(obs)
    newest = obs.positions.max()
    for layer in range(obs.positions.shape[0]):
        for head in range(obs.positions.shape[1]):
            held = np.flatnonzero(obs.positions[layer, head] >= 0)
            pos = obs.positions[layer, head, held]
            key = np.where(pos == newest, np.inf, scores[layer, head, held])
            order = np.lexsort((held, pos, -key))  # best first; ties: lower position, then lower cell
            expected = np.sort(pos[order[: filled.counts[layer]]])
            got = filled.kept_positions[layer, head, : filled.counts[layer]]
            np.testing.assert_array_equal(got, expected)


def test_a_cap_below_a_floor_is_refused():
    obs = _observation(4, 3, 2, 30, compacted=False)
    with pytest.raises(ValueError, match="cap"):
        KVCompose(keep_token_lower_bound=5).select(obs, 0.5, layer_caps=4)
    with pytest.raises(ValueError, match=">= 1"):
        KVCompose().select(obs, 0.1, layer_caps=0)
    with pytest.raises(ValueError, match="one per layer"):
        KVCompose().select(obs, 0.1, layer_caps=np.array([3, 3]))


def _greedy_allocation(rows, n_total, capacity, reserve, floor, caps):
    """Reference: take reserved entries, then the best remaining one at a time (ties: lower row, rank)."""
    entries = []
    for row in range(rows.shape[0]):
        limit = min(capacity[row], caps[row])
        for rank in range(limit):
            reserved = rank < reserve[row]
            entries.append((not reserved, -rows[row, rank], row, rank))
    entries.sort()
    counts = np.zeros(rows.shape[0], dtype=np.int64)
    for _, _, row, _ in entries[:n_total]:
        counts[row] += 1
    return np.maximum(counts, floor)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n_rows=st.integers(1, 6), width=st.integers(1, 12))
def test_threshold_allocation_equals_a_greedy_pick_with_caps_reserves_and_ties(data, n_rows, width):
    values = st.integers(0, 4)  # few distinct values: many ties
    rows = np.array(
        [sorted(data.draw(st.lists(values, min_size=width, max_size=width)), reverse=True) for _ in range(n_rows)],
        dtype=np.float64,
    )
    capacity = np.array([data.draw(st.integers(1, width)) for _ in range(n_rows)])
    caps = np.array([data.draw(st.integers(1, width)) for _ in range(n_rows)])
    limit = np.minimum(capacity, caps)
    reserve = np.array([data.draw(st.integers(0, int(lim))) for lim in limit])
    floor = np.array([data.draw(st.integers(0, int(lim))) for lim in limit])
    n_total = data.draw(st.integers(max(1, int(reserve.sum())), int(limit.sum())))
    got = threshold_allocation(rows, n_total, capacity, reserve=reserve, floor=floor, caps=caps)
    np.testing.assert_array_equal(got, _greedy_allocation(rows, n_total, capacity, reserve, floor, caps))


# --------------------------------------------------------------------------- order and ties


@settings(max_examples=40, deadline=None)
@given(obs=observations, fraction=st.floats(0.05, 1.0), name=st.sampled_from(sorted(POLICIES)), seed=st.integers(0, 99))
def test_selections_do_not_depend_on_where_cells_sit(obs, fraction, name, seed):
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random(obs.positions.shape), axis=-1)

    def shuffle(a):
        return np.take_along_axis(a, order, axis=-1)

    moved = Observation(
        scores=shuffle(obs.scores), positions=shuffle(obs.positions), value_norms=shuffle(obs.value_norms)
    )
    first = _policy(name).select(obs, fraction)
    second = _policy(name).select(moved, fraction)
    if name == "random":
        np.testing.assert_array_equal(first.counts, second.counts)
        return
    np.testing.assert_array_equal(first.kept_positions, second.kept_positions)
    np.testing.assert_array_equal(first.slot_positions, second.slot_positions)


def test_ties_go_to_the_lower_position_then_the_lower_cell():
    positions = np.array([[[5, 1, 3, 0, 4, 2, 9]]], dtype=np.int32)
    scores = np.ones((1, 1, 7), dtype=np.float32)
    selection = KVCompose().select(Observation(scores=scores, positions=positions), 4)
    # Newest (9) is protected; the three lowest positions win the tie.
    np.testing.assert_array_equal(selection.kept_positions[0, 0], [0, 1, 2, 9])
    np.testing.assert_array_equal(selection.cells[0, 0], [3, 1, 5, 6])


def test_global_allocation_ties_go_to_the_lower_layer():
    positions = np.broadcast_to(np.arange(10, dtype=np.int32), (3, 1, 10)).copy()
    scores = np.ones((3, 1, 10), dtype=np.float32)
    selection = KVCompose().select(Observation(scores=scores, positions=positions), 0.5)
    np.testing.assert_array_equal(selection.counts, [10, 5, 1])


def test_slots_follow_original_positions_and_slot_positions_are_their_maximum():
    obs = _observation(5, 3, 2, 16, compacted=True)
    selection = KVCompose().select(obs, 0.5)
    used = selection.cells >= 0
    assert all((np.diff(row[row >= 0]) > 0).all() for row in selection.kept_positions.reshape(-1, selection.n_slots))
    expected = np.where(used, selection.kept_positions, -1).max(axis=(0, 1))
    np.testing.assert_array_equal(selection.slot_positions, expected)


# --------------------------------------------------------------------------- method details


def test_kvcompose_unstructured_is_reported_as_simulated():
    obs = _observation(6, 4, 4, 32, compacted=False)
    selection = KVCompose(structured=False).select(obs, 0.3)
    _check_layout(obs, selection)
    assert selection.simulated
    assert selection.logical_entries_kept() == max(1, int(4 * 4 * 32 * 0.3))
    assert (selection.head_counts().max(axis=1) == selection.counts).all()


def test_kvcompose_lower_bound_above_the_tokens_keeps_them_all():
    obs = _observation(14, 3, 2, 20, compacted=False)
    selection = KVCompose(keep_token_lower_bound=50).select(obs, 0.1)
    np.testing.assert_array_equal(selection.counts, [20, 20, 20])


def test_kvcompose_lower_bound_is_a_per_layer_floor():
    obs = _observation(15, 6, 2, 40, compacted=False)
    assert (KVCompose(keep_token_lower_bound=7).select(obs, 0.1).counts >= 7).all()


def test_kvcompose_value_norms_are_required_for_add_v_norm():
    obs = _observation(7, 2, 2, 16, compacted=False)
    with pytest.raises(ValueError, match="value_norms"):
        KVCompose(add_v_norm=True).select(Observation(scores=obs.scores, positions=obs.positions), 0.5)


def test_kvcompose_layer_zero_keeps_the_most():
    obs = _observation(8, 6, 3, 64, compacted=False)
    counts = KVCompose().select(obs, 0.3).counts
    assert counts[0] == counts.max()


def test_snapkv_pooling_follows_original_positions_with_zero_padding():
    rng = np.random.default_rng(9)
    n = 12
    order = rng.permutation(n)
    positions = order.astype(np.int32)[None, None, :]
    values = rng.random((1, 1, n), dtype=np.float32)
    members = positions < 9  # positions 9..11 are the window
    pooled = pool_by_position(values, positions, members, 3)
    by_position = np.zeros(9, dtype=np.float32)
    by_position[positions[members]] = values[members]
    reference = np.convolve(by_position, np.ones(3, dtype=np.float32), mode="same") / 3
    np.testing.assert_allclose(pooled[members], reference[positions[members]], rtol=1e-6)
    assert (pooled[~members] == 0).all()


def test_snapkv_keeps_the_window_first():
    obs = _observation(10, 2, 2, 40, compacted=False)
    selection = SnapKV(window_size=6).select(obs, 0.25)
    assert (selection.kept_positions[:, :, -6:] == np.arange(34, 40)).all()


def test_streaming_keeps_sinks_and_the_most_recent():
    obs = _observation(11, 2, 2, 40, compacted=False)
    selection = get_policy("streaming", n_sink=4).select(obs, 10)
    assert (selection.kept_positions == [0, 1, 2, 3, 34, 35, 36, 37, 38, 39]).all()


# --------------------------------------------------------------------------- validation and registry


def test_observation_errors_are_clear():
    obs = _observation(12, 2, 2, 10, compacted=False)
    missing = obs.positions.copy()
    missing[1, 0, 9] = -1
    with pytest.raises(ValueError, match="newest token"):
        KVCompose().select(Observation(scores=obs.scores, positions=missing), 0.5)
    with pytest.raises(ValueError, match="shape"):
        KVCompose().select(Observation(scores=obs.scores[:, :, :5], positions=obs.positions), 0.5)
    nan = obs.scores.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        KVCompose().select(Observation(scores=nan, positions=obs.positions), 0.5)


def test_selection_validate_rejects_out_of_order_slots():
    obs = _observation(13, 2, 2, 10, compacted=False)
    good = KVCompose().select(obs, 0.5)
    cells = good.cells.copy()
    kept = good.kept_positions.copy()
    cells[0, 0, [0, 1]] = cells[0, 0, [1, 0]]
    kept[0, 0, [0, 1]] = kept[0, 0, [1, 0]]
    bad = Selection(counts=good.counts, cells=cells, slot_positions=good.slot_positions, kept_positions=kept)
    with pytest.raises(ValueError, match="order"):
        bad.validate(10)


def test_get_policy_names_the_known_policies():
    with pytest.raises(ValueError, match="kvcompose.*snapkv|snapkv.*kvcompose"):
        get_policy("nope")
    policy = get_policy("kvcompose", keep_token_lower_bound=2)
    assert get_policy(policy) is policy
    assert get_policy(policy, add_v_norm=True).add_v_norm
    assert get_policy("kvcompose", agg_task="mean").query_reduction == "mean"
    with pytest.raises(ValueError, match="agg_head"):
        get_policy("kvcompose", agg_head="median")
