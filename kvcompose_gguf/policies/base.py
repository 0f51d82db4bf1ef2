"""Shared mechanics of every policy: observation in, selection out.

A policy reads an `Observation` (attention statistics per layer, KV head and
cell, plus the original position each cell holds) and returns a `Selection`
(which cells every layer/head keeps, and in which slot). Methods differ only
in how they score cells (`Policy.score`) and, for some, in how the budget is
split over layers (`Policy.allocation_rows`). Everything else is written once,
here, in `Policy.select`:

1. validate the observation, the budget, the protection mask and the caps;
2. score cells (the method);
3. split the budget over layers with one global threshold over per-layer
   priority rows (`threshold_allocation`), honouring reserves for protected
   cells, per-layer caps and per-layer floors;
4. keep, in every layer/head, the protected cells plus the best-scoring others
   (`select_cells`), and lay them out in original-position order.

Conventions (they hold for every policy):

- **Budget.** ``kv_budget`` is the fraction of the sequence's cells KEPT, a
  float in (0, 1], or an int number of cells per layer (1 <= k <= the cells
  the sequence occupies). See `Budget`.
- **Protection.** Protected cells are never dropped. The sequence's newest
  token (its largest original position) is always protected, in every
  layer/head, so that the cache's largest position stays max and the next
  token is decoded at max + 1, right after the token it follows.
  Explicitly protected cells (``protected=``) are kept *inside* the budget
  (their slots are reserved before the threshold is drawn); the implicit
  protection of the newest token only raises the per-layer floor to 1, which
  the reference applies anyway, so it never changes a reference allocation.
- **Tie-break.** Wherever two cells of one head score the same, the lower
  original position wins, then the lower cell index. Wherever two entries of
  the global allocation tie, the lower layer wins, then the lower rank.
- **Slot order.** Within a head, kept cells are ordered by original position;
  slot j of layer l therefore holds the j-th oldest kept token of each head.

Per-layer caps (``layer_caps``) bound how many slots each layer may keep. See
`Policy.select` and docs/policies.md for what a cap costs and frees.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import numpy as np

__all__ = [
    "Budget",
    "Observation",
    "Policy",
    "Selection",
    "protect_positions",
    "head_mean_by_position",
    "select_cells",
    "threshold_allocation",
    "target_rows",
]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class Observation:
    """What a policy reads, built by `kvcompose_gguf.stats` from native statistics.

    scores: float32 [n_layer, n_head_kv, n_cells], the attention statistic of
        each cell, already reduced over the observing queries
        (`Policy.query_reduction`) and over the GQA group
        (`Policy.group_reduction`).
    positions: int32 [n_layer, n_head_kv, n_cells], the original position of
        the token whose K/V rows (of that head) each cell holds; -1 = empty.
        Distinct within a layer/head; every layer/head holds the newest token.
    value_norms: optional float32 [n_layer, n_head_kv, n_cells], the L2 norm
        of each cell's value row (KVCompose ``add_v_norm``).
    """

    scores: np.ndarray
    positions: np.ndarray
    value_norms: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.positions.shape)  # type: ignore[return-value]

    def validate(self) -> None:
        """Raise ValueError/TypeError unless the arrays are a well-formed observation."""
        for name in ("scores", "positions"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise TypeError(f"Observation.{name} must be a numpy array")
        if self.positions.ndim != 3:
            raise ValueError(
                f"Observation.positions must be [n_layer, n_head_kv, n_cells], got shape {self.positions.shape}"
            )
        if self.scores.shape != self.positions.shape:
            raise ValueError(
                f"Observation.scores has shape {self.scores.shape}, positions {self.positions.shape}"
            )
        if not np.issubdtype(self.positions.dtype, np.integer):
            raise TypeError(f"Observation.positions must be integers, got {self.positions.dtype}")
        if not np.issubdtype(self.scores.dtype, np.floating):
            raise TypeError(f"Observation.scores must be floating point, got {self.scores.dtype}")
        if self.value_norms is not None and np.shape(self.value_norms) != self.positions.shape:
            raise ValueError(
                f"Observation.value_norms has shape {np.shape(self.value_norms)}, positions {self.positions.shape}"
            )
        if min(self.positions.shape) < 1:
            raise ValueError(f"Observation needs at least one layer, head and cell, got {self.positions.shape}")
        if (self.positions < -1).any():
            raise ValueError("Observation.positions holds values below -1 (-1 marks an empty cell)")
        valid = self.positions >= 0
        if not valid.any():
            raise ValueError("Observation holds no token (every position is -1)")
        occupied = self.scores if valid.all() else np.where(valid, self.scores, 0)
        if not np.isfinite(occupied).all():
            raise ValueError("Observation.scores holds NaN or infinite values in occupied cells")
        newest = self.positions.max()
        holds_newest = (self.positions == newest).any(axis=-1)
        if not holds_newest.all():
            layer, head = np.argwhere(~holds_newest)[0]
            raise ValueError(
                f"layer {layer} head {head} does not hold the newest token (position {newest}); "
                "every layer/head must hold it"
            )


@dataclass(frozen=True, eq=False)
class Selection:
    """Which cells every layer/head keeps, and in which slot.

    counts: int32 [n_layer], composite slots kept per layer (n_l).
    cells: int32 [n_layer, n_head_kv, n_slots], n_slots = counts.max();
        cells[l, h, j] = the cell whose K/V rows of head h go to slot j of
        layer l; -1 for j >= counts[l] (and, in a simulated unstructured
        selection, beyond each head's own count).
    slot_positions: int32 [n_slots], the llama.cpp position given to slot j:
        the largest original position held in slot j over all layers/heads
        that own it. It keeps every slot before the next token (max + 1).
    kept_positions: int32 [n_layer, n_head_kv, n_slots], original position of
        each kept token, -1 where cells is -1.
    simulated: True when the layout cannot hold the selection (per-head counts
        differ within a layer: the unstructured variant). Such a selection is
        for evaluation by masking only; a compactor must refuse it.
    allocation: int32 [n_layer], the slots the policy's budget split gave each
        layer; below `counts` where `Policy.select(fill=True)` filled the layer
        up to the widest one. Defaults to counts.

    Memory accounting (never conflated): `logical_entries_kept` counts kept
    (layer, head, token) K/V rows; `cells_needed` is the physical number of
    llama.cpp cells the sequence still needs, because all layers share one
    list of cells: cells freed = cells before - counts.max().
    """

    counts: np.ndarray
    cells: np.ndarray
    slot_positions: np.ndarray
    kept_positions: np.ndarray
    simulated: bool = False
    allocation: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.allocation is None:
            object.__setattr__(self, "allocation", np.asarray(self.counts).copy())

    @property
    def n_layer(self) -> int:
        return int(self.cells.shape[0])

    @property
    def n_head_kv(self) -> int:
        return int(self.cells.shape[1])

    @property
    def n_slots(self) -> int:
        return int(self.cells.shape[2])

    def head_counts(self) -> np.ndarray:
        """int32 [n_layer, n_head_kv]: tokens kept per layer/head (equal to counts[l] unless simulated)."""
        return (self.cells >= 0).sum(axis=-1).astype(np.int32)

    def logical_entries_kept(self) -> int:
        """Kept (layer, head, token) K/V rows, over all layers and heads."""
        return int((self.cells >= 0).sum())

    def cells_needed(self) -> int:
        """Physical cells the sequence occupies after compaction (the widest layer)."""
        return int(self.counts.max())

    def validate(self, n_cells: int) -> None:
        """Raise ValueError unless this selection is self-consistent for a cache of n_cells cells."""
        counts, cells, kept = self.counts, self.cells, self.kept_positions
        if cells.ndim != 3 or kept.shape != cells.shape:
            raise ValueError(f"cells {cells.shape} and kept_positions {kept.shape} must be equal 3-D shapes")
        n_layer, _, n_slots = cells.shape
        if counts.shape != (n_layer,) or self.slot_positions.shape != (n_slots,):
            raise ValueError("counts must be [n_layer] and slot_positions [n_slots]")
        if n_slots != (counts.max() if counts.size else 0):
            raise ValueError(f"n_slots {n_slots} != counts.max() {counts.max()}")
        if (counts < 1).any():
            raise ValueError("every layer must keep at least one slot")
        slot = np.arange(n_slots)
        inside = slot[None, None, :] < counts[:, None, None]
        used = cells >= 0
        if (used & ~inside).any():
            raise ValueError("a cell is referenced beyond its layer's count")
        if not self.simulated and (used != inside).any():
            raise ValueError("a structured selection must fill every slot below counts[l] in every head")
        if ((cells < -1) | (cells >= n_cells)).any():
            raise ValueError(f"cell index outside [0, {n_cells})")
        if ((kept >= 0) != used).any() or (kept < -1).any():
            raise ValueError("kept_positions must be >= 0 exactly where cells is >= 0")
        for layer in range(n_layer):
            for head in range(cells.shape[1]):
                row = cells[layer, head][used[layer, head]]
                if np.unique(row).size != row.size:
                    raise ValueError(f"layer {layer} head {head} references a cell twice")
                pos = kept[layer, head][used[layer, head]]
                if (np.diff(pos) <= 0).any():
                    raise ValueError(f"layer {layer} head {head}: slots are not in original-position order")
        expected = np.where(used, kept, -1).max(axis=(0, 1)) if n_slots else np.zeros(0, np.int32)
        if not np.array_equal(expected, self.slot_positions):
            raise ValueError("slot_positions must be the largest original position held in each slot")


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """A validated ``kv_budget``: a kept fraction (float) or a per-layer cell count (int).

    Float b in (0, 1]: a layer holding T_l tokens keeps max(1, int(T_l * b))
    under a per-layer (uniform) allocation, and the whole sequence keeps
    max(1, int(b * sum_l T_l)) slots under a global allocation. These are
    kvpress's ``compute_n_kept`` with compression_ratio = 1 - b.
    Int k in [1, T], T = the cells the sequence occupies: every layer keeps
    min(k, T_l) slots under a uniform allocation, the sequence
    sum_l min(k, T_l) under a global one.
    """

    value: float | int

    @classmethod
    def parse(cls, kv_budget: object, n_cells_used: int) -> "Budget":
        if isinstance(kv_budget, (bool, np.bool_)):
            raise TypeError("kv_budget must be a float fraction or an int number of cells, not a bool")
        if isinstance(kv_budget, numbers.Integral):
            k = int(kv_budget)
            if k < 1:
                raise ValueError(f"kv_budget={k} cells: keep at least 1 cell")
            if k > n_cells_used:
                raise ValueError(f"kv_budget={k} cells, but the sequence occupies only {n_cells_used} cells")
            return cls(k)
        if isinstance(kv_budget, numbers.Real):
            b = float(kv_budget)
            if not np.isfinite(b) or b <= 0.0 or b > 1.0:
                raise ValueError(f"kv_budget={kv_budget!r}: a fraction of cells kept must lie in (0, 1]")
            return cls(b)
        raise TypeError(
            f"kv_budget must be a float fraction in (0, 1] or an int number of cells, got {type(kv_budget).__name__}"
        )

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.value, float)

    def fraction_of(self, n_tokens: int) -> float:
        """The kept fraction this budget means for a layer of n_tokens tokens."""
        return self.value if self.is_fraction else min(1.0, self.value / n_tokens)

    def per_layer(self, n_tokens: np.ndarray) -> np.ndarray:
        """Kept slots per layer under a uniform allocation."""
        n_tokens = np.asarray(n_tokens, dtype=np.int64)
        if self.is_fraction:
            return np.array([max(1, int(int(t) * self.value)) for t in n_tokens], dtype=np.int64)
        return np.minimum(self.value, n_tokens)

    def total(self, n_tokens: np.ndarray) -> int:
        """Kept entries in all, under a global allocation over entries with these per-row capacities."""
        n_tokens = np.asarray(n_tokens, dtype=np.int64)
        if self.is_fraction:
            return max(1, int(int(n_tokens.sum()) * self.value))
        return int(np.minimum(self.value, n_tokens).sum())


# --------------------------------------------------------------------------- protection


def protect_positions(obs: Observation, spans: Iterable[Sequence[int]]) -> np.ndarray:
    """bool [n_layer, n_head_kv, n_cells]: cells holding an original position in any [start, end) span.

    Spans are by original position, e.g. ``[(0, n_system), (newest + 1 - r, newest + 1)]``
    protects a system prompt and the last r tokens wherever compaction moved them.
    """
    mask = np.zeros(obs.positions.shape, dtype=bool)
    for span in spans:
        if len(span) != 2:
            raise ValueError(f"a protected span is (start, end), got {span!r}")
        start, end = (int(v) for v in span)
        if start < 0 or end < start:
            raise ValueError(f"protected span [{start}, {end}) must satisfy 0 <= start <= end")
        mask |= (obs.positions >= start) & (obs.positions < end)
    return mask


# --------------------------------------------------------------------------- shared selection


def target_rows(targets: np.ndarray, width: int) -> np.ndarray:
    """Priority rows under which a global top-sum(targets) keeps exactly ``targets[l]`` per layer.

    Row l is -(j + 1) / targets[l]: its targets[l]-th entry is exactly -1, so
    the threshold lands on -1 in every layer at once. Under caps, the surplus
    of a capped layer goes to the others in proportion to their targets.
    """
    j = np.arange(1, width + 1, dtype=np.float64)
    return -j[None, :] / np.asarray(targets, dtype=np.float64)[:, None]


def threshold_allocation(
    rows: np.ndarray,
    n_total: int,
    capacity: np.ndarray,
    *,
    reserve: np.ndarray | None = None,
    floor: np.ndarray | None = None,
    caps: np.ndarray | None = None,
) -> np.ndarray:
    """Split n_total entries over rows (layers, or layer/heads) by one global threshold.

    rows: float [n_rows, width], each row non-increasing: entry j is the
        priority of the row's (j+1)-th kept entry. Only the first
        min(capacity, cap) entries of a row are eligible: a cap clips the row
        and the threshold, drawn over all rows together, hands what the
        capped row cannot take to the rows below their cap.
    reserve: entries per row taken before the threshold (protected cells);
        they count against n_total.
    floor: minimum per row, applied after the threshold (the reference's
        ``max(1, keep_token_lower_bound)``); it may exceed n_total.
    Ties at the threshold go to the lower row, then the lower rank.
    Returns int64 [n_rows].
    """
    n_rows, width = rows.shape
    capacity = np.asarray(capacity, dtype=np.int64)
    limit = capacity if caps is None else np.minimum(capacity, caps)
    reserve = np.zeros(n_rows, np.int64) if reserve is None else np.asarray(reserve, np.int64)
    floor = np.zeros(n_rows, np.int64) if floor is None else np.asarray(floor, np.int64)
    if (reserve > limit).any() or (floor > limit).any():
        row = int(np.argmax((reserve > limit) | (floor > limit)))
        raise ValueError(
            f"allocation row {row} (a layer, or layer * n_head_kv + head when unstructured) must keep "
            f"{max(reserve[row], floor[row])} entries but may hold only {limit[row]} (its tokens or its cap)"
        )
    if reserve.sum() > n_total:
        raise ValueError(f"protected cells need {reserve.sum()} slots but the budget keeps only {n_total}")
    if n_total > limit.sum():
        raise ValueError(f"the budget keeps {n_total} slots but the caps and tokens allow only {limit.sum()}")
    rank = np.arange(width)
    keyed = np.where(rank[None, :] < limit[:, None], rows, -np.inf)
    keyed = np.where(rank[None, :] < reserve[:, None], np.inf, keyed)
    flat = keyed.ravel()
    threshold = np.partition(flat, flat.size - n_total)[flat.size - n_total]
    above = keyed > threshold
    counts = above.sum(axis=1)
    short = n_total - int(counts.sum())
    if short:
        tied = (keyed == threshold).ravel()
        taken = tied & (np.cumsum(tied) <= short)
        counts = counts + taken.reshape(n_rows, width).sum(axis=1)
    return np.maximum(counts, floor)


def select_cells(
    scores: np.ndarray, positions: np.ndarray, protected: np.ndarray, head_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per layer/head, keep head_counts[l, h] cells: the protected ones, then the best-scoring.

    Returns (cells, kept_positions), int32 [n_layer, n_head_kv, max count],
    each head's cells in original-position order, -1 padded. Ties go to the
    lower original position, then the lower cell index.
    """
    n_layer, n_head, n_cells = positions.shape
    counts = head_counts.reshape(-1).astype(np.int64)
    held_by = positions.reshape(-1, n_cells)
    key = np.where(held_by >= 0, scores.reshape(-1, n_cells), -np.inf)
    key[protected.reshape(-1, n_cells)] = np.inf  # protected first; counts >= protected by the floor
    # One sort of every row is cheaper than a partition per distinct count.
    threshold = np.sort(key, axis=-1)[np.arange(key.shape[0]), n_cells - counts]
    keep = key >= threshold[:, None]
    for row in np.flatnonzero(keep.sum(axis=1) > counts):
        tied = np.flatnonzero(key[row] == threshold[row])
        order = np.lexsort((tied, held_by[row, tied]))
        wanted = counts[row] - int((key[row] > threshold[row]).sum())
        keep[row, tied[order[wanted:]]] = False

    # Kept cells row by row (ascending cell index), then each row in original-position order.
    cell = np.broadcast_to(np.arange(n_cells, dtype=np.int32), keep.shape)[keep]
    held = held_by[keep]
    first_of_row = np.concatenate(([0], np.cumsum(counts)))
    descending = np.diff(held) <= 0
    descending[first_of_row[1:-1] - 1] = False  # row boundaries
    if descending.any():
        order = np.lexsort((held, np.repeat(np.arange(counts.size), counts)))
        cell, held = cell[order], held[order]
    n_slots = int(counts.max())
    cells = np.full((n_layer, n_head, n_slots), -1, dtype=np.int32)
    kept = np.full((n_layer, n_head, n_slots), -1, dtype=np.int32)
    per_layer = head_counts.reshape(n_layer, n_head)
    for layer in range(n_layer):
        n = per_layer[layer]
        start, stop = first_of_row[layer * n_head], first_of_row[(layer + 1) * n_head]
        if (n == n[0]).all():
            cells[layer, :, : n[0]] = cell[start:stop].reshape(n_head, n[0])
            kept[layer, :, : n[0]] = held[start:stop].reshape(n_head, n[0])
            continue
        for head in range(n_head):
            lo, hi = first_of_row[layer * n_head + head], first_of_row[layer * n_head + head + 1]
            cells[layer, head, : hi - lo] = cell[lo:hi]
            kept[layer, head, : hi - lo] = held[lo:hi]
    return cells, kept


def head_mean_by_position(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per cell: the mean of values over the KV heads of its layer that hold the same original position.

    In a fresh cache every head holds position i in cell i and this is the
    plain mean over heads. After a compaction heads hold different tokens in
    one cell, so the mean is taken per token, over the heads that still hold
    it. Both are summed in float64 and rounded once to float32, so the result
    does not depend on which cell holds a token. Empty cells get 0.
    """
    valid = positions >= 0
    if (positions == positions[:, :1]).all():
        mean = np.where(valid, values, 0).mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
        return np.broadcast_to(mean, positions.shape) * valid
    out = np.zeros(positions.shape, dtype=np.float32)
    for layer in range(positions.shape[0]):
        held = valid[layer]
        pos = positions[layer][held]
        total = np.bincount(pos, weights=values[layer][held].astype(np.float64))
        count = np.bincount(pos)
        out[layer][held] = (total[pos] / count[pos]).astype(np.float32)
    return out


# --------------------------------------------------------------------------- policy base


class Policy:
    """Base of every policy: subclasses implement `score`, some override `allocation_rows`.

    Class attributes tell the observer what statistics to gather:
    query_reduction: "max" | "mean" | "sum" | "last", over the observing queries;
    group_reduction: "mean" | "max", over the query heads of a GQA group;
    accumulate: sum statistics over successive observations (H2O).
    needs_attention: False for policies that read positions only (no observer run).
    observation_window: None = the policy reads whatever queries the caller
        observes (re-feed or task prompt); an int w = the last w tokens' queries.
    """

    query_reduction: ClassVar[str] = "max"
    group_reduction: ClassVar[str] = "mean"
    accumulate: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = True
    observation_window: ClassVar[int | None] = None

    def min_per_layer(self) -> int:
        """Slots every layer keeps at least, applied after the budget split (default 1: no layer empties)."""
        return 1

    def score(self, obs: Observation) -> np.ndarray:
        """float [n_layer, n_head_kv, n_cells]: higher = more worth keeping. Empty cells are ignored."""
        raise NotImplementedError

    def allocation_rows(
        self, scores: np.ndarray, valid: np.ndarray, n_tokens: np.ndarray, budget: Budget
    ) -> tuple[np.ndarray, int]:
        """(rows [n_layer, width], n_total) for `threshold_allocation`; default: a uniform budget.

        n_tokens: int [n_layer], the tokens each layer holds in every head.
        """
        targets = budget.per_layer(n_tokens)
        return target_rows(targets, int(n_tokens.max())), int(targets.sum())

    def select(
        self,
        obs: Observation,
        kv_budget: float | int,
        *,
        protected: np.ndarray | None = None,
        layer_caps: np.ndarray | int | None = None,
        fill: bool = False,
    ) -> Selection:
        """Turn an observation into a selection; see the module docstring for the conventions.

        kv_budget: kept fraction in (0, 1] or int cells per layer (see `Budget`).
        protected: bool mask, [n_layer, n_head_kv, n_cells] or broadcastable
            (e.g. [n_cells]); see `protect_positions`. Kept inside the budget.
        layer_caps: int [n_layer] or one int C: at most cap_l slots in layer l.
            The budget is unchanged -- what a capped layer cannot take goes to
            the layers below their cap, in threshold order -- so caps cost
            allocation quality where they bind and free no logical entries.
            What they free is physical: llama.cpp cells are shared by all
            layers, so the sequence still needs max_l n_l cells and frees
            cells - max_l n_l; a single C guarantees at least cells - C freed.
            ValueError when the caps cannot hold the budget or a floor.
        fill: after the budget split, every layer keeps up to the widest layer's
            count (within its tokens and cap): its next-best tokens. In a shared pool
            of cells the widest layer holds those cells anyway, so the allocation decides
            the cells freed and filling keeps more logical entries at no memory cost.
            The cells needed (max_l n_l) are unchanged.
        """
        obs.validate()
        positions = obs.positions
        n_layer, n_head, n_cells = positions.shape
        valid = positions >= 0
        n_cells_used = int(valid.any(axis=(0, 1)).sum())
        budget = Budget.parse(kv_budget, n_cells_used)
        explicit = _explicit_protection(protected, positions.shape) & valid
        protected = explicit | (positions == positions.max())
        caps = _parse_caps(layer_caps, n_layer)

        scores = np.asarray(self.score(obs))
        if scores.shape != positions.shape:
            raise AssertionError(f"{type(self).__name__}.score returned {scores.shape}, expected {positions.shape}")
        # Explicitly protected cells are reserved inside the budget; the newest token only sets
        # the floor of 1 that the reference applies anyway.
        head_counts = self.allocate(
            scores, valid, budget, reserve=explicit.sum(axis=-1), floor=protected.sum(axis=-1), caps=caps
        )
        allocation = head_counts.max(axis=1).astype(np.int32)
        if fill:
            head_counts = _filled(head_counts, valid, caps)
        cells, kept = select_cells(scores, positions, protected, head_counts)
        simulated = bool((head_counts != head_counts[:, :1]).any())
        return _selection(cells, kept, head_counts, simulated=simulated, allocation=allocation)

    def allocate(
        self,
        scores: np.ndarray,
        valid: np.ndarray,
        budget: Budget,
        *,
        reserve: np.ndarray,
        floor: np.ndarray,
        caps: np.ndarray | None,
    ) -> np.ndarray:
        """int [n_layer, n_head_kv]: cells each layer/head keeps (structured: one count per layer).

        reserve / floor: int [n_layer, n_head_kv], explicitly protected cells
        (reserved inside the budget) / all protected cells (a floor).
        """
        n_tokens = valid.sum(axis=-1).min(axis=1)
        rows, n_total = self.allocation_rows(scores, valid, n_tokens, budget)
        counts = threshold_allocation(
            rows,
            n_total,
            n_tokens,
            reserve=reserve.max(axis=1),
            # A lower bound above a layer's tokens keeps them all, as in the reference.
            floor=np.maximum(np.minimum(self.min_per_layer(), n_tokens), floor.max(axis=1)),
            caps=caps,
        )
        return np.repeat(counts[:, None], valid.shape[1], axis=1)


# --------------------------------------------------------------------------- helpers


def _explicit_protection(protected: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if protected is None:
        return np.zeros(shape, dtype=bool)
    protected = np.asarray(protected)
    if protected.dtype != np.bool_:
        raise TypeError(f"protected must be a bool mask, got dtype {protected.dtype}")
    try:
        return np.broadcast_to(protected, shape).copy()
    except ValueError:
        raise ValueError(f"protected of shape {protected.shape} does not broadcast to {shape}") from None


def _filled(head_counts: np.ndarray, valid: np.ndarray, caps: np.ndarray | None) -> np.ndarray:
    """Every layer/head's count raised to the widest one, within its layer's tokens and cap."""
    limit = valid.sum(axis=-1).min(axis=1, keepdims=True)  # the tokens every head of the layer holds
    if caps is not None:
        limit = np.minimum(limit, caps[:, None])
    return np.maximum(head_counts, np.minimum(head_counts.max(), limit))


def _parse_caps(layer_caps: np.ndarray | int | None, n_layer: int) -> np.ndarray | None:
    if layer_caps is None:
        return None
    if isinstance(layer_caps, (bool, np.bool_)):
        raise TypeError("layer_caps must be an int or an int array [n_layer], not a bool")
    caps = np.asarray(layer_caps)
    if not np.issubdtype(caps.dtype, np.integer):
        raise TypeError(f"layer_caps must be integers, got {caps.dtype}")
    if caps.ndim == 0:
        caps = np.full(n_layer, int(caps), dtype=np.int64)
    if caps.shape != (n_layer,):
        raise ValueError(f"layer_caps must be one int or one per layer ({n_layer}), got shape {caps.shape}")
    if (caps < 1).any():
        raise ValueError("layer_caps must be >= 1 (every layer keeps at least one slot)")
    return caps.astype(np.int64)


def _selection(
    cells: np.ndarray, kept: np.ndarray, head_counts: np.ndarray, *, simulated: bool, allocation: np.ndarray
) -> Selection:
    counts = head_counts.max(axis=1).astype(np.int32)
    slot_positions = kept.max(axis=(0, 1)).astype(np.int32)
    return Selection(
        counts=counts, cells=cells, slot_positions=slot_positions, kept_positions=kept, simulated=simulated,
        allocation=allocation,
    )
