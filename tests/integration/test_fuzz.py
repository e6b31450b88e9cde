"""Hostile run directories and command lines (issue 7).

Loading never executes code and never reads outside the run: every malformed,
malicious or damaged run directory is refused with `WeightWatchError`, never
another exception, a wrong array, or a read of a file outside the run. Explicit
attacks first, then hypothesis fuzzing of the manifest reader (`FUZZ_*` cases
each) and of the CLI's argument handling (`CLI_CASES`): exit code 0, 1 or 2 and
no traceback. Hypothesis runs derandomized (fixed seed) with no example database.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_weightwatch import WeightWatchError, load_run, verify_run
from keras_weightwatch import cli as cli_mod
from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.cli import main
from keras_weightwatch.report import render_show
from keras_weightwatch.run import RunWriter

FUZZ_JSON = 300  # random JSON values planted into the snapshot and header manifests
FUZZ_BYTES = 250  # byte-level damage of manifest files
FUZZ_TENSORS = 200  # damaged .npy files, renamed to their new checksum so the hash passes
CLI_CASES = 400

def fuzz(n: int) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )



ARRAYS = {
    "dense/kernel": np.arange(12, dtype="float32").reshape(3, 4),
    "dense/bias": np.array([1.0, np.nan, np.inf, -np.inf], "float32"),
    "count": np.array(5, "int32"),
    "flags": np.array([True, False]),
}


def _info() -> ModelInfo:
    specs = tuple(
        WeightSpec(key=k, path="m/" + k, layer=k.rsplit("/", 1)[0] if "/" in k else "",
                   shape=a.shape, dtype=a.dtype.name, trainable=a.dtype.kind == "f")
        for k, a in ARRAYS.items()
    )
    return ModelInfo(name="m", class_name="Sequential", layers=(), weights=specs)


def make_run(path: str) -> str:
    """A small valid run (no Keras): an initial snapshot and two epochs."""
    w = RunWriter.open(path, _info(), settings={"freq": 1}, versions={"keras": "3"},
                       durable=False)
    from keras_weightwatch.stats import tensor_stats

    for step in (-1, 0, 1):
        arrays = {k: (a + step if a.dtype.kind in "fi" else a) for k, a in ARRAYS.items()}
        snap = Snapshot(step=step, label="initial" if step == -1 else "epoch",
                        epoch=None if step == -1 else step, arrays=arrays,
                        logs={} if step == -1 else {"loss": 1.0 / (step + 2)})
        w.commit_snapshot(snap, w.store_tensors(snap),
                          {k: tensor_stats(a) for k, a in arrays.items()})
    w.close()
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> str:
    return make_run(str(tmp_path_factory.mktemp("fuzz") / "base"))


@contextlib.contextmanager
def copy_of(base: str):
    d = tempfile.mkdtemp(prefix="ww-fuzz-")
    run = os.path.join(d, "run")
    shutil.copytree(base, run, symlinks=True)
    try:
        yield run
    finally:
        shutil.rmtree(d)


def read_everything(run: str) -> None:
    """Every reading path the package offers; only WeightWatchError may come out."""
    r = load_run(run)
    render_show(r)
    r.history()
    assert len({s.key for s in r.specs}) <= len(r.specs)
    assert all(isinstance(layer.params, int) for layer in r.layers)
    verify_run(run)
    for snap in r.snapshots:
        for mmap in (True, False):
            for verify in (True, False):
                for key, arr in r.weights(snap.step, mmap=mmap, verify=verify).items():
                    rec = snap.tensors[key]
                    assert arr.shape == rec.shape
                    assert not arr.dtype.hasobject


def must_refuse_or_read(run: str) -> None:
    try:
        read_everything(run)
    except WeightWatchError:
        pass


def _snapshot_path(run: str, name: str = "epoch_000000.json") -> str:
    return os.path.join(run, "snapshots", name)


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


# ------------------------------------------------------------------ explicit attacks


def test_valid_run_reads(base_run):
    read_everything(base_run)
    r = load_run(base_run)
    np.testing.assert_array_equal(r.weights(1)["dense/kernel"], ARRAYS["dense/kernel"] + 1)


def test_show_flags_non_finite_weights(base_run, tmp_path):
    text = render_show(load_run(base_run))
    assert ("NON-FINITE weights hold NaN/Inf in 3 tensor snapshots: initial: dense/bias "
            "(1 NaN, 2 Inf); 0: dense/bias (1 NaN, 2 Inf); 1: dense/bias (1 NaN, 2 Inf)") in text
    finite = tmp_path / "finite"
    backup = dict(ARRAYS)
    try:
        ARRAYS["dense/bias"] = np.zeros(4, "float32")
        make_run(str(finite))
    finally:
        ARRAYS.update(backup)
    assert "NON-FINITE" not in render_show(load_run(finite))


def _sha256_named(rec: dict, sha: str, **changes) -> None:
    """Make a tensor entry name a file by its SHA-256 (as format 1 does; still read)."""
    rec.pop("blake3", None)
    rec.update(file=f"tensors/{sha}.npy", sha256=sha, **changes)


def _set_file(value):
    def edit(d):
        d["tensors"]["dense/kernel"]["file"] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set_file("../../etc/passwd"), r"is not of the form tensors/<digest>\.npy inside the run"),
    (_set_file("/etc/passwd"), r"is not of the form tensors/<digest>\.npy"),
    (_set_file("tensors/../../" + "a" * 64 + ".npy"), r"is not of the form"),
    (_set_file("tensors/" + "A" * 64 + ".npy"), r"is not of the form"),
    (_set_file(["tensors/x.npy"]), r"file must be a string"),
    (lambda d: d["tensors"]["dense/kernel"].update(shape=[2**62, 2**62]),
     r"larger than any stored tensor can be"),
    (lambda d: d["tensors"]["dense/kernel"].update(shape=[0, 10**30]),
     r"larger than any stored tensor can be"),
    (lambda d: d["tensors"]["dense/kernel"].update(shape=[-1, 4]), r"integers >= 0"),
    (lambda d: d["tensors"]["dense/kernel"].update(shape=[1] * 33), r"at most 32"),
    (lambda d: d["tensors"]["dense/kernel"].update(shape=[4, 3]),
     r"holds float32\[3, 4\] but the snapshot says float32\[4, 3\]"),
    (lambda d: d["tensors"]["dense/kernel"].update(dtype="object", stored_dtype="object"),
     r"unknown dtype 'object'"),
    (lambda d: d["tensors"]["dense/kernel"].update(dtype="O", stored_dtype="O"),
     r"unknown dtype 'O'"),
    (lambda d: d["tensors"]["dense/kernel"].update(dtype="float64", stored_dtype="float64"),
     r"holds float32\[3, 4\] but the snapshot says float64\[3, 4\]"),
    (lambda d: d["tensors"]["dense/kernel"].update(blake3="0" * 64),
     r"does not match its blake3"),
    (lambda d: d["tensors"]["dense/kernel"].update(sha256="0" * 64),
     r"holds one digest, 'sha256' or 'blake3'"),
    (lambda d: d.update(step=True), r"step must be an integer"),
    (lambda d: d.update(logs={"loss": "1"}), r"logs must map names to numbers"),
    (lambda d: d.update(stats={"dense/kernel": {"l2_norm": "x"}}),
     r"stats must map weight keys to numbers"),
    (lambda d: d.update(stats={"dense/kernel": []}), r"stats must map weight keys to numbers"),
])
def test_hostile_manifest_is_refused(base_run, edit, match):
    with copy_of(base_run) as run:
        _edit_json(_snapshot_path(run), edit)
        with pytest.raises(WeightWatchError, match=match):
            read_everything(run)


def test_pickled_npy_is_never_unpickled(base_run):
    """An object array (pickle inside) with a matching checksum is refused, not loaded."""
    with copy_of(base_run) as run:
        bio = io.BytesIO()
        np.save(bio, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
        data = bio.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        with open(os.path.join(run, "tensors", sha + ".npy"), "wb") as f:
            f.write(data)

        def edit(d):
            _sha256_named(d["tensors"]["dense/kernel"], sha,
                                                bytes=len(data), shape=[2])
        _edit_json(_snapshot_path(run), edit)
        with pytest.raises(WeightWatchError, match=r"Object arrays cannot be loaded|objects"):
            load_run(run).weights(0, mmap=False)
        with pytest.raises(WeightWatchError):
            load_run(run).weights(0, mmap=True)


def _plant_npy(run: str, header_shape: tuple, data: bytes, record_shape: list) -> None:
    """A .npy whose header claims `header_shape`, with `data` after it, named by its hash."""
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        bio, {"descr": "<f4", "fortran_order": False, "shape": header_shape})
    blob = bio.getvalue() + data
    sha = hashlib.sha256(blob).hexdigest()
    with open(os.path.join(run, "tensors", sha + ".npy"), "wb") as f:
        f.write(blob)

    def edit(d):
        _sha256_named(d["tensors"]["dense/kernel"], sha,
                                            bytes=len(blob), shape=record_shape)
    _edit_json(_snapshot_path(run), edit)


@pytest.mark.parametrize("mmap", [True, False])
def test_npy_claiming_a_huge_shape_is_refused_without_allocating(base_run, mmap):
    with copy_of(base_run) as run:
        # Header and manifest agree on 2**36 floats (256 GiB); the file holds 48 bytes.
        _plant_npy(run, (2**36,), b"\0" * 48, [2**36])
        with pytest.raises(WeightWatchError, match=r"(truncated|bytes)"):
            load_run(run).weights(0, mmap=mmap, verify=False)
        with pytest.raises(WeightWatchError, match=r"(truncated|bytes)"):
            load_run(run).weights(0, mmap=mmap, verify=True)


def test_truncated_and_oversized_tensor_files(base_run):
    with copy_of(base_run) as run:
        rec = load_run(run).snapshot(0).tensors["dense/kernel"]
        path = os.path.join(run, rec.file)
        with open(path, "r+b") as f:
            f.truncate(rec.bytes - 8)
        with pytest.raises(WeightWatchError, match=r"expected \d+ \(truncated or replaced\)"):
            load_run(run).weights(0)
        with pytest.raises(WeightWatchError, match=r"truncated|bytes"):
            load_run(run).weights(0, verify=False, mmap=False)
        assert not verify_run(run).ok
        with open(path, "ab") as f:
            f.write(b"\0" * 100)
        with pytest.raises(WeightWatchError, match=r"truncated or replaced"):
            load_run(run).weights(0)
        with pytest.raises(WeightWatchError, match=r"truncated|bytes"):
            load_run(run).weights(0, verify=False)


def test_symlinks_out_of_the_run_are_refused(base_run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with copy_of(base_run) as run:
        rec = load_run(run).snapshot(0).tensors["dense/kernel"]
        # 1. A tensor file that is a symlink to a (matching) file outside the run.
        target = outside / "t.npy"
        shutil.move(os.path.join(run, rec.file), target)
        os.symlink(target, os.path.join(run, rec.file))
        with pytest.raises(WeightWatchError, match=r"symbolic link"):
            load_run(run).weights(0)
        assert any("symbolic link" in p for p in verify_run(run).problems)
    with copy_of(base_run) as run:
        # 2. The whole tensors directory is a symlink out of the run.
        shutil.move(os.path.join(run, "tensors"), outside / "tensors")
        os.symlink(outside / "tensors", os.path.join(run, "tensors"))
        with pytest.raises(WeightWatchError, match=r"outside the run"):
            load_run(run).weights(0)
        assert any("outside the run" in p for p in verify_run(run).problems)
    with copy_of(base_run) as run:
        # 3. A snapshot file that is a symlink.
        snap = _snapshot_path(run)
        shutil.move(snap, outside / "s.json")
        os.symlink(outside / "s.json", snap)
        with pytest.raises(WeightWatchError, match=r"symbolic link"):
            load_run(run)
    with copy_of(base_run) as run:
        # 4. The snapshots directory is a symlink out of the run.
        shutil.move(os.path.join(run, "snapshots"), outside / "snapshots")
        os.symlink(outside / "snapshots", os.path.join(run, "snapshots"))
        with pytest.raises(WeightWatchError, match=r"outside the run"):
            load_run(run)
    # A run directory that is itself a symlink (runs/latest -> runs/exp3) is fine.
    link = tmp_path / "latest"
    os.symlink(base_run, link)
    read_everything(str(link))


def test_oversized_manifest_is_refused(base_run, monkeypatch):
    from keras_weightwatch.run import format as run_format

    monkeypatch.setattr(run_format, "MAX_JSON_BYTES", 100)
    with pytest.raises(WeightWatchError, match=r"too large to be one"):
        load_run(base_run)


def test_no_pickle_anywhere_in_the_package():
    import keras_weightwatch

    pkg = os.path.dirname(keras_weightwatch.__file__)
    names = [os.path.relpath(os.path.join(d, n), pkg)
             for d, _, files in os.walk(pkg) for n in files]  # subpackages (run/) too
    assert os.path.join("run", "reader.py") in names
    for name in names:
        if name.endswith(".py"):
            with open(os.path.join(pkg, name)) as f:
                text = f.read()
            assert "import pickle" not in text and "allow_pickle=True" not in text, name
            for line in text.splitlines():
                if "np.load(" in line:
                    assert "allow_pickle=False" in line, (name, line)


# ------------------------------------------------------------------ fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
PATHS = st.lists(st.sampled_from(
    ["tensors", "dense/kernel", "count", "shape", "dtype", "stored_dtype", "file", "sha256",
     "bytes", "lossy", "step", "label", "epoch", "logs", "stats", "l2_norm", "time",
     "weights", "model", "layers", "0", "params", "name", "format_version", "versions",
     "settings", "key", "trainable", "class_name", "total_params", "nan_count"]),
    min_size=1, max_size=4)


def _plant(data, path, value):
    """Put `value` at `path` in the nested JSON `data` (as far as the path exists)."""
    node = data
    for part in path[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            break
    last = path[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    return data


@fuzz(FUZZ_JSON)
@given(target=st.sampled_from(["snapshots/epoch_000000.json", "snapshots/initial.json",
                               "weightwatch.json"]),
       path=PATHS, value=JSON, whole=st.booleans())
def test_fuzz_manifest_values(base_run, target, path, value, whole):
    with copy_of(base_run) as run:
        file = os.path.join(run, target)
        with open(file) as f:
            data = json.load(f)
        data = value if whole and target != "weightwatch.json" else _plant(data, path, value)
        with open(file, "w") as f:
            json.dump(data, f, allow_nan=True)
        must_refuse_or_read(run)


@fuzz(FUZZ_BYTES)
@given(target=st.sampled_from(["snapshots/epoch_000001.json", "weightwatch.json"]),
       cut=st.integers(0, 4000), insert=st.binary(max_size=8), flip=st.integers(0, 4000))
def test_fuzz_manifest_bytes(base_run, target, cut, insert, flip):
    with copy_of(base_run) as run:
        file = os.path.join(run, target)
        with open(file, "rb") as f:
            data = bytearray(f.read())
        if flip < len(data):
            data[flip] ^= 0x20
        cut = min(cut, len(data))
        data = data[:cut] + insert + data[cut + len(insert):]
        with open(file, "wb") as f:
            f.write(bytes(data))
        must_refuse_or_read(run)


@fuzz(FUZZ_TENSORS)
@given(key=st.sampled_from(list(ARRAYS)), start=st.integers(0, 200),
       replacement=st.binary(max_size=24), truncate=st.booleans())
def test_fuzz_tensor_files(base_run, key, start, replacement, truncate):
    """Damaged .npy content (header or data) that still passes the checksum check."""
    with copy_of(base_run) as run:
        snap_file = _snapshot_path(run, "epoch_000001.json")
        rec = load_run(run).snapshot(1).tensors[key]
        with open(os.path.join(run, rec.file), "rb") as f:
            blob = bytearray(f.read())
        start = min(start, len(blob))
        blob = blob[:start] + replacement + (b"" if truncate else blob[start + len(replacement):])
        sha = hashlib.sha256(blob).hexdigest()
        with open(os.path.join(run, "tensors", sha + ".npy"), "wb") as f:
            f.write(blob)

        def edit(d):
            _sha256_named(d["tensors"][key], sha, bytes=len(blob))
        _edit_json(snap_file, edit)
        must_refuse_or_read(run)


TOKENS = st.sampled_from(
    ["show", "verify", "diff", "demo", "--version", "-h", "--help", "--quick", "--logdir",
     "RUN", "DAMAGED", "MISSING", "FILE", "", "-", "--", "initial", "last", "0", "-1", "99",
     "--bogus", "x" * 300, "\x00", "é", "--steps", "1:2"]
) | st.text(max_size=12)


@pytest.fixture(scope="module")
def cli_paths(base_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_fuzz")
    damaged = make_run(str(d / "damaged"))
    rec = load_run(damaged).snapshot(0).tensors["dense/kernel"]
    with open(os.path.join(damaged, rec.file), "r+b") as f:
        f.truncate(10)
    (d / "file").write_text("not a run")
    return {"RUN": base_run, "DAMAGED": damaged, "MISSING": str(d / "missing"),
            "FILE": str(d / "file")}


@fuzz(CLI_CASES)
@given(argv=st.lists(TOKENS, max_size=5))
def test_fuzz_cli_arguments(cli_paths, monkeypatch, argv):
    # `demo` trains models for a minute: replaced by a stub (its arguments are still parsed).
    monkeypatch.setattr(cli_mod, "_cmd_demo", lambda args, stdout: 0)
    argv = [cli_paths.get(a, a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv, stdout=out, stderr=err)
    assert code in (0, 1, 2), (argv, code)
    assert "Traceback" not in err.getvalue() + out.getvalue(), argv
    if code == 2:
        assert err.getvalue().strip(), argv  # a usage error or one line saying what is wrong
