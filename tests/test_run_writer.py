"""`keras_weightwatch.run.writer`: `RunWriter`, continuing runs, content addressing, the lock.

References: `model.get_weights()` recorded during `fit`, the bytes `np.save`
writes, and the run written by release 0.1.0 (tests/fixtures/run-0.1.0).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays, sharded_model, split
from tiny_models import data, sequential

from keras_weightwatch import WeightWatch, WeightWatchError, WeightWatchWarning, load_run
from keras_weightwatch.capture import Snapshot
from keras_weightwatch.run import LocalStorage, ModelInfo, RunWriter, ShardWriter

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run-0.1.0")


# ------------------------------------------------------------------ what fit writes


def test_frozen_layer_is_stored_once(tmp_path):
    keras.utils.set_random_seed(4)
    base = keras.layers.Dense(8, name="base")
    model = keras.Sequential([keras.Input((4,)), base, keras.layers.Dense(1, name="head")])
    base.trainable = False
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    model.fit(x, y, epochs=4, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    assert len(run.snapshots) == 5
    for key in ("base/kernel", "base/bias"):
        files = {s.tensors[key].file for s in run.snapshots}
        assert len(files) == 1, key
    head_files = {s.tensors["head/kernel"].file for s in run.snapshots}
    assert len(head_files) == 5
    # Bytes on disk: the frozen layer once, the head once per snapshot.
    on_disk = {f for f in os.listdir(tmp_path / "run" / "tensors")}
    referenced = {os.path.basename(r.file) for s in run.snapshots for r in s.tensors.values()}
    assert on_disk == referenced
    frozen_bytes = sum(run.snapshots[0].tensors[k].bytes for k in ("base/kernel", "base/bias"))
    total = sum(os.path.getsize(tmp_path / "run" / "tensors" / f) for f in on_disk)
    per_snapshot_head = sum(run.snapshots[0].tensors[k].bytes for k in ("head/kernel", "head/bias"))
    # head/bias starts as zeros like base/bias, so content addressing may share that file too
    assert total <= frozen_bytes + 5 * per_snapshot_head


def test_second_fit_continues_the_run(tmp_path, recorder):
    keras.utils.set_random_seed(5)
    model = sequential()
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    cb = WeightWatch(tmp_path / "run")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    # Same instance, epochs restart at 0: the steps carry on after the run's last step.
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb, recorder])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3]
    assert_same_arrays(run.weights(3), recorder.epochs[1])
    assert [s.epoch for s in run.snapshots] == [None, 0, 1, 0, 1]


def test_initial_epoch_continues_in_a_new_callback(tmp_path, recorder):
    keras.utils.set_random_seed(6)
    model = sequential()
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    model.fit(x, y, epochs=5, initial_epoch=3, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run"), recorder])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3, 4]  # lines up with keras.callbacks.TensorBoard's epochs
    assert_same_arrays(run.weights(4), recorder.epochs[4])
    assert run.verify().ok


def test_other_architecture_goes_beside_and_error_refuses_naming_what_differs(tmp_path):
    x, y = data()
    m1 = sequential()
    m1.compile(optimizer="adam", loss="mse")
    m1.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    m2 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(1)])
    m2.compile(optimizer="adam", loss="mse")
    with pytest.raises(WeightWatchError, match=r"another architecture \(the run has 8 weight "
                                               r"tensors, the model has 4; .*Received: "
                                               r"if_exists='error'"):
        m2.fit(x, y, epochs=1, verbose=0,
               callbacks=[WeightWatch(tmp_path / "run", if_exists="error")])
    with pytest.warns(WeightWatchWarning, match="another architecture") as said:
        m2.fit(x, y, epochs=1, verbose=0, callbacks=[cb := WeightWatch(tmp_path / "run")])
    assert len(said) == 1
    assert cb.run_dir == os.fspath(tmp_path / "run") + "-2"
    assert [s.shape for s in load_run(cb.run_dir).specs][0] == (4, 5)
    assert len(load_run(tmp_path / "run").specs) == 8  # the first run is untouched
    # The writer itself never mixes architectures into one run.
    with pytest.raises(WeightWatchError, match="another architecture"):
        RunWriter.open(os.fspath(tmp_path / "run"), ModelInfo("m", "M", (), ()), settings={},
                       versions={})
    with pytest.raises(WeightWatchError, match="already holds a run"):
        m1.fit(x, y, epochs=1, verbose=0,
               callbacks=[WeightWatch(tmp_path / "run", if_exists="error")])


def test_same_architecture_other_layer_names_continues_with_the_runs_keys(tmp_path):
    x, y = data()
    m1 = sequential()
    m1.compile(optimizer="adam", loss="mse")
    m1.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    keys = [s.key for s in load_run(tmp_path / "run").specs]
    m2 = sequential()  # built in the same process: Keras numbers its layers dense_2, ...
    assert [w.path for w in m2.weights] != [w.path for w in m1.weights]
    m2.set_weights(m1.get_weights())
    m2.compile(optimizer="adam", loss="mse")
    m2.fit(x, y, epochs=2, initial_epoch=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    assert list(run.weights(1)) == keys
    assert_same_arrays(run.weights(1), m2.get_weights())


def test_nothing_is_created_in_init(tmp_path):
    WeightWatch(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


def test_run_directory_is_plain_json_and_npy(tmp_path):
    keras.utils.set_random_seed(7)
    model = sequential()
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    # Read a snapshot with json and numpy alone, as docs/FORMAT.md describes.
    root = tmp_path / "run"
    header = json.loads((root / "weightwatch.json").read_text())
    assert header["format"] == "keras-weightwatch-run" and header["format_version"] == 2
    assert header["versions"]["backend"] == "tensorflow"
    snap = json.loads((root / "snapshots" / "epoch_000000.json").read_text())
    kernel = np.load(root / snap["tensors"]["dense/kernel"]["file"], allow_pickle=False)
    np.testing.assert_array_equal(kernel, model.layers[0].get_weights()[0])
    import blake3

    tensor_file = root / snap["tensors"]["dense/kernel"]["file"]
    digest = blake3.blake3(tensor_file.read_bytes()).hexdigest()  # what `b3sum` prints
    assert digest == snap["tensors"]["dense/kernel"]["blake3"]
    assert "sha256" not in snap["tensors"]["dense/kernel"]
    assert set(snap["stats"]["dense/kernel"]) >= {"l2_norm", "mean", "std", "max_abs",
                                                   "nan_count", "inf_count", "update_ratio"}
    assert snap["stats"]["dense/kernel"]["l2_norm"] == pytest.approx(
        float(np.linalg.norm(kernel.astype(np.float64))), rel=1e-12)


# ------------------------------------------------------------------ RunWriter itself


def _fixture_copy(tmp_path) -> tuple[str, ModelInfo]:
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURE, "run"), run)
    header = load_run(run).header
    return run, ModelInfo.from_json(header["model"], header["weights"])


def test_a_run_written_by_0_1_0_is_continued_without_touching_its_snapshots(tmp_path):
    run, info = _fixture_copy(tmp_path)
    before = load_run(run)
    old = {s.name: before.weights(s.step) for s in before.snapshots}
    writer = RunWriter.open(run, info, settings=dict(before.settings), versions={"x": "1"})
    assert writer.last_step == 1 and writer.has_initial()
    arrays = {k: np.asarray(a) + 1 for k, a in old["1"].items()}
    snap = Snapshot(step=2, label="epoch", epoch=2, arrays=arrays, logs={"loss": 0.1})
    record = writer.commit_snapshot(snap, writer.store_tensors(snap), {})
    writer.close()
    after = load_run(run)
    assert after.steps == [-1, 0, 1, 2] and record == after.snapshot(2)
    assert after.header["created"] == before.header["created"]
    assert after.verify().ok
    assert before.verify().snapshots == 4  # verify lists the run again: the new one counts
    for s in before.snapshots:
        assert_same_arrays(after.weights(s.step), list(old[s.name].values()))
        assert after.snapshot(s.step) == s  # its snapshot file is not rewritten
    assert_same_arrays(after.weights(2), list(arrays.values()))


def test_stored_files_are_the_bytes_np_save_writes(tmp_path):
    run, info = _fixture_copy(tmp_path)
    arrays = {s.key: np.random.default_rng(1).normal(size=s.shape).astype(s.dtype)
              for s in info.weights}
    arrays["hidden/kernel"] = np.asfortranarray(arrays["hidden/kernel"])  # written in C order
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    snap = Snapshot(step=5, label="epoch", epoch=5, arrays=arrays, logs={})
    records = writer.store_tensors(snap)
    writer.close()
    for key, rec in records.items():
        bio = io.BytesIO()
        np.save(bio, np.ascontiguousarray(arrays[key]), allow_pickle=False)
        with open(os.path.join(run, rec.file), "rb") as f:
            assert f.read() == bio.getvalue(), key
        assert rec.bytes == len(bio.getvalue())


def test_writer_read_goes_through_the_checks_of_every_read(tmp_path):
    # RunWriter.read (update ratios against the previous snapshot) refuses a file whose
    # header disagrees with its record instead of returning another array.
    run, info = _fixture_copy(tmp_path)
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    try:
        prev = writer.previous(2)
        assert prev is not None and prev.step == 1
        rec = prev.tensors["hidden/kernel"]
        np.testing.assert_array_equal(writer.read(rec), load_run(run).weights(1)[
            "hidden/kernel"])
        bio = io.BytesIO()
        np.save(bio, np.zeros(12, "float32"), allow_pickle=False)
        with open(os.path.join(run, rec.file), "wb") as f:
            f.write(bio.getvalue())
        with pytest.raises(WeightWatchError, match=r"holds float32\[12\] but the snapshot says "
                                                   r"float32\[4, 3\]"):
            writer.read(rec)
    finally:
        writer.close()


def test_collect_garbage_removes_only_unreferenced_tensors_and_temporaries(tmp_path):
    run, info = _fixture_copy(tmp_path)
    stray = os.path.join(run, "tensors", "a" * 64 + ".npy")
    tmp = os.path.join(run, "tensors", ".tmp-123")
    other = os.path.join(run, "tensors", "notes.txt")
    for path in (stray, tmp, other):
        with open(path, "wb") as f:
            f.write(b"x")
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    deleted = writer.collect_garbage()
    writer.close()
    assert sorted(deleted) == ["tensors/.tmp-123", f"tensors/{'a' * 64}.npy"]
    assert os.path.exists(other)
    assert load_run(run).verify().ok


# ------------------------------------------------------------------ batched, ordered syncs


def _specs_snapshot(step: int, frozen: np.ndarray) -> tuple[ModelInfo, Snapshot]:
    arrays = {"a/kernel": np.full((64, 32), float(step), "float32"), "frozen/kernel": frozen,
              "a/bias": np.arange(5, dtype="float64") * step}
    from keras_weightwatch.run import WeightSpec
    info = ModelInfo("m", "Fake", (), tuple(
        WeightSpec(k, f"m/{k}", k.split("/")[0], a.shape, a.dtype.name, True)
        for k, a in arrays.items()))
    return info, Snapshot(step=step, label="epoch", epoch=step, arrays=arrays, logs={})


class _Syscalls:
    """Records the file system calls LocalStorage makes, in order, with the paths they touch."""

    def __init__(self, monkeypatch, root: str):
        self.events: list[tuple[str, str]] = []
        self._fds: dict[int, str] = {}
        real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

        def rel(path):
            return os.path.relpath(os.fspath(path), root)

        def open_(path, flags, *args, **kw):
            fd = real_open(path, flags, *args, **kw)
            self._fds[fd] = rel(path)
            return fd

        def fsync(fd):
            self.events.append(("fsync", self._fds.get(fd, "?")))
            return real_fsync(fd)

        def replace(src, dst):
            self.events.append(("rename", f"{rel(src)} -> {rel(dst)}"))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind: str, match) -> int:
        hits = [i for i, (k, what) in enumerate(self.events) if k == kind and match(what)]
        assert len(hits) == 1, (kind, self.events)
        return hits[0]


def test_snapshot_record_is_synced_only_after_every_tensor_file_it_names_is_durable(
        tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    frozen = np.eye(16, dtype="float32")
    info, first = _specs_snapshot(0, frozen)
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=True)
    writer.commit_snapshot(first, writer.store_tensors(first))
    calls = _Syscalls(monkeypatch, run)
    _, snap = _specs_snapshot(1, frozen)
    record = writer.commit_snapshot(snap, writer.store_tensors(snap))
    writer.close()
    monkeypatch.undo()
    new_files = {r.file for r in record.tensors.values()} - {
        r.file for r in load_run(run).snapshot(0).tensors.values()}
    assert len(new_files) == 2  # the frozen kernel is not written again
    renames = [what for kind, what in calls.events if kind == "rename"]
    tensor_dir_sync = calls.index("fsync", lambda p: p == "tensors")
    for file in new_files:
        (rename,) = [r for r in renames if r.endswith(f"-> {file}")]
        tmp = rename.split(" -> ")[0]
        synced = calls.index("fsync", lambda p, tmp=tmp: p == tmp)
        renamed = calls.index("rename", lambda r, rename=rename: r == rename)
        # the bytes are durable before the name appears, the name before the directory sync
        assert synced < renamed < tensor_dir_sync
    snap_rename = calls.index("rename", lambda r: r.endswith("-> snapshots/epoch_000001.json"))
    snap_tmp = calls.events[snap_rename][1].split(" -> ")[0]
    snap_sync = calls.index("fsync", lambda p: p == snap_tmp)
    # the snapshot record is created, synced and renamed only after the tensor directory sync
    created = [i for i, (k, p) in enumerate(calls.events) if k == "fsync" and p == snap_tmp]
    assert tensor_dir_sync < created[0] == snap_sync < snap_rename
    assert calls.index("fsync", lambda p: p == "snapshots") > snap_rename
    # all tensor files are synced before any of them is renamed (one batch per snapshot)
    tensor_syncs = [i for i, (k, p) in enumerate(calls.events)
                    if k == "fsync" and p.startswith("tensors/.tmp-")]
    tensor_renames = [i for i, (k, r) in enumerate(calls.events)
                      if k == "rename" and "-> tensors/" in r]
    assert max(tensor_syncs) < min(tensor_renames)
    assert load_run(run).verify().ok


def test_a_tensor_equal_to_the_previous_snapshots_is_reused_without_hashing(
        tmp_path, monkeypatch):
    import blake3

    import keras_weightwatch.run.format as format_module  # where every digest is made

    run = str(tmp_path / "run")
    frozen = np.random.default_rng(0).normal(size=(300, 200)).astype("float32")
    info, first = _specs_snapshot(0, frozen)
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    writer.commit_snapshot(first, writer.store_tensors(first))
    hashed: list[str] = []
    real_hash = format_module.content_hash

    def counting_hash(name):
        hashed.append(name)
        return real_hash(name)

    monkeypatch.setattr(format_module, "content_hash", counting_hash)
    _, second = _specs_snapshot(1, frozen.copy())
    records = writer.store_tensors(second)
    writer.commit_snapshot(second, records)
    monkeypatch.undo()
    assert hashed == ["blake3", "blake3"]  # the two tensors that changed, once each
    prev = load_run(run).snapshot(0).tensors["frozen/kernel"]
    assert records["frozen/kernel"] == prev
    # A previous file that no longer holds the same bytes is not trusted: hashed, rewritten.
    with open(os.path.join(run, prev.file), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    _, third = _specs_snapshot(2, frozen.copy())
    writer._files.discard(prev.file)  # as after retention removed the file's last snapshot
    rec = writer.store_tensors(third)["frozen/kernel"]
    writer.close()
    bio = io.BytesIO()
    np.save(bio, frozen, allow_pickle=False)
    assert (rec.hash, rec.digest) == ("blake3", blake3.blake3(bio.getvalue()).hexdigest())
    with open(os.path.join(run, rec.file), "rb") as f:
        assert f.read() == bio.getvalue()


def test_a_run_with_numpys_plain_headers_on_large_tensors_is_read_verified_and_continued(
        tmp_path, monkeypatch):
    """Runs written before the header padding name large tensors by np.save's bytes: they
    load and verify, `holds` knows their weights, and a continuing writer stores the same
    weights anew once, with the header padded to a block (numpy reads both)."""
    import keras_weightwatch.run.format as format_module
    import keras_weightwatch.run.writer as writer_module

    run = str(tmp_path / "run")
    big = np.random.default_rng(2).normal(size=(520, 512)).astype("float32")  # > 1 MiB
    assert big.nbytes >= format_module.ALIGNED_BYTES
    info, first = _specs_snapshot(0, big)
    monkeypatch.setattr(format_module, "npy_header", format_module.plain_npy_header)
    monkeypatch.setattr(writer_module, "npy_header", format_module.plain_npy_header)
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=True)
    writer.commit_snapshot(first, writer.store_tensors(first))
    writer.close()
    monkeypatch.undo()
    bio = io.BytesIO()
    np.save(bio, big, allow_pickle=False)
    old = load_run(run).snapshot(0).tensors["frozen/kernel"]
    with open(os.path.join(run, old.file), "rb") as f:
        assert f.read() == bio.getvalue()  # the old layout
    assert load_run(run).verify().ok
    assert format_module.holds(old, big)

    writer = RunWriter.open(run, info, settings={}, versions={}, durable=True)
    _, second = _specs_snapshot(1, big.copy())
    new = writer.store_tensors(second)["frozen/kernel"]
    writer.commit_snapshot(second, {**writer.store_tensors(second), "frozen/kernel": new})
    writer.close()
    assert new.file != old.file and new.bytes == old.bytes - 128 + format_module.BLOCK
    loaded = load_run(run)
    assert loaded.verify().ok
    for step in (0, 1):
        np.testing.assert_array_equal(loaded.weights(step)["frozen/kernel"], big)


@pytest.mark.parametrize("which", ["0.1.0 (sha256)", "new (blake3)"])
def test_a_damaged_byte_is_found_in_old_and_new_runs(tmp_path, which):
    run, info = _fixture_copy(tmp_path)
    if which.startswith("new"):
        arrays = {s.key: np.random.default_rng(2).normal(size=s.shape).astype(s.dtype)
                  for s in info.weights}
        writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
        snap = Snapshot(step=2, label="epoch", epoch=2, arrays=arrays, logs={})
        writer.commit_snapshot(snap, writer.store_tensors(snap))
        writer.close()
    loaded = load_run(run)
    assert loaded.verify().ok
    rec = loaded.snapshot("last").tensors["hidden/kernel"]
    assert rec.hash == ("blake3" if which.startswith("new") else "sha256")
    path = os.path.join(run, rec.file)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    report = load_run(run).verify()
    assert not report.ok
    assert f"checksum mismatch ({rec.hash} " in report.problems[0]
    with pytest.raises(WeightWatchError, match="checksum mismatch"):
        load_run(run).weights("last")


# ------------------------------------------------------------------ sharded weights: parts


def _sharded(step: int, kernel: np.ndarray, shards: list) -> tuple[ModelInfo, Snapshot]:
    """A snapshot whose `big/kernel` is sharded (this process holds `shards`) beside a
    plain `small/bias`."""
    info = sharded_model({"big/kernel": kernel.shape, "small/bias": (3,)})
    snap = Snapshot(step=step, label="epoch", epoch=step,
                    arrays={"small/bias": np.arange(3, dtype="float32") * step}, logs={},
                    shards={"big/kernel": shards})
    return info, snap


def _publish_later(writer: ShardWriter, snap: Snapshot, attempt: str, delay: float):
    thread = threading.Thread(target=lambda: (time.sleep(delay),
                                              writer.publish(snap, 1, attempt)))
    thread.start()
    return thread


def _process_1(run: str, info: ModelInfo, step: int, shards: list) -> tuple[ShardWriter,
                                                                            Snapshot]:
    snap = Snapshot(step=step, label="epoch", epoch=step, arrays={}, logs={},
                    shards={"big/kernel": shards})
    return ShardWriter(LocalStorage(run), info.weights, False, None), snap


def test_process_0_commits_the_parts_of_every_process_once_all_are_stored(tmp_path):
    run = str(tmp_path / "run")
    kernel = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    blocks = split(kernel, 2, 2)
    mine = [blocks[0], blocks[2]]   # the left columns: process 0
    right = [blocks[1], blocks[3]]  # the right columns: process 1
    info, snap = _sharded(3, kernel, mine)
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    other, theirs = _process_1(run, info, 3, right)
    thread = _publish_later(other, theirs, "now", 0.2)
    try:
        records = writer.store_tensors(snap)
        records.update(writer.store_shards(snap, 2, attempt="now", timeout=30).records)
        writer.commit_snapshot(snap, records)
    finally:
        thread.join()
        writer.close()
    rec = records["big/kernel"]
    assert [p.offset for p in rec.parts] == [(0, 0), (0, 4), (3, 0), (3, 4)]
    assert rec.bytes == sum(p.bytes for p in rec.parts) and rec.file == ""
    loaded = load_run(run)
    got = loaded.weights(3)
    assert got["big/kernel"].tobytes() == kernel.tobytes()
    np.testing.assert_array_equal(got["small/bias"], snap.arrays["small/bias"])
    assert loaded.verify().ok and loaded.verify().files == 5
    assert os.listdir(os.path.join(run, "shards")) == [], "the merged record is removed"


def test_a_record_left_by_an_earlier_attempt_at_the_same_step_is_not_merged(tmp_path):
    run = str(tmp_path / "run")
    kernel = np.random.default_rng(1).normal(size=(6, 8)).astype("float32")
    halves = split(kernel, 1, 2)
    info, snap = _sharded(3, kernel, halves[:1])
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    other, theirs = _process_1(run, info, 3, [halves[1]._replace(array=np.zeros((6, 4),
                                                                                "float32"))])
    other.publish(theirs, 1, "crashed")  # a fit that stopped after process 1 wrote step 3
    try:
        writer.store_tensors(snap)
        with pytest.raises(WeightWatchError) as e:
            writer.store_shards(snap, 2, attempt="now", timeout=0.2)
        where = os.path.join(run, "shards", "epoch_000003.process_00001.json")
        assert str(e.value).startswith(where)
        assert "found only one of another attempt ('crashed')" in str(e.value)
        assert str(e.value).endswith("Received: shard_timeout=0.2, attempt='now'")
        _, theirs = _process_1(run, info, 3, halves[1:])
        thread = _publish_later(other, theirs, "now", 0.3)  # this fit's process 1, late
        records = writer.store_tensors(snap)
        records.update(writer.store_shards(snap, 2, attempt="now", timeout=30).records)
        writer.commit_snapshot(snap, records)
        thread.join()
    finally:
        writer.close()
    got = load_run(run).weights(3)["big/kernel"]
    np.testing.assert_array_equal(got, np.concatenate([h.array for h in halves], axis=1))
    assert got.tobytes() == kernel.tobytes()


def test_the_wait_for_a_missing_record_ends_after_shard_timeout_naming_it(tmp_path):
    run = str(tmp_path / "run")
    kernel = np.ones((4, 2), "float32")
    info, snap = _sharded(5, kernel, split(kernel, 2, 1)[:1])
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    start = time.monotonic()
    try:
        with pytest.raises(WeightWatchError) as e:
            writer.store_shards(snap, 3, attempt="a", timeout=0.05)
    finally:
        writer.close()
    assert time.monotonic() - start < 5
    missing = os.path.join(run, "shards", "epoch_000005.process_00001.json")
    assert str(e.value).startswith(f"{missing}: a process of the model-parallel run did not "
                                   "record its shards of this attempt within 0.05 s (found none")
    assert str(e.value).endswith("Received: shard_timeout=0.05, attempt='a'")
    assert not load_run(run).snapshots, "nothing is committed"


def test_parts_that_leave_a_gap_are_refused_before_the_commit(tmp_path):
    run = str(tmp_path / "run")
    kernel = np.ones((4, 2), "float32")
    info, snap = _sharded(5, kernel, split(kernel, 2, 1)[:1])  # the other half: nobody
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    try:
        with pytest.raises(WeightWatchError, match=r"weight 'big/kernel': the parts leave a gap"
                                                   r".*Received: offsets=\[\[0, 0\]\]"):
            writer.store_shards(snap, 1, attempt="a", timeout=1)
    finally:
        writer.close()


def test_settings_shard_timeout_is_what_process_0_waits(tmp_path):
    from keras_weightwatch.settings import Settings

    assert Settings(str(tmp_path)).shard_timeout == 300
    assert Settings(str(tmp_path), shard_timeout=0.5).shard_timeout == 0.5
    assert WeightWatch(tmp_path, shard_timeout=2).get_config()["shard_timeout"] == 2.0
    for bad, error in ((0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                       ("60", TypeError), (True, TypeError)):
        with pytest.raises(error, match=rf"`shard_timeout` must be a number > 0\. "
                                        rf"Received: shard_timeout={re.escape(repr(bad))}"):
            Settings(str(tmp_path), shard_timeout=bad)


# ------------------------------------------------------------------ format 2 unless parts


def test_a_run_without_parts_stays_format_2_and_turns_3_with_its_first_parts(tmp_path,
                                                                              monkeypatch):
    run = str(tmp_path / "run")
    kernel = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    info, sharded = _sharded(2, kernel, split(kernel, 1, 3))
    plain = Snapshot(step=1, label="epoch", epoch=1, logs={},
                     arrays={"big/kernel": kernel * 0, "small/bias": np.zeros(3, "float32")})

    def header_version() -> int:
        with open(os.path.join(run, "weightwatch.json")) as f:
            return json.load(f)["format_version"]

    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    writer.commit_snapshot(plain, writer.store_tensors(plain))
    writer.close()
    assert header_version() == 2
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)  # continued
    assert header_version() == 2
    written = []
    real = writer.storage.write_atomic

    def spy(name, chunks, durable):
        written.append((name, header_version() if os.path.exists(
            os.path.join(run, "weightwatch.json")) else None))
        real(name, chunks, durable)

    monkeypatch.setattr(writer.storage, "write_atomic", spy)
    records = writer.store_tensors(sharded)
    records.update(writer.store_shards(sharded, 1, attempt="a", timeout=1).records)
    writer.commit_snapshot(sharded, records)
    writer.close()
    # The header says 3 before the first snapshot file with parts is written.
    assert written == [("weightwatch.json", 2), ("snapshots/epoch_000002.json", 3)]
    assert header_version() == 3
    RunWriter.open(run, info, settings={}, versions={}, durable=False).close()
    assert header_version() == 3, "a run with parts stays format 3 when continued"
    assert load_run(run).tensor("big/kernel", 2).tobytes() == kernel.tobytes()


def test_a_reader_of_format_2_reads_runs_without_parts(tmp_path, monkeypatch):
    from keras_weightwatch.run import format as fmt

    kernel = np.arange(24, dtype="float32").reshape(4, 6)
    info, sharded = _sharded(2, kernel, split(kernel, 2, 1))
    plain = Snapshot(step=1, label="epoch", epoch=1, logs={},
                     arrays={"big/kernel": kernel, "small/bias": np.zeros(3, "float32")})
    for name, snap in (("plain", plain), ("parts", sharded)):
        writer = RunWriter.open(str(tmp_path / name), info, settings={}, versions={},
                                durable=False)
        records = writer.store_tensors(snap)
        if snap.shards:
            records.update(writer.store_shards(snap, 1, attempt="a", timeout=1).records)
        writer.commit_snapshot(snap, records)
        writer.close()
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)  # what a reader of format 2 checks
    np.testing.assert_array_equal(load_run(tmp_path / "plain").tensor("big/kernel"), kernel)
    with pytest.raises(WeightWatchError, match="format version 3 is not supported"):
        load_run(tmp_path / "parts")
# ------------------------------------------------------------------ stored input samples


def _conv_fit(tmp_path, images, **options):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((9, 9, 2)),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", dilation_rate=1, name="conv"),
        keras.layers.Flatten(), keras.layers.Dense(1, name="out")])
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 9, 9, 2)).astype("float32"), rng.normal(size=(16, 1))
    model.fit(x, y, epochs=3, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", sample_images=images, **options)])
    return load_run(tmp_path / "run"), model


def test_sample_images_are_stored_readable_with_numpy_and_survive_retention(tmp_path):
    images = np.random.default_rng(1).normal(size=(3, 9, 9, 2)).astype("float32")
    run, model = _conv_fit(tmp_path, images, keep_last=1)
    np.testing.assert_array_equal(run.sample_images(), images)
    header = json.loads((tmp_path / "run" / "weightwatch.json").read_text())
    stored = header["samples"]["sample_images"]
    assert stored["rows_total"] == 3 and header["samples"]["feature_data"] is None
    raw = np.load(tmp_path / "run" / stored["tensor"]["file"], allow_pickle=False)
    np.testing.assert_array_equal(raw, images)
    conv = model.get_layer("conv")
    (layer,) = run.samples.responses
    assert (layer.layer, layer.key, layer.padding) == ("conv", "conv/kernel", conv.padding)
    assert layer.strides == tuple(conv.strides) and layer.dilation == tuple(conv.dilation_rate)
    assert len(run.snapshots) == 2  # retention ran, and its garbage collection kept the sample
    assert run.verify().ok and run.verify().files == len(
        {r.file for s in run.snapshots for r in s.tensors.values()}) + 1


def test_activation_mode_stores_the_images_but_no_kernel_response_layer(tmp_path):
    images = np.zeros((1, 9, 9, 2), dtype="float32")
    run, _ = _conv_fit(tmp_path, images, response_mode="activation")
    np.testing.assert_array_equal(run.sample_images(), images)
    assert run.samples.responses == ()


def test_feature_data_is_stored_as_given(tmp_path):
    keras.utils.set_random_seed(2)
    model = sequential()
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", feature_data=x.astype("float64"))])
    run = load_run(tmp_path / "run")
    np.testing.assert_array_equal(run.feature_data(), x.astype("float64"))
    assert run.feature_data().dtype == np.float64 and run.sample_images() is None


def test_samples_over_the_cap_keep_their_first_rows_and_say_how_many_there_were(tmp_path):
    from keras_weightwatch.run import LocalStorage
    from keras_weightwatch.run.writer import store_samples

    storage = LocalStorage(str(tmp_path))
    storage.makedirs("tensors")
    x = np.arange(10 * 6, dtype=np.int16).reshape(10, 6)  # 12 bytes a row
    huge = np.zeros((2, 100), dtype=np.float64)  # one row is over the cap: not stored
    samples = store_samples(storage, {"feature_data": x, "sample_images": huge}, (), False,
                            max_bytes=40)
    assert samples.sample_images is None
    assert samples.feature_data.rows == 3 and samples.feature_data.rows_total == 10
    np.testing.assert_array_equal(np.load(tmp_path / samples.feature_data.tensor.file), x[:3])


def test_runs_without_stored_samples_read_as_empty():
    run = load_run(os.path.join(FIXTURE, "run"))
    assert run.samples.sample_images is None and run.samples.responses == ()
    assert run.sample_images() is None and run.feature_data() is None
@pytest.mark.parametrize("changed", [0, 5_000, 65_535])  # in the first bytes, past them, last
def test_a_tensor_that_differs_from_the_previous_only_far_in_is_written_again(tmp_path, changed):
    run = str(tmp_path / "run")
    base = np.arange(65_536, dtype="float32")
    info, first = _specs_snapshot(0, base)
    writer = RunWriter.open(run, info, settings={}, versions={}, durable=False)
    writer.commit_snapshot(first, writer.store_tensors(first))
    moved = base.copy()
    moved[changed] += 1.0
    _, snap = _specs_snapshot(1, moved)
    writer.commit_snapshot(snap, writer.store_tensors(snap))
    _, same = _specs_snapshot(2, moved.copy())
    writer.commit_snapshot(same, writer.store_tensors(same))
    writer.close()
    loaded = load_run(run)
    files = [loaded.snapshot(s).tensors["frozen/kernel"].file for s in (0, 1, 2)]
    assert files[0] != files[1] == files[2]  # written again when changed, reused when equal
    np.testing.assert_array_equal(loaded.weights(1)["frozen/kernel"], moved)
    np.testing.assert_array_equal(loaded.weights(0)["frozen/kernel"], base)
    assert loaded.verify().ok


# ------------------------------------------------------------------ a change of architecture


def _spec(key, shape, dtype="float32"):
    from keras_weightwatch.run import WeightSpec

    return WeightSpec(key, f"m/{key}", key.rsplit("/", 1)[0], shape, dtype, True)


RUN_SPECS = [_spec("d/kernel", (4, 3)), _spec("d/bias", (3,))]


def test_architecture_change_tells_an_extension_from_another_architecture():
    from keras_weightwatch.run.writer import architecture_change

    assert architecture_change(RUN_SPECS, RUN_SPECS) is None
    renamed = [_spec("d_1/kernel", (4, 3)), _spec("d_1/bias", (3,))]
    assert architecture_change(RUN_SPECS, renamed) is None  # keys matched by position
    lora = [RUN_SPECS[0], _spec("d/lora_kernel_a", (4, 2)), _spec("d/lora_kernel_b", (2, 3)),
            RUN_SPECS[1]]
    change = architecture_change(RUN_SPECS, lora)
    assert change is not None and change.extends
    assert change.what == ("the run has 2 weight tensors, the model has 4; the model adds "
                           "d/lora_kernel_a float32[4, 2], d/lora_kernel_b float32[2, 3]")
    wider = [_spec("d/kernel", (4, 5)), _spec("d/bias", (5,))]
    change = architecture_change(RUN_SPECS, wider)
    assert change is not None and not change.extends
    assert change.what == ("weight #0 is d/kernel float32[4, 3] in the run but d/kernel "
                           "float32[4, 5] in the model")
    # More weights, one of the run's reshaped: not an extension, and both are named.
    grown = [_spec("d/kernel", (4, 5)), _spec("d/bias", (3,)), _spec("e/kernel", (3, 1))]
    change = architecture_change(RUN_SPECS, grown)
    assert change is not None and not change.extends
    assert "adds e/kernel float32[3, 1]" in change.what
    assert "d/kernel is float32[4, 3] in the run but float32[4, 5] in the model" in change.what
    fewer = architecture_change(lora, RUN_SPECS)
    assert fewer is not None and not fewer.extends and "the model lacks d/lora_kernel_a" in (
        fewer.what)
    cast = architecture_change(RUN_SPECS, [_spec("d/kernel", (4, 3), "int8"), RUN_SPECS[1],
                                           _spec("d/kernel_scale", (3,))])
    assert cast is not None and not cast.extends  # a quantized kernel is another architecture


def test_a_writer_continues_a_run_its_weights_extend_and_refuses_any_other(tmp_path):
    path = os.fspath(tmp_path / "run")
    arrays = {"d/kernel": np.ones((4, 3), "float32"), "d/bias": np.zeros(3, "float32")}
    writer = RunWriter.open(path, ModelInfo("m", "M", (), tuple(RUN_SPECS)), settings={},
                            versions={}, durable=False)
    snap = Snapshot(step=0, label="epoch", epoch=0, arrays=arrays, logs={})
    writer.commit_snapshot(snap, writer.store_tensors(snap))
    writer.close()
    lora = (*RUN_SPECS, _spec("d/lora_kernel_a", (4, 2)))
    writer = RunWriter.open(path, ModelInfo("m", "M", (), lora), settings={}, versions={},
                            durable=False)
    assert [s.key for s in writer.specs] == [s.key for s in lora] and writer.last_step == 0
    a = np.full((4, 2), 0.5, "float32")
    snap = Snapshot(step=1, label="epoch", epoch=1, arrays={**arrays, "d/lora_kernel_a": a},
                    logs={})
    writer.commit_snapshot(snap, writer.store_tensors(snap))
    writer.close()
    run = load_run(path)
    assert [s.key for s in run.specs] == [s.key for s in lora]
    assert "d/lora_kernel_a" not in run.snapshot(0).tensors
    np.testing.assert_array_equal(run.tensor("d/lora_kernel_a", 1), a)
    assert run.tensor("d/kernel", 1).tobytes() == arrays["d/kernel"].tobytes()
    with pytest.raises(WeightWatchError, match=r"another architecture \(weight #0 is d/kernel "):
        RunWriter.open(path, ModelInfo("m", "M", (), (_spec("d/kernel", (4, 5)),) + lora[1:]),
                       settings={}, versions={})


@pytest.mark.parametrize("size", [0, 5, 8, 13, 4096 + 3])
def test_same_bytes_finds_any_single_differing_byte(size):
    from keras_weightwatch.run.writer import same_bytes

    rng = np.random.default_rng(size)
    a = rng.integers(0, 256, size, dtype=np.uint8)
    assert same_bytes(memoryview(a), memoryview(a.copy()), first=16, chunk=64)
    for i in range(size):  # the prefix, every chunk, the bytes past the last 8-byte word
        b = a.copy()
        b[i] ^= 1
        assert not same_bytes(memoryview(a), memoryview(b), first=16, chunk=64), i
        assert same_bytes(memoryview(a), memoryview(b)) is (bytes(a) == bytes(b))  # defaults
    assert not same_bytes(memoryview(a), memoryview(np.append(a, 0)))
