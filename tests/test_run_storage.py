"""`keras_weightwatch.run.storage`: the one seam where a run's files are touched.

`LocalStorage` against the file system it wraps; and a run written and read
entirely through an in-memory `Storage` (no file on disk at all), which shows
that the reader and the writer do every file operation through the seam.
"""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest

from keras_weightwatch import WeightWatchError
from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.errors import RunBusyError
from keras_weightwatch.run import (
    LocalStorage,
    RunLock,
    RunWriter,
    is_run,
    load_run,
    open_run,
)
from keras_weightwatch.run import storage as storage_module
from keras_weightwatch.run.format import ALIGNED_BYTES, BLOCK, encode_tensor
from keras_weightwatch.run.storage import FileStamp, LockHeld
from keras_weightwatch.scratch import empty


class MemoryStorage:
    """A `Storage` that keeps a run's files in a dict; it records every operation."""

    def __init__(self, path: str = "mem://run"):
        self.path = path
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {""}
        self.ops: list[str] = []
        self.versions: dict[str, int] = {}
        self.locked = False

    def where(self, name=""):
        return f"{self.path}/{name}" if name else self.path

    def exists(self, name=""):
        return name in self.files or name in self.dirs

    def isdir(self, name=""):
        return name in self.dirs

    def isfile(self, name):
        return name in self.files

    def is_link(self, name):
        return False

    def is_inside(self, name):
        return True

    def size(self, name):
        if name not in self.files:
            raise FileNotFoundError(name)
        return len(self.files[name])

    def open_read(self, name):
        self.ops.append(f"read {name}")
        if name not in self.files:
            raise FileNotFoundError(name)
        return io.BytesIO(self.files[name])

    def load_npy(self, name, *, mmap):
        self.ops.append(f"load {name}")
        return np.load(io.BytesIO(self.files[name]), allow_pickle=False)

    def listdir(self, name):
        if name not in self.dirs:
            raise FileNotFoundError(name)
        prefix = name + "/"
        return [f[len(prefix):] for f in self.files if f.startswith(prefix)]

    def makedirs(self, name):
        self.dirs.add(name)

    def write_atomic(self, name, chunks, durable):
        self.ops.append(f"write {name}")
        self.files[name] = b"".join(bytes(c) for c in chunks)
        self.versions[name] = self.versions.get(name, 0) + 1

    def write_atomic_many(self, files, durable):
        for name, chunks in files:
            self.write_atomic(name, chunks, durable)

    def append(self, name, data, durable):
        self.ops.append(f"append {name}")
        self.files[name] = self.files.get(name, b"") + bytes(data)
        self.versions[name] = self.versions.get(name, 0) + 1

    def stamp(self, name):
        return FileStamp(len(self.files[name]), str(self.versions[name]))

    def stamps(self, name):
        if name not in self.dirs:
            raise FileNotFoundError(name)
        prefix = name + "/"
        return {f[len(prefix):]: FileStamp(len(b), str(self.versions[f]))
                for f, b in self.files.items()
                if f.startswith(prefix) and "/" not in f[len(prefix):]}

    def remove(self, name):
        self.ops.append(f"remove {name}")
        return self.files.pop(name, None) is not None

    def sync_dir(self, name):
        self.ops.append(f"sync {name}")

    def lock(self, name, owner):
        if self.locked:
            raise LockHeld("pid 1")
        self.locked = True
        storage = self

        class Handle:
            def release(self):
                storage.locked = False

        return Handle()


ARRAYS = {"dense/kernel": np.arange(12, dtype="float32").reshape(3, 4),
          "dense/bias": np.array([0.5, -1.0, 2.0, 0.0], "float32")}


def _info() -> ModelInfo:
    return ModelInfo("m", "Sequential", (), tuple(
        WeightSpec(k, f"m/{k}", "dense", a.shape, a.dtype.name, True) for k, a in ARRAYS.items()))


def _write(storage, steps=(-1, 0, 1), path="unused-local-path", durable=True):
    writer = RunWriter.open(path, _info(), settings={"freq": 1}, versions={}, durable=durable,
                            storage=storage)
    for step in steps:
        arrays = {k: a + step for k, a in ARRAYS.items()}
        snap = Snapshot(step=step, label="initial" if step == -1 else "epoch",
                        epoch=None if step == -1 else step, arrays=arrays, logs={"loss": 1.0})
        writer.commit_snapshot(snap, writer.store_tensors(snap))
    return writer


