"""keras-weightwatch: see what a Keras model's weights do, epoch by epoch.

`WeightWatch` is a Keras 3 callback that snapshots every layer's weights into
a run directory and writes TensorBoard views of them; `load_run` reads a run
back with numpy arrays; `diagnose` says what is wrong with the training it holds.
"""

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import WeightWatchError, WeightWatchWarning
from .run import Run, SnapshotRecord, TensorRecord, VerifyReport, load_run, verify_run

__all__ = [
    "Diagnosis",
    "DiffResult",
    "DriftResult",
    "FeatureDiff",
    "FeatureMove",
    "Finding",
    "LayerDiff",
    "LayerDrift",
    "Run",
    "SnapshotRecord",
    "TensorDiff",
    "TensorRecord",
    "VerifyReport",
    "WeightWatch",
    "WeightWatchError",
    "WeightWatchWarning",
    "__version__",
    "diagnose",
    "diff_runs",
    "drift",
    "load_run",
    "verify_run",
]

if TYPE_CHECKING:
    from .callback import WeightWatch
    from .compare import (
        DiffResult,
        DriftResult,
        FeatureDiff,
        FeatureMove,
        LayerDiff,
        LayerDrift,
        TensorDiff,
        diff_runs,
        drift,
    )
    from .health import Diagnosis, Finding, diagnose

# Imported when first used (PEP 562): the callback imports Keras (and its backend), the
# comparison its numerics; reading runs needs only numpy, so `weightwatch show` and
# `load_run` pay for neither.
_LAZY = {"WeightWatch": "callback", **{name: "compare" for name in (
    "DiffResult", "DriftResult", "FeatureDiff", "FeatureMove", "LayerDiff", "LayerDrift",
    "TensorDiff", "diff_runs", "drift")}, **{name: "health" for name in (
    "Diagnosis", "Finding", "diagnose")}}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_weightwatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
