"""What train begin decides for a model: its description, its views, the weights watched.

`Plan.make(model, settings)` holds every check that needs the model (each view's
`prepare` and `restrict`, `Settings.validate`), so bad arguments raise before the
first epoch; the pipeline and the run directory are then opened from the plan.

Under a hyperparameter search (KerasTuner), `find_trial` learns which trial and
execution the fit is from the tuner's own `run_trial` frame (KerasTuner hands a
callback nothing else); the plan records it in the header's `model.trial`, and the run
goes to `log_dir/<trial id>/execution<k>` (`trial_parts`), as KerasTuner names its
TensorBoard directories.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from types import FrameType
from typing import Any, NamedTuple

import numpy as np

from .capture import ModelInfo, WeightSpec, describe_model, is_sharded, json_safe, shared_token
from .run import ResponseLayer
from .settings import Settings
from .views import FeatureView, ResponseView, View, build_views


class Trial(NamedTuple):
    """The hyperparameter-search trial a fit belongs to (see `find_trial`)."""

    id: str
    execution: int | None
    """Which execution of the trial (0 for the first); None where the tuner's frame does
    not say, and the run directory's order decides (`rundir.trial_settings`)."""
    hyperparameters: Mapping[str, Any]

    def parts(self) -> tuple[str, str]:
        """The run's directory below `log_dir`: `<trial id>`, `execution<k>` (KerasTuner's
        own TensorBoard directories)."""
        return self.id, f"execution{self.execution or 0}"

    def to_json(self) -> dict[str, Any]:
        """The header's `model.trial`."""
        return {"id": self.id, "execution": self.execution,
                "hyperparameters": dict(self.hyperparameters)}


def _is_trial(obj: Any) -> bool:
    cls = type(obj)
    return (cls.__name__ == "Trial" and cls.__module__.startswith("keras_tuner")
            and hasattr(obj, "trial_id") and hasattr(obj, "hyperparameters"))


def find_trial(frame: FrameType | None = None) -> Trial | None:
    """The KerasTuner trial whose execution calls this fit, from the frames on the stack: the
    nearest local `trial` that is a `keras_tuner` `Trial`, and the `execution` index of the
    tuner's `run_trial` loop (`Tuner.run_trial` in keras-tuner 1.4) in a frame holding the
    same trial. None outside a search."""
    frame = frame if frame is not None else sys._getframe(1)
    trial: Any = None
    while frame is not None:
        local = frame.f_locals
        found = local.get("trial")
        if trial is None and _is_trial(found):
            trial = found
        if trial is not None and found is trial:
            execution = local.get("execution")
            if isinstance(execution, int) and not isinstance(execution, bool):
                return _trial(trial, execution)
        frame = frame.f_back
    return None if trial is None else _trial(trial, None)


def _trial(trial: Any, execution: int | None) -> Trial:
    values = getattr(trial.hyperparameters, "values", {})
    return Trial(str(trial.trial_id), execution,
                 json_safe(dict(values)) if isinstance(values, Mapping) else {})


@dataclasses.dataclass(frozen=True)
class Plan:
    """What train begin decided for a model: its description, the views, the watched weights."""

    info: ModelInfo
    views: tuple[View, ...]
    watch: tuple[int, ...]
    """Indices into `model.weights` of the weights the include/exclude filter keeps."""
    sharded: tuple[int, ...] = ()
    """The watched weights split across processes (model parallelism), stored as parts."""
    attempt: str = ""
    """With `sharded`: the token of this fit that every process shares (`shared_token`),
    carried by each shard record so that none of an earlier fit is merged."""
    trial: Trial | None = None
    """The hyperparameter-search trial execution this fit is (None: not in a search)."""

    @classmethod
    def make(cls, model: Any, settings: Settings, trial: Trial | None = None) -> Plan:
        """Describe the model and check the settings against it (raises before any epoch).
        `trial` (`find_trial`) is recorded in the header's `model.trial`."""
        info = describe_model(model)
        if trial is not None:
            info = dataclasses.replace(info, extra={**info.extra, "trial": trial.to_json()})
        views = build_views(settings, info)
        for view in views:
            view.prepare(model, info)
        watch = settings.validate(info)
        keys = {info.weights[i].key for i in watch}
        sharded = tuple(i for i in watch if is_sharded(model.weights[i]))
        keys -= {info.weights[i].key for i in sharded}  # no view sees a sharded weight
        for view in views:
            view.restrict(keys)
        attempt = shared_token() if sharded else ""  # every process calls make: a collective
        return cls(info, tuple(views), watch, sharded, attempt, trial)

    def with_trial(self, trial: Trial) -> Plan:
        """The plan of the same fit with its trial (its execution index settled)."""
        info = dataclasses.replace(self.info, extra={**self.info.extra, "trial": trial.to_json()})
        return dataclasses.replace(self, info=info, trial=trial)

    @property
    def specs(self) -> list[WeightSpec]:
        return [self.info.weights[i] for i in self.watch]

    def samples(self, settings: Settings) -> dict[str, np.ndarray | None]:
        """The inputs the run stores with its header: `sample_images` channels last (as the
        responses are computed), and `feature_data`."""
        images = settings.sample_images
        view = next((v for v in self.views if isinstance(v, ResponseView)), None)
        if images is not None and view is not None and view.targets and (
                view.targets[0].channels_first):
            images = np.moveaxis(images, 1, -1)
        return {"sample_images": images, "feature_data": settings.feature_data}

    @property
    def response_layers(self) -> list[ResponseLayer]:
        """The layers whose kernel responses a reader computes from the run alone: those of
        `response_mode="kernel"` fed directly by the model input."""
        out = []
        for view in self.views:
            if isinstance(view, ResponseView) and view.mode == "kernel":
                out += [ResponseLayer(t.layer, t.key, t.padding, tuple(t.strides),
                                      tuple(t.dilation))
                        for t in view.targets if t.fed_by_input]
        return out

    @property
    def feature_key(self) -> str | None:
        """The kernel the top-k feature table reads, recorded in the header for `diff`."""
        return next((v.key for v in self.views if isinstance(v, FeatureView)), None)