def test_a_run_lives_entirely_behind_the_seam(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mem = MemoryStorage()
    writer = _write(mem)
    writer.close()
    assert os.listdir(tmp_path) == []  # nothing went to the local disk
    assert is_run(mem) and not is_run(tmp_path)
    run = open_run(mem)
    assert run.steps == [-1, 0, 1] and run.path == "mem://run"
    for step in run.steps:
        for key, arr in run.weights(step).items():
            np.testing.assert_array_equal(arr, ARRAYS[key] + step)
    report = run.verify()
    assert report.ok and (report.snapshots, report.files) == (3, 6)
    # Tensor files are written before the snapshot file that names them, durably.
    writes = [op for op in mem.ops if op.startswith(("write", "sync"))]
    assert writes[:2] == ["write weightwatch.json", "write weightwatch-index.jsonl"]
    first_snapshot = writes.index("write snapshots/initial.json")
    assert writes[first_snapshot - 1] == "sync tensors"
    assert all(w.startswith("write tensors/") for w in writes[2:first_snapshot - 1])
    # Each snapshot joins the index after its file is written and synced.
    assert mem.ops[mem.ops.index("sync snapshots") + 1] == "append weightwatch-index.jsonl"
    # A damaged byte behind the seam is found by the checksum.
    name = run.snapshot(0).tensors["dense/kernel"].file
    mem.files[name] = mem.files[name][:-1] + b"\x01"
    with pytest.raises(WeightWatchError, match=r"mem://run/tensors/.*checksum mismatch"):
        open_run(mem).weights(0)


def test_retention_and_lock_go_through_the_seam():
    mem = MemoryStorage()
    writer = _write(mem, steps=(-1, 0, 1, 2, 3), durable=False)
    with pytest.raises(RunBusyError, match=r"mem://run: the run is being written by another "
                                           r"WeightWatch \(pid 1\)"):
        RunWriter.open("x", _info(), settings={}, versions={}, storage=mem)
    removed = writer.apply_retention(keep_last=1)
    writer.close()
    assert removed == [f"snapshots/epoch_00000{i}.json" for i in (0, 1, 2)]
    run = open_run(mem)
    assert run.steps == [-1, 3]  # the initial snapshot and the last one
    referenced = {r.file for s in run.snapshots for r in s.tensors.values()}
    assert {f for f in mem.files if f.startswith("tensors/")} == referenced
    assert not mem.locked


# ------------------------------------------------------------------ LocalStorage


def test_local_write_atomic_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    s = LocalStorage(tmp_path)
    s.makedirs("d")
    s.write_atomic("d/f", [b"ab", memoryview(b"cd")], durable=True)
    assert (tmp_path / "d" / "f").read_bytes() == b"abcd"

    def chunks():
        yield b"xy"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        s.write_atomic("d/f", chunks(), durable=False)
    assert (tmp_path / "d" / "f").read_bytes() == b"abcd"  # the old content, whole
    assert os.listdir(tmp_path / "d") == ["f"]  # no temporary file left behind


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="POSIX_FADV_DONTNEED is POSIX")
def test_durable_files_leave_the_page_cache_only_after_their_fsync(tmp_path, monkeypatch):
    """Each durable file is fsynced, then its cached pages are handed back; a file that is
    not durable keeps them (its pages may still be dirty). The bytes are unchanged."""
    events = []
    real_fsync, real_fadvise = os.fsync, os.posix_fadvise

    def name(fd):
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def fsync(fd):
        events.append(("fsync", name(fd)))
        real_fsync(fd)

    def fadvise(fd, offset, length, advice):
        events.append(("drop" if advice == os.POSIX_FADV_DONTNEED else advice, name(fd)))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    s = LocalStorage(tmp_path)
    s.write_atomic_many([("a", [b"x" * 10_000]), ("b", [b"y"])], durable=True)
    tmp_names = [n for kind, n in events if kind == "fsync"]
    assert len(tmp_names) == 2
    for n in tmp_names:  # per file: its fsync, then the drop
        assert events.index(("fsync", n)) < events.index(("drop", n))
    assert (tmp_path / "a").read_bytes() == b"x" * 10_000 and (tmp_path / "b").read_bytes() == b"y"
    events.clear()
    s.write_atomic_many([("c", [b"z"])], durable=False)
    assert events == []


