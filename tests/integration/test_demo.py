"""`weightwatch demo --quick`, run in-process through cli.main: what it writes and prints."""

from __future__ import annotations

import io
import os
import re
import sys

import numpy as np
import pytest
from helpers import run_group, run_kernel_tags

from keras_weightwatch import demo as demo_module
from keras_weightwatch import load_run, verify_run
from keras_weightwatch.cli import main
from keras_weightwatch.summaries import RESPONSES, response_tag, saliency_tag

pytestmark = pytest.mark.slow


def _run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("demo") / "weightwatch-demo"
    code, out, err = _run_cli("demo", "--quick", "--logdir", str(logdir))
    assert code == 0, err
    return str(logdir), out


def _section(out: str, start: str) -> list[str]:
    lines = out.split(start, 1)[1].splitlines()[1:]
    return lines[: lines.index("")] if "" in lines else lines


def test_progress_has_one_line_per_stage_with_its_time(demo):
    _, out = demo
    stages = [line for line in out.splitlines() if line.startswith("[")]
    assert len(stages) == 6
    for n, line in enumerate(stages, 1):
        assert re.fullmatch(rf"\[{n}/6\] .+ \.\.\. \d+\.\d s(  .+)?", line), line
    times = [float(re.search(r"\.\.\. (\d+\.\d) s", line).group(1)) for line in stages]
    total = float(re.search(r"Done in (\d+\.\d) s", out).group(1))
    assert total == pytest.approx(sum(times), abs=0.1 * len(times))


def test_every_run_loads_verifies_and_has_each_epoch(demo):
    logdir, out = demo
    q = demo_module.QUICK
    epochs = {"diabetes": q.linear_epochs, "digits-seed1": q.cnn_epochs,
              "digits-seed2": q.cnn_epochs, "photos": q.photo_epochs}
    assert sorted(epochs) == sorted(demo_module.RUN_NAMES)
    for name, n in epochs.items():
        path = os.path.join(logdir, name)
        assert f"  {name:<13} {path}" in out
        run = load_run(path)
        assert run.epochs == list(range(n)), name
        assert run.initial is not None and run.initial.step == -1
        assert verify_run(path).ok, name
        # Keras's own TensorBoard callback writes the loss curves beside the weight views.
        for sub in ("train", "validation"):
            files = os.listdir(os.path.join(path, sub))
            assert any(f.startswith("events.out.tfevents") for f in files)
        assert "val_loss" in run.logs()


def _diabetes():
    from sklearn import datasets

    return demo_module._diabetes_data(datasets)


_PRINTED_ROW = re.compile(
    r"  (\d)\. (\S+)\s+([+-]\d+\.\d{3})  standardized\s+([+-]\d+\.\d{3})"
    r"(?:  correlated with (\S+) \(r=(-?\d\.\d\d)\))?"
)


def test_diabetes_top_k_are_real_feature_names_with_the_runs_weights(demo):
    from sklearn.datasets import load_diabetes

    logdir, out = demo
    names = list(load_diabetes().feature_names) + [demo_module.DIABETES_RATIO]
    x = _diabetes()["x_train"].astype(np.float64)
    rows = _section(out, "diabetes: the 5 largest weights")
    parsed = [_PRINTED_ROW.fullmatch(row).groups() for row in rows]
    assert [int(p[0]) for p in parsed] == [1, 2, 3, 4, 5]
    kernel = np.asarray(load_run(os.path.join(logdir, "diabetes")).weights()["linear/kernel"])[:, 0]
    expected = np.argsort(-np.abs(kernel), kind="stable")[:5]
    assert [p[1] for p in parsed] == [names[i] for i in expected]
    for p, i in zip(parsed, expected):
        assert float(p[2]) == pytest.approx(kernel[i], abs=6e-4)
        assert float(p[3]) == pytest.approx(kernel[i] * x[:, i].std(), abs=6e-4)
    header = load_run(os.path.join(logdir, "diabetes")).settings
    assert header["feature_names"] == names
    assert header["feature_data"] == [353, 11]


def _numpy_partner(x, i, threshold=0.9):
    """(name index, r) of the feature most correlated with feature i, if |r| >= threshold."""
    r = np.corrcoef(x, rowvar=False)[i]
    r[i] = 0.0
    j = int(np.argmax(np.abs(r)))
    return (j, r[j]) if abs(r[j]) >= threshold else None


