"""Compare the weights of two runs, or of two snapshots of one run: plan, then execute.

`diff_runs(a, b)` compares every weight tensor of snapshot A with the tensor of
the same key in snapshot B (a LoRA or quantized layer's effective kernel, the one it
computes with, under its stored kernel's key; its adapters and scales listed under
it): relative change ||B - A|| / ||A||, cosine
similarity, max |B - A|, RMS difference, and whether it is unchanged
(bit-identical, or within a tolerance), with the spectral metrics and gradient
norms each snapshot stores beside the tensor. It first plans (`plan.make_plan`: the
tensors grouped by layer, their status, their units axis, which layers feed
each layer), then executes the plan layer by layer, carrying the matching of
units along the graph (`matching`).

Memory: tensors are memory-mapped and reduced in chunks with float64
accumulation (`reductions`), one pair at a time, so diffing two runs of a large
model holds at most a few tensors (and, for matched layers, two units x units
matrices).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ..reductions import Sums, as_2d, pair_sums, self_sums
from ..run import Run, SnapshotRecord
from .features import feature_diff
from .inputs import (
    Chains,
    Target,
    chains,
    check_fixed_units,
    check_positive_int,
    check_tolerance,
    compile_layer,
    content,
    load,
    open_snapshot,
)
from .matching import (
    Perm,
    carried_in,
    carried_out,
    input_rows,
    match_units,
)
from .plan import COMPARE, DiffPlan, LayerPlan, TensorPlan, make_plan
from .records import (
    DEFAULT_MAX_MATCH_UNITS,
    STATUS_CHANGED,
    STATUS_UNCHANGED,
    DiffResult,
    LayerDiff,
    StoredGradients,
    StoredSpectral,
    TensorDiff,
)


def diff_runs(
    a: Target,
    b: Target,
    *,
    step_a: int | str | None = None,
    step_b: int | str | None = None,
    tolerance: float = 0.0,
    layer: str | None = None,
    match: bool = True,
    max_match_units: int = DEFAULT_MAX_MATCH_UNITS,
    top_k: int | None = None,
    verify: bool = True,
    fixed_units: str | Sequence[str] = (),
) -> DiffResult:
    """Compare every weight tensor of snapshot A with the same tensor of snapshot B.

    Each side is a run directory, optionally ending in `@STEP` (`runs/exp1@3`,
    `runs/exp1@initial`; default: the last snapshot), or an open `Run`. Two
    snapshots of one run compare epochs; two runs compare training runs.
    Tensors are matched by weight key (`conv1/kernel`), read memory-mapped
    one pair at a time and reduced in float64 chunks.

    Args:
        a: Snapshot A: a run directory, `"path@step"` or a `Run`.
        b: Snapshot B, likewise.
        step_a: A's step (an int, `"initial"` or `"last"`), instead of an
            `@STEP` suffix. Defaults to None.
        step_b: B's step. Defaults to None.
        tolerance: Tensors whose max |B - A| is at most this are unchanged.
            Defaults to 0.0 (only equal values).
        layer: A regular expression; only weights whose key it matches (with
            `re.search`) are compared. Defaults to None (all).
        match: Also compare Dense and convolution layers after the best
            one-to-one matching of their hidden units (needs scipy). The units
            of the model's outputs (a layer no other layer consumes, and the
            layers without a kernel between it and the last kernel) and of the
            `fixed_units` layers are never permuted. Defaults to True.
        max_match_units: Layers with more units are not matched. Defaults
            to 2048.
        top_k: Rows of the named-feature comparison. Defaults to None: the
            run's `top_k` setting.
        verify: Check each tensor file's SHA-256 before reading it. Defaults
            to True.
        fixed_units: Layer names (one, or a sequence) whose units keep their
            order besides the model's outputs: units whose order means
            something outside the network (a layer read by name elsewhere).
            Defaults to () (the outputs alone).

    Returns:
        A `DiffResult`.

    Raises:
        WeightWatchError: a run or step is missing, or the snapshots have no
            weight in common.

    Example:

    >>> result = diff_runs("runs/seed1", "runs/seed2")      # doctest: +SKIP
    >>> result.tensor("conv1/kernel").cosine                # doctest: +SKIP
    0.0213
    >>> diff_runs("runs/exp1@initial", "runs/exp1@3").layers[0].name  # doctest: +SKIP
    'dense'
    """
    tolerance = check_tolerance(tolerance)
    pattern = compile_layer(layer)
    max_match_units = check_positive_int("max_match_units", max_match_units)
    top_k = None if top_k is None else check_positive_int("top_k", top_k)
    run_a, snap_a = open_snapshot(a, step_a)
    run_b, snap_b = open_snapshot(b, step_b)
    fixed = check_fixed_units(fixed_units, {s.layer for s in (*run_a.specs, *run_b.specs)})
    plan = make_plan(run_a, snap_a, run_b, snap_b, pattern, fixed)
    ctx = _Context(run_a, snap_a, run_b, snap_b, tolerance, match, max_match_units, verify,
                   chains(run_a), chains(run_b))
    return DiffResult(a=plan.a, b=plan.b, tolerance=tolerance, layers=_execute(ctx, plan),
                      features=feature_diff(run_a, snap_a, run_b, snap_b, top_k, verify))


def _execute(ctx: _Context, plan: DiffPlan) -> tuple[LayerDiff, ...]:
    """Every layer of the plan in the model's order, carrying matchings; most changed first."""
    layers: list[LayerDiff] = []
    out_perms: dict[str, Perm | None] = {}  # layer -> the matching of its outputs
    previous: Perm | None = None
    for layer_plan in plan.layers:
        carry = carried_in(layer_plan.feeds, out_perms, previous)
        layer_diff, previous = _diff_layer(ctx, layer_plan, carry)
        out_perms[layer_plan.name] = previous
        layers.append(layer_diff)
    return tuple(sorted(layers, key=_change_order))


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every layer of one diff reads: the two snapshots and the options."""

    run_a: Run
    snap_a: SnapshotRecord
    run_b: Run
    snap_b: SnapshotRecord
    tolerance: float
    match: bool
    max_match_units: int
    verify: bool
    chains_a: Chains
    chains_b: Chains


@dataclasses.dataclass(frozen=True)
class _Reduced:
    """One compared tensor pair, reduced."""

    identical: bool
    sums: Sums
    matched: Sums | None = None
    moved: int | None = None
    perm: Perm | None = None
    carried: Perm | None = None
    """The matching of the kernel's inputs, where it was applied."""


