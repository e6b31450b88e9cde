"""`keras_weightwatch.run.index`: the snapshot index is used when it agrees with the
snapshot files and never trusted over them.

Reference: the same run opened with `use_index=False`, which reads every snapshot file
(the path of runs written before the index existed).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_run_storage import MemoryStorage

from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.run import LocalStorage, RunWriter, load_run, open_run
from keras_weightwatch.run.index import INDEX_FILE

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run-0.1.0", "run")
ARRAYS = {"dense/kernel": np.arange(12, dtype="float32").reshape(3, 4),
          "dense/bias": np.zeros(4, "float32"), "step": np.array(0, "int64")}


def _info() -> ModelInfo:
    return ModelInfo("m", "Sequential", (), tuple(
        WeightSpec(k, f"m/{k}", k.split("/")[0], a.shape, a.dtype.name, True)
        for k, a in ARRAYS.items()))


def _write(path: str | None, steps, storage=None, store_dtype=None) -> None:
    writer = RunWriter.open(path or "unused", _info(), settings={}, versions={}, durable=False,
                            storage=storage, store_dtype=store_dtype)
    for step in steps:
        arrays = {k: a + (step if k != "dense/bias" else 0) for k, a in ARRAYS.items()}
        snap = Snapshot(step=step, label="initial" if step == -1 else "epoch",
                        epoch=None if step == -1 else step, arrays=arrays,
                        logs={} if step == -1 else {"loss": 1.0 / (step + 2)}, time=100.0 + step)
        stats = {k: {"l2_norm": float(np.linalg.norm(a)), "nan_count": 0,
                     "update_ratio": None if step == -1 else 0.5} for k, a in arrays.items()}
        writer.commit_snapshot(snap, writer.store_tensors(snap), stats)
    writer.close()


def _same_as_files(path) -> list:
    """The run read with its index equals the run read from its snapshot files alone."""
    with_index = load_run(path).snapshots
    assert with_index == open_run(LocalStorage(path), use_index=False).snapshots
    return [s.step for s in with_index]


def _json(path):
    with open(path) as f:
        return json.load(f)


def _entries(path) -> list[list]:
    """Each index line as one list: its two halves (8 fields, then statistics and tensors)."""
    decoder = json.JSONDecoder()
    out = []
    with open(os.path.join(path, INDEX_FILE)) as f:
        for line in f.read().splitlines()[1:]:
            head, end = decoder.raw_decode(line)
            out.append(head + json.loads(line[end + 1:]))
    return out


def _rewrite(path, entries) -> None:
    with open(os.path.join(path, INDEX_FILE)) as f:
        head = f.readline()
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        f.write(head + "".join(f"{json.dumps(e[:8])} {json.dumps(e[8:])}\n" for e in entries))


def test_the_writer_indexes_every_snapshot_and_the_reader_uses_it():
    mem = MemoryStorage()
    _write(None, range(-1, 4), storage=mem, store_dtype="float16")
    assert INDEX_FILE in mem.files
    mem.ops.clear()
    run = open_run(mem)
    assert not [op for op in mem.ops if op.startswith("read snapshots/")]  # from the index
    files_only = open_run(mem, use_index=False)
    assert [op for op in mem.ops if op.startswith("read snapshots/")]
    assert run.snapshots == files_only.snapshots and run.steps == [-1, 0, 1, 2, 3]
    assert run.snapshot(2).tensors["dense/kernel"].lossy  # a lossy store's record round-trips
    for step in run.steps:
        for key, arr in run.weights(step).items():
            np.testing.assert_array_equal(arr, files_only.weights(step)[key])


def test_a_missing_index_is_rebuilt_by_the_next_writer(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run)  # written by 0.1.0: no index
    assert not os.path.exists(os.path.join(run, INDEX_FILE))
    before = _same_as_files(run)
    header = load_run(run).header
    RunWriter.open(run, ModelInfo.from_json(header["model"], header["weights"]),
                   settings={}, versions={}, durable=False).close()
    assert sorted(e[0] for e in _entries(run)) == sorted(os.listdir(os.path.join(run, "snapshots")))
    assert _same_as_files(run) == before == [-1, 0, 1]
    os.remove(os.path.join(run, INDEX_FILE))
    assert _same_as_files(run) == before


def test_snapshots_added_or_removed_behind_the_index_are_seen(tmp_path):
    run = str(tmp_path / "run")
    _write(run, range(-1, 3))
    snaps = os.path.join(run, "snapshots")
    added = _json(os.path.join(snaps, "epoch_000001.json"))
    added.update(step=7, epoch=7, logs={"loss": 9.0})
    with open(os.path.join(snaps, "epoch_000007.json"), "w") as f:
        json.dump(added, f)
    os.remove(os.path.join(snaps, "epoch_000000.json"))
    assert _same_as_files(run) == [-1, 1, 2, 7]
    assert load_run(run).logs(7) == {"loss": 9.0}


def test_a_snapshot_file_changed_behind_the_index_is_read_again(tmp_path):
    run = str(tmp_path / "run")
    _write(run, range(-1, 2))
    path = os.path.join(run, "snapshots", "epoch_000001.json")
    data = _json(path)
    data["logs"]["loss"] = 0.125  # rewritten in place: its stamp changes
    with open(path, "w") as f:
        json.dump(data, f)
    assert _same_as_files(run) == [-1, 0, 1]
    assert load_run(run).logs(1) == {"loss": 0.125}


# An entry is [name, size, version, step, label, epoch, time, logs, stats, tensors].
def _set(i, value):
    return lambda e: e.__setitem__(i, value(e[i]) if callable(value) else value)


LIES = [
    lambda e: e.__setitem__(3, e[3] + 1) if e[4] == "epoch" else None,
    lambda e: e.__setitem__(4, "epoch") if e[4] == "initial" else None,
    _set(1, lambda size: size + 1),
    _set(2, "0-0-0"),
    _set(9, {"dense/kernel": ["blake3", "../../etc/passwd", 10]}),
    _set(9, {"dense/kernel": {"file": "/etc/passwd"}}),
    lambda e: e[9].__setitem__(1, "not base64!"),
    lambda e: e[9].__setitem__(1, e[9][1][:-8]),
    lambda e: e[9][2].__setitem__(0, "big"),
    lambda e: e[9].append([["float32", "yes"]] * 3),
    lambda e: e[8].update({"dense/kernel": {"l2_norm": "big"}}),
    _set(7, [1, 2]),
    lambda e: e.pop(),
]
LIE_IDS = ["step", "label", "size", "version", "digest", "tensor-file", "digests-base64",
           "digests-short", "bytes", "stored", "stats", "logs", "short"]


@pytest.mark.parametrize("lie", LIES, ids=LIE_IDS)
def test_an_index_entry_that_disagrees_or_is_malformed_is_not_used(tmp_path, lie):
    run = str(tmp_path / "run")
    _write(run, range(-1, 3))
    entries = _entries(run)
    for e in entries:
        lie(e)
    _rewrite(run, entries)
    assert _same_as_files(run) == [-1, 0, 1, 2]


def test_a_torn_last_line_and_another_models_index_are_ignored(tmp_path):
    run = str(tmp_path / "run")
    _write(run, range(-1, 2))
    index = os.path.join(run, INDEX_FILE)
    with open(index, "rb") as f:
        whole = f.read()
    with open(index, "wb") as f:
        f.write(whole[:-40])  # a writer killed while appending the last entry
    assert _same_as_files(run) == [-1, 0, 1]
    head, rest = whole.split(b"\n", 1)
    other = json.loads(head)
    other["keys"] = other["keys"][::-1]
    with open(index, "wb") as f:
        f.write(json.dumps(other).encode() + b"\n" + rest)
    assert _same_as_files(run) == [-1, 0, 1]


def test_retention_and_continuing_keep_the_index_whole(tmp_path):
    run = str(tmp_path / "run")
    _write(run, range(-1, 3))
    writer = RunWriter.open(run, _info(), settings={}, versions={}, durable=False)
    writer.apply_retention(keep_last=1)
    writer.close()
    assert sorted(e[0] for e in _entries(run)) == ["epoch_000002.json", "initial.json"]
    _write(run, [3, 4])
    assert _same_as_files(run) == [-1, 2, 3, 4]
    assert len(_entries(run)) == 4


def _write_float_stats(storage, specials) -> None:
    """A run whose statistics are all floats or None (as the callback writes them), so the
    index holds them packed; `specials` are values planted into the last snapshot's."""
    writer = RunWriter.open("unused", _info(), settings={}, versions={}, durable=False,
                            storage=storage)
    for step in range(-1, 3):
        arrays = {k: a + step for k, a in ARRAYS.items()}
        snap = Snapshot(step=step, label="initial" if step == -1 else "epoch",
                        epoch=None if step == -1 else step, arrays=arrays, logs={},
                        time=100.0 + step)
        stats = {k: {"l2_norm": float(np.linalg.norm(a)), "mean": float(np.mean(a)),
                     "update_ratio": None if step == -1 else 0.25} for k, a in arrays.items()}
        if step == 2:
            stats["dense/bias"].update(specials)
        writer.commit_snapshot(snap, writer.store_tensors(snap), stats)
    writer.close()