def test_diabetes_features_keep_their_units_and_include_a_correlated_pair():
    from sklearn.datasets import load_diabetes

    d = _diabetes()
    raw = load_diabetes(scaled=False)
    x = d["x_train"].astype(np.float64)
    stds = x.std(axis=0)
    assert stds.max() / stds.min() > 50  # cholesterol in mg/dL beside a log and a ratio
    assert np.abs(x.mean(axis=0)).max() < 1e-3 * stds.max()  # centred, not rescaled
    names = d["names"]
    s2, s3, s4 = (raw.data[:, raw.feature_names.index(n)] for n in ("s2", "s3", "s4"))
    ratio = s2 / s3
    assert np.corrcoef(ratio, s4)[0, 1] > 0.9
    everything = np.concatenate([d["x_train"], d["x_test"]]).astype(np.float64)
    shift = np.sort(ratio) - np.sort(everything[:, -1])  # the ratio, moved by its train mean
    assert np.allclose(shift, shift.mean(), atol=1e-4)
    assert names[-1] == demo_module.DIABETES_RATIO
    assert _numpy_partner(x, names.index("s4"))[0] == names.index(demo_module.DIABETES_RATIO)


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in row.strip("|").split("|")]
            for row in markdown.splitlines() if re.match(r"\| \d+ \|", row)]


def test_diabetes_table_standardized_and_correlated_columns_equal_numpy(demo):
    """Every epoch's table: standardized = weight x std of feature_data, partners from
    numpy's correlation matrix; and the columns carry information."""
    logdir, _ = demo
    x = _diabetes()["x_train"].astype(np.float64)
    names = _diabetes()["names"]
    run = load_run(os.path.join(logdir, "diabetes"))
    kernels = {s: np.asarray(run.weights(s)["linear/kernel"])[:, 0] for s in run.steps}
    flagged, ratios = set(), []
    for step, table in _events(run.path)["features/linear"]:
        lines = table.item().decode()
        assert "| rank | feature | weight | standardized | correlated with (r) |" in lines
        for _rank, name, weight, standardized, partner in _table_rows(lines):
            i = names.index(name)
            w = kernels[step][i]
            assert float(weight) == pytest.approx(w, rel=1e-3, abs=1e-6)
            assert float(standardized) == pytest.approx(w * x[:, i].std(), rel=1e-3, abs=1e-6)
            expect = _numpy_partner(x, i)
            if expect is None:
                assert partner == ""
            else:
                assert partner == f"**{names[expect[0]]}** ({expect[1]:.4g})"
                flagged.add(name)
            if abs(w) > 0:
                ratios.append(float(standardized) / float(weight))
    assert flagged, "no top-k row names a correlated partner"
    assert max(ratios) / min(ratios) > 10  # standardized is not a copy of weight


def test_the_two_digits_runs_match_layer_for_layer_and_differ_in_values(demo):
    logdir, _ = demo
    a = load_run(os.path.join(logdir, "digits-seed1"))
    b = load_run(os.path.join(logdir, "digits-seed2"))
    assert [s.key for s in a.specs] == [s.key for s in b.specs]
    assert a.specs[0].key == "conv1/kernel" and a.specs[0].shape == (3, 3, 1, 5)
    wa, wb = a.weights("initial"), b.weights("initial")
    assert not np.array_equal(wa["conv1/kernel"], wb["conv1/kernel"])  # two seeds
    assert a.settings["sample_images"] == [4, 8, 8, 1]
    photos = load_run(os.path.join(logdir, "photos"))
    assert photos.specs[0].key == f"{demo_module.PHOTOS_FIRST_CONV}/kernel"
    assert photos.specs[0].shape == (5, 5, 3, 8)
    assert photos.settings["sample_images"] == [2, 107, 160, 3]


