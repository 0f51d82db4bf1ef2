"""Our policies against kvpress 0.5.5, the authors' reference, on identical attention tensors.

kvpress presses are driven directly (no model): KVComposePress through its
forward hook and `prepare_important_masks`, the scorer presses through
`compress`, with keys that carry their own token index so that the kept
indices can be read back from the gathered keys. Our side gets the same
tensors reduced the way our native observer reduces them (over observing
queries, then mean over the GQA group), in numpy.

Ties: kvpress copies the deepest maximum into layer 0 (exact ties between
layers) and torch's top-k/argsort break ties in no specified order, and the
two implementations may round a sum of float32 values differently. Tokens
whose reference score lies within a relative 1e-5 of the kept/dropped
threshold are therefore left out of the comparison; everything else must be
identical. Our own tie-break (lower position, then lower cell; lower layer in
the global allocation) is pinned by tests/test_policies.py.

The newest token: our selections always keep it, kvpress does not. The
synthetic tensors make it the best token of every head (as a real model's
attention to the last token usually is), so both agree; a separate test pins
the exact deviation when it is not.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

kvpress = pytest.importorskip("kvpress", reason="reference tests need kvpress==0.5.5 (pip install -e .[reference])")
torch = pytest.importorskip("torch", reason="reference tests need torch (CPU) for kvpress")

from kvpress import (  # noqa: E402
    KVComposePress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept  # noqa: E402

from kvcompose_gguf.policies import (  # noqa: E402
    H2O,
    TOVA,
    KVCompose,
    Observation,
    PyramidKV,
    SnapKV,
    StreamingLLM,
)

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
TIE_RTOL = 1e-5

# (n_layer, n_head, n_head_kv, n_tokens): GQA groups of 1, 3 and 4.
SHAPES = [(4, 4, 4, 48), (6, 6, 2, 72), (5, 8, 2, 64), (3, 12, 3, 40)]


def _positions(n_layer: int, n_head_kv: int, n_tokens: int) -> np.ndarray:
    return np.broadcast_to(np.arange(n_tokens, dtype=np.int32), (n_layer, n_head_kv, n_tokens)).copy()


def _group_mean(per_query_head: np.ndarray, n_head_kv: int) -> np.ndarray:
    """[n_layer, n_head, T] -> [n_layer, n_head_kv, T], the observer's GQA reduction."""
    n_layer, n_head, n_tokens = per_query_head.shape
    return per_query_head.reshape(n_layer, n_head_kv, n_head // n_head_kv, n_tokens).mean(axis=2)


def _straddling_ties(values: np.ndarray, n: int) -> np.ndarray:
    """bool mask of the entries tied (within TIE_RTOL) with the n-th largest value, when the tie
    straddles the kept/dropped boundary; all False when the boundary falls between distinct values."""
    flat = values.ravel()
    threshold = np.sort(flat)[::-1][n - 1]
    band = np.abs(values - threshold) <= TIE_RTOL * abs(threshold)
    n_above = int((flat > threshold + TIE_RTOL * abs(threshold)).sum())
    return band if n_above + int(band.sum()) > n else np.zeros_like(band)


def _assert_top_n_sets(ours: set, theirs: set, ref_scores: np.ndarray, n: int, where: str) -> None:
    """Equal kept sets of size n, except tokens tied at the threshold (see module docstring)."""
    assert len(ours) == len(theirs) == n, where
    tied = set(np.flatnonzero(_straddling_ties(ref_scores, n)).tolist())
    assert ours - tied == theirs - tied, where


def _assert_is_top_n(kept: set, ref_scores: np.ndarray, n: int, where: str) -> None:
    """kept is a top-n of ref_scores, up to ties at the threshold."""
    assert len(kept) == n, where
    tied = _straddling_ties(ref_scores, n)
    order = np.argsort(-ref_scores, kind="stable")
    best = set(order[:n].tolist())
    untied = set(np.flatnonzero(~tied).tolist())
    assert kept & untied == best & untied, where


# --------------------------------------------------------------------------- KVCompose


def _kvcompose_attention(rng, n_layer, n_head, n_tokens, n_queries, newest_on_top=True):
    """Re-feed attention [n_layer][1, n_head, n_queries, n_tokens + n_queries] (context keys first)."""
    attention = rng.random((n_layer, 1, n_head, n_queries, n_tokens + n_queries), dtype=np.float32) ** 3
    if newest_on_top:
        attention[..., n_tokens - 1] = 2.0
    return attention


def _run_kvcompose_press(attention, values, n_head_kv, n_tokens, **press_kwargs):
    n_layer, _, n_head = attention.shape[:3]
    press = KVComposePress(**press_kwargs)
    press.num_layers, press.num_att_heads, press.num_kv_heads = n_layer, n_head, n_head_kv
    press.num_kv_groups = n_head // n_head_kv
    press.device = torch.device("cpu")
    press.register_context_ids(torch.zeros((1, n_tokens), dtype=torch.long))
    for layer in range(n_layer):
        press.forward_hook(SimpleNamespace(layer_idx=layer), [], {}, (None, torch.from_numpy(attention[layer])))
    press.cache = SimpleNamespace(layers=[SimpleNamespace(values=torch.from_numpy(v)) for v in values])
    press.prepare_important_masks()
    masks = np.array([[m.numpy() for m in layer] for layer in press.important_mask_per_kv_head])
    return press, masks


def _kvcompose_case(seed, shape, ratio, newest_on_top=True, **kwargs):
    n_layer, n_head, n_head_kv, n_tokens = shape
    rng = np.random.default_rng(seed)
    attention = _kvcompose_attention(rng, n_layer, n_head, n_tokens, 12, newest_on_top)
    values = rng.standard_normal((n_layer, 1, n_head_kv, n_tokens, 16), dtype=np.float32)
    press, masks = _run_kvcompose_press(attention, values, n_head_kv, n_tokens, compression_ratio=ratio, **kwargs)
    value_norms = np.stack([torch.from_numpy(v[0]).norm(dim=-1).numpy() for v in values])
    observation = Observation(
        scores=_group_mean(attention[:, 0, :, :, :n_tokens].max(axis=2), n_head_kv),
        positions=_positions(n_layer, n_head_kv, n_tokens),
        value_norms=value_norms,
    )
    policy = KVCompose(**kwargs)
    selection = policy.select(observation, 1 - ratio)
    selection.validate(n_tokens)
    return press, masks, policy, observation, selection


def _ambiguous_layers(composite: np.ndarray, n_total: int) -> np.ndarray:
    """Layers holding a composite entry of a tie that straddles the global top-N threshold."""
    return _straddling_ties(composite, n_total).any(axis=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-H{}-KV{}-T{}".format(*s))
@pytest.mark.parametrize("ratio", RATIOS)
def test_kvcompose_counts_and_kept_sets_match_kvpress(shape, ratio):
    press, masks, policy, observation, selection = _kvcompose_case(11, shape, ratio)
    ref_scores = press.scores.numpy()
    np.testing.assert_allclose(policy.score(observation), ref_scores, rtol=1e-6)
    ref_counts = press.important_per_layer
    composite = press.composite_scores_per_layer.numpy()
    ambiguous = _ambiguous_layers(composite, compute_n_kept(composite.size, ratio))
    np.testing.assert_array_equal(selection.counts[~ambiguous], ref_counts[~ambiguous])
    n_layer, n_head_kv = masks.shape[:2]
    for layer in range(n_layer):
        for head in range(n_head_kv):
            ours = set(selection.cells[layer, head, : selection.counts[layer]].tolist())
            where = f"layer {layer} head {head}"
            if selection.counts[layer] == ref_counts[layer]:
                theirs = set(np.flatnonzero(masks[layer, head]).tolist())
                _assert_top_n_sets(ours, theirs, ref_scores[layer, head], int(ref_counts[layer]), where)
            else:
                _assert_is_top_n(ours, ref_scores[layer, head], int(selection.counts[layer]), where)


@pytest.mark.parametrize(
    "options",
    [
        {"add_v_norm": True},
        {"keep_token_lower_bound": 5},
        {"add_mean_across_heads": False},
        {"agg_head": "max"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_kvcompose_options_match_kvpress(options, ratio):
    press, masks, policy, observation, selection = _kvcompose_case(5, (5, 8, 2, 64), ratio, **options)
    ref_scores = press.scores.numpy()
    np.testing.assert_allclose(policy.score(observation), ref_scores, rtol=1e-6)
    composite = press.composite_scores_per_layer.numpy()
    ambiguous = _ambiguous_layers(composite, compute_n_kept(composite.size, ratio))
    np.testing.assert_array_equal(selection.counts[~ambiguous], press.important_per_layer[~ambiguous])
    for layer in np.flatnonzero(~ambiguous):
        for head in range(masks.shape[1]):
            ours = set(selection.cells[layer, head, : selection.counts[layer]].tolist())
            theirs = set(np.flatnonzero(masks[layer, head]).tolist())
            _assert_top_n_sets(ours, theirs, ref_scores[layer, head], int(selection.counts[layer]), f"{layer}/{head}")


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_kvcompose_unstructured_head_counts_match_kvpress(ratio):
    press, masks, _, _, selection = _kvcompose_case(3, (4, 6, 3, 56), ratio, structured=False)
    ref_scores = press.scores.numpy()
    ranked = np.sort(ref_scores, axis=-1)[..., ::-1]
    ambiguous = _ambiguous_layers(ranked.reshape(-1, ranked.shape[-1]), compute_n_kept(ranked.size, ratio))
    ref_head_counts = press.important_per_head.ravel()
    # Our floor: a head keeps at least the newest token, where the reference may keep none.
    expected = np.maximum(ref_head_counts, 1)
    ours = selection.head_counts().ravel()
    np.testing.assert_array_equal(ours[~ambiguous], expected[~ambiguous])
    assert selection.simulated == bool((selection.head_counts() != selection.head_counts()[:, :1]).any())
    flat_masks = masks.reshape(-1, masks.shape[-1])
    flat_cells = selection.cells.reshape(-1, selection.cells.shape[-1])
    for row in np.flatnonzero(~ambiguous & (ref_head_counts > 0)):
        kept = set(flat_cells[row][flat_cells[row] >= 0].tolist())
        theirs = set(np.flatnonzero(flat_masks[row]).tolist())
        _assert_top_n_sets(kept, theirs, ref_scores.reshape(-1, ref_scores.shape[-1])[row], len(theirs), str(row))


def test_kvcompose_keeps_a_low_scoring_newest_token_in_place_of_the_weakest_kept():
    press, masks, _, _, selection = _kvcompose_case(7, (5, 8, 2, 64), 0.6, newest_on_top=False)
    ref_scores = press.scores.numpy()
    newest = ref_scores.shape[-1] - 1
    composite = press.composite_scores_per_layer.numpy()
    ambiguous = _ambiguous_layers(composite, compute_n_kept(composite.size, 0.6))
    np.testing.assert_array_equal(selection.counts[~ambiguous], press.important_per_layer[~ambiguous])
    deviations = 0
    for layer in np.flatnonzero(~ambiguous):
        n = int(selection.counts[layer])
        for head in range(masks.shape[1]):
            ours = set(selection.cells[layer, head, :n].tolist())
            theirs = set(np.flatnonzero(masks[layer, head]).tolist())
            assert newest in ours
            if newest in theirs:
                _assert_top_n_sets(ours, theirs, ref_scores[layer, head], n, f"{layer}/{head}")
            else:
                deviations += 1
                # Ours = the reference's best n - 1, plus the newest token.
                scores = ref_scores[layer, head].copy()
                scores[newest] = -np.inf
                _assert_is_top_n(ours - {newest}, scores, n - 1, f"{layer}/{head}")
    assert deviations > 0, "the case must exercise a low-scoring newest token"


# --------------------------------------------------------------------------- scorer presses


def _causal_attention(rng, n_layer, n_head, n_tokens):
    """Prefill self-attention [n_layer, 1, n_head, T, T]: causal softmax rows of random logits."""
    logits = rng.standard_normal((n_layer, 1, n_head, n_tokens, n_tokens)).astype(np.float32) * 2
    logits = np.where(np.tril(np.ones((n_tokens, n_tokens), dtype=bool)), logits, -np.inf)
    attention = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (attention / attention.sum(axis=-1, keepdims=True)).astype(np.float32)


def _run_scorer_press(press, attention, n_head_kv, layer, n_layer):
    """Kept token indices [n_head_kv, n] and the press's scores [n_head_kv, T], for one layer."""
    _, n_head, n_tokens, _ = attention.shape
    head_dim = 4
    module = SimpleNamespace(
        layer_idx=layer,
        head_dim=head_dim,
        config=SimpleNamespace(
            num_attention_heads=n_head, num_key_value_heads=n_head_kv, num_hidden_layers=n_layer
        ),
    )
    token_index = torch.arange(n_tokens, dtype=torch.float32)
    keys = token_index[None, None, :, None].expand(1, n_head_kv, n_tokens, head_dim).contiguous()
    hidden = torch.zeros((1, n_tokens, 8))
    attn = torch.from_numpy(attention)
    scores = press.score(module, hidden, keys, keys, attn, {}).numpy()[0]
    kept, _ = press.compress(module, hidden, keys, keys, attn, {})
    return kept[0, :, :, 0].numpy().astype(np.int64), scores


def _compare_scorer(press_factory, policy, observation_scores, attention, n_head_kv, ratio):
    n_layer, _, _, n_tokens, _ = attention.shape
    observation = Observation(scores=observation_scores, positions=_positions(n_layer, n_head_kv, n_tokens))
    selection = policy.select(observation, 1 - ratio)
    selection.validate(n_tokens)
    for layer in range(n_layer):
        kept, ref_scores = _run_scorer_press(press_factory(ratio), attention[layer], n_head_kv, layer, n_layer)
        n = kept.shape[-1]
        assert selection.counts[layer] == n, f"layer {layer}"
        for head in range(n_head_kv):
            ours = set(selection.cells[layer, head, :n].tolist())
            _assert_top_n_sets(ours, set(kept[head].tolist()), ref_scores[head], n, f"layer {layer} head {head}")


SCORER_SHAPES = [(3, 4, 4, 96), (3, 6, 2, 80), (2, 8, 2, 72)]


@pytest.mark.parametrize("shape", SCORER_SHAPES, ids=lambda s: "L{}-H{}-KV{}-T{}".format(*s))
@pytest.mark.parametrize("ratio", RATIOS)
def test_snapkv_matches_kvpress(shape, ratio):
    n_layer, n_head, n_head_kv, n_tokens = shape
    attention = _causal_attention(np.random.default_rng(1), n_layer, n_head, n_tokens)
    window = 8
    observed = _group_mean(attention[:, 0, :, -window:, :].mean(axis=2), n_head_kv)
    _compare_scorer(
        lambda r: SnapKVPress(compression_ratio=r, window_size=window, kernel_size=5),
        SnapKV(window_size=window, kernel_size=5),
        observed,
        attention,
        n_head_kv,
        ratio,
    )


@pytest.mark.parametrize("shape", SCORER_SHAPES, ids=lambda s: "L{}-H{}-KV{}-T{}".format(*s))
@pytest.mark.parametrize("ratio", RATIOS)
def test_pyramidkv_matches_kvpress(shape, ratio):
    n_layer, n_head, n_head_kv, n_tokens = shape
    n_layer = 5  # enough layers for a visible pyramid
    attention = _causal_attention(np.random.default_rng(2), n_layer, n_head, n_tokens)
    window = 4
    observed = _group_mean(attention[:, 0, :, -window:, :].mean(axis=2), n_head_kv)
    _compare_scorer(
        lambda r: PyramidKVPress(compression_ratio=r, window_size=window, kernel_size=3, beta=4),
        PyramidKV(window_size=window, kernel_size=3, beta=4),
        observed,
        attention,
        n_head_kv,
        ratio,
    )


@pytest.mark.parametrize("shape", SCORER_SHAPES, ids=lambda s: "L{}-H{}-KV{}-T{}".format(*s))
@pytest.mark.parametrize("ratio", RATIOS)
def test_tova_matches_kvpress(shape, ratio):
    n_layer, n_head, n_head_kv, n_tokens = shape
    attention = _causal_attention(np.random.default_rng(3), n_layer, n_head, n_tokens)
    observed = _group_mean(attention[:, 0, :, -1, :], n_head_kv)
    _compare_scorer(lambda r: TOVAPress(compression_ratio=r), TOVA(), observed, attention, n_head_kv, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_streamingllm_matches_kvpress(ratio):
    n_layer, n_head, n_head_kv, n_tokens = 3, 6, 2, 64
    attention = np.zeros((n_layer, 1, n_head, n_tokens, n_tokens), dtype=np.float32)
    observed = np.zeros((n_layer, n_head_kv, n_tokens), dtype=np.float32)
    _compare_scorer(
        lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
        StreamingLLM(n_sink=4),
        observed,
        attention,
        n_head_kv,
        ratio,
    )


@pytest.mark.parametrize("ratio", RATIOS)
def test_h2o_normalized_matches_kvpress_observed_attention(ratio):
    n_layer, n_head, n_head_kv, n_tokens = 3, 6, 2, 64
    attention = _causal_attention(np.random.default_rng(4), n_layer, n_head, n_tokens)
    # The last query mostly attends to itself, so the newest token leads (see module docstring).
    attention[..., -1, :] *= 0.1
    attention[..., -1, -1] += 0.9
    observed = _group_mean(attention[:, 0].sum(axis=2), n_head_kv)
    _compare_scorer(
        lambda r: ObservedAttentionPress(compression_ratio=r),
        H2O(normalize=True),
        observed,
        attention,
        n_head_kv,
        ratio,
    )
