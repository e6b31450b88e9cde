"""`weightwatch show` and `verify`, run in-process: argv in, exit code and output out."""

from __future__ import annotations

import io
import json
import os
import sys

import keras
import numpy as np
import pytest
from compare_runs import cli, epochs, oracle, permuted, weights, write_run

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
    assert any(line.split()[:4] == ["bn/moving_mean", "(3,)", "float32", "no"]
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


# --------------------------------------------------------------------------- diff and drift


@pytest.fixture
def numpy_run(tmp_path):
    """A run written with numpy alone (see compare_runs)."""
    return write_run(tmp_path / "run", epochs())


def test_cli_diff_json_has_every_tensor_with_name_rel_l2_and_cosine(tmp_path):
    w = weights(np.random.default_rng(9))
    v = permuted(w)
    del v["out/bias"]
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)])
    code, out, err = cli("diff", a, b, "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    tensors = {t["name"]: t for t in doc["tensors"]}
    assert set(tensors) == set(w)
    for key in v:
        assert tensors[key]["rel_l2"] == pytest.approx(oracle(w[key], v[key])["rel_l2"], rel=1e-9)
        assert tensors[key]["cosine"] == pytest.approx(oracle(w[key], v[key])["cosine"], rel=1e-9)
    assert tensors["out/bias"]["status"] == "only_a" and tensors["out/bias"]["rel_l2"] is None
    assert tensors["conv1/kernel"]["matched_cosine"] == pytest.approx(1.0, abs=1e-9)


def test_cli_diff_layer_filter_and_epoch_vs_epoch(numpy_run):
    code, out, err = cli("diff", f"{numpy_run}@initial", f"{numpy_run}@0", "--layer", "^dense/",
                          "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert [t["name"] for t in doc["tensors"]] == ["dense/kernel", "dense/bias"]
    snaps = epochs()
    for t in doc["tensors"]:
        expect = oracle(snaps[0][2][t["name"]], snaps[1][2][t["name"]])
        assert t["rel_l2"] == pytest.approx(expect["rel_l2"], rel=1e-10)
        assert t["max_abs"] == pytest.approx(expect["max_abs"], rel=1e-10)
    assert doc["a"].endswith("@initial") and doc["b"].endswith("@0")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diff", "{tmp}/missing", "{run}"], "no such run directory"),
        (["diff", "{run}@7", "{run}"], "no snapshot at step 7"),
        (["diff", "{run}@seven", "{run}"], "is not a step"),
        (["diff", "{run}", "{other}"], "no weight tensor in common"),
        (["diff", "{run}", "{run}", "--layer", "nothing"], "matches 'nothing'"),
        (["drift", "{tmp}/missing"], "no such run directory"),
        (["drift", "{one}"], "at least two snapshots"),
    ],
)
def test_cli_errors_are_one_line_on_stderr_and_exit_2(tmp_path, numpy_run, argv, message):
    other = write_run(tmp_path / "other", [("epoch", 0, {"x/kernel": np.ones((2, 2), "f4")})],
                      layers=[("x", "Dense")])
    one = write_run(tmp_path / "one", epochs(1))
    args = [a.format(tmp=tmp_path, run=numpy_run, other=other, one=one) for a in argv]
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("weightwatch: error: ") and message in err
    assert "Traceback" not in err


def test_cli_usage_errors_exit_2(numpy_run, capsys):
    for argv in (["diff", numpy_run, numpy_run, "--layer", "("],
                 ["diff", numpy_run, numpy_run, "--tolerance", "-1"], ["diff", numpy_run]):
        code, out, _ = cli(*argv)
        assert code == 2 and out == ""
        assert "usage: weightwatch" in capsys.readouterr().err


