"""Compare the weights of two runs, or of two snapshots of one run: pure numpy.

- `records`: what a comparison returns (`TensorDiff`, `LayerDiff`, `FeatureMove`,
  `FeatureDiff`, `DiffResult`, `LayerDrift`, `DriftResult`, the stored spectral and
  gradient numbers) and the statuses.
- `inputs`: `RUN@STEP` targets, open runs, argument checks.
- `plan`: the pure-data plan of a diff (tensors by layer, status, units axis, feeds).
- `diff`: `diff_runs`, which executes the plan layer by layer.
- `matching`: the best one-to-one matching of units, carried along the graph.
- `features`: the named input features of A and B side by side.
- `drift`: `drift`, each layer of one run through its snapshots.
"""

from typing import TYPE_CHECKING

from .records import (
    DEFAULT_MAX_MATCH_UNITS,
    STATUS_CHANGED,
    STATUS_ONLY_A,
    STATUS_ONLY_B,
    STATUS_SHAPE,
    STATUS_UNCHANGED,
    STATUSES,
    DiffResult,
    DriftResult,
    FeatureDiff,
    FeatureMove,
    LayerDiff,
    LayerDrift,
    StoredGradients,
    StoredSpectral,
    TensorDiff,
    TensorGradients,
)

if TYPE_CHECKING:
    from .diff import diff_runs
    from .drift import drift
    from .inputs import split_target
    from .matching import EXTRA_HINT

# What the comparison computes is imported when first used (PEP 562): the records are
# light, and `weightwatch show` (through `report`) needs only them.
_LAZY = {"diff_runs": "diff", "drift": "drift", "split_target": "inputs",
         "EXTRA_HINT": "matching"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DEFAULT_MAX_MATCH_UNITS",
    "EXTRA_HINT",
    "STATUSES",
    "STATUS_CHANGED",
    "STATUS_ONLY_A",
    "STATUS_ONLY_B",
    "STATUS_SHAPE",
    "STATUS_UNCHANGED",
    "DiffResult",
    "DriftResult",
    "FeatureDiff",
    "FeatureMove",
    "LayerDiff",
    "LayerDrift",
    "StoredGradients",
    "StoredSpectral",
    "TensorDiff",
    "TensorGradients",
    "diff_runs",
    "drift",
    "split_target",
]
