"""The README's Quickstart, run twice as a script: the second run is a new training and
starts `runs/exp1-2` beside the first, which it leaves untouched.

Each run is a fresh Python process (as `python quickstart.py` twice is); the reference
is the first run's files, byte for byte, and each process's own final weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_weightwatch import load_run

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quickstart() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    # Save the model's final weights, to compare with the run the script wrote.
    return code.group(1) + "\nnp.savez('final.npz', *model.get_weights())\n"


def _run(cwd):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "quickstart.py"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(os.path.join(cwd, "final.npz")) as f:
        final = [f[f"arr_{i}"] for i in range(len(f.files))]
    return proc.stderr, final


def _files(run_dir):
    out = {}
    for sub in ("snapshots", "tensors"):
        for name in os.listdir(os.path.join(run_dir, sub)):
            with open(os.path.join(run_dir, sub, name), "rb") as f:
                out[f"{sub}/{name}"] = f.read()
    return out


def test_the_quickstart_run_twice_writes_two_runs_and_says_so(tmp_path):
    (tmp_path / "quickstart.py").write_text(_quickstart())
    err1, final1 = _run(tmp_path)
    assert "WeightWatchWarning" not in err1
    exp1 = os.path.join(tmp_path, "runs", "exp1")
    before = _files(exp1)
    err2, final2 = _run(tmp_path)
    said = [line for line in err2.splitlines() if "WeightWatchWarning" in line]
    assert len(said) == 1, err2[-3000:]
    assert "runs/exp1 holds a run whose last snapshot (step 19)" in said[0]
    assert "written to runs/exp1-2, beside it" in said[0]
    assert _files(exp1) == before  # the first training is untouched
    for path, final in ((exp1, final1), (exp1 + "-2", final2)):
        run = load_run(path)
        assert run.steps == list(range(-1, 20))  # one training each: no steps 20-39
        for got, expected in zip(run.weights("last").values(), final):
            np.testing.assert_array_equal(got, expected)
        assert run.verify().ok
    assert not os.path.exists(exp1 + "-3")