def test_packed_statistics_keep_every_float_none_nan_and_signed_zero():
    mem = MemoryStorage()
    specials = {"l2_norm": -0.0, "mean": float("nan"), "update_ratio": float("-inf")}
    _write_float_stats(mem, specials)
    line = mem.files[INDEX_FILE].decode().splitlines()[-1]
    assert '"l2_norm"' in line and "NaN" not in line  # packed, not written as JSON numbers
    mem.ops.clear()
    run = open_run(mem)
    for snap in run.snapshots:
        assert snap.stats and snap.tensors  # every record's both halves decoded
    assert not [op for op in mem.ops if op.startswith("read snapshots/")]
    files_only = open_run(mem, use_index=False)
    for a, b in zip(run.snapshots, files_only.snapshots):
        assert a.stats.keys() == b.stats.keys()
        for key, st in b.stats.items():  # the same values (below) of the same types
            assert {n: type(v) for n, v in a.stats[key].items()} == {
                n: type(v) for n, v in st.items()}
    got = run.snapshot(2).stats["dense/bias"]
    assert np.signbit(got["l2_norm"]) and got["l2_norm"] == 0.0 and np.isnan(got["mean"])
    assert got["update_ratio"] == float("-inf") and run.snapshot(-1).stats["step"][
        "update_ratio"] is None
    assert run.snapshots == files_only.snapshots  # NaN included: the decoder's own NaN


