"""How each layer of one run moved through its snapshots: step by step, and since the first.

`drift(run)` reduces, per layer, ||W_t - W_prev|| / ||W_prev|| and
||W_t - W_0|| / ||W_0|| for every snapshot after the first (a LoRA or quantized
layer by its effective kernel, the one it computes with; the adapters and scales it
derives from count through it, not on their own), one tensor at a
time, memory-mapped and in float64 chunks (`reductions`), and reads what the
snapshots store beside the weights: the spectral alpha of each layer's kernel
(`spectral_freq`) and the gradient norms of its weights (`gradient_data`). It streams: however
long the run, it holds three tensors of one weight and two floats per snapshot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from ..errors import WeightWatchError, received
from ..reductions import Sums, as_2d, pair_sums, self_sums
from ..run import Run, SnapshotRecord, load_run
from ..spectral import stored_metric
from .inputs import chains, compile_layer, content, input_roles, load
from .records import DriftResult, LayerDrift, StoredGradients, TensorGradients


def drift(
    run: str | os.PathLike | Run, *, layer: str | None = None, verify: bool = True
) -> DriftResult:
    """How much each layer changed between successive snapshots, and since the first.

    Args:
        run: A run directory or an open `Run`.
        layer: A regular expression; only weights whose key it matches count.
            Defaults to None (all).
        verify: Check each tensor file's SHA-256 before reading it. Defaults
            to True.

    Returns:
        A `DriftResult`: per layer, ||W_t - W_prev|| / ||W_prev|| and
        ||W_t - W_0|| / ||W_0|| for every snapshot after the first.

    Raises:
        WeightWatchError: the run is missing or has fewer than two snapshots.

    Example:

    >>> d = drift("runs/exp1")             # doctest: +SKIP
    >>> d.steps                            # doctest: +SKIP
    ('initial', '0', '1')
    >>> d.layers[0].from_initial           # doctest: +SKIP
    (0.052, 0.087)
    """
    pattern = compile_layer(layer)
    if isinstance(run, (str, os.PathLike)):
        run = load_run(run)
    elif not isinstance(run, Run):
        raise TypeError(f"`run` must be a path or a Run. {received('run', run)}")
    snaps = run.snapshots
    if len(snaps) < 2:
        raise WeightWatchError(
            f"{run.path}: drift needs at least two snapshots; the run has {len(snaps)}"
        )
    groups: dict[str, list[str]] = {}
    parts = input_roles(run)
    for spec in run.specs:
        if (pattern is not None and not pattern.search(spec.key)) or spec.key in parts:
            continue
        if all(spec.key in s.tensors for s in snaps):
            groups.setdefault(spec.layer, []).append(spec.key)
    if not groups:
        raise WeightWatchError(f"{run.path}: no weight to follow" + (
            f" matches {pattern.pattern!r}" if pattern is not None else ""))
    layers = tuple(_layer_drift(run, snaps, name, keys, verify) for name, keys in groups.items())
    return DriftResult(path=run.path, steps=tuple(s.name for s in snaps), layers=layers)


def _layer_drift(run: Run, snaps: Sequence[SnapshotRecord], name: str, keys: Sequence[str],
                 verify: bool) -> LayerDrift:
    """One layer's change per step and since the first snapshot, over its tensors together.

    Streams: one weight at a time through every snapshot, holding three of its
    tensors (the first, the previous, the current) and, per snapshot, the two
    float64 sums each change needs (||W_ref||^2 and ||W_t - W_ref||^2).
    """
    n = len(snaps) - 1
    step = np.zeros((2, n))  # rows: ||W_ref||^2 and ||W_t - W_ref||^2, summed over the keys
    total = np.zeros((2, n))
    by_key = chains(run)
    for key in keys:
        chain = by_key.get(key, ())
        first = as_2d(load(run, snaps[0], key, verify))
        first_sha = content(snaps[0], key, chain)
        first_saa = self_sums(first).saa
        prev, prev_sha, prev_saa = first, first_sha, first_saa
        for i, snap in enumerate(snaps[1:]):
            sha = content(snap, key, chain)
            if sha == prev_sha:  # bit-identical: no change, nothing to read
                cur, cur_saa, step_sdd = prev, prev_saa, 0.0
            else:
                cur = as_2d(load(run, snap, key, verify))
                s = pair_sums(prev, cur)
                cur_saa, step_sdd = s.sbb, s.sdd
            step[:, i] += (prev_saa, step_sdd)
            total[:, i] += (first_saa, 0.0 if sha == first_sha else pair_sums(first, cur).sdd)
            prev, prev_sha, prev_saa = cur, sha, cur_saa
    return LayerDrift(
        name=name,
        step_change=tuple(Sums(saa=saa, sdd=sdd).rel_l2() for saa, sdd in step.T),
        from_initial=tuple(Sums(saa=saa, sdd=sdd).rel_l2() for saa, sdd in total.T),
        alpha=stored_alpha(snaps, keys),
        gradients=stored_gradients(snaps, keys),
    )


def stored_alpha(snaps: Sequence[SnapshotRecord], keys: Sequence[str]) -> tuple[float, ...] | None:
    """The alpha stored for the first of `keys` that has one at some snapshot, per snapshot
    (NaN where absent); None when none has one."""
    for key in keys:
        alpha = tuple(stored_metric(s.stats.get(key, {}), "alpha") for s in snaps)
        if any(key in s.stats and "alpha" in s.stats[key] for s in snaps):
            return alpha
    return None


def stored_gradients(snaps: Sequence[SnapshotRecord], keys: Sequence[str]
                     ) -> tuple[TensorGradients, ...]:
    """The gradient statistics stored for each of `keys` that has them at some snapshot, per
    snapshot (NaN where absent)."""
    out = []
    for key in keys:
        found = [StoredGradients.from_stats(s.stats.get(key)) for s in snaps]
        if all(g is None for g in found):
            continue
        out.append(TensorGradients(
            key=key,
            grad_norm=tuple(math.nan if g is None else g.grad_norm for g in found),
            grad_to_weight=tuple(math.nan if g is None else g.grad_to_weight for g in found)))
    return tuple(out)
