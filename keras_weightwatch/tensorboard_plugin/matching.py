"""B's convolution kernels in A's unit order, for drawing them side by side.

The order is the comparison's own: `diff_runs` records, for each kernel it
matched, the matching of its units (`TensorDiff.unit_order`) and the order of
its inputs carried from the layers that feed it (`TensorDiff.input_order`);
this module only applies them to B's array. Nothing is matched here.
"""

from __future__ import annotations

import numpy as np

from ..compare import TensorDiff
from ..naming import conv_kind


def units_axis(class_name: str | None) -> int:
    """The axis of a kernel's output units: -1, or -2 for the transposed convolutions."""
    kind = conv_kind(class_name)
    return -1 if kind is None or kind.units_axis is None else kind.units_axis


def reordered(b: np.ndarray, diff: TensorDiff | None, axis: int = -1) -> np.ndarray:
    """B's kernel with its inputs and units in A's order, as `diff` matched them.

    Args:
        b: B's kernel.
        diff: The kernel's `TensorDiff` from `diff_runs`; None (or one without a
            matching) leaves B as it is.
        axis: The units axis (`units_axis`); the inputs are the other of the last two.
    """
    out = np.asarray(b)
    if diff is None:
        return out
    inputs_axis = -2 if axis == -1 else -1
    if diff.input_order is not None and out.shape[inputs_axis] == len(diff.input_order):
        out = np.take(out, np.asarray(diff.input_order, dtype=np.int64), axis=inputs_axis)
    if diff.unit_order is not None and out.shape[axis] == len(diff.unit_order):
        out = np.take(out, np.asarray(diff.unit_order, dtype=np.int64), axis=axis)
    return out