def test_a_line_whose_second_half_is_damaged_reads_that_snapshot_file_when_used():
    mem = MemoryStorage()
    _write_float_stats(mem, {})
    lines = mem.files[INDEX_FILE].decode().split("\n")
    damaged = lines[2][:-30]  # the snapshot at step 0: its tensors cut short
    mem.files[INDEX_FILE] = "\n".join(lines[:2] + [damaged] + lines[3:]).encode()
    mem.ops.clear()
    run = open_run(mem)
    assert run.steps == [-1, 0, 1, 2]
    assert not [op for op in mem.ops if op.startswith("read snapshots/")]  # nothing read yet
    files_only = open_run(mem, use_index=False)
    mem.ops.clear()
    assert run.snapshot(1).tensors == files_only.snapshot(1).tensors
    assert not [op for op in mem.ops if op.startswith("read snapshots/")]
    assert run.snapshot(0).tensors == files_only.snapshot(0).tensors
    assert run.snapshot(0).stats == files_only.snapshot(0).stats
    assert [op for op in mem.ops if op.startswith("read snapshots/")] == [
        "read snapshots/epoch_000000.json"]  # once, for both halves
    assert run.snapshots == files_only.snapshots


def test_an_index_of_the_previous_layout_is_not_used_and_is_rebuilt(tmp_path):
    run = str(tmp_path / "run")
    _write(run, range(-1, 2))
    index = os.path.join(run, INDEX_FILE)
    with open(index) as f:
        head = json.loads(f.readline())
    with open(index, "w") as f:  # version 1: one JSON list per line, all of it read at once
        f.write(json.dumps(dict(head, version=1)) + "\n" + "".join(
            json.dumps(e) + "\n" for e in _entries(run)))
    assert _same_as_files(run) == [-1, 0, 1]
    _write(run, [2])
    with open(index) as f:
        assert json.loads(f.readline())["version"] == head["version"]
    assert sorted(e[0] for e in _entries(run)) == sorted(os.listdir(os.path.join(run, "snapshots")))
    assert _same_as_files(run) == [-1, 0, 1, 2]


