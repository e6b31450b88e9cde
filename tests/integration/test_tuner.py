"""KerasTuner: a real `RandomSearch` watched by one `WeightWatch` in its callbacks.

KerasTuner deep-copies the callbacks for every execution of every trial and tells a
callback nothing of the trial; WeightWatch learns it from the tuner's `run_trial` frame
and writes each execution to `log_dir/<trial id>/execution<k>`. References: the tuner's
own trials (`tuner.oracle.trials`: status, hyperparameters), the weights every fit ended
with (`get_weights()` at train end, recorded by a callback outside the search's copies),
and the runs' own files (`verify_run`).
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import redirect_stdout

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, WeightWatchWarning, load_run, verify_run
from keras_weightwatch.cli import main

keras_tuner = pytest.importorskip("keras_tuner")

pytestmark = [pytest.mark.slow,
              # keras-tuner's own deprecated threading calls, not ours to fix
              pytest.mark.filterwarnings("ignore::DeprecationWarning:keras_tuner.*")]

UNITS = [3, 5]
RATES = [0.01, 0.1]


class _Ends(keras.callbacks.Callback):
    """The weights each fit ended with, in the order the fits ran (kept on the class: the
    tuner deep-copies every callback for each execution)."""

    ended: list[list[np.ndarray]] = []

    def on_train_end(self, logs=None):
        type(self).ended.append([np.array(w, copy=True) for w in self.model.get_weights()])


def _build(hp):
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(hp.Choice("units", UNITS), name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(hp.Choice("lr", RATES)), loss="mse")
    return model


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    x = rng.random((32, 4), dtype=np.float32)
    y = rng.random((32, 1), dtype=np.float32)
    keras.utils.set_random_seed(0)
    tuner = keras_tuner.RandomSearch(_build, objective="loss", max_trials=4,
                                     executions_per_trial=2, seed=1,
                                     directory=os.fspath(tmp_path / "tuner"), project_name="p")
    _Ends.ended = []
    log_dir = os.fspath(tmp_path / "runs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightWatchWarning)
        tuner.search(x, y, epochs=2, batch_size=8, verbose=0,
                     callbacks=[WeightWatch(log_dir), _Ends()])
    said = [w for w in caught if issubclass(w.category, WeightWatchWarning)]
    return tuner, log_dir, said


def _run_dirs(log_dir):
    out = set()
    for root, _, files in os.walk(log_dir):
        if "weightwatch.json" in files:
            out.add(os.path.relpath(root, log_dir))
    return out


def test_every_trial_execution_completes_in_a_run_of_its_own(search):
    tuner, log_dir, said = search
    trials = list(tuner.oracle.trials.values())
    assert len(trials) == 4 and said == []
    assert all(t.status == "COMPLETED" for t in trials)
    assert sorted((t.hyperparameters.values["units"], t.hyperparameters.values["lr"])
                  for t in trials) == sorted((u, r) for u in UNITS for r in RATES)
    expected = {os.path.join(t.trial_id, f"execution{k}") for t in trials for k in (0, 1)}
    assert _run_dirs(log_dir) == expected
    ends = iter(_Ends.ended)
    for trial in trials:
        hp = trial.hyperparameters.values
        for k in (0, 1):
            path = os.path.join(log_dir, trial.trial_id, f"execution{k}")
            report = verify_run(path)
            assert report.ok and report.snapshots == 3, report.problems
            run = load_run(path)
            assert run.steps == [-1, 0, 1]
            assert_same_arrays(run.weights("last"), next(ends))
            # One architecture: the header's weights are every snapshot's tensors.
            shapes = {s.key: s.shape for s in run.specs}
            assert shapes["hidden/kernel"] == (4, hp["units"])
            for snap in run.snapshots:
                assert {k: r.shape for k, r in snap.tensors.items()} == shapes
            # What tells the trials apart: the trial, the optimizer, the layers.
            assert run.model["trial"] == {"id": trial.trial_id, "execution": k,
                                          "hyperparameters": hp}
            optimizer = run.model["optimizer"]
            assert optimizer["class_name"] == "SGD"
            assert optimizer["learning_rate"] == pytest.approx(hp["lr"], rel=1e-6)
            layers = {c["name"]: c for c in run.model["config"]["layers"]}
            assert layers["hidden"]["units"] == hp["units"] and layers["out"]["units"] == 1
    assert next(ends, None) is None


def test_show_and_diff_across_widths(search):
    tuner, log_dir, _ = search
    by_units = {}
    for t in tuner.oracle.trials.values():
        by_units.setdefault(t.hyperparameters.values["units"], t)
    narrow, wide = (os.path.join(log_dir, by_units[u].trial_id, "execution0") for u in UNITS)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["show", narrow]) == 0
    text = out.getvalue()
    trial = by_units[3]
    assert f"trial     {trial.trial_id}, execution 0" in text
    for name, value in trial.hyperparameters.values.items():
        assert f"{name}={value}" in text
    assert "optimizer SGD" in text
    # The tab's run summary carries the same lines (shown beside the run chosen).
    from keras_weightwatch.tensorboard_plugin import content

    fit = dict(content.summary(load_run(narrow), "narrow")["fit"])
    assert f"trial     {fit['trial']}" in text and f"optimizer {fit['optimizer']}" in text
    assert fit["trial"].startswith(f"{trial.trial_id}, execution 0: ")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["diff", f"{narrow}@last", f"{wide}@last"])
    assert code == 0, out.getvalue()
    assert "hidden/kernel" in out.getvalue()
