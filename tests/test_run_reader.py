"""`keras_weightwatch.run.reader`: `load_run`, `Run`, `verify_run`, and the checks of every read.

References: `model.get_weights()` recorded during `fit`, `model.summary()`'s
counts, Keras's own `history`, and a run written by release 0.1.0
(tests/fixtures/run-0.1.0) with the arrays its generator recorded.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays, sharded_model, split
from tiny_models import data, functional_with_nested, sequential, subclassed

from keras_weightwatch import WeightWatch, WeightWatchError, load_run, verify_run
from keras_weightwatch.capture import Snapshot
from keras_weightwatch.run import LayerInfo, RunWriter, hash_file

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run-0.1.0")


# ------------------------------------------------------------------ a run written by 0.1.0


def _expected_0_1_0() -> dict[str, list[np.ndarray]]:
    """The generator's `model.get_weights()` per snapshot: initial, 0, 1."""
    with np.load(os.path.join(FIXTURE, "expected.npz"), allow_pickle=False) as npz:
        out: dict[str, list[np.ndarray]] = {}
        for name in sorted(npz.files, key=lambda n: (n.split("__")[0], int(n.split("__")[1]))):
            out.setdefault(name.split("__")[0], []).append(npz[name])
    return {"initial": out["initial"], 0: out["epoch0"], 1: out["epoch1"]}


def test_run_written_by_release_0_1_0_loads_verifies_and_equals_get_weights():
    run = load_run(os.path.join(FIXTURE, "run"))
    assert run.versions["keras_weightwatch"] == "0.1.0"
    assert run.steps == [-1, 0, 1] and run.epochs == [0, 1] and run.initial is not None
    report = verify_run(os.path.join(FIXTURE, "run"))
    # every checksum: 3 snapshots of 4 tensors, none shared (all change each epoch)
    assert report.ok and (report.snapshots, report.files) == (3, 12), report.problems
    assert run.verify().ok
    for rec in {r.file: r for s in run.snapshots for r in s.tensors.values()}.values():
        path = os.path.join(FIXTURE, "run", rec.file)
        with open(path, "rb") as f:
            assert hash_file(path) == rec.sha256 == hashlib.sha256(f.read()).hexdigest()
    expected = _expected_0_1_0()
    for step, arrays in expected.items():
        for mmap in (True, False):
            assert_same_arrays(run.weights(step, mmap=mmap), arrays)
    assert [s.key for s in run.specs] == ["hidden/kernel", "hidden/bias", "out/kernel",
                                          "out/bias"]
    assert run.layers == (LayerInfo("hidden", "Dense", 15, 15, 0, ("input_layer",)),
                          LayerInfo("out", "Dense", 4, 4, 0, ("hidden",)))
    assert run.settings["feature_names"] == ["age", "bmi", "bp", "s1"]
    assert set(run.logs(1)) == {"loss", "mae"} and run.logs("initial") == {}
    stats = run.snapshot(1).stats["hidden/kernel"]
    assert stats["l2_norm"] == pytest.approx(
        float(np.linalg.norm(expected[1][0].astype(np.float64))), rel=1e-12)


# ------------------------------------------------------------------ reading what fit wrote


