"""`HistogramView`: a histogram of every weight tensor."""

from __future__ import annotations

from typing import Any

from ..capture import Snapshot
from .base import Stats, View


class HistogramView(View):
    """A fixed-bin histogram of the finite values of every weight tensor."""

    name = "histograms"

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..histograms import histogram as bins
        from ..summaries import histogram, tag

        values = [
            histogram(tag(key, "histogram"), bins(arr)) for key, arr in snapshot.arrays.items()
        ]
        events.write(snapshot.step, values, wall_time=snapshot.time)