def test_prints_the_tensorboard_line_and_the_diff_of_both_cnn_runs(demo):
    logdir, out = demo
    assert f"  tensorboard --logdir {logdir} --samples_per_plugin images=100" in out.splitlines()
    a, b = (os.path.join(logdir, f"digits-seed{s}") for s in (1, 2))
    assert f"$ weightwatch diff {a} {b}" in out
    diff = out.split(f"$ weightwatch diff {a} {b}", 1)[1]
    assert "conv1/kernel" in diff
    # The 10 output classes keep their meaning: the matching never permutes them.
    from keras_weightwatch import diff_runs

    result = diff_runs(a, b)
    classes = result.tensor("classes/kernel")
    assert classes.units_fixed and classes.units_moved == 0 and classes.unit_order is None
    assert result.tensor("classes/bias").matched_cosine is None
    lines = diff.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("classes/kernel"))
    assert "moves" not in lines[at + 1] and "kept in order" in lines[at + 1]


def test_refuses_a_non_empty_directory_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    code, out, err = _run_cli("demo", "--quick", "--logdir", str(tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and "was not written by `weightwatch demo`" in err
    assert sorted(os.listdir(tmp_path)) == ["precious.txt"]


def test_a_second_demo_replaces_only_its_own_runs(tmp_path):
    demo_module._prepare_logdir(str(tmp_path))
    for name in ("diabetes", "photos", "mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    demo_module._prepare_logdir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [demo_module.MARKER_FILE, "mine"]


def test_missing_demo_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    code, out, err = _run_cli("demo", "--logdir", str(tmp_path / "d"))
    assert code == 2
    assert err.count("\n") == 1
    assert "scikit-learn" in err and "pip install 'keras-weightwatch[demo]'" in err
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"logdir": 3}, TypeError, "Received: logdir=3"),
        ({"logdir": "x", "quick": "yes"}, TypeError, "Received: quick='yes'"),
    ],
)
def test_run_demo_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        demo_module.run_demo(**kwargs)


def _events(run_dir: str) -> dict:
    """Tag -> list of (step, ndarray) from WeightWatch's event files, read with TensorBoard."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(os.path.join(run_dir, "weights"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return {
        t: [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(t)]
        for t in acc.Tags()["tensors"]
    }


def _png_size(png: bytes) -> tuple[int, int]:
    import struct

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    return height, width


def test_tensorboard_holds_the_top_k_table_of_every_epoch_with_diabetes_names(demo):
    from sklearn.datasets import load_diabetes

    logdir, out = demo
    names = list(load_diabetes().feature_names)
    run = load_run(os.path.join(logdir, "diabetes"))
    events = _events(run.path)
    table = events["features/linear"]
    assert [step for step, _ in table] == run.steps
    last = table[-1][1].item().decode()
    ranked = [row.split("|")[2].strip() for row in last.splitlines() if re.match(r"\| \d \|", row)]
    printed = [row.split()[1] for row in _section(out, "diabetes: the 5 largest weights")]
    assert ranked == printed and set(ranked) <= set(names)
    kernel = np.asarray(run.weights()["linear/kernel"])[:, 0]
    for i, name in enumerate(names):  # one scalar per feature, following its weight
        assert float(events[f"features/linear/{name}"][-1][1]) == pytest.approx(kernel[i], rel=1e-6)


def test_tensorboard_holds_kernel_grids_and_filtered_images(demo):
    from keras_weightwatch import images

    logdir, _ = demo
    photos = demo_module.PHOTOS_FIRST_CONV
    for name, layer, samples in (("digits-seed1", "conv1", 4), ("photos", photos, 2)):
        run = load_run(os.path.join(logdir, name))
        events = _events(run.path)
        kernel = np.asarray(run.weights()[f"{layer}/kernel"])
        grid = events[run_kernel_tags(run)[f"{layer}/kernel"]]
        assert [step for step, _ in grid] == run.steps
        expected = images.kernel_grid(kernel)
        assert len(expected.tiles) == kernel.shape[-1]  # 5 grey tiles; 8 RGB tiles for photos
        assert _png_size(grid[-1][1][2]) == expected.image.shape[:2]
        responses = sorted(t for t in events if t.startswith(f"{run_group(run)}/{RESPONSES}/"))
        assert responses == [response_tag(run_group(run), layer, i) for i in range(samples)]
        for t in responses:
            assert [step for step, _ in events[t]] == run.steps


def test_backend_start_up_notes_are_hidden_unless_the_start_fails(capfd):
    with demo_module._backend_start_up_notes_hidden():
        os.write(2, b"I0000 oneDNN custom operations are on\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(ImportError), demo_module._backend_start_up_notes_hidden():
        os.write(2, b"E0000 could not load the runtime\n")
        raise ImportError("no backend")
    assert capfd.readouterr().err == "E0000 could not load the runtime\n"
    os.write(2, b"after\n")  # file descriptor 2 is back where it was
    assert capfd.readouterr().err == "after\n"


def _bbox_mass(image, heat):
    """(area fraction, saliency mass fraction) of the box around the digit's ink."""
    ys, xs = np.nonzero(image > 0)
    box = np.zeros(image.shape, bool)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    return box.mean(), heat[box].sum() / heat.sum()


