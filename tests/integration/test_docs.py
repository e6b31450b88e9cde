"""The docs run as written: the README's snippets and commands, and every public example.

The README's Python blocks are executed in order in an empty directory (they train the
quickstart's runs, `runs/exp1` and `runs/exp2`); its `weightwatch` command lines then run
there through the CLI, and the docstring examples of the package (doctests, and the
fenced examples of public names) run against those same runs.
"""

from __future__ import annotations

import doctest
import importlib
import io
import json
import os
import pkgutil
import re
import shlex
import shutil
import textwrap

import numpy as np
import pytest

import keras_weightwatch
from keras_weightwatch.cli import main

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as _f:
    README = _f.read()


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Runs the README's Python blocks in order; returns (directory, namespace)."""
    import keras

    d = tmp_path_factory.mktemp("readme")
    here = os.getcwd()
    os.chdir(d)
    keras.backend.clear_session()
    ns: dict = {}
    try:
        for n, code in enumerate(fenced(README, "python")):
            exec(compile(code, f"README.md python block {n}", "exec"), ns)  # noqa: S102
    finally:
        os.chdir(here)
    return d, ns


@pytest.fixture
def in_readme_dir(readme):
    here = os.getcwd()
    os.chdir(readme[0])
    yield readme
    os.chdir(here)


def test_readme_python_blocks_do_what_they_say(in_readme_dir):
    d, ns = in_readme_dir
    run, model = ns["run"], ns["model"]
    assert run.epochs == list(range(20))
    for got, expected in zip(run.weights().values(), model.get_weights()):
        np.testing.assert_array_equal(got, expected)
    assert set(run.logs(3)) == {"loss", "mae"}
    # the numpy-alone reader of "The run directory" read the same array as load_run
    np.testing.assert_array_equal(ns["kernel"], run.weights(3)["hidden/kernel"])
    # the diff block compared exp1 and exp2
    t = ns["result"].tensor("hidden/kernel")
    assert t.name == "hidden/kernel" and t.status == "changed"
    assert len(fenced(README, "python")) >= 4
    # the fine-tuning block: one run, the adapters joining at the fine-tune's first step
    tuned = ns["tuned"]
    assert tuned.steps == list(range(-1, 6)) and [d.key for d in tuned.derived] == ["hidden/kernel"]
    assert [s.step for s in tuned.snapshots if "hidden/lora_kernel_b" in s.tensors] == [3, 4, 5]
    layer = ns["ft"].get_layer("hidden")  # the effective kernel is layer.kernel
    np.testing.assert_allclose(ns["effective"], np.asarray(layer.kernel), atol=1e-6)


def test_readme_commands_run_and_succeed(in_readme_dir):
    d, _ = in_readme_dir
    lines = [
        line.split("  #")[0].strip()
        for block in fenced(README, "bash")
        for line in block.splitlines()
        if line.startswith("weightwatch ")
    ]
    assert len(lines) >= 7
    for line in lines:
        out, err = io.StringIO(), io.StringIO()
        code = main(shlex.split(line)[1:], stdout=out, stderr=err)
        assert code == 0, (line, err.getvalue())
        if "--json" in line:
            doc = json.loads(out.getvalue())
            assert {t["name"] for t in doc["tensors"]} == {"hidden/kernel", "hidden/bias"}
        if line.startswith("weightwatch verify"):
            assert out.getvalue().startswith("OK: 21 snapshots")


def test_every_public_name_has_an_example():
    missing = []
    for name in keras_weightwatch.__all__:
        if name == "__version__":
            continue
        doc = getattr(keras_weightwatch, name).__doc__ or ""
        if ">>>" not in doc and "```python" not in doc and "Example: see `" not in doc:
            missing.append(name)
    assert missing == []


def _modules():
    yield keras_weightwatch
    # every module, those of subpackages (keras_weightwatch.run, .compare) included
    for info in pkgutil.walk_packages(keras_weightwatch.__path__, prefix="keras_weightwatch."):
        yield importlib.import_module(info.name)


def test_doctests_of_every_module_pass(in_readme_dir):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    tried, report = set(), []
    for module in _modules():
        for test in finder.find(module):
            if test.examples:
                runner.run(test, out=report.append)
                tried.add(test.name)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    # the examples of the public names are among them
    for name in ("load_run", "verify_run", "diff_runs", "drift", "TensorRecord",
                 "SnapshotRecord", "TensorDiff", "DiffResult", "WeightWatchWarning"):
        assert any(t.endswith("." + name) for t in tried), name


def test_fenced_examples_in_public_docstrings_run(readme, tmp_path):
    # on a copy of the README's runs, with its model, x and y in scope
    d, ns = readme
    shutil.copytree(d / "runs", tmp_path / "runs")
    here = os.getcwd()
    os.chdir(tmp_path)
    ran = 0
    try:
        for name in keras_weightwatch.__all__:
            doc = getattr(getattr(keras_weightwatch, name), "__doc__", "") or ""
            for code in fenced(doc, "python"):
                code = textwrap.dedent(code)
                exec(compile(code, f"{name} docstring", "exec"), dict(ns))  # noqa: S102
                ran += 1
    finally:
        os.chdir(here)
    assert ran >= 1


def test_a_run_opened_by_a_relative_path_survives_a_chdir(readme, tmp_path, monkeypatch):
    _, ns = readme  # load_run("runs/exp1") ran in the README's directory
    monkeypatch.chdir(tmp_path)  # an empty directory: no runs/ here
    np.testing.assert_array_equal(ns["run"].weights(3)["hidden/kernel"], ns["kernel"])
    assert ns["run"].verify().ok


def test_readme_argument_table_lists_every_argument_of_weightwatch():
    import inspect

    from keras_weightwatch import WeightWatch

    table = README[README.index("## WeightWatch's arguments"):README.index("## The command line")]
    rows = re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", table, re.M)
    listed = {name for row in rows for name in row if name}
    params = set(inspect.signature(WeightWatch.__init__).parameters) - {"self"}
    assert listed == params
    # every argument but the ones that may hold credentials, which are never recorded
    from keras_weightwatch.settings import SECRET_OPTIONS

    assert SECRET_OPTIONS == {"storage_options"}
    assert set(WeightWatch("runs/unused").get_config()) == params - SECRET_OPTIONS
