"""`StatsView`: the scalars of every weight."""

from __future__ import annotations

from typing import Any

from ..capture import ModelInfo, Snapshot
from ..stats import STAT_NAMES
from .base import Stats, View

NONFINITE_STATS = ("nan_count", "inf_count")
"""Written for a weight only once one of them is non-zero (see `StatsView`)."""


class StatsView(View):
    """Scalars of every weight: `l2_norm`, `mean`, `std`, `max_abs`, `update_ratio`, and NaN/Inf
    counts once they are non-zero.

    `update_ratio` (||W_t - W_prev|| / ||W_prev||) is absent at a run's first
    snapshot, which has no previous one. `nan_count` and `inf_count` are
    written for a weight from the first snapshot in which either is non-zero,
    and at every snapshot after it in the same fit (zeros included, so the
    chart shows the values going back to zero): a healthy weight gets no flat
    zero charts. The snapshot statistics stored in the run keep both counts
    at every snapshot.
    """

    name = "stats"

    def __init__(self) -> None:
        self.nonfinite: set[str] = set()
        """The weights that have had a NaN or an Inf in this fit."""

    def prepare(self, model: Any, info: ModelInfo) -> None:
        self.nonfinite = set()

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..summaries import scalar, tag

        values = []
        for key, st in stats.items():
            if any(st.get(name, 0) for name in NONFINITE_STATS):
                self.nonfinite.add(key)
            for stat in STAT_NAMES:
                if stat in st and (stat not in NONFINITE_STATS or key in self.nonfinite):
                    values.append(scalar(tag(key, stat), st[stat]))
        events.write(snapshot.step, values, wall_time=snapshot.time)