def test_digits_saliency_falls_on_the_digit_not_the_border(demo):
    import keras
    from sklearn import datasets
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    from keras_weightwatch import saliency

    logdir, _ = demo
    samples = demo_module._digits_data(datasets, demo_module.QUICK.digits)["samples"]
    margins = {m: [] for m in demo_module.DIGITS_SALIENCY}
    for name in ("digits-seed1", "digits-seed2"):
        run = load_run(os.path.join(logdir, name))
        acc = pea.EventAccumulator(os.path.join(run.path, "weights"))
        acc.Reload()
        tags = set(acc.Tags()["tensors"])
        want = {saliency_tag(run_group(run), m, i) for m in margins for i in range(len(samples))}
        assert want <= tags
        assert "grad_norm" in run.snapshots[-1].stats["classes/kernel"]
        assert "classes/kernel/grad_norm" in tags
        model = demo_module._digits_cnn(keras)
        model.set_weights(list(run.weights(run.epochs[-1]).values()))
        for method in margins:
            maps = getattr(saliency, method)(model, samples).maps
            for img, heat in zip(samples[..., 0], maps):
                area, mass = _bbox_mass(img, heat)
                margins[method].append(mass - area)  # a uniform map has mass == area
    # On 8x8 digits the ink's box covers about 3/4 of the image, so the margin is bounded.
    assert np.mean(margins["vanilla"]) > 0.04, margins
    assert np.mean(margins["hirescam"]) > 0.1, margins
    assert min(margins["hirescam"]) > 0, margins


def _low_frequency_fraction(kernel: np.ndarray) -> np.ndarray:
    """Per kernel of a (kh, kw, in, out) kernel: the fraction of its spectral energy (summed
    over input channels) at spatial frequencies |fx| <= 1 and |fy| <= 1 cycle per kernel.
    For white noise that is the share of those frequencies: 9 of 25 for a 5x5 kernel."""
    power = np.abs(np.fft.fft2(kernel, axes=(0, 1))) ** 2
    fy = np.abs(np.fft.fftfreq(kernel.shape[0]) * kernel.shape[0])
    fx = np.abs(np.fft.fftfreq(kernel.shape[1]) * kernel.shape[1])
    low = (fy[:, None] <= 1) & (fx[None, :] <= 1)
    return power[low].sum(axis=(0, 1)) / power.sum(axis=(0, 1, 2))


def test_photos_rgb_kernels_learn_smooth_patterns_from_their_random_start(demo):
    """The quick demo's own photos run (2 epochs of 100 patches per photograph): each RGB
    kernel's energy moves to the low spatial frequencies (smooth colour blobs and luminance
    patterns), far above the share that its random start, white noise, has there."""
    logdir, _ = demo
    run = load_run(os.path.join(logdir, "photos"))
    key = f"{demo_module.PHOTOS_FIRST_CONV}/kernel"
    start = np.asarray(run.weights("initial")[key], np.float64)
    learned = np.asarray(run.weights("last")[key], np.float64)
    assert learned.shape == (5, 5, 3, 8)
    before, after = _low_frequency_fraction(start), _low_frequency_fraction(learned)
    assert before.mean() == pytest.approx(9 / 25, abs=0.1), before  # the measure: noise ~ 0.36
    assert after.mean() > 0.65, after
    assert np.all(after > before), (before, after)  # every kernel moved to low frequencies
    # What was learned dominates the start (AlexNet's N(0, 0.01)): the kernels grew.
    assert np.linalg.norm(learned) > 2 * np.linalg.norm(start)