@pytest.mark.parametrize("build", [sequential, functional_with_nested, subclassed])
def test_snapshots_equal_get_weights_bit_for_bit(tmp_path, recorder, build):
    keras.utils.set_random_seed(1)
    model = build()
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    before = [np.array(w, copy=True) for w in model.get_weights()]
    model.fit(x, y, epochs=3, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run"), recorder])

    run = load_run(tmp_path / "run")
    assert run.epochs == [0, 1, 2]
    assert run.steps == [-1, 0, 1, 2]
    assert run.initial is not None and run.initial.step == -1
    assert_same_arrays(run.weights("initial"), before)
    assert_same_arrays(run.weights("initial"), recorder.initial)
    for epoch in (0, 1, 2):
        assert_same_arrays(run.weights(epoch), recorder.epochs[epoch])
    # Keys are weight paths without the model's own name, in model.weights order.
    expected_keys = [w.path.removeprefix(model.name + "/") for w in model.weights]
    assert list(run.weights(2)) == expected_keys
    assert run.verify().ok


def test_keys_trainable_flags_and_logs(tmp_path):
    keras.utils.set_random_seed(2)
    model = sequential()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x, y = data()
    hist = model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                     callbacks=[WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    flags = {s.key: s.trainable for s in run.specs}
    assert flags["batch_normalization/moving_mean"] is False
    assert flags["batch_normalization/moving_variance"] is False
    assert flags["batch_normalization/gamma"] is True
    assert flags["dense/kernel"] is True
    for epoch in (0, 1):
        logs = run.logs(epoch)
        assert logs["loss"] == pytest.approx(hist.history["loss"][epoch], rel=1e-6)
        assert logs["mae"] == pytest.approx(hist.history["mae"][epoch], rel=1e-6)
    assert run.logs("initial") == {}
    # Per-layer parameter counts as model.summary() shows them.
    counts = {layer.name: layer.params for layer in run.layers}
    assert counts == {layer.name: layer.count_params() for layer in model.layers}
    assert run.model["total_params"] == model.count_params()


def test_freq_takes_every_nth_epoch_and_the_last(tmp_path, recorder):
    keras.utils.set_random_seed(3)
    model = sequential()
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    model.fit(x, y, epochs=6, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", freq=4), recorder])
    run = load_run(tmp_path / "run")
    assert run.epochs == [0, 4, 5]
    assert_same_arrays(run.weights(4), recorder.epochs[4])
    assert_same_arrays(run.weights("last"), recorder.epochs[5])


# ------------------------------------------------------------------ the checks of every read


def _copy_fixture(tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURE, "run"), run)
    return run


@pytest.mark.parametrize("mmap", [True, False])
def test_a_file_whose_header_disagrees_with_its_record_is_refused_unverified(tmp_path, mmap):
    # The same bytes under the file's own name, but with the shape its record does not say:
    # verify=False skips the checksum, and the header check still refuses it.
    run = _copy_fixture(tmp_path)
    rec = load_run(run).snapshot(0).tensors["hidden/kernel"]
    bio = io.BytesIO()
    np.save(bio, np.zeros((3, 4), "float32"), allow_pickle=False)  # the record says (4, 3)
    with open(os.path.join(run, rec.file), "wb") as f:
        f.write(bio.getvalue())
    with pytest.raises(WeightWatchError, match=r"holds float32\[3, 4\] but the snapshot says "
                                               r"float32\[4, 3\]"):
        load_run(run).weights(0, verify=False, mmap=mmap)
    with pytest.raises(WeightWatchError, match=r"checksum mismatch"):
        load_run(run).weights(0)
    problems = verify_run(run).problems
    assert len(problems) == 1 and problems[0].startswith("snapshot 0, weight hidden/kernel: ")


def test_a_missing_tensor_file_is_a_problem_not_a_crash(tmp_path):
    run = _copy_fixture(tmp_path)
    rec = load_run(run).snapshot(1).tensors["out/bias"]
    os.remove(os.path.join(run, rec.file))
    report = verify_run(run)
    assert not report.ok and report.problems == (
        f"snapshot 1, weight out/bias: {os.path.join(run, rec.file)}: missing",)
    with pytest.raises(WeightWatchError, match="tensor file is missing"):
        load_run(run).weights(1, verify=False)
    assert_same_arrays(load_run(run).weights(0), _expected_0_1_0()[0])  # the rest reads


def test_a_run_opened_by_a_relative_path_survives_chdir(tmp_path, monkeypatch):
    _copy_fixture(tmp_path)
    monkeypatch.chdir(tmp_path)
    run = load_run("run")
    monkeypatch.chdir("/")
    assert_same_arrays(run.weights(1), _expected_0_1_0()[1])
    assert run.verify().ok


def test_missing_and_malformed_runs_are_named(tmp_path):
    with pytest.raises(WeightWatchError, match=r"no such run directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightWatchError, match=r"run header not found"):
        load_run(tmp_path / "empty")
    run = _copy_fixture(tmp_path)
    shutil.copy(os.path.join(run, "snapshots", "epoch_000001.json"),
                os.path.join(run, "snapshots", "epoch_0000001.json"))
    with pytest.raises(WeightWatchError, match=r"two snapshot files claim the same step"):
        load_run(run)


# ------------------------------------------------------------------ tensors stored as parts


def _write_parts(run: str, kernel: np.ndarray, shards: list, store_dtype=None) -> None:
    info = sharded_model({"big/kernel": kernel.shape})
    snap = Snapshot(step=0, label="epoch", epoch=0, arrays={}, logs={},
                    shards={"big/kernel": shards})
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False,
                            store_dtype=store_dtype)
    try:
        writer.commit_snapshot(snap, writer.store_shards(snap, 1, attempt="a", timeout=1).records)
    finally:
        writer.close()


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 1)])
@pytest.mark.parametrize("store_dtype", [None, "float16"])
@pytest.mark.parametrize("mmap", [True, False])
def test_a_tensor_of_parts_reads_as_its_parts_put_together(tmp_path, grid, store_dtype, mmap):
    run = str(tmp_path / "run")
    kernel = np.random.default_rng(3).normal(size=(6, 9)).astype("float32")
    shards = split(kernel, *grid)
    _write_parts(run, kernel, shards[::-1], store_dtype)  # in any order
    rows = [np.concatenate([s.array for s in shards[r * grid[1]:(r + 1) * grid[1]]], axis=1)
            for r in range(grid[0])]
    expected = np.concatenate(rows, axis=0)
    if store_dtype:
        expected = expected.astype(store_dtype).astype("float32")
    loaded = load_run(run)
    got = loaded.weights(0, mmap=mmap)["big/kernel"]
    assert got.dtype == np.float32 and got.shape == (6, 9)
    assert got.tobytes() == expected.tobytes()
    rec = loaded.snapshot(0).tensors["big/kernel"]
    assert len(rec.parts) == grid[0] * grid[1] and rec.lossy == bool(store_dtype)
    assert rec.stored_dtype == (store_dtype or "float32")
    assert loaded.verify().ok and loaded.verify().files == len(rec.parts)


