"""`keras_weightwatch.rundir` (and the trial a fit belongs to, `fitplan.find_trial`): which
run directory a fit writes when `log_dir` holds a run of another architecture, or when the
fit is a trial execution of a hyperparameter search.

References: the run header's weights read back with `load_run`, the model's own
`weights`, and a real `keras_tuner` `Trial`.
"""

from __future__ import annotations

import os

import keras
import pytest
from tiny_models import data

from keras_weightwatch import WeightWatch, WeightWatchError
from keras_weightwatch.fitplan import Plan, Trial, find_trial
from keras_weightwatch.rundir import beside_other, other_architecture, trial_settings
from keras_weightwatch.settings import Settings


def _model(units=3, lora=0):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, name="a"),
                              keras.layers.Dense(1, name="b")])
    if lora:
        model.get_layer("a").enable_lora(lora)
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.fixture
def run_dir(tmp_path):
    """A run of a 4 -> 3 -> 1 model (4 weights)."""
    x, y = data()
    path = os.fspath(tmp_path / "run")
    _model().fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(path)])
    return path


def _plan(model, settings):
    return Plan.make(model, settings)


def test_a_model_that_extends_the_run_or_matches_it_is_not_another_architecture(run_dir):
    settings = Settings(run_dir)
    assert other_architecture(_plan(_model(), settings), settings, None) is None
    assert other_architecture(_plan(_model(lora=2), settings), settings, None) is None


@pytest.mark.parametrize("if_exists", ["continue", "error"])
def test_another_architecture_is_named_and_goes_beside_or_is_refused(run_dir, if_exists):
    settings = Settings(run_dir, if_exists=if_exists)
    wider = _model(units=5)
    other = other_architecture(_plan(wider, settings), settings, None)
    assert other is not None and other.run_dir == run_dir
    assert other.what == ("weight #0 is a/kernel float32[4, 3] in the run but a/kernel "
                          "float32[4, 5] in the model")
    if if_exists == "error":
        with pytest.raises(WeightWatchError, match=r"holds a run of another architecture "
                                                   r"\(weight #0 is a/kernel .*Received: "
                                                   r"if_exists='error'"):
            beside_other(settings, other)
        assert not os.path.exists(run_dir + "-2")
    else:
        assert beside_other(settings, other) == run_dir + "-2"
        assert beside_other(settings, other) == run_dir + "-3"  # reserved: never twice
    # The callback's own run of an earlier fit counts whatever if_exists says; a new run
    # asked for with if_exists="new" never looks at log_dir.
    assert other_architecture(_plan(wider, settings), settings, run_dir) is not None
    new = Settings(run_dir, if_exists="new")
    assert other_architecture(_plan(wider, new), new, None) is None


def test_no_run_is_no_other_architecture(tmp_path):
    settings = Settings(tmp_path / "empty")
    assert other_architecture(_plan(_model(), settings), settings, None) is None


def test_a_trial_execution_writes_below_log_dir_as_keras_tuner_names_it(tmp_path):
    settings = Settings(tmp_path / "search")
    given, trial = trial_settings(settings, Trial("07", 1, {"units": 3}))
    assert given.log_dir == os.path.join(os.fspath(tmp_path / "search"), "07", "execution1")
    assert trial.execution == 1 and given.freq == settings.freq
    # Without the tuner's index: the first execution directory that holds no run.
    x, y = data()
    first, _ = trial_settings(settings, Trial("08", None, {}))
    _model().fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(first.log_dir)])
    second, trial = trial_settings(settings, Trial("08", None, {}))
    assert first.log_dir.endswith(os.path.join("08", "execution0"))
    assert second.log_dir.endswith(os.path.join("08", "execution1")) and trial.execution == 1
    url = Settings("memory://bucket/search").within("3", "execution0")
    assert url.log_dir == "memory://bucket/search/3/execution0"


def test_find_trial_reads_the_tuners_run_trial_frame():
    from keras_tuner.engine.hyperparameters import HyperParameters
    from keras_tuner.engine.trial import Trial as TunerTrial

    hp = HyperParameters()
    hp.Choice("units", [3, 5], default=5)
    hp.Float("lr", 1e-3, 1e-1, sampling="log", default=0.01)

    def run_trial(trial, *args):
        for execution in range(3):  # noqa: B007 - read from this frame by find_trial
            if execution == 2:
                return fit(trial)
        return None

    def fit(trial):  # a frame between: the tuner's `_build_and_fit_model(trial, ...)`
        return find_trial()

    found = run_trial(TunerTrial(hp, trial_id="0042"))
    assert found == Trial("0042", 2, {"units": 5, "lr": 0.01})
    assert found.to_json() == {"id": "0042", "execution": 2,
                               "hyperparameters": hp.values}

    def custom_run_trial(trial):  # a tuner of one's own: no execution index
        return find_trial()

    assert custom_run_trial(TunerTrial(hp, trial_id="9")) == Trial("9", None, hp.values)

    def not_a_search(trial="a local of the same name"):
        return find_trial()

    assert not_a_search() is None