# --------------------------------------------------------------------------- many at once

NAMES = ("l2_norm", "mean", "update_ratio", "nan_count", "absent")


def _columns_from_dicts(run, names=NAMES):
    """The reference for `Run.stat_columns`: each snapshot's statistics read as mappings."""
    keys = [s.key for s in run.specs]
    shape = (len(run.snapshots), len(keys))
    out = {n: (np.full(shape, np.nan), np.zeros(shape, bool), np.zeros(shape, bool))
           for n in names}
    for i, snap in enumerate(run.snapshots):
        for j, key in enumerate(keys):
            for n in names:
                st = snap.stats.get(key, {})
                if n in st:
                    out[n][1][i, j] = True
                    out[n][2][i, j] = st[n] is None
                    if st[n] is not None:
                        out[n][0][i, j] = st[n]
    return out


def _assert_columns_equal(run, reference):
    got = run.stat_columns(NAMES)
    for n, (values, stored, none) in _columns_from_dicts(reference).items():
        np.testing.assert_array_equal(got[n].values, values)  # NaN where NaN, -0.0 == 0.0
        np.testing.assert_array_equal(np.signbit(got[n].values), np.signbit(values))
        np.testing.assert_array_equal(got[n].stored, stored)
        np.testing.assert_array_equal(got[n].none, none)


def test_stat_columns_equal_every_snapshots_statistics_packed_or_not():
    mem = MemoryStorage()
    specials = {"l2_norm": -0.0, "mean": float("nan"), "update_ratio": float("-inf")}
    _write_float_stats(mem, specials)  # packed, a None at step -1 and NaN at step 2
    writer = RunWriter.open("unused", _info(), settings={}, versions={}, durable=False,
                            storage=mem)
    snap = Snapshot(step=3, label="epoch", epoch=3, arrays=dict(ARRAYS), logs={}, time=1.0)
    writer.commit_snapshot(snap, writer.store_tensors(snap), {  # names differ: written whole
        "dense/kernel": {"l2_norm": 2.0, "nan_count": 3}, "step": {"mean": None}})
    writer.close()
    files_only = open_run(mem, use_index=False)
    mem.ops.clear()
    run = open_run(mem)
    _assert_columns_equal(run, files_only)
    assert not [op for op in mem.ops if op.startswith("read snapshots/")]
    got = run.stat_columns(["update_ratio"])["update_ratio"]
    assert got.none[0].all() and got.values[3, 1] == -np.inf  # step -1; step 2, dense/bias


@pytest.mark.parametrize("lie", LIES, ids=LIE_IDS)
def test_stat_columns_and_lossy_dtypes_of_a_disagreeing_index_follow_the_files(tmp_path, lie):
    run = str(tmp_path / "run")
    _write(run, range(-1, 3), store_dtype="float16")
    entries = _entries(run)
    for e in entries:
        lie(e)
    _rewrite(run, entries)
    files_only = open_run(LocalStorage(run), use_index=False)
    _assert_columns_equal(load_run(run), files_only)
    assert load_run(run).lossy_dtypes() == {"float16"} == {
        r.stored_dtype for s in files_only.snapshots for r in s.tensors.values() if r.lossy}


