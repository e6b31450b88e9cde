"""The TensorBoard views that WeightWatch writes at each snapshot.

A view has three hooks:

- `prepare(model, info)` runs on the training thread at train begin. It checks
  the view's arguments against the model (a feature layer that does not exist,
  sample images of the wrong shape) and raises `ValueError`/`TypeError` before
  any epoch runs.
- `capture(model)` runs on the training thread at each snapshot, for the rare
  view that needs Keras to compute something (a layer's activations). It
  returns a payload of numpy arrays, or None.
- `write(snapshot, stats, payload, events)` runs on the background worker with
  numpy arrays only, and writes summaries through `events`.

`build_views(settings)` turns the callback's settings into the list of views.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .capture import ModelInfo, Snapshot


class View:
    """Base class of a view; see the module docstring."""

    name = "view"

    def prepare(self, model: Any, info: ModelInfo) -> None:
        """Check arguments against the model (training thread, train begin)."""

    def capture(self, model: Any) -> Any:
        """Compute a payload that needs Keras (training thread, each snapshot)."""
        return None

    def write(
        self,
        snapshot: Snapshot,
        stats: Mapping[str, Mapping[str, float]],
        payload: Any,
        events: Any,
    ) -> None:
        """Write this view's summaries for one snapshot (worker thread)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever the view holds (train end)."""


def build_views(settings: Mapping[str, Any]) -> list[View]:
    """The views the callback's settings ask for, in writing order."""
    return []
