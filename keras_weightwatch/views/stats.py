"""`StatsView`: the scalars of every weight."""

from __future__ import annotations

from typing import Any

from ..capture import Snapshot
from ..stats import STAT_NAMES
from .base import Stats, View


class StatsView(View):
    """Scalars of every weight: `l2_norm`, `mean`, `std`, `max_abs`, NaN/Inf counts, `update_ratio`.

    `update_ratio` (||W_t - W_prev|| / ||W_prev||) is absent at a run's first
    snapshot, which has no previous one.
    """

    name = "stats"

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..summaries import scalar, tag

        values = []
        for key, st in stats.items():
            for stat in STAT_NAMES:
                if stat in st:
                    values.append(scalar(tag(key, stat), st[stat]))
        events.write(snapshot.step, values, wall_time=snapshot.time)
