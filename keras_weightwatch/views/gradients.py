"""`GradientView`: how hard the loss pushes each weight, on a probe batch, at each snapshot."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Set
from typing import Any

import numpy as np

from ..capture import ModelInfo, Snapshot
from ..health.measures import GRAD_DEAD_UNITS, dead_units, is_unit_kernel
from ..settings import Settings
from .base import Stats, View, weight_keys

GRAD_NORM = "grad_norm"
GRAD_TO_WEIGHT = "grad_to_weight"
GRAD_STAT_NAMES = (GRAD_NORM, GRAD_TO_WEIGHT)


@dataclasses.dataclass(frozen=True)
class GradientPayload:
    """What the training thread hands the worker: each weight's gradient norm (and array).

    Attributes:
        norms: Weight key -> ||g|| (float64 L2 norm of the gradient).
        arrays: Weight key -> the gradient, for the histograms; None without them.
        units: Dense and convolution kernel key -> its gradient, whose output units that
            are exactly zero the worker counts (`health.measures.dead_units`).
    """

    norms: dict[str, float]
    arrays: dict[str, np.ndarray] | None = None
    units: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def gradient_norms(grads: dict[str, np.ndarray]) -> dict[str, float]:
    """Key -> L2 norm of each gradient, summed in float64."""
    return {
        k: math.sqrt(float(np.einsum("i,i->", g.ravel(), g.ravel(), dtype=np.float64)))
        for k, g in grads.items()
    }


class GradientView(View):
    """Gradient norms of every watched trainable weight on a probe batch `(x, y)`.

    At every `freq`-th snapshot (the initial one included) the training thread
    differentiates the model's compiled loss on the batch with respect to its
    trainable weights (`gradients.gradients`: inference mode, no optimizer
    step, weights untouched) and hands only the norms (and, with histograms,
    the gradients) to the worker. The worker stores `grad_norm` (||g||) and
    `grad_to_weight` (||g|| / ||W||, absent where ||W|| = 0) and, for Dense and convolution
    kernels, `grad_dead_units` (output units whose gradient is exactly zero) in the snapshot's
    statistics and writes them as scalars `<weight key>/grad_norm` and
    `<weight key>/grad_to_weight` (and histograms `<weight key>/grad_histogram`).

    One probe batch is a noisy estimate of the training gradient: compare the
    series, not single points.

    Args:
        data: The probe batch `(x, y)`, as `fit` takes them.
        freq: Compute at every `freq`-th snapshot. Defaults to 1.
        histograms: Also write a histogram of each gradient. Defaults to False.
    """

    name = "gradients"

    def __init__(self, data: tuple[Any, Any], freq: int = Settings.gradient_freq,
                 histograms: bool = Settings.gradient_histograms):
        self.x, self.y = data
        self.freq = freq
        self.histograms = histograms
        self.keys: dict[int, str] = {}  # id(trainable variable) -> key, watched ones only
        self._count = 0

    def prepare(self, model: Any, info: ModelInfo) -> None:
        if getattr(model, "loss", None) is None and not model.losses:
            raise ValueError(
                "`gradient_data` differentiates the compiled loss; compile the model with a "
                "`loss`. Received: model.loss=None"
            )
        keys = weight_keys(model, info)
        self.keys = {id(v): keys[id(v)] for v in model.trainable_weights}
        self._count = 0

    def restrict(self, keys: Set[str]) -> None:
        self.keys = {i: k for i, k in self.keys.items() if k in keys}

    def capture(self, model: Any) -> GradientPayload | None:
        due = self._count % self.freq == 0
        self._count += 1
        if not due or not self.keys:
            return None
        from ..gradients import Loss, gradients

        g = gradients(model, self.x, Loss(self.y), weights=True)
        grads = g.weights or {}
        mine = {
            self.keys[id(v)]: grads[k]
            for v, k in zip(model.trainable_weights, grads) if id(v) in self.keys
        }
        units = {k: g for k, g in mine.items() if is_unit_kernel(k, np.shape(g))}
        return GradientPayload(gradient_norms(mine), mine if self.histograms else None, units)

    def stats(self, stats: Stats, payload: GradientPayload) -> Stats:
        out = {}
        for key, norm in payload.norms.items():
            values = {GRAD_NORM: norm}
            w_norm = stats.get(key, {}).get("l2_norm")
            if w_norm is not None and math.isfinite(w_norm) and w_norm > 0:
                values[GRAD_TO_WEIGHT] = norm / w_norm
            if key in payload.units:  # counted here, on the worker
                values[GRAD_DEAD_UNITS] = float(dead_units(payload.units[key]))
            out[key] = values
        return out

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        if payload is None:
            return
        from ..summaries import histogram, scalar, tag

        values = []
        for key in payload.norms:
            for name in GRAD_STAT_NAMES:
                if name in stats.get(key, {}):
                    values.append(scalar(tag(key, name), stats[key][name]))
        if payload.arrays is not None:
            from ..histograms import histogram as buckets

            for key, g in payload.arrays.items():
                values.append(histogram(tag(key, "grad_histogram"), buckets(g)))
        events.write(snapshot.step, values, wall_time=snapshot.time)