@pytest.mark.parametrize("store_dtype", [None, "float16"])
def test_lossy_dtypes_equal_every_snapshots_tensor_records(store_dtype):
    mem = MemoryStorage()
    _write(None, range(-1, 3), storage=mem, store_dtype=store_dtype)
    files_only = open_run(mem, use_index=False)
    expected = {r.stored_dtype for s in files_only.snapshots for r in s.tensors.values()
                if r.lossy}
    assert expected == (set() if store_dtype is None else {"float16"})
    mem.ops.clear()
    assert open_run(mem).lossy_dtypes() == expected
    assert not [op for op in mem.ops if op.startswith("read snapshots/")]  # the index says
    lines = mem.files[INDEX_FILE].decode().split("\n")
    for i in range(1, len(lines) - 2):  # every line's tensors but the last cut short
        lines[i] = lines[i][:-30]
    mem.files[INDEX_FILE] = "\n".join(lines).encode()
    assert open_run(mem).lossy_dtypes() == expected


@pytest.mark.parametrize("enabled", [True, False])
def test_reading_a_run_leaves_the_collector_as_it_was(tmp_path, enabled):
    import gc

    run = str(tmp_path / "run")
    _write(run, range(-1, 3), store_dtype="float16")
    with open(os.path.join(run, INDEX_FILE), "a") as f:
        f.write("not json\n")  # a damaged line is skipped while the collector is paused
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        opened = load_run(run)
        assert gc.isenabled() == enabled
        assert opened.lossy_dtypes() == {"float16"} and gc.isenabled() == enabled
        assert opened.stat_columns(["l2_norm"])["l2_norm"].stored.all()
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()
    assert _same_as_files(run) == [-1, 0, 1, 2]


def test_a_weight_that_joins_part_way_is_indexed_and_read_as_the_files_say(tmp_path):
    # A LoRA fine-tune continuing a run: the header's weights grow, earlier snapshots lack
    # the adapters. The index is rebuilt for the new weights; every entry reads as its file.
    path = os.fspath(tmp_path / "run")
    _write(path, [-1, 0])
    adapter = np.full((3, 2), 0.25, "float32")
    info = _info()
    grown = ModelInfo("m", "Sequential", (), info.weights + (
        WeightSpec("dense/lora_kernel_a", "m/dense/lora_kernel_a", "dense", (3, 2), "float32",
                   True),))
    writer = RunWriter.open(path, grown, settings={}, versions={}, durable=False)
    arrays = {**{k: a + 1 for k, a in ARRAYS.items()}, "dense/lora_kernel_a": adapter}
    snap = Snapshot(step=1, label="epoch", epoch=1, arrays=arrays, logs={}, time=101.0)
    stats = {k: {"l2_norm": float(np.linalg.norm(a))} for k, a in arrays.items()}
    writer.commit_snapshot(snap, writer.store_tensors(snap), stats)
    writer.close()
    assert _same_as_files(path) == [-1, 0, 1]
    assert len(_entries(path)) == 3  # every snapshot indexed under the grown header
    run = load_run(path)
    assert [s.key for s in run.specs] == [*ARRAYS, "dense/lora_kernel_a"]
    assert [sorted(s.tensors) for s in run.snapshots] == [sorted(ARRAYS)] * 2 + [
        sorted([*ARRAYS, "dense/lora_kernel_a"])]
    np.testing.assert_array_equal(run.tensor("dense/lora_kernel_a", 1), adapter)
    np.testing.assert_array_equal(run.tensor("dense/kernel", 0), ARRAYS["dense/kernel"])
    cols = run.stat_columns(["l2_norm"])["l2_norm"]
    assert np.isnan(cols.values[:2, 3]).all() and not cols.stored[:2, 3].any()
    assert cols.values[2, 3] == pytest.approx(np.linalg.norm(adapter))
    assert run.verify().ok
