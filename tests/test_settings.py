"""`Settings`: every WeightWatch option's default, check and message; the checks that need the model
run at train begin, before any epoch."""

from __future__ import annotations

import os
import re
import warnings

import keras
import numpy as np
import pytest
from fit_helpers import _data, _mlp, _worker_threads
from view_helpers import (
    BOSTON,
    _boston_model,
    _cnn,
    _EpochCounter,
    _fit,
)

from keras_weightwatch import WeightWatch


@pytest.mark.parametrize("kwargs, error, match", [
    ({"log_dir": 3}, TypeError, r"`log_dir` must be a path .*Received: log_dir=3"),
    ({"log_dir": ""}, ValueError, r"`log_dir` must not be empty\. Received: log_dir=''"),
    ({"freq": 0}, ValueError, r"`freq` must be an integer >= 1\. Received: freq=0"),
    ({"freq": 1.5}, TypeError, r"`freq` must be an integer >= 1\. Received: freq=1\.5"),
    ({"freq": True}, TypeError, r"Received: freq=True"),
    ({"batch_freq": 0}, ValueError, r"`batch_freq` must be an integer >= 1\. "
                                    r"Received: batch_freq=0"),
    ({"batch_freq": "10"}, TypeError, r"`batch_freq` must be an integer >= 1\. "
                                      r"Received: batch_freq='10'"),
    ({"histograms": "yes"}, TypeError, r"`histograms` must be True or False\. "
                                       r"Received: histograms='yes'"),
    ({"kernel_images": None}, TypeError, r"Received: kernel_images=None"),
    ({"max_kernel_tiles": -1}, ValueError, r"Received: max_kernel_tiles=-1"),
    ({"feature_names": "abc"}, TypeError, r"`feature_names` must be a list of strings\. "
                                          r"Received: feature_names='abc'"),
    ({"feature_names": ["a", 2]}, TypeError, r"must hold only strings; found 2\. "),
    ({"feature_names": ["a", "b", "a"]}, ValueError,
     r"`feature_names` must be unique; \['a'\] appear more than once\. "
     r"Received: feature_names=\['a', 'b', 'a'\]"),
    ({"top_k": 0}, ValueError, r"`top_k` must be an integer >= 1\. Received: top_k=0"),
    ({"feature_layer": 5}, TypeError, r"`feature_layer` must be a layer name\. "
                                      r"Received: feature_layer=5"),
    ({"feature_data": np.ones(3)}, ValueError,
     r"`feature_data` must be a 2-D array .*Received: feature_data with shape \(3,\)"),
    ({"response_mode": "kernels"}, ValueError,
     r"`response_mode` must be one of \['kernel', 'activation'\]\. "
     r"Received: response_mode='kernels'"),
    ({"response_layers": "conv"}, TypeError, r"Received: response_layers='conv'"),
    ({"responses_dir": 1}, TypeError, r"`responses_dir` must be a path\. "
                                      r"Received: responses_dir=1"),
    ({"if_exists": "overwrite"}, ValueError,
     r"`if_exists` must be one of \['continue', 'new', 'error'\]\. "
     r"Received: if_exists='overwrite'"),
    ({"strict": 1}, TypeError, r"`strict` must be True or False\. Received: strict=1"),
    ({"durable": "no"}, TypeError, r"Received: durable='no'"),
    ({"max_queue": 0}, ValueError, r"`max_queue` must be an integer >= 1\. "
                                   r"Received: max_queue=0"),
])
def test_bad_arguments_raise_in_init(tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    log_dir = kwargs.pop("log_dir", tmp_path / "run")
    with pytest.raises(error, match=match):
        WeightWatch(log_dir, **kwargs)
    assert not (tmp_path / "run").exists()


# Every option that only refines another (settings.NEEDS), set without it: refused, naming
# the missing one; with it (or at its default) accepted.
@pytest.mark.parametrize("kwargs, message, partner", [
    ({"top_k": 3}, "`top_k` sets the rows of the top-k feature table and does nothing without "
     "`feature_names`, `feature_layer` or `feature_data`; pass one of them or leave `top_k` out. "
     "Received: top_k=3, feature_names=None, feature_layer=None, feature_data=None",
     {"feature_names": ["a"]}),
    ({"max_kernel_tiles": 16, "kernel_images": False}, "`max_kernel_tiles` sets the tiles of the "
     "kernel grids and the response grids and does nothing without `kernel_images` or "
     "`sample_images`; pass one of them or leave `max_kernel_tiles` out. "
     "Received: max_kernel_tiles=16, kernel_images=False, sample_images=None",
     {"sample_images": np.ones((1, 8, 8, 1))}),
    ({"response_mode": "activation"}, "`response_mode` sets how the responses to the sample "
     "images are made and does nothing without `sample_images`; pass it or leave "
     "`response_mode` out. Received: response_mode='activation', sample_images=None",
     {"sample_images": np.ones((1, 8, 8, 1))}),
    ({"response_layers": ["c"]}, "`response_layers` sets the layers the sample images are "
     "filtered by and does nothing without `sample_images`; pass it or leave `response_layers` "
     "out. Received: response_layers=['c'], sample_images=None",
     {"sample_images": np.ones((1, 8, 8, 1))}),
    ({"responses_dir": "pngs"}, "`responses_dir` sets where the response grids are also written "
     "and does nothing without `sample_images`; pass it or leave `responses_dir` out. "
     "Received: responses_dir='pngs', sample_images=None",
     {"sample_images": np.ones((1, 8, 8, 1))}),
    ({"keep_every": 4}, "`keep_every` sets which snapshots retention keeps besides the last "
     "`keep_last` and does nothing without `keep_last`; pass it or leave `keep_every` out. "
     "Received: keep_every=4, keep_last=None", {"keep_last": 2}),
    ({"spectral_traps": True}, "`spectral_traps` sets whether the spectral metrics count "
     "correlation traps and does nothing without `spectral_freq`; pass it or leave "
     "`spectral_traps` out. Received: spectral_traps=True, spectral_freq=None",
     {"spectral_freq": 1}),
])
def test_an_option_that_would_do_nothing_alone_is_refused(tmp_path, kwargs, message, partner):
    from keras_weightwatch.settings import NEEDS

    with pytest.raises(ValueError) as e:
        WeightWatch(tmp_path / "run", **kwargs)
    assert str(e.value) == message
    (needs,) = [n for n in NEEDS if n.option in kwargs and n.option != "kernel_images"]
    assert set(partner) <= set(needs.any_of)
    WeightWatch(tmp_path / "run", **kwargs, **partner)  # with the option it needs: accepted
    defaults = {k: v for k, v in kwargs.items() if k != needs.option}
    WeightWatch(tmp_path / "run", **defaults)  # without the option itself: accepted


def test_every_option_that_needs_another_is_tested():
    from keras_weightwatch.settings import NEEDS

    tested = {"top_k", "max_kernel_tiles", "response_mode", "response_layers", "responses_dir",
              "keep_every", "spectral_traps"}
    assert {n.option for n in NEEDS} == tested


def test_log_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"must be a directory .*but it is a file\. "
                                         r"Received: log_dir="):
        WeightWatch(f)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"store_dtype": "int8"}, ValueError, "Received: store_dtype='int8'"),
        ({"store_dtype": "float32"}, ValueError, "`store_dtype` must be one of"),
        ({"keep_last": 0}, ValueError, "Received: keep_last=0"),
        ({"keep_last": 1.5}, TypeError, "Received: keep_last=1.5"),
        ({"keep_every": 2}, ValueError, "`keep_every` sets which snapshots retention keeps "
         "besides the last `keep_last` and does nothing without `keep_last`; pass it or leave "
         "`keep_every` out. Received: keep_every=2, keep_last=None"),
        ({"keep_last": 3, "keep_every": 0}, ValueError, "Received: keep_every=0"),
        ({"include": 5}, TypeError, "Received: include=5"),
        ({"include": []}, ValueError, "must not be an empty list"),
        ({"exclude": ["ok", 3]}, TypeError, "must hold only strings"),
        ({"exclude": "dense(["}, ValueError, "not a valid regular expression"),
    ],
)
def test_new_arguments_are_validated(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        WeightWatch(tmp_path / "run", **kwargs)


def test_new_arguments_in_config_with_defaults(tmp_path):
    config = WeightWatch(tmp_path / "run").get_config()
    assert {k: config[k] for k in ("store_dtype", "keep_last", "keep_every", "include",
                                   "exclude", "max_queue")} == {
        "store_dtype": None, "keep_last": None, "keep_every": None, "include": None,
        "exclude": None, "max_queue": 1,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WeightWatch(tmp_path / "run", store_dtype="bfloat16", include="dense")


def test_a_filter_that_leaves_nothing_is_refused_at_train_begin(tmp_path):
    x, y = _data()
    with pytest.raises(ValueError, match="leave none of the model's 4 weights"):
        _mlp().fit(x, y, epochs=1, verbose=0,
                   callbacks=[WeightWatch(tmp_path / "run", include="no_such_layer")])
    assert not _worker_threads()


def _small_cnn():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(1, name="out")])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sample_images": np.ones((1, 1, 8, 8, 1))}, ValueError,
     r"must be a 4-D batch .*Received: sample_images with shape \(1, 1, 8, 8, 1\)"),
    ({"sample_images": np.ones((8, 8))}, ValueError,
     r"must be a 4-D batch .*Received: sample_images with shape \(8, 8\)"),
    ({"sample_images": np.ones((0, 8, 8, 1))}, ValueError,
     r"`sample_images` is empty\. Received: sample_images with shape \(0, 8, 8, 1\)"),
    ({"sample_images": np.ones((2, 8, 8, 2))}, ValueError,
     r"must match the model input shape \(None, 8, 8, 1\)\. "
     r"Received: sample_images with shape \(2, 8, 8, 2\)"),
    ({"sample_images": np.ones((2, 9, 8, 1))}, ValueError,
     r"must match the model input shape"),
    ({"sample_images": np.ones((1, 8, 8, 1), complex)}, TypeError,
     r"`sample_images` must be numeric images\. Received: sample_images with dtype complex128"),
    ({"sample_images": np.array([[[[None]] * 8] * 8])}, TypeError,
     r"must be numeric images\. Received: sample_images with dtype object"),
    ({"feature_layer": "conv", "feature_names": ["a"]}, ValueError,
     r"must name a Dense layer; 'conv' is a Conv2D\. Received: feature_layer='conv'"),
    ({"feature_layer": "missing", "feature_names": ["a"]}, ValueError,
     r"no layer named 'missing'.*Received: feature_layer='missing'"),
    ({"feature_layer": "out", "feature_names": ["a", "b"]}, ValueError,
     r"`feature_names` has 2 names but layer 'out' has 72 input features\. Received: "),
    ({"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["nope"]}, ValueError,
     r"no layer named 'nope'"),
    ({"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["out"]}, ValueError,
     r"must name Conv2D layers.*'out' is a Dense\. Received: response_layers=\['out'\]"),
])
def test_model_dependent_bad_arguments_raise_before_any_epoch(tmp_path, kwargs, error, match):
    model = _small_cnn()
    model.compile(optimizer="sgd", loss="mse")
    counter = _EpochCounter()
    with pytest.raises(error, match=match):
        model.fit(np.zeros((2, 8, 8, 1)), np.zeros((2, 1)), epochs=1, verbose=0,
                  callbacks=[counter, WeightWatch(tmp_path / "run", **kwargs)])
    assert counter.epochs == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "build, kwargs, error, match",
    [
        (
            lambda: _boston_model(),
            {"feature_names": BOSTON[:5]},
            ValueError,
            r"`feature_names` has 5 names but layer 'price' has 13 input features\. Received: ",
        ),
        (
            lambda: _boston_model(),
            {"feature_layer": "nope"},
            ValueError,
            r"no layer named 'nope'.*Received: feature_layer='nope'",
        ),
        (
            lambda: _boston_model(),
            {"feature_layer": "norm"},
            ValueError,
            r"must name a Dense layer; 'norm' is a Normalization\. Received: feature_layer='norm'",
        ),
        (
            lambda: _cnn(),
            {"feature_names": ["a"]},
            ValueError,
            r"needs a Dense layer fed by the model input.*Received: feature_layer=None",
        ),
        (
            lambda: _boston_model(),
            {"feature_names": BOSTON, "feature_data": np.ones((5, 3))},
            ValueError,
            r"must have shape \(samples, 13\).*Received: feature_data with shape \(5, 3\)",
        ),
        (
            lambda: _boston_model(),
            {"feature_data": np.array([["a"] * 13] * 3)},
            TypeError,
            r"`feature_data` must be numeric",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((8, 8, 1))},
            ValueError,
            r"4-D batch.*Received: sample_images with shape \(8, 8, 1\)",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((2, 8, 8, 3))},
            ValueError,
            r"match the model input shape \(None, 8, 8, 1\).*shape \(2, 8, 8, 3\)",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.array([[[["x"]] * 8] * 8])},
            TypeError,
            r"`sample_images` must be numeric images",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["out"]},
            ValueError,
            r"must name Conv2D layers.*'out' is a Dense\. Received: response_layers=",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["x"]},
            ValueError,
            r"no layer named 'x'",
        ),
        (
            lambda: _boston_model(),
            {"sample_images": np.ones((1, 13, 1, 1))},
            ValueError,
            r"`sample_images` needs a Conv2D layer to filter them by, at the model's top level; "
            r"this model has none \(its layers are \['Dense', 'Dropout', 'Normalization'\]\)\. "
            r"Received: sample_images with shape \(1, 13, 1, 1\)",
        ),
        (
            lambda: _cnn(),
            {"response_layers": ["conv"]},
            ValueError,
            r"does nothing without `sample_images`; pass it or leave `response_layers` out\. "
            r"Received: response_layers=\['conv'\], sample_images=None",
        ),
    ],
)
def test_model_dependent_errors_raise_before_any_epoch(tmp_path, build, kwargs, error, match):
    model = build()
    counter = _EpochCounter()
    run = tmp_path / "run"
    with pytest.raises(error, match=match):
        _fit(
            model,
            WeightWatch(run, **kwargs),
            epochs=1,
            extra=[counter],
            x=np.zeros((4,) + model.input_shape[1:], "float32"),
        )
    assert counter.epochs == 0
    assert not os.path.exists(run)


