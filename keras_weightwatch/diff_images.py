"""`weightwatch diff --images`: the kernel grids of A, B and B - A written to TensorBoard.

A thin writer: the grids come from `images.diff_grids` (pure numpy), the event
file from `summaries.EventWriter`; which snapshots and keys are read comes from
the comparison's own inputs (`compare.inputs`).
"""

from __future__ import annotations

import glob
import os
import re

from .compare.inputs import (
    Target,
    check_positive_int,
    compile_layer,
    label,
    load,
    open_snapshot,
    ordered_keys,
)
from .errors import WeightWatchError
from .naming import key_name
from .run import Run, SnapshotRecord

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
) -> list[str]:
    """Write A's, B's and B - A's kernel grids of every convolution layer to TensorBoard.

    For each convolution kernel (3 to 5 dimensions) in both snapshots with
    the same shape, three images are written at step 0 into one event file
    in `logdir`: tags `<key>/A`, `<key>/B` and `<key>/B_minus_A`. The
    difference is drawn on its own colour scale.

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

    Returns:
        The tags written.

    Example:

    >>> write_diff_images("runs/seed1", "runs/seed2", "tb/diff")  # doctest: +SKIP
    ['conv1/kernel/A', 'conv1/kernel/B', 'conv1/kernel/B_minus_A']
    """
    from .images import diff_grids, encode_png
    from .summaries import EventWriter, image, tag

    pattern = compile_layer(layer)
    max_tiles = check_positive_int("max_tiles", max_tiles)
    logdir = os.fspath(logdir)
    if glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*")):
        raise WeightWatchError(
            f"{logdir}: already holds TensorBoard event files; choose a new directory for images"
        )
    run_a, snap_a = open_snapshot(a, step_a)
    run_b, snap_b = open_snapshot(b, step_b)
    whats = {"A": label(run_a, snap_a), "B": label(run_b, snap_b), "B_minus_A": "B - A"}
    tags: list[str] = []
    with EventWriter(logdir) as writer:
        for k in _kernel_keys(run_a, snap_a, run_b, snap_b, pattern):
            grids = diff_grids(load(run_a, snap_a, k, verify), load(run_b, snap_b, k, verify),
                               max_tiles=max_tiles)
            values = []
            for suffix, grid in zip(("A", "B", "B_minus_A"), grids):
                h, w = grid.image.shape[:2]
                values.append(image(tag(k, suffix), [encode_png(grid.image)], w, h,
                                    description=f"`{k}`: {whats[suffix]}"))
                tags.append(tag(k, suffix))
            writer.write(0, values)
    return tags


def _kernel_keys(run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord,
                 pattern: re.Pattern | None) -> list[str]:
    """The convolution kernels (3 to 5 dimensions) in both snapshots with the same shape."""
    out = []
    for k in ordered_keys(run_a, snap_a, run_b, snap_b):
        ra, rb = snap_a.tensors.get(k), snap_b.tensors.get(k)
        if ra is None or rb is None or ra.shape != rb.shape:
            continue
        if not 3 <= len(ra.shape) <= 5 or "kernel" not in key_name(k):
            continue
        if pattern is None or pattern.search(k):
            out.append(k)
    return out
