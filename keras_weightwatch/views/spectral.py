"""`SpectralView`: weightwatcher's spectral metrics of every Dense and convolution kernel.

Computed on the worker, from the snapshot's host copy, every `every`-th snapshot of a fit
(the first included), with numpy's BLAS/LAPACK limited to one thread while it runs, so that
the eigenvalues do not take the cores training uses. `measure` computes the metrics (the
run stores them beside each tensor's statistics); `write` turns the same numbers into
scalars, one ESD histogram per kernel and a summary table.
"""

from __future__ import annotations

import math
from collections.abc import Set
from typing import Any

import numpy as np

from ..capture import ModelInfo, Snapshot
from ..spectral import ESD, EVALS_THRESHOLD, Target, targets, tensor_esd
from .base import Stats, View

SCALARS = ("alpha", "alpha_weighted", "stable_rank", "spectral_norm", "log_norm")
"""The metrics written as TensorBoard scalars, `<weight key>/<metric>`."""
SUMMARY_TAG = "spectral/summary"


class SpectralView(View):
    """Spectral metrics (see `keras_weightwatch.spectral`) every `every`-th snapshot.

    Writes, at each snapshot it measures: the scalars `<weight key>/<metric>` of `SCALARS`
    (a metric that is NaN, such as the alpha of a kernel too small for a fit, is not
    written) and, with `traps`, `<weight key>/num_traps`; a histogram `<weight key>/esd` of
    log10 of the eigenvalues above 1e-5; and a Markdown table `spectral/summary` of the
    kernels whose alpha is outside 2-6 or missing (with the reason) and of those with
    correlation traps.

    Args:
        every: Measure every `every`-th snapshot of a fit, starting with the first.
        threads: The BLAS/LAPACK threads numpy may use while measuring. Defaults to 1.
        traps: Also count correlation traps (`num_traps`). Defaults to False.
    """

    name = "spectral"

    def __init__(self, every: int, threads: int = 1, traps: bool = False):
        self.every = every
        self.threads = threads
        self.traps = traps
        self.targets: list[Target] = []
        self._seen = 0
        self._esds: dict[str, ESD] = {}
        self._controller: Any = None

    def prepare(self, model: Any, info: ModelInfo) -> None:
        classes = {layer.name: layer.class_name for layer in info.layers}
        self.targets = targets(classes, {w.key: w.shape for w in info.weights})
        self._seen = 0

    def restrict(self, keys: Set[str]) -> None:
        self.targets = [t for t in self.targets if t.key in keys]

    def _limit(self) -> Any:
        """A context that bounds every BLAS library's threads (threadpoolctl)."""
        if self._controller is None:
            from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

            self._controller = ThreadpoolController()
        return self._controller.limit(limits=self.threads, user_api="blas")

    def measure(self, snapshot: Snapshot) -> Stats | None:
        due = self._seen % self.every == 0
        self._seen += 1
        self._esds = {}
        if not due or not self.targets:
            return None
        with self._limit():
            for t in self.targets:
                esd = tensor_esd(snapshot.arrays[t.key], t.layer_class, t.name,
                                 traps=self.traps)
                if esd is not None:
                    self._esds[t.key] = esd
        return {key: esd.metrics.to_stats() for key, esd in self._esds.items()}

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..report import spectral_markdown
        from ..summaries import scalar, tag, text

        esds, self._esds = self._esds, {}
        if not esds:
            return
        values = []
        for key, esd in esds.items():
            m = esd.metrics
            for metric in SCALARS:
                v = getattr(m, metric)
                if math.isfinite(v):
                    values.append(scalar(tag(key, metric), v))
            if m.num_traps is not None:
                values.append(scalar(tag(key, "num_traps"), float(m.num_traps)))
            esd_value = _esd_histogram(key, esd)
            if esd_value is not None:
                values.append(esd_value)
        metrics = {key: esd.metrics for key, esd in esds.items()}
        values.append(text(SUMMARY_TAG, spectral_markdown(snapshot.step, metrics)))
        events.write(snapshot.step, values, wall_time=snapshot.time)

    def close(self) -> None:
        self._esds = {}


def _esd_histogram(key: str, esd: ESD) -> Any:
    """The histogram of log10 λ over the eigenvalues above `EVALS_THRESHOLD`, or None."""
    from ..histograms import histogram as bins
    from ..summaries import histogram, tag

    if esd.eigenvalues is None:
        return None
    kept = esd.eigenvalues[esd.eigenvalues > EVALS_THRESHOLD]
    if kept.size == 0:
        return None
    dropped = esd.eigenvalues.size - kept.size
    desc = (f"log10 of the {kept.size} eigenvalues of WᵀW above {EVALS_THRESHOLD:g} (the ESD"
            f" the power law is fitted to; {dropped} below left out)")
    return histogram(tag(key, "esd"), bins(np.log10(kept)), desc)