class _OpenSpy:
    """Records the flags of every `os.open`; can refuse O_DIRECT or its writes with EINVAL."""

    def __init__(self, monkeypatch, refuse_open=False, refuse_write=None):
        self.flags: list[int] = []
        self.direct_fds: set[int] = set()
        real_open, real_write = os.open, os.write

        def spy_open(path, flags, *args, **kw):
            self.flags.append(flags)
            direct = flags & getattr(os, "O_DIRECT", 0)
            if direct and refuse_open:
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args, **kw)
            if direct:
                self.direct_fds.add(fd)
            return fd

        def spy_write(fd, data):
            if fd in self.direct_fds and refuse_write is not None:
                raise OSError(refuse_write, os.strerror(refuse_write))
            return real_write(fd, data)

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "write", spy_write)

    @property
    def tried_direct(self) -> bool:
        return any(f & getattr(os, "O_DIRECT", 0) for f in self.flags)


def _aligned_tensor(n: int) -> np.ndarray:
    arr = empty((n,), np.float32)  # page-aligned, as a capture buffer is
    arr[:] = np.random.default_rng(n).standard_normal(n)
    return arr


@pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="O_DIRECT is Linux's")
@pytest.mark.parametrize("n", [ALIGNED_BYTES // 4, ALIGNED_BYTES // 4 + 1, 1000 * 1001])
def test_a_large_tensor_file_goes_past_the_page_cache_byte_for_byte(tmp_path, monkeypatch, n):
    """A tensor of at least ALIGNED_BYTES in a page-aligned buffer is written with O_DIRECT
    (the header and a tail shorter than a block through a bounce block, the file then cut
    to size): the file holds exactly the .npy bytes, which numpy loads, mapped page-aligned."""
    arr = _aligned_tensor(n)
    enc = encode_tensor(arr, "float32")
    spy = _OpenSpy(monkeypatch)
    LocalStorage(tmp_path).write_atomic("t.npy", [enc.header, enc.data], durable=True)
    assert spy.tried_direct
    assert (tmp_path / "t.npy").read_bytes() == enc.header + arr.tobytes()
    loaded = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert loaded.offset == BLOCK and np.array_equal(loaded, arr)


@pytest.mark.parametrize("case", ["small", "unaligned", "refused at open", "refused at write"])
def test_where_o_direct_cannot_serve_the_file_is_written_the_usual_way(tmp_path, monkeypatch,
                                                                       case):
    """Small or unaligned data is written buffered; a file system that refuses O_DIRECT
    (EINVAL at open or at a write) gets the same bytes buffered, leaving no stray file."""
    if case == "small":
        arr = _aligned_tensor(1000)
    elif case == "unaligned":
        arr = _aligned_tensor(ALIGNED_BYTES // 4 + 2)[1:]  # 4 bytes past a page
    else:
        arr = _aligned_tensor(ALIGNED_BYTES // 4)
    enc = encode_tensor(arr, "float32")
    spy = _OpenSpy(monkeypatch, refuse_open=case == "refused at open",
                   refuse_write=errno.EINVAL if case == "refused at write" else None)
    LocalStorage(tmp_path).write_atomic("t.npy", [enc.header, enc.data], durable=True)
    assert (tmp_path / "t.npy").read_bytes() == enc.header + arr.tobytes()
    assert os.listdir(tmp_path) == ["t.npy"]
    assert spy.tried_direct == (case.startswith("refused") and bool(getattr(os, "O_DIRECT", 0)))


@pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="O_DIRECT is Linux's")
def test_a_direct_write_that_fails_otherwise_raises_and_leaves_no_file(tmp_path, monkeypatch):
    arr = _aligned_tensor(ALIGNED_BYTES // 4)
    enc = encode_tensor(arr, "float32")
    _OpenSpy(monkeypatch, refuse_write=errno.ENOSPC)
    with pytest.raises(OSError, match="No space"):
        LocalStorage(tmp_path).write_atomic("t.npy", [enc.header, enc.data], durable=True)
    assert os.listdir(tmp_path) == []
    assert storage_module._O_DIRECT  # the path under test exists here


def test_local_listing_size_remove_and_reading(tmp_path):
    s = LocalStorage(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"12345")
    assert s.isdir() and s.isfile("a.bin") and not s.isfile("b.bin") and s.exists("a.bin")
    assert s.size("a.bin") == 5 and s.listdir("") == ["a.bin"]
    with s.open_read("a.bin") as f:
        assert f.read() == b"12345"
    assert s.remove("a.bin") is True and s.remove("a.bin") is False
    with pytest.raises(FileNotFoundError):
        s.listdir("missing")
    np.save(tmp_path / "t.npy", np.arange(3.0))
    mapped = s.load_npy("t.npy", mmap=True)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(s.load_npy("t.npy", mmap=False), np.arange(3.0))


def test_local_paths_are_absolute_so_chdir_does_not_lose_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_bytes(b"1")
    s = LocalStorage("run")
    monkeypatch.chdir("/")
    assert s.isfile("x") and s.where("x") == os.path.join("run", "x")


def test_local_links_and_places_outside_the_run_are_seen(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "outside").write_bytes(b"secret")
    os.symlink(tmp_path / "outside", tmp_path / "run" / "link")
    s = LocalStorage(tmp_path / "run")
    assert s.is_link("link") and not s.is_inside("link")
    (tmp_path / "run" / "plain").write_bytes(b"")
    assert not s.is_link("plain") and s.is_inside("plain")


def test_local_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    s = LocalStorage(tmp_path)
    first = s.lock(".lock", "pid 42")
    assert (tmp_path / ".lock").read_text() == "pid 42\n"
    # flock is per open file description, so a second open in this process is refused too.
    with pytest.raises(LockHeld) as e:
        s.lock(".lock", "pid 43")
    assert e.value.holder == "pid 42"
    first.release()
    first.release()  # safe twice
    assert not (tmp_path / ".lock").exists()  # a released lock leaves no file behind
    s.lock(".lock", "pid 43").release()
    assert not (tmp_path / ".lock").exists()


def test_a_writer_that_opened_the_lock_file_as_it_was_removed_does_not_share_the_run(
        tmp_path, monkeypatch):
    s = LocalStorage(tmp_path)
    path = os.path.join(s.root, ".lock")
    first = s.lock(".lock", "pid 1")
    stale = os.open(path, os.O_RDWR)  # a second writer opens the file just before...
    first.release()  # ...the first one lets go and removes it
    third = s.lock(".lock", "pid 3")  # a third writer creates the file anew and holds it
    real_open, opened = os.open, []

    def open_stale_first(p, flags, *args):
        if p == path and not opened:
            opened.append(p)
            return stale  # the second writer's descriptor of the removed file
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", open_stale_first)
    # flock on the removed file succeeds (nobody holds it), but it is not the run's lock
    # file any more: the second writer tries the current one, which the third holds.
    with pytest.raises(LockHeld) as e:
        s.lock(".lock", "pid 2")
    monkeypatch.undo()
    assert opened == [path] and e.value.holder == "pid 3"
    assert (tmp_path / ".lock").read_text() == "pid 3\n"
    third.release()
    assert not (tmp_path / ".lock").exists()


def test_run_lock_refuses_a_writer_while_held(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    lock = RunLock(LocalStorage(run))
    lock.acquire()
    try:
        with pytest.raises(RunBusyError, match=rf"{run}: the run is being written by another "
                                               rf"WeightWatch \(pid {os.getpid()}\)"):
            RunWriter.open(run, _info(), settings={}, versions={})
    finally:
        lock.release()
    RunWriter.open(run, _info(), settings={}, versions={}).close()
    assert load_run(run).steps == []


# --------------------------------------------------------------------------- fsspec URLs


fsspec = pytest.importorskip("fsspec")


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/ww-{os.getpid()}-{id(fs)}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_open_storage_picks_local_for_paths_and_fsspec_for_urls(tmp_path):
    from keras_weightwatch.run.remote import FsspecStorage, is_url, open_storage

    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert open_storage(f"file://{tmp_path}").root == str(tmp_path)
    assert isinstance(open_storage("memory://x/run"), FsspecStorage)
    assert [is_url(p) for p in ("s3://b/r", "gs://b/r", "memory://r", "runs/s3", "file:///r",
                                "C:\\runs")] == [True, True, True, False, False, False]


def test_a_url_log_dir_is_kept_as_a_url_and_creates_nothing_locally(tmp_path, monkeypatch):
    from keras_weightwatch.settings import Settings

    monkeypatch.chdir(tmp_path)
    assert Settings(log_dir="s3://bucket/runs/exp1/").log_dir == "s3://bucket/runs/exp1"
    assert os.listdir(tmp_path) == []


def test_a_url_without_fsspec_names_the_extra_to_install(monkeypatch):
    import sys

    from keras_weightwatch.settings import Settings

    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-weightwatch\[s3\]'"):
        Settings(log_dir="s3://bucket/run")


def test_a_run_written_and_read_through_memory_urls(memfs):
    from keras_weightwatch.run.remote import FsspecStorage

    fs, root = memfs
    url = f"memory://{root}/run"
    storage = FsspecStorage(url)
    spec = WeightSpec("d/kernel", "m/d/kernel", "d", (3, 2), "float32", True)
    info = ModelInfo("m", "Sequential", (), (spec,))
    writer = RunWriter.open(url, info, settings={}, versions={}, storage=storage)
    assert fs.exists(f"{root}/run/.weightwatch.lock")
    arr = np.arange(6, dtype="float32").reshape(3, 2)
    snap = Snapshot(step=0, label="epoch", epoch=0, arrays={"d/kernel": arr}, logs={"loss": 1.0})
    writer.commit_snapshot(snap, writer.store_tensors(snap))
    writer.close()
    assert not fs.exists(f"{root}/run/.weightwatch.lock")  # the lease is given back
    run = load_run(url)
    got = run.weights(0)["d/kernel"]
    assert np.array_equal(got, arr) and not got.flags.writeable
    assert run.verify().ok and is_run(url)
    tensor = next(p for p in fs.find(f"{root}/run/tensors"))
    fs.pipe_file(tensor, fs.cat_file(tensor)[:-4] + b"\0\0\0\1")
    assert not load_run(url).verify().ok  # a fresh reader re-reads the damaged object


class _FlakyFS:
    """An fsspec-like file system whose `cat_file` fails with `errors` first."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    def cat_file(self, path):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return b"{}"


def _flaky_storage(errors, total=5.0):
    from keras_weightwatch.run.remote import FsspecStorage, RetryPolicy

    storage = FsspecStorage("memory://flaky/run", {"secret": "hunter2-XYZ"},
                            retry=RetryPolicy(total=total, first=0.01, cap=0.02))
    storage.fs = _FlakyFS(errors)
    seen = []
    storage.on_trouble = seen.append
    return storage, seen


def test_transient_errors_are_retried_and_reported_once_then_cleared():
    storage, seen = _flaky_storage([ConnectionError("refused"), TimeoutError("slow"),
                                    OSError("503 Slow Down")])
    assert storage.read_bytes("weightwatch.json") == b"{}"
    assert storage.fs.calls == 4
    assert len(seen) == 2 and "retrying" in seen[0] and "ConnectionError" in seen[0]
    assert seen[1] is None


def test_permanent_errors_raise_at_once_with_the_url_and_no_secret():
    storage, seen = _flaky_storage([PermissionError("Access Denied for hunter2-XYZ")])
    with pytest.raises(PermissionError) as caught:
        storage.read_bytes("weightwatch.json")
    assert storage.fs.calls == 1 and seen == []
    assert "memory://flaky/run" in str(caught.value) and "hunter2-XYZ" not in str(caught.value)


def test_an_outage_longer_than_the_retry_time_raises():
    storage, _ = _flaky_storage([ConnectionError("down")] * 1000, total=0.1)
    with pytest.raises(OSError, match="down"):
        storage.read_bytes("x")
    assert 2 <= storage.fs.calls < 1000


def test_the_lease_refuses_a_second_writer_and_is_taken_over_once_expired(memfs):
    import json
    import time

    from keras_weightwatch.run.remote import FsspecStorage

    fs, root = memfs
    url = f"memory://{root}/run"
    lease = FsspecStorage(url).lock(".weightwatch.lock", "pid 1")
    with pytest.raises(LockHeld, match="pid 1"):
        FsspecStorage(url).lock(".weightwatch.lock", "pid 2")
    with pytest.raises(RunBusyError, match="pid 1"):
        RunLock(FsspecStorage(url)).acquire()
    lease._stop.set()
    fs.pipe_file(f"{root}/run/.weightwatch.lock",
                 json.dumps({"owner": "pid 1", "expires": time.time() - 60}).encode())
    taken = FsspecStorage(url).lock(".weightwatch.lock", "pid 3")
    held = json.loads(fs.cat_file(f"{root}/run/.weightwatch.lock"))
    assert held["owner"].startswith("pid 3") and held["expires"] > time.time()
    taken.release()


def test_a_writer_whose_lease_lapsed_commits_no_snapshot(memfs):
    from keras_weightwatch.run.remote import FsspecStorage

    fs, root = memfs
    storage = FsspecStorage(f"memory://{root}/run")
    lease = storage.lock(".weightwatch.lock", "pid 1")
    lease._stop.set()
    lease.renewed -= storage.lease_ttl  # no renewal for a whole time to live
    storage.write_atomic("tensors/a.npy", [b"x"], True)  # tensors may still be written
    with pytest.raises(OSError, match="lease"):
        storage.write_atomic("snapshots/epoch_000000.json", [b"{}"], True)
    assert not fs.exists(f"{root}/run/snapshots/epoch_000000.json")