def _diff_layer(ctx: _Context, plan: LayerPlan, carry: Perm | None
                ) -> tuple[LayerDiff, Perm | None]:
    """Execute one layer's plan; returns its diff and the matching of its outputs."""
    diffs = {t.key: _structural(t, plan.name) for t in plan.tensors if t.status != COMPARE}
    raw_total, matched_total = Sums(), Sums()
    any_matched = False
    kernel = plan.kernel
    perm: Perm | None = None
    for t in plan.order():
        if t is kernel:
            r = _reduce_kernel(ctx, t, carry, fixed=plan.fixed is not None)
            perm = r.perm
        else:
            # A bias (or a per-channel weight) follows its layer's units.
            r = _reduce_other(ctx, t, perm if perm is not None else
                              (carry if kernel is None else None))
        diffs[t.key] = _finish(t, plan.name, r, ctx.tolerance,
                               fixed=t is kernel and plan.fixed is not None)
        raw_total.add(r.sums)
        any_matched = any_matched or r.matched is not None
        matched_total.add(r.matched if r.matched is not None else r.sums)
    for t in plan.parts:
        if t.status == COMPARE:
            diffs[t.key] = _finish(t, plan.name, _reduce_other(ctx, t, None), ctx.tolerance,
                                   fixed=False)
    compared = plan.compared
    out = carried_out(carry, perm, kernel is not None, [t.shape_a or () for t in compared])
    return LayerDiff(
        name=plan.name,
        tensors=_nested(plan, {k: _with_stored(ctx, d) for k, d in diffs.items()}),
        rel_l2=raw_total.rel_l2() if compared else None,
        cosine=raw_total.cosine() if compared else None,
        matched_cosine=matched_total.cosine() if any_matched else None,
        units_fixed=plan.fixed,
    ), out


def _nested(plan: LayerPlan, diffs: dict[str, TensorDiff]) -> tuple[TensorDiff, ...]:
    """The layer's tensors in weight order, each effective kernel with its inputs under it
    (an input whose kernel is not in the layer's plan stays a tensor of its own)."""
    top = {t.key for t in plan.tensors if t.part_of is None}
    under: dict[str, list[TensorDiff]] = {}
    for t in plan.parts:
        if t.part_of in top:
            under.setdefault(t.part_of, []).append(diffs[t.key])
    return tuple(dataclasses.replace(diffs[t.key], inputs=tuple(under.get(t.key, ())))
                 for t in plan.tensors if t.key in top or t.part_of not in top)


def _pair(ctx: _Context, key: str) -> tuple[bool, np.ndarray, np.ndarray]:
    """(bit-identical, A's tensor, B's tensor), effective kernels as the layers computed
    with them: B is not read when it is identical (the same stored weights derived alike)."""
    identical = (content(ctx.snap_a, key, ctx.chains_a.get(key, ()))
                 == content(ctx.snap_b, key, ctx.chains_b.get(key, ())))
    arr_a = load(ctx.run_a, ctx.snap_a, key, ctx.verify)
    arr_b = arr_a if identical else load(ctx.run_b, ctx.snap_b, key, ctx.verify)
    return identical, arr_a, arr_b


def _plain_sums(identical: bool, a2: np.ndarray, b2: np.ndarray) -> Sums:
    return self_sums(a2) if identical else pair_sums(a2, b2)


