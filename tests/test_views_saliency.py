"""views.saliency: panels read back from TensorBoard, against maps from the stored weights."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from view_helpers import _acc, _decode, _fit, _images, _saliency_tag, _tags_by_plugin, _values

from keras_weightwatch import WeightWatch, load_run, saliency
from keras_weightwatch.views.saliency import caption

METHODS = ("vanilla", "smoothgrad", "gradcam", "hirescam")


def _cnn():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(3, name="out"),
    ])


def test_panels_equal_the_maps_of_the_stored_weights(tmp_path):
    images = _images(n=2)
    model = _cnn()
    cb = WeightWatch(tmp_path / "run", sample_images=images, saliency=METHODS,
                     responses_dir=tmp_path / "png")
    _fit(model, cb)
    run = load_run(tmp_path / "run")
    acc = _acc(run.path)
    tags = {t for t in _tags_by_plugin(acc)["images"] if "/3_saliency/" in t}
    assert tags == {_saliency_tag(model, m, i) for m in METHODS for i in range(2)}
    fresh = _cnn()
    for snap in run.snapshots:
        fresh.set_weights(list(run.weights(snap.step).values()))
        for method in METHODS:
            maps = getattr(saliency, method)(fresh, images)
            for i in range(2):
                arr = _values(acc, _saliency_tag(model, method, i))[snap.step]
                np.testing.assert_array_equal(_decode(arr[2]),
                                              saliency.panel(images[i], maps.maps[i]))
                path = os.path.join(tmp_path, "png", "saliency", method, f"sample_{i}",
                                    f"step_{snap.step}.png")
                with open(path, "rb") as f:
                    assert f.read() == arr[2]


def test_the_caption_says_when_a_map_is_empty():
    zero, some = np.zeros((4, 4)), np.eye(4)
    assert "zero everywhere" in caption("gradcam", 0, 3, zero, "conv")
    assert "HiResCAM" in caption("gradcam", 0, 3, zero, "conv")
    assert "zero everywhere" not in caption("gradcam", 0, 3, some, "conv")
    assert "class 3" in caption("vanilla", 1, 3, some, None)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"saliency": "vanilla"}, ValueError, "Received: sample_images=None"),
        ({"saliency": "lime", "sample_images": np.ones((1, 8, 8, 1))}, ValueError,
         "not a saliency method"),
        ({"saliency_class": 1}, ValueError, "Received: saliency=None"),
        ({"saliency_layer": "conv"}, ValueError, "Received: saliency=None"),
    ],
)
def test_bad_saliency_options(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        WeightWatch(tmp_path / "run", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"saliency": "gradcam", "saliency_layer": "out"}, "Received: saliency_layer='out'"),
        ({"saliency": "vanilla", "saliency_class": 3}, "Received: saliency_class=3"),
    ],
)
def test_model_dependent_saliency_errors_raise_at_train_begin(tmp_path, kwargs, message):
    cb = WeightWatch(tmp_path / "run", sample_images=_images(n=1), **kwargs)
    with pytest.raises(ValueError, match=message):
        _fit(_cnn(), cb, epochs=1)