# ------------------------------------------------------------------ the record itself


def test_every_argument_is_a_settings_field_with_the_same_default(tmp_path):
    import dataclasses
    import inspect

    from keras_weightwatch.settings import Settings

    params = inspect.signature(WeightWatch.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert [p for p in params if p != "self"] == list(fields)
    for name, param in params.items():
        if name in ("self", "log_dir"):
            continue
        assert param.default is fields[name].default, name
    # The docstring's "Defaults to ..." says the same default.
    doc = inspect.getdoc(WeightWatch)
    args = doc.split("Args:", 1)[1].split("Example:", 1)[0]
    for name, field in fields.items():
        if name == "log_dir":
            continue
        entry = re.search(rf"^    {name}: (.*?)(?=^    \w+: |\Z)", args, re.S | re.M)
        assert entry, name
        said = re.search(r"Defaults\s+to\s+`?([^\s`.:,]+)", entry.group(1))
        assert said, name
        assert said.group(1).strip("\"'") == str(field.default), name


def test_settings_are_frozen_normalised_and_give_the_config(tmp_path):
    import dataclasses

    from keras_weightwatch.settings import Settings

    s = Settings(tmp_path / "run", feature_names=["a", "b"], include="dense",
                 sample_images=[[[[0.0]]]], feature_data=np.ones((3, 2)))
    assert s.log_dir == os.fspath(tmp_path / "run")
    assert s.feature_names == ("a", "b") and s.include == ("dense",)
    assert isinstance(s.sample_images, np.ndarray) and s.sample_images.shape == (1, 1, 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_k = 3
    config = s.to_config()
    assert config["feature_names"] == ["a", "b"] and config["include"] == ["dense"]
    assert config["sample_images"] == [1, 1, 1, 1] and config["feature_data"] == [3, 2]
    assert s.header("d/kernel") == {**config, "feature_key": "d/kernel"}
    assert s.header() == config
    cb = WeightWatch(tmp_path / "run", feature_names=["a", "b"], include="dense",
                     sample_images=[[[[0.0]]]], feature_data=np.ones((3, 2)))
    assert cb.get_config() == config
    assert cb.feature_names == ("a", "b") and cb.top_k == 5 and cb.log_dir == s.log_dir
    with pytest.raises(AttributeError, match="no attribute 'no_such_option'"):
        cb.no_such_option  # noqa: B018
    assert Settings.create(**{**config, "sample_images": None, "feature_data": None}) == s


def test_validate_keeps_what_a_plain_re_search_keeps():
    from keras_weightwatch.capture import ModelInfo, WeightSpec
    from keras_weightwatch.settings import Settings

    keys = ["dense/kernel", "dense/bias", "head/kernel", "block/conv/kernel#2", "scale"]
    specs = tuple(WeightSpec(k, "m/" + k, k.split("#")[0].rpartition("/")[0], (1,), "float32",
                             True) for k in keys)
    info = ModelInfo("m", "Functional", (), specs)
    for include, exclude in [(None, None), ("kernel", None), (["^head", "conv"], "#2$"),
                             (None, "bias$"), ("^block/conv$", None)]:
        s = Settings("unused-run", include=include, exclude=exclude)
        inc = None if include is None else ([include] if isinstance(include, str) else include)
        exc = [] if exclude is None else [exclude]

        def hit(patterns, spec):
            return any(re.search(p, spec.key) or (spec.layer and re.search(p, spec.layer))
                       for p in patterns)

        expected = tuple(i for i, w in enumerate(specs)
                         if (inc is None or hit(inc, w)) and not hit(exc, w))
        assert s.validate(info) == expected, (include, exclude)
    with pytest.raises(ValueError, match=r"leave none of the model's 5 weights.*"
                                         r"Received: include=\['nothing'\], exclude=None"):
        Settings("unused-run", include="nothing").validate(info)
