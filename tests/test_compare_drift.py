"""`drift`: per-layer change through a run, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from compare_runs import epochs, write_run

from keras_weightwatch import WeightWatchError, drift


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", epochs())


def test_drift_per_layer_matches_numpy(run_dir):
    snaps = epochs()
    d = drift(run_dir)
    assert d.steps == ("initial", "0", "1")
    names = [layer.name for layer in d.layers]
    assert names == ["conv1", "bn", "conv2", "dense", "out"]
    for layer in d.layers:
        keys = [k for k in snaps[0][2] if k.startswith(layer.name + "/")]

        def rel(x, y, keys=keys):
            num = sum(np.sum((np.float64(y[k]) - x[k]) ** 2) for k in keys)
            den = sum(np.sum(np.float64(x[k]) ** 2) for k in keys)
            return np.sqrt(num / den)

        expect_step = [rel(snaps[i][2], snaps[i + 1][2]) for i in range(2)]
        expect_total = [rel(snaps[0][2], snaps[i + 1][2]) for i in range(2)]
        assert layer.step_change == pytest.approx(expect_step, rel=1e-10)
        assert layer.from_initial == pytest.approx(expect_total, rel=1e-10)


def test_drift_needs_two_snapshots(tmp_path):
    one = write_run(tmp_path / "one", epochs(1))
    with pytest.raises(WeightWatchError, match="at least two snapshots"):
        drift(one)


def _long_run(path, n, rng, units=48):
    snaps = [("epoch", s, {"a/kernel": rng.normal(size=(64, units)).astype("float32"),
                           "a/bias": rng.normal(size=units).astype("float32"),
                           "b/kernel": rng.normal(size=(units, 32)).astype("float32")})
             for s in range(n)]
    return write_run(path, snaps, layers=[("a", "Dense"), ("b", "Dense")]), snaps


def test_drift_holds_a_bounded_number_of_tensors_whatever_the_length_of_the_run(tmp_path):
    import weakref

    from keras_weightwatch.run import open_run
    from keras_weightwatch.run.storage import LocalStorage

    class CountingStorage(LocalStorage):
        """Counts the tensors the reader holds at once (alive arrays it handed out)."""

        alive = 0
        most = 0
        reads = 0

        def load_npy(self, name, *, mmap):
            arr = super().load_npy(name, mmap=mmap)
            cls = CountingStorage
            cls.alive += 1
            cls.reads += 1
            cls.most = max(cls.most, cls.alive)
            weakref.finalize(arr, lambda: setattr(cls, "alive", cls.alive - 1))
            return arr

    path, snaps = _long_run(tmp_path / "long", 40, np.random.default_rng(0))
    d = drift(open_run(CountingStorage(path)))
    # Against numpy: the last step of layer `a`, both tensors together.
    last, prev, first = snaps[-1][2], snaps[-2][2], snaps[0][2]
    def rel(x, y):
        num = sum(np.sum((x[k].astype(float) - y[k]) ** 2) for k in ("a/kernel", "a/bias"))
        return np.sqrt(num / sum(np.sum(y[k].astype(float) ** 2) for k in ("a/kernel", "a/bias")))
    assert d.layers[0].step_change[-1] == pytest.approx(rel(last, prev), rel=1e-9)
    assert d.layers[0].from_initial[-1] == pytest.approx(rel(last, first), rel=1e-9)
    # Each tensor file read once (the first snapshot's too), at most 3 held at once:
    # the first, the previous and the current tensor of one weight.
    assert CountingStorage.reads == 3 * 40
    assert CountingStorage.most <= 3


def test_drift_memory_does_not_grow_with_the_number_of_snapshots(tmp_path):
    import tracemalloc

    from keras_weightwatch import load_run

    peaks = {}
    units = 1024  # a snapshot of 400 KiB: far above the interpreter's own garbage
    for n, verify in ((6, False), (60, False), (60, True)):
        run = load_run(_long_run(tmp_path / f"r{n}{verify}", n, np.random.default_rng(n),
                                 units)[0])
        for snap in run.snapshots:  # the run's own records, decoded from its index when
            len(snap.tensors), len(snap.stats)  # first read: not drift's working memory
        tracemalloc.start()
        drift(run, verify=verify)
        peaks[n, verify] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    snapshot_bytes = 4 * (64 * units + units + units * 32)
    # A few float64 copies of one snapshot's largest tensor at most, whatever the run's
    # length (the checksum's read buffer is a constant of its own).
    assert peaks[60, False] < 8 * snapshot_bytes
    assert peaks[60, False] < peaks[6, False] + snapshot_bytes / 4
    from keras_weightwatch.run.reader import hash_stream

    chunk = hash_stream.__defaults__[0]
    assert peaks[60, True] < peaks[60, False] + chunk + snapshot_bytes / 4


def _with_gradients(snaps, every=2, seed=5):
    """`snaps` with planted gradient statistics for every weight at every `every`-th snapshot."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (label, step, arrays) in enumerate(snaps):
        stats = {}
        if i % every == 0:
            for key, a in arrays.items():
                g = float(rng.uniform(0.1, 2.0))
                w = float(np.linalg.norm(a.astype(np.float64)))
                stats[key] = {"grad_norm": g, **({"grad_to_weight": g / w} if w else {})}
        out.append((label, step, arrays, stats))
    return out


