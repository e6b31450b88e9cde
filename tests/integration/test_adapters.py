"""Adapters end to end: a real Keras model with LoRA on a Conv2D and two Dense layers, one of
whose adapters cannot train, fitted with WeightWatch; the stored update sizes against numpy of
the run's own snapshots, the TensorBoard scalars and table read back with TensorBoard's reader,
one warning and one `show` line for the adapter that does not train."""

from __future__ import annotations

import io
import os
import warnings

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.util import tensor_util

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.cli import main
from keras_weightwatch.errors import WeightWatchWarning
from keras_weightwatch.views.adapters import IDLE_SNAPSHOTS, SUMMARY_TAG

EPOCHS = 4
LAYERS = ("conv", "hidden", "stuck")


def _model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3, name="conv")(inp)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(h)
    out = keras.layers.Dense(2, name="stuck")(h)
    model = keras.Model(inp, out)
    for name in LAYERS:
        model.get_layer(name).enable_lora(2)
    model.get_layer("stuck").lora_kernel_b.trainable = False  # its B stays all zeros
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("adapters") / "run")
    model = _model()
    rng = np.random.default_rng(1)
    x, y = rng.random((32, 6, 6, 1)).astype("f4"), rng.random((32, 2)).astype("f4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=EPOCHS, batch_size=8, verbose=0, callbacks=[WeightWatch(run_dir)])
    told = [str(w.message) for w in caught if issubclass(w.category, WeightWatchWarning)]
    return run_dir, model, told


def _expected(run, layer, step, scale):
    w = run.weights(step)
    a = w[f"{layer}/lora_kernel_a"].astype(np.float64)
    b = w[f"{layer}/lora_kernel_b"].astype(np.float64)
    base = w[f"{layer}/kernel"].astype(np.float64)
    return np.linalg.norm(scale * np.matmul(a, b)) / np.linalg.norm(base)


def test_stored_update_size_equals_numpy_of_the_runs_own_weights(fitted):
    run_dir, model, _ = fitted
    run = load_run(run_dir)
    assert run.steps == list(range(-1, EPOCHS))
    for name in LAYERS:
        layer = model.get_layer(name)
        scale = layer.lora_alpha / layer.lora_rank
        for step in run.steps:
            got = run.snapshot(step).stats[f"{name}/kernel"]["lora_update"]
            assert got == pytest.approx(_expected(run, name, step, scale), rel=1e-5, abs=1e-12)
    # the layers that train moved their adapters; the stuck one applies no update at all
    last = run.snapshot("last").stats
    assert last["conv/kernel"]["lora_update"] > 0 and last["hidden/kernel"]["lora_update"] > 0
    assert last["stuck/kernel"]["lora_update"] == 0.0
    assert not run.weights("last")["stuck/lora_kernel_b"].any()
    # the stored base is what the model holds (the frozen `_kernel`), bit for bit
    np.testing.assert_array_equal(run.weights("last")["conv/kernel"],
                                  keras.ops.convert_to_numpy(model.get_layer("conv")._kernel))


def _acc(run_dir):
    acc = pea.EventAccumulator(os.path.join(run_dir, "weights"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return acc


def _values(acc, tag):
    return {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}


def test_tensorboard_scalars_and_table_read_back(fitted):
    run_dir, _, _ = fitted
    run, acc = load_run(run_dir), _acc(run_dir)
    for name in LAYERS:
        tag = f"{name}/kernel/lora_update"
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
        got = _values(acc, tag)
        assert sorted(got) == run.steps
        for step, v in got.items():
            assert float(v) == pytest.approx(run.snapshot(step).stats[f"{name}/kernel"][
                "lora_update"], rel=1e-6, abs=1e-12)
    tables = _values(acc, SUMMARY_TAG)
    assert acc.SummaryMetadata(SUMMARY_TAG).plugin_data.plugin_name == "text"
    assert sorted(tables) == run.steps
    last = tables[run.steps[-1]].item().decode()
    rows = {line.split("|")[1].strip(): line for line in last.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")}
    assert set(rows) == set(LAYERS)
    assert "NOT TRAINING" in rows["stuck"]
    assert "NOT TRAINING" not in rows["conv"] and "NOT TRAINING" not in rows["hidden"]
    # before the stuck adapter has been still for IDLE_SNAPSHOTS snapshots, it is not marked
    early = tables[run.steps[IDLE_SNAPSHOTS - 2]].item().decode()
    assert "NOT TRAINING" not in early


def test_the_adapter_that_cannot_train_is_flagged_once(fitted):
    _, _, told = fitted
    flagged = [t for t in told if "LoRA adapter" in t]
    assert len(flagged) == 1, told
    assert "'stuck'" in flagged[0] and "B still all zeros" in flagged[0]
    run = load_run(fitted[0])
    stalled = {name: [run.snapshot(s).stats[f"{name}/kernel"]["lora_stalled"] for s in run.steps]
               for name in LAYERS}
    assert stalled["stuck"] == [0.0] * (IDLE_SNAPSHOTS - 1) + [1.0] * (
        len(run.steps) - IDLE_SNAPSHOTS + 1)
    assert not any(stalled["conv"]) and not any(stalled["hidden"])


def test_show_has_a_line_for_the_adapter_not_training(fitted):
    out = io.StringIO()
    assert main(["show", fitted[0]], stdout=out) == 0
    text = out.getvalue()
    section = text[text.index("\nadapters"):]
    lines = {line.split()[0]: line for line in section.splitlines()[2:] if line.strip()}
    assert "NOT TRAINING" in lines["stuck"]
    assert "NOT TRAINING" not in lines["conv"] and "NOT TRAINING" not in lines["hidden"]
    assert sum("NOT TRAINING" in line for line in text.splitlines()) == 2  # summary + row


def test_the_tab_lists_each_adapter_with_its_mark(fitted):
    from keras_weightwatch.tensorboard_plugin import content

    run = load_run(fitted[0])
    listed = {a["layer"]: a for a in content.summary(run, "run")["adapters"]}
    assert set(listed) == set(LAYERS)
    assert listed["stuck"]["stalled"] and listed["stuck"]["idle"] == len(run.steps)
    assert not listed["conv"]["stalled"] and not listed["hidden"]["stalled"]
    last = run.snapshot("last").stats
    for name, a in listed.items():
        assert [s for s, _ in a["update"]] == [s.name for s in run.snapshots]
        assert a["update"][-1][1] == last[f"{name}/kernel"]["lora_update"]
        assert a["b_ratio"] == last[f"{name}/lora_kernel_b"]["update_ratio"]
