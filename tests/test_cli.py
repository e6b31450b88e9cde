"""`weightwatch show` and `verify`, run in-process: argv in, exit code and output out."""

from __future__ import annotations

import io
import os

import keras
import numpy as np
import pytest

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.cli import main


def _run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("cli") / "run"
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, name="hidden"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(1, name="out"),
    ])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model.fit(x, x[:, :1], epochs=2, verbose=0, callbacks=[WeightWatch(path)])
    return str(path)


def test_show_lists_epochs_layers_shapes_params_and_metrics(run_dir):
    code, out, err = _run_cli("show", run_dir)
    assert code == 0 and err == ""
    run = load_run(run_dir)
    assert "snapshots 3: initial, 0, 1" in out
    for layer in run.layers:
        assert any(line.split()[:3] == [layer.name, layer.class_name, f"{layer.params:,}"]
                   for line in out.splitlines()), layer
    assert any(line.split()[:5] == ["hidden/kernel", "(4,", "3)", "float32", "yes"]
               for line in out.splitlines())
    assert any(line.split()[:4] == ["bn/moving_mean", "(3)", "float32", "no"]
               for line in out.splitlines())
    metric_lines = out.split("metrics")[1].splitlines()[3:]
    metric_rows = {line.split()[0]: line.split()[1:] for line in metric_lines}
    assert float(metric_rows["1"][0]) == pytest.approx(run.logs(1)["loss"], rel=1e-3)
    assert float(metric_rows["1"][1]) == pytest.approx(run.logs(1)["mae"], rel=1e-3)
    assert "31 parameters" in out


def test_verify_ok(run_dir):
    code, out, err = _run_cli("verify", run_dir)
    assert code == 0
    assert out.startswith("OK: 3 snapshots")


def test_verify_names_each_damaged_and_missing_file(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    run = load_run(copy)
    damaged = run.snapshot(1).tensors["hidden/kernel"].file
    missing = run.snapshot(1).tensors["out/kernel"].file
    data = bytearray((copy / damaged).read_bytes())
    data[-1] ^= 0x01
    (copy / damaged).write_bytes(bytes(data))
    os.unlink(copy / missing)
    code, out, _ = _run_cli("verify", str(copy))
    assert code == 1
    assert f"{os.path.join(str(copy), damaged)}: checksum mismatch" in out
    assert f"{os.path.join(str(copy), missing)}: missing" in out
    assert out.splitlines()[-1].startswith("FAILED")


@pytest.mark.parametrize("command", ["show", "verify"])
def test_missing_run_is_one_line_on_stderr(tmp_path, command):
    code, out, err = _run_cli(command, str(tmp_path / "nope"))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "no such run directory" in err


def test_usage_error_exits_2(capsys):
    code, _, _ = _run_cli("frobnicate")
    assert code == 2
    assert "invalid choice" in capsys.readouterr().err