def test_drift_reads_the_stored_gradient_statistics_per_weight(tmp_path):
    import json
    import math

    from compare_runs import cli

    from keras_weightwatch import load_run
    from keras_weightwatch.report import render_drift

    path = write_run(tmp_path / "run", _with_gradients(epochs(4)))
    run = load_run(path)
    d = drift(path)
    assert d.steps == ("initial", "0", "1", "2")
    seen = set()
    for layer in d.layers:
        keys = [s.key for s in run.specs if s.layer == layer.name]
        assert [g.key for g in layer.gradients] == keys
        for g in layer.gradients:
            seen.add(g.key)
            for i, snap in enumerate(run.snapshots):
                st = snap.stats.get(g.key, {})
                assert ("grad_norm" in st) == (i % 2 == 0)
                want = st.get("grad_norm", math.nan)
                ratio = st.get("grad_to_weight", math.nan)
                assert g.grad_norm[i] == want or (math.isnan(want) and math.isnan(g.grad_norm[i]))
                assert g.grad_to_weight[i] == ratio or (math.isnan(ratio)
                                                       and math.isnan(g.grad_to_weight[i]))
    assert seen == {s.key for s in run.specs}
    # The zero bias has ||W|| = 0: no ratio stored, NaN in the record, "NaN" in JSON.
    bias = next(g for layer in d.layers for g in layer.gradients if g.key == "conv1/bias")
    assert math.isnan(bias.grad_to_weight[0]) and not math.isnan(bias.grad_norm[0])
    code, out, _ = cli("drift", path, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc == json.loads(json.dumps(d.to_json()))
    dense = next(x for x in doc["layers"] if x["name"] == "dense")["gradients"][0]
    assert dense["key"] == "dense/kernel" and dense["grad_norm"][1] == "NaN"
    assert dense["grad_norm"][2] == run.snapshot(1).stats["dense/kernel"]["grad_norm"]
    # The text: one row per weight with its last stored ||g|| and ||g||/||W||.
    text = render_drift(d)
    assert "gradients of the loss on the probe batch (2 snapshots" in text
    code, out, _ = cli("drift", path)
    assert out.rstrip("\n") == text
    row = next(line for line in text.splitlines() if line.startswith("dense/kernel "))
    last = run.snapshot(1).stats["dense/kernel"]
    assert float(row.split()[-2]) == pytest.approx(last["grad_norm"], rel=1e-3)
    assert float(row.split()[-1]) == pytest.approx(last["grad_to_weight"], rel=1e-3)


def test_drift_without_stored_gradients_has_no_gradient_section(run_dir):
    from keras_weightwatch.report import render_drift

    d = drift(run_dir)
    assert all(layer.gradients == () for layer in d.layers)
    assert all(x["gradients"] == [] for x in d.to_json()["layers"])
    assert "gradients of the loss" not in render_drift(d)


def test_drift_follows_a_lora_layers_effective_kernel_not_its_adapters(tmp_path):
    from keras_weightwatch.run import Derivation

    rng = np.random.default_rng(5)
    base = rng.normal(size=(6, 4)).astype("float32")
    bias = rng.normal(size=4).astype("float32")
    snaps = []
    for step in range(3):  # the base and bias frozen; only the adapters move
        snaps.append(("epoch", step, {
            "d/kernel": base, "d/bias": bias,
            "d/lora_kernel_a": rng.normal(size=(6, 2)).astype("float32"),
            "d/lora_kernel_b": (step * rng.normal(size=(2, 4))).astype("float32")}))
    lora = Derivation("d/kernel", "lora", {"base": "d/kernel", "a": "d/lora_kernel_a",
                                           "b": "d/lora_kernel_b"}, {"scale": 2.0}, "d")
    path = write_run(tmp_path / "run", snaps, layers=[("d", "Dense")], derived=[lora])

    def eff(w):
        return np.float64(w["d/kernel"]) + 2.0 * (np.float64(w["d/lora_kernel_a"])
                                                  @ np.float64(w["d/lora_kernel_b"]))

    def rel(x, y):
        num = np.sum((eff(y) - eff(x)) ** 2) + np.sum((np.float64(y["d/bias"]) - x["d/bias"]) ** 2)
        return np.sqrt(num / (np.sum(eff(x) ** 2) + np.sum(np.float64(x["d/bias"]) ** 2)))

    (layer,) = drift(path).layers
    ws = [s[2] for s in snaps]
    assert layer.step_change == pytest.approx([rel(ws[0], ws[1]), rel(ws[1], ws[2])], rel=1e-6)
    assert layer.from_initial == pytest.approx([rel(ws[0], ws[1]), rel(ws[0], ws[2])], rel=1e-6)
    assert layer.from_initial[-1] > 0
