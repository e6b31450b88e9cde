"""Each script in examples/ runs offline in seconds with --quick and shows what it says it does."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from keras_weightwatch import load_run, verify_run

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name: str, logdir) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
               KERAS_BACKEND="tensorflow", PYTHONHASHSEED="0")
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), "--quick", "--logdir", str(logdir)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_book_boston_style_prints_the_top_k_table_of_every_epoch(tmp_path):
    from sklearn.datasets import load_diabetes

    logdir = tmp_path / "book"
    out = run_example("book_boston_style.py", logdir)
    names = list(load_diabetes().feature_names)
    run = load_run(logdir)
    assert verify_run(logdir).ok
    table = out.split("at every epoch, from load_run:", 1)[1].splitlines()[2:]
    rows = {int(r.split()[0]): r.split() for r in table[: len(run.epochs)]}
    assert sorted(rows) == run.epochs == [0, 1, 2]
    for step, cells in rows.items():
        kernel = np.asarray(run.weights(step)["linear/kernel"])[:, 0]
        assert float(cells[1]) == pytest.approx(run.logs(step)["val_mae"], abs=0.006)
        pairs = list(zip(cells[2::2], map(float, cells[3::2])))
        expected = np.argsort(-np.abs(kernel), kind="stable")[:5]
        assert [n for n, _ in pairs] == [names[i] for i in expected]
        for (_, w), i in zip(pairs, expected):
            assert w == pytest.approx(kernel[i], abs=0.006)
    # The caveat, in numbers anyone can recompute.
    x = load_diabetes(scaled=False).data
    order = np.random.default_rng(0).permutation(len(x))[: int(0.8 * len(x))]
    r = np.corrcoef(x[order].T)[names.index("s1"), names.index("s2")]
    assert f"s1 and s2 are correlated (r = {r:.3f})" in out
    # The last table flags s1/s2 (threshold 0.85) and nothing else.
    final = out.split("The book's table after the last epoch", 1)[1].splitlines()[2:7]
    for row in final:
        m = re.fullmatch(r"\s+\d  (\S+)\s+[+-]\d+\.\d{3}(?:  (\S+) \(r = ([+-]\d\.\d{3})\))?", row)
        assert m, row
        name, partner, corr = m.groups()
        if name in ("s1", "s2"):
            assert partner == ({"s1", "s2"} - {name}).pop()
            assert float(corr) == pytest.approx(r, abs=1e-3)
        else:
            assert partner is None


def test_course_conv_kernels_draws_five_kernels_and_filters_two_digits(tmp_path):
    logdir = tmp_path / "course"
    out = run_example("course_conv_kernels.py", logdir)
    run = load_run(logdir)
    kernel = np.asarray(run.weights()["conv1/kernel"])
    assert kernel.shape == (3, 3, 1, 5)
    # The printed kernels are the run's kernels.
    for k in range(5):
        block = out.split(f"\nkernel {k}: ", 1)[1].splitlines()[1:4]
        printed = np.array([[float(v) for v in row.split()] for row in block])
        np.testing.assert_allclose(printed, kernel[:, :, 0, k], atol=0.006)
    # kernels.png: 5 tiles of 3x3 weights side by side.
    from keras_weightwatch import images

    width, height = png_size(logdir / "kernels.png")
    assert (height, width) == images.kernel_grid(kernel).image.shape[:2]
    assert width > 4 * height
    # The response table: mean |cross-correlation| of each digit with each kernel, recomputed
    # here with an explicit loop over zero-padded 3x3 windows.
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:400]
    x, y = d.images[order] / 16.0, d.target[order]
    x_test, y_test = x[320:], y[320:]
    rows = out.split("digit  k0", 1)[1].splitlines()[1:3]
    for row, digit in zip(rows, (0, 7)):
        cells = row.split()
        assert int(cells[0]) == digit
        img = np.pad(x_test[np.flatnonzero(y_test == digit)[0]].astype("float32"), 1)
        for k in range(5):
            w = kernel[:, :, 0, k]
            resp = np.array([[np.sum(img[i:i + 3, j:j + 3] * w) for j in range(8)]
                             for i in range(8)])
            assert float(cells[1 + k]) == pytest.approx(np.abs(resp).mean(), abs=6e-4)
    # Its own response grids, and WeightWatch's (responses_dir=): one per test digit and snapshot.
    for digit in (0, 7):
        png_size(logdir / f"responses_digit{digit}.png")
    pngs = [os.path.join(root, f) for root, _, files in os.walk(logdir / "responses_png")
            for f in files]
    assert len(pngs) == 2 * len(run.snapshots) and all(p.endswith(".png") for p in pngs)
    assert f"({len(pngs)} PNG files under" in out
    assert {png_size(p) for p in pngs} == {png_size(logdir / "responses_digit0.png")}


def test_fine_tuning_frozen_base_stores_frozen_tensors_once_without_drift(tmp_path):
    logdir = tmp_path / "finetune"
    out = run_example("fine_tuning_frozen_base.py", logdir)
    run = load_run(logdir)
    assert verify_run(logdir).ok
    assert "frozen base: stored once, zero drift" in out
    base = [s.key for s in run.specs if s.key.startswith("base/")]
    head = [s.key for s in run.specs if s.key.startswith("head_")]
    assert len(base) == 8 and len(head) == 4
    assert all(not s.trainable for s in run.specs if s.key in base)
    for key in base:
        assert len({snap.tensors[key].sha256 for snap in run.snapshots}) == 1, key
    for key in head:
        assert len({snap.tensors[key].sha256 for snap in run.snapshots}) == len(run.snapshots)
    files = os.listdir(logdir / "tensors")
    assert f"tensor files: {len(files)} (" in out
    assert len(files) == len(base) + len(head) * len(run.snapshots)
    on_disk = sum(os.path.getsize(logdir / "tensors" / f) for f in files)
    assert f"({on_disk:,} bytes)" in out


def test_compare_two_runs_matches_shuffled_units_and_tells_seeds_apart(tmp_path):
    from keras_weightwatch import diff_runs

    logdir = tmp_path / "compare"
    out = run_example("compare_two_runs.py", logdir)
    assert "seed1-shuffled computes the same function as seed1: True" in out
    runs = {n: str(logdir / n) for n in ("seed1", "seed2", "seed1-shuffled")}
    for n in runs.values():
        assert verify_run(n).ok
    # The shuffled twin holds seed1's weights, permuted: the same multiset of values.
    a, b = load_run(runs["seed1"]).weights(), load_run(runs["seed1-shuffled"]).weights()
    for key in ("conv/kernel", "hidden/kernel", "logits/kernel"):
        assert not np.array_equal(a[key], b[key])
        np.testing.assert_array_equal(np.sort(a[key], axis=None), np.sort(b[key], axis=None))
    # The printed table is diff_runs' result; matching recovers the twin exactly.
    for other in ("seed1-shuffled", "seed2"):
        block = out.split(f"seed1 vs {other}: per layer", 1)[1].splitlines()[1:4]
        printed = {r.split()[0]: (float(r.split()[1]), float(r.split()[3])) for r in block}
        result = diff_runs(runs["seed1"], runs[other])
        assert set(printed) == {"conv", "hidden", "logits"}
        for layer in result.layers:
            assert printed[layer.name] == pytest.approx(
                (layer.cosine, layer.matched_cosine), abs=6e-5)
            if other == "seed1-shuffled":
                assert layer.cosine < 0.9 and layer.matched_cosine == pytest.approx(1, abs=1e-6)
            else:
                assert layer.matched_cosine < 0.99


def test_lora_fine_tune_continues_one_run_and_reports_each_adapted_kernel(tmp_path):
    logdir = tmp_path / "lora"
    out = run_example("lora_fine_tune.py", logdir)
    run = load_run(logdir)
    assert verify_run(logdir).ok
    assert [d.key for d in run.derived] == ["conv/kernel", "head/kernel"]
    pretrained = max(s.step for s in run.snapshots if "conv/lora_kernel_a" not in s.tensors)
    assert f"LoRA from step {pretrained + 1} on (2 adapted kernels)" in out
    before = run.weights(pretrained)
    for d in run.derived:
        a, b = (run.tensor(d.inputs[r]).astype(np.float64) for r in ("a", "b"))
        base = before[d.key].astype(np.float64)
        effective = base + d.params["scale"] * np.matmul(a, b)  # numpy, from the stored adapters
        moved = np.linalg.norm(effective - base) / np.linalg.norm(base)
        line = next(x for x in out.splitlines() if x.startswith(d.key))
        assert f"moved {moved:6.1%}" in line and moved > 0.01
        assert "base stored as 1 file(s)" in line and "effective == layer.kernel: True" in line
        assert "base unchanged: True" in line