def test_verify_finds_a_damaged_or_missing_part(tmp_path):
    run = str(tmp_path / "run")
    kernel = np.random.default_rng(4).normal(size=(4, 6)).astype("float32")
    _write_parts(run, kernel, split(kernel, 1, 3))
    rec = load_run(run).snapshot(0).tensors["big/kernel"]
    damaged, gone = rec.parts[1], rec.parts[2]
    with open(os.path.join(run, damaged.file), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.remove(os.path.join(run, gone.file))
    report = verify_run(run)
    assert not report.ok and report.files == 3 and len(report.problems) == 2
    assert report.problems[0].startswith("snapshot 0, weight big/kernel: ")
    assert damaged.digest[:12] in report.problems[0] and "checksum mismatch" in report.problems[0]
    assert gone.file.split("/")[1] in report.problems[1]
    with pytest.raises(WeightWatchError, match="checksum mismatch"):
        load_run(run).weights(0)
    # Unverified reads still refuse a part whose file is missing, instead of zeros.
    with pytest.raises(WeightWatchError):
        load_run(run).weights(0, verify=False)
def _blake3_run(path: str) -> str:
    from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
    from keras_weightwatch.run import RunWriter

    arrays = {"d/kernel": np.arange(2048, dtype="float32").reshape(64, 32),
              "d/bias": np.ones(32, "float32")}
    info = ModelInfo("m", "Sequential", (), tuple(
        WeightSpec(k, f"m/{k}", "d", a.shape, "float32", True) for k, a in arrays.items()))
    writer = RunWriter.open(path, info, settings={}, versions={}, durable=False)
    snap = Snapshot(step=0, label="epoch", epoch=0, arrays=arrays, logs={})
    writer.commit_snapshot(snap, writer.store_tensors(snap))
    writer.close()
    return path


@pytest.mark.parametrize("hash_name", ["sha256", "blake3"])
def test_one_flipped_byte_is_found_by_the_mapped_and_the_streamed_hash(tmp_path, hash_name):
    import blake3

    from keras_weightwatch.run.reader import hash_stream

    path = str(tmp_path / "run")
    if hash_name == "sha256":  # format 1, written by release 0.1.0
        shutil.copytree(os.path.join(FIXTURE, "run"), path)
    else:
        _blake3_run(path)
    run = load_run(path)
    rec = run.snapshot("last").tensors[run.specs[0].key]
    assert rec.hash == hash_name
    file = os.path.join(path, rec.file)
    with open(file, "rb") as f:
        data = f.read()
    reference = (hashlib.sha256(data).hexdigest() if hash_name == "sha256"
                 else blake3.blake3(data).hexdigest())
    with open(file, "rb") as f:  # a local file: mapped
        assert hash_stream(f, hash=hash_name) == reference == rec.digest
    assert hash_stream(io.BytesIO(data), chunk=100, hash=hash_name) == reference  # streamed
    damaged = bytearray(data)
    damaged[len(data) - 5] ^= 0x01  # one bit of the last value: same size, same header
    with open(file, "wb") as f:
        f.write(damaged)
    report = verify_run(path)
    assert not report.ok and len(report.problems) == 1
    assert f"{file}: checksum mismatch ({hash_name} " in report.problems[0]
    with open(file, "rb") as f:
        assert hash_stream(f, hash=hash_name) != reference
    assert hash_stream(io.BytesIO(bytes(damaged)), chunk=100, hash=hash_name) != reference
    with pytest.raises(WeightWatchError, match="checksum mismatch"):
        load_run(path).weights("last")
