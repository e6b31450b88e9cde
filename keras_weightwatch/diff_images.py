"""`weightwatch diff --images`: the kernel grids of A, B and B - A written to TensorBoard.

A thin writer: the grids come from `images.diff_grids` (pure numpy) of the kernels
the layers compute with (a LoRA conv's effective kernel), the event file from
`summaries.EventWriter`; which snapshots and keys are read comes from the
comparison's own inputs (`compare.inputs`).
"""

from __future__ import annotations

import glob
import os
import re
from typing import TYPE_CHECKING

import numpy as np

from .compare.inputs import (
    Target,
    chains,
    check_positive_int,
    compile_layer,
    input_roles,
    label,
    load,
    open_snapshot,
    ordered_keys,
    shape_of,
)
from .compare.plan import units_axis
from .errors import WeightWatchError
from .naming import key_name
from .run import Run, SnapshotRecord

if TYPE_CHECKING:
    from .compare.records import DiffResult

__all__ = ["write_diff_images"]


def write_diff_images(
    a: Target,
    b: Target,
    logdir: str | os.PathLike,
    *,
    step_a: int | str | None = None,
    step_b: int | str | None = None,
    layer: str | None = None,
    max_tiles: int = 256,
    verify: bool = True,
    match: bool = True,
    diff: DiffResult | None = None,
) -> list[str]:
    """Write A's, B's and B - A's kernel grids of every convolution layer to TensorBoard.

    For each convolution kernel (3 to 5 dimensions) in both snapshots with
    the same shape, three images are written at step 0 into one event file
    in `logdir`: tags `<key>/A`, `<key>/B` and `<key>/B_minus_A`. Where the
    diff matched the kernel's units, B's tiles are drawn in the matched order
    (tile i of B is the unit matched to A's unit i), as each tag's description
    says. The difference is drawn on its own colour scale. When the snapshots
    hold no such kernel, nothing is written (not even `logdir`).

    Args:
        a: Snapshot A: a run directory, `"path@step"` or a `Run`.
        b: Snapshot B, likewise.
        logdir: A new TensorBoard run directory (refused when it already holds
            event files).
        step_a: A's step, instead of an `@STEP` suffix. Defaults to None.
        step_b: B's step. Defaults to None.
        layer: A regular expression on weight keys. Defaults to None (all).
        max_tiles: The most tiles per grid. Defaults to 256.
        verify: Check each tensor file's SHA-256 before reading it. Defaults
            to True.
        match: Draw B in the order of the matching of units (`diff_runs`,
            needs scipy); False draws B as stored. Defaults to True.
        diff: The `diff_runs` result of the same snapshots, whose matching
            orders B (saves diffing again). Defaults to None.

    Returns:
        The tags written (empty when there is nothing to draw).

    Example:

    >>> write_diff_images("runs/seed1", "runs/seed2", "tb/diff")  # doctest: +SKIP
    ['conv1/kernel/A', 'conv1/kernel/B', 'conv1/kernel/B_minus_A']
    """
    pattern = compile_layer(layer)
    max_tiles = check_positive_int("max_tiles", max_tiles)
    logdir = os.fspath(logdir)
    if glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*")):
        raise WeightWatchError(
            f"{logdir}: already holds TensorBoard event files; choose a new directory for images"
        )
    run_a, snap_a = open_snapshot(a, step_a)
    run_b, snap_b = open_snapshot(b, step_b)
    keys = kernel_keys(run_a, snap_a, run_b, snap_b, pattern)
    if not keys:
        return []
    if diff is None and match:
        from .compare import diff_runs

        diff = diff_runs(run_a, run_b, step_a=snap_a.step, step_b=snap_b.step, layer=layer,
                         verify=verify)
    return _write(run_a, snap_a, run_b, snap_b, logdir, keys, diff, max_tiles, verify)


def _write(run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord, logdir: str,
           keys: list[str], diff: DiffResult | None, max_tiles: int, verify: bool) -> list[str]:
    from .images import diff_grids, encode_png
    from .summaries import EventWriter, image, tag

    label_a, label_b = label(run_a, snap_a), label(run_b, snap_b)
    tags: list[str] = []
    with EventWriter(logdir) as writer:
        classes = {layer.name: layer.class_name for layer in run_a.layers}
        layers = {spec.key: spec.layer for spec in run_a.specs}
        for k in keys:
            axis = units_axis(classes.get(layers.get(k, "")), k, snap_a.tensors[k].shape)
            perm, perm_in, order = _b_order(diff if axis == -1 else None, k)
            grids = diff_grids(load(run_a, snap_a, k, verify), load(run_b, snap_b, k, verify),
                               perm=perm, max_tiles=max_tiles, perm_in=perm_in)
            whats = {"A": label_a, "B": f"{label_b}, {order}", "B_minus_A": f"B - A, {order}"}
            values = []
            for suffix, grid in zip(("A", "B", "B_minus_A"), grids):
                h, w = grid.image.shape[:2]
                values.append(image(tag(k, suffix), [encode_png(grid.image)], w, h,
                                    description=f"`{k}`: {whats[suffix]}"))
                tags.append(tag(k, suffix))
            writer.write(0, values)
    return tags


def _b_order(diff: DiffResult | None, key: str
             ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """B's unit and input orders for the grids (None: as stored), and the words for them."""
    t = None
    if diff is not None:
        t = next((x for x in diff.tensors if x.name == key), None)
    if t is None:
        return None, None, "B's units as stored (not matched)"
    perm = None if t.unit_order is None else np.asarray(t.unit_order, dtype=np.int64)
    perm_in = None if t.input_order is None else np.asarray(t.input_order, dtype=np.int64)
    if perm is not None:
        words = (f"B's units reordered by the matching to A's: tile i is the unit of B matched "
                 f"to A's unit i ({t.units_moved or 0} of {len(perm)} units moved)")
    elif t.units_fixed:
        words = "B's units kept in order (a model output or a fixed layer)"
    else:
        words = "B's units as stored (not matched)"
    if perm_in is not None:
        words += "; its inputs in the order matched to A's by the layers that feed it"
    return perm, perm_in, words


def kernel_keys(run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord,
                pattern: re.Pattern | None) -> list[str]:
    """The convolution kernels (3 to 5 dimensions) in both snapshots with the same shape: the
    kernels the layers compute with (a LoRA conv's effective kernel), not their adapters."""
    out = []
    parts = input_roles(run_a, run_b)
    chains_a, chains_b = chains(run_a), chains(run_b)
    for k in ordered_keys(run_a, snap_a, run_b, snap_b):
        shape = shape_of(snap_a, k, chains_a.get(k, ()))
        if k in parts or shape is None or shape != shape_of(snap_b, k, chains_b.get(k, ())):
            continue
        if not 3 <= len(shape) <= 5 or "kernel" not in key_name(k):
            continue
        if pattern is None or pattern.search(k):
            out.append(k)
    return out
