"""What train begin decides for a model: its description, its views, the weights watched.

`Plan.make(model, settings)` holds every check that needs the model (each view's
`prepare` and `restrict`, `Settings.validate`), so bad arguments raise before the
first epoch; the pipeline and the run directory are then opened from the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .capture import ModelInfo, WeightSpec, describe_model, is_sharded, shared_token
from .run import ResponseLayer
from .settings import Settings
from .views import FeatureView, ResponseView, View, build_views


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

    @classmethod
    def make(cls, model: Any, settings: Settings) -> Plan:
        """Describe the model and check the settings against it (raises before any epoch)."""
        info = describe_model(model)
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
        return cls(info, tuple(views), watch, sharded, attempt)

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