def test_cli_without_scipy_names_the_extra(numpy_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    code, out, err = cli("diff", numpy_run + "@0", numpy_run)
    assert code == 2 and "pip install 'keras-weightwatch[diff]'" in err
    code, out, err = cli("diff", numpy_run + "@0", numpy_run, "--no-match")
    assert code == 0 and "conv1/kernel" in out


def _python(code: str) -> None:
    """Run `code` in a fresh interpreter (this one's import path); it must exit 0."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_show_imports_neither_keras_nor_the_comparison_and_every_public_name_resolves(
        run_dir):
    code = (
        "import sys, io\n"
        "import keras_weightwatch as ww\n"
        "from keras_weightwatch.cli import main\n"
        f"main(['show', {str(run_dir)!r}], stdout=io.StringIO())\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'keras_weightwatch.compare.diff',\n"
        "                     'keras_weightwatch.compare.drift', 'scipy') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "import keras_weightwatch.compare as c, keras_weightwatch.callback as cb\n"
        "import keras_weightwatch.errors as e, keras_weightwatch.health as h\n"
        "names = [n for n in ww.__all__ if n != '__version__']\n"
        "for n in names:\n"
        "    home = next(m for m in (cb, c, h, ww.run, e) if n in getattr(m, '__all__', dir(m)))\n"
        "    assert getattr(ww, n) is getattr(home, n), n\n"
        "assert sorted(dir(ww)) == sorted(ww.__all__) and 'diff_runs' in dir(c)\n"
        "exec('from keras_weightwatch import ' + ', '.join(names))\n"
        "exec('from keras_weightwatch.compare import ' + ', '.join(c.__all__))\n"
    )
    _python(code)


def test_show_imports_only_the_comparisons_records_and_leaves_the_collector_on(run_dir):
    code = (
        "import gc, sys, io\n"
        "from keras_weightwatch import cli\n"
        f"assert cli.main(['show', {str(run_dir)!r}], stdout=io.StringIO()) == 0\n"
        "assert gc.isenabled()\n"
        "loaded = {m for m in sys.modules if m.startswith('keras_weightwatch.compare')}\n"
        "vocabulary = {'keras_weightwatch.compare', 'keras_weightwatch.compare.records'}\n"
        "assert loaded <= vocabulary, loaded\n"
    )
    _python(code)


def test_show_leaves_a_paused_collector_paused_and_restarts_it_after_an_error(run_dir, tmp_path):
    import gc

    gc.disable()
    try:
        code, out, _ = _run_cli("show", str(run_dir))
        assert code == 0 and out and not gc.isenabled()
    finally:
        gc.enable()
    code, _, err = _run_cli("show", str(tmp_path / "missing"))
    assert code == 2 and "no such run directory" in err and gc.isenabled()


# --------------------------------------------------------------------------- doctor


@pytest.fixture(scope="module")
def health_runs(tmp_path_factory):
    """A healthy run, a run with a warning only (symmetry) and a run with a NaN planted
    (non_finite, an error), written without live health checks."""
    from health_helpers import constant_fit, diverging_fit, healthy_fit

    root = tmp_path_factory.mktemp("doctor")
    healthy_fit(root / "healthy", health=None)
    constant_fit(root / "warned", epochs=2, health=None)
    diverging_fit(root / "nan", epochs=2, health=None)
    return {name: str(root / name) for name in ("healthy", "warned", "nan")}


def test_doctor_healthy_run_exits_0(health_runs):
    from keras_weightwatch.health.monitor import NEEDS

    code, out, err = _run_cli("doctor", health_runs["healthy"])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{health_runs['healthy']}: 3 snapshots, healthy (no finding)"
    assert lines[2:] == [f"not checked: {n}" for n in NEEDS.values()]


def test_doctor_warnings_only_exit_0_and_are_printed(health_runs):
    code, out, _ = _run_cli("doctor", health_runs["warned"])
    assert code == 0
    assert out.splitlines()[0].endswith(": 3 snapshots, 0 error(s), 1 warning(s)")
    assert "WARNING symmetry in layer constant: step 0 (shown since -1), last at 1" in out


def test_doctor_error_exits_1_naming_the_layer_and_the_weights_that_followed(health_runs):
    code, out, _ = _run_cli("doctor", health_runs["nan"])
    assert code == 1
    assert out.splitlines()[0].endswith(": 3 snapshots, 1 error(s), 0 warning(s)")
    assert "ERROR   non_finite in layer hidden1: step 0, last at 1" in out
    assert "followed by: hidden1/bias@0, hidden2/kernel@0" in out


@pytest.mark.parametrize(("name", "code"), [("healthy", 0), ("warned", 0), ("nan", 1)])
def test_doctor_json_is_the_diagnosis(health_runs, name, code):
    from keras_weightwatch.health import diagnose

    got, out, _ = _run_cli("doctor", health_runs[name], "--json")
    assert got == code
    doc = json.loads(out)
    d = diagnose(health_runs[name])
    assert doc["findings"] == [f.to_json() for f in d.findings]
    assert doc == {"run": health_runs[name], "snapshots": d.snapshots,
                   "healthy": not d.findings, "errors": len(d.errors),
                   "findings": doc["findings"], "notes": d.notes}
    assert doc["errors"] == code and doc["healthy"] == (name == "healthy")


def test_doctor_missing_or_unreadable_run_exits_2(tmp_path):
    code, out, err = _run_cli("doctor", str(tmp_path / "nope"))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "no such run directory" in err
    (tmp_path / "empty").mkdir()
    code, out, err = _run_cli("doctor", str(tmp_path / "empty"), "--json")
    assert (code, out) == (2, "")
    assert "run header not found" in err


@pytest.mark.parametrize(("argv", "message"), [
    (("doctor",), "the following arguments are required: run"),
    (("doctor", "x", "--bogus"), "unrecognized arguments: --bogus"),
])
def test_doctor_usage_errors_exit_2(argv, message, capsys):
    code, _, _ = _run_cli(*argv)
    assert code == 2
    assert message in capsys.readouterr().err