def _reduce_kernel(ctx: _Context, t: TensorPlan, carry: Perm | None, fixed: bool) -> _Reduced:
    """The layer's kernel: its units matched to A's (unless `fixed`), its inputs in the
    carried order. A fixed kernel's matched sums exist only where its inputs are carried."""
    identical, arr_a, arr_b = _pair(ctx, t.key)
    if t.units_axis == -2:
        arr_a = np.ascontiguousarray(np.moveaxis(arr_a, -2, -1))
        arr_b = np.ascontiguousarray(np.moveaxis(arr_b, -2, -1))
    a2, b2 = as_2d(arr_a), as_2d(arr_b)
    rows, carried = _carried_rows(arr_a.shape, carry)
    if ctx.match and fixed and arr_a.dtype.kind != "c":
        s = _plain_sums(identical, a2, b2)
        aligned = (None if carried is None else s if rows is None
                   else pair_sums(a2, b2, rows=rows))
        return _Reduced(identical, s, aligned, moved=0, carried=carried)
    if not (ctx.match and a2.shape[1] <= ctx.max_match_units and arr_a.dtype.kind != "c"):
        return _Reduced(identical, _plain_sums(identical, a2, b2))
    if identical and rows is None:  # B is A: each unit is its own best match
        s = _plain_sums(identical, a2, b2)
        return _Reduced(identical, s, s, 0, np.arange(a2.shape[1], dtype=np.int64),
                        carried=carried)
    m = match_units(a2, b2, rows, block=None if rows is None or carried is None else len(carried))
    return _Reduced(identical, m.sums, m.matched, m.moved, m.perm, carried=carried)


def _carried_rows(shape: tuple[int, ...], carry: Perm | None
                  ) -> tuple[np.ndarray | None, Perm | None]:
    """(the order of B's kernel rows, or None to read them as stored; the carried matching
    of its inputs where it applies). A matching that moved no unit reads B as stored."""
    rows = None if carry is None else input_rows(shape, carry)
    if rows is None or carry is None:
        return None, None
    if np.array_equal(carry, np.arange(len(carry))):
        return None, carry
    return rows, carry


def _reduce_other(ctx: _Context, t: TensorPlan, align: Perm | None) -> _Reduced:
    """Any other tensor; a 1-d one with a value per unit also with B in `align`'s order."""
    identical, arr_a, arr_b = _pair(ctx, t.key)
    a2, b2 = as_2d(arr_a), as_2d(arr_b)
    s = _plain_sums(identical, a2, b2)
    if (
        align is not None
        and arr_a.ndim == 1
        and arr_a.shape[0] == len(align)
        and arr_a.dtype.kind != "c"
    ):
        return _Reduced(identical, s, pair_sums(a2, b2, rows=align))
    return _Reduced(identical, s)


def _with_stored(ctx: _Context, t: TensorDiff) -> TensorDiff:
    """`t` with the spectral metrics and gradient statistics each snapshot stores for it."""
    stats_a = ctx.snap_a.stats.get(t.name) if t.shape_a is not None else None
    stats_b = ctx.snap_b.stats.get(t.name) if t.shape_b is not None else None
    return dataclasses.replace(
        t, spectral_a=StoredSpectral.from_stats(stats_a),
        spectral_b=StoredSpectral.from_stats(stats_b),
        gradients_a=StoredGradients.from_stats(stats_a),
        gradients_b=StoredGradients.from_stats(stats_b))


def _structural(t: TensorPlan, layer: str) -> TensorDiff:
    """A tensor only in one snapshot, or of another shape: its status (the plan's) alone."""
    return TensorDiff(name=t.key, layer=layer, status=t.status, shape_a=t.shape_a,
                      shape_b=t.shape_b, rule_a=t.rule_a, rule_b=t.rule_b, part_of=t.part_of,
                      role=t.role)


def _finish(t: TensorPlan, layer: str, r: _Reduced, tolerance: float, fixed: bool
            ) -> TensorDiff:
    s, matched = r.sums, r.matched
    unchanged = r.identical or (not math.isnan(s.maxd) and s.maxd <= tolerance)
    return TensorDiff(
        name=t.key,
        layer=layer,
        status=STATUS_UNCHANGED if unchanged else STATUS_CHANGED,
        shape_a=t.shape_a,
        shape_b=t.shape_b,
        size=s.size,
        identical=r.identical,
        norm_a=math.sqrt(s.saa) if s.saa >= 0 else math.nan,
        norm_b=math.sqrt(s.sbb) if s.sbb >= 0 else math.nan,
        rel_l2=s.rel_l2(),
        cosine=s.cosine(),
        max_abs=s.maxd,
        rms=s.rms(),
        matched_cosine=None if matched is None else matched.cosine(),
        matched_rel_l2=None if matched is None else matched.rel_l2(),
        units_moved=r.moved,
        nonfinite_a=s.nonfinite_a,
        nonfinite_b=s.nonfinite_b,
        units_fixed=fixed,
        unit_order=None if r.perm is None else tuple(int(i) for i in r.perm),
        input_order=None if r.carried is None else tuple(int(i) for i in r.carried),
        rule_a=t.rule_a,
        rule_b=t.rule_b,
        part_of=t.part_of,
        role=t.role,
    )


def _change_order(layer: LayerDiff) -> tuple[bool, bool, float]:
    rel = layer.rel_l2
    if rel is None or math.isnan(rel):
        rel = math.inf
    return (not layer.structural, layer.unchanged, -rel)
