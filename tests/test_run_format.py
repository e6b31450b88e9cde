"""`keras_weightwatch.run.format`: records, their JSON, the declarative checks, stored dtypes.

No file is touched here: the format is data and checks of data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import ml_dtypes
import numpy as np
import pytest

from keras_weightwatch import WeightWatchError, stats
from keras_weightwatch.run import format as fmt
from keras_weightwatch.run.format import (
    LayerInfo,
    ModelInfo,
    SnapshotRecord,
    TensorRecord,
    WeightSpec,
    architecture_mismatch,
    check_fields,
    check_header,
    check_layout,
    from_storage,
    storage_array,
)

SHA = "ab" * 32
WHERE = "RUN/snapshots/epoch_000001.json"


def _tensor(**changes):
    d = {"file": f"tensors/{SHA}.npy", "sha256": SHA, "shape": [3, 4], "dtype": "float32",
         "stored_dtype": "float32", "lossy": False, "bytes": 176}
    d.update(changes)
    return d


def _snapshot(**changes):
    d = {"step": 1, "label": "epoch", "epoch": 1, "time": 12.5, "logs": {"loss": 0.5},
         "tensors": {"dense/kernel": _tensor()}, "stats": {"dense/kernel": {"l2_norm": 2.0}}}
    d.update(changes)
    return d


def _header(**changes):
    d = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
        "versions": {"keras": "3"}, "settings": {"freq": 1},
        "model": {"name": "m", "class_name": "Sequential", "total_params": 16,
                  "trainable_params": 16, "non_trainable_params": 0,
                  "layers": [LayerInfo("dense", "Dense", 16, 16, 0, ("input",)).to_json()]},
        "weights": [WeightSpec("dense/kernel", "m/dense/kernel", "dense", (3, 4), "float32",
                               True).to_json()],
    }
    d.update(changes)
    return d


# ------------------------------------------------------------------ records and their JSON


def test_records_round_trip_through_json_text():
    spec = WeightSpec("dense/kernel", "seq/dense/kernel", "dense", (3, 4), "float32", True)
    layer = LayerInfo("dense", "Dense", 16, 12, 4, ("input_layer",))
    info = ModelInfo("seq", "Sequential", (layer,), (spec,))
    assert WeightSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert LayerInfo.from_json(json.loads(json.dumps(layer.to_json()))) == layer
    model_json = json.loads(json.dumps(info.to_json()))
    assert ModelInfo.from_json(model_json, [spec.to_json()]) == info
    assert model_json["total_params"] == 12 == spec.size
    rec = TensorRecord.from_json(_tensor(), WHERE)
    assert TensorRecord.from_json(json.loads(json.dumps(rec.to_json())), WHERE) == rec
    snap = SnapshotRecord.from_json(_snapshot(), "snapshots/epoch_000001.json")
    again = SnapshotRecord.from_json(json.loads(json.dumps(snap.to_json())), snap.file)
    assert again == snap
    assert (snap.name, snap.tensors["dense/kernel"].shape) == ("1", (3, 4))


def test_layer_without_inbound_reads_as_none():
    # Runs written before `inbound` was recorded have none.
    d = LayerInfo("a", "Dense", 1, 1, 0).to_json()
    del d["inbound"]
    assert LayerInfo.from_json(d).inbound is None
    check_fields(d, LayerInfo.FIELDS, "h", "layer entry")


def test_absent_optional_fields_take_their_defaults():
    d = _tensor()
    for name in ("stored_dtype", "lossy", "bytes"):
        del d[name]
    rec = TensorRecord.from_json(d, WHERE)
    assert (rec.stored_dtype, rec.lossy, rec.bytes) == ("float32", False, -1)
    snap = SnapshotRecord.from_json({"step": -1, "label": "initial", "tensors": {}}, "f")
    assert (snap.epoch, snap.time, dict(snap.logs), dict(snap.stats)) == (None, 0.0, {}, {})


def test_architecture_mismatch_names_the_first_difference():
    a = WeightSpec("d/kernel", "m/d/kernel", "d", (3, 4), "float32", True)
    b = WeightSpec("e/kernel", "n/e/kernel", "e", (3, 5), "float32", True)
    assert architecture_mismatch([a], [a]) is None
    assert architecture_mismatch([a], [a, a]) == "the run has 1 weight tensors, the model has 2"
    assert architecture_mismatch([a], [b]) == (
        "weight #0 is d/kernel float32[3, 4] in the run but e/kernel float32[3, 5] in the model")


def test_snapshot_file_names():
    assert fmt.snapshot_file_name("initial", -1) == "initial.json"
    assert fmt.snapshot_file_name("epoch", 3) == "epoch_000003.json"
    assert fmt.SNAPSHOT_FILE_RE.match(fmt.snapshot_file_name("epoch", 1234567))


# ------------------------------------------------------------------ the declarative checks


@pytest.mark.parametrize("changes, message", [
    ({"step": True}, "step must be an integer. Received: step=True"),
    ({"step": 1.0}, "step must be an integer. Received: step=1.0"),
    ({"label": "final"},
         "label must be 'initial', 'epoch' or 'batch'. Received: label='final'"),
    ({"epoch": "1"}, "epoch must be an integer or null. Received: epoch='1'"),
    ({"time": "now"}, "time must be a number. Received: time='now'"),
    ({"logs": {"loss": "1"}}, "logs must map names to numbers. Received: logs={'loss': '1'}"),
    ({"tensors": []}, "tensors must be an object. Received: tensors=[]"),
    ({"stats": {"k": []}}, "stats must map weight keys to numbers. Received: stats={'k': []}"),
    ({"stats": {"k": {"l2_norm": True}}},
     "stats must map weight keys to numbers. Received: stats={'k': {'l2_norm': True}}"),
])
def test_snapshot_fields_are_checked_with_file_field_expectation_and_value(changes, message):
    with pytest.raises(WeightWatchError) as e:
        SnapshotRecord.from_json(_snapshot(**changes), "snapshots/epoch_000001.json", WHERE)
    assert str(e.value) == f"{WHERE}: {message}"


def test_missing_required_field_and_non_object_are_named():
    d = _snapshot()
    del d["step"]
    with pytest.raises(WeightWatchError, match=re.escape(
            f"{WHERE}: snapshot has no field 'step' (it must be an integer)")):
        SnapshotRecord.from_json(d, "f", WHERE)
    with pytest.raises(WeightWatchError, match=re.escape(
            f"{WHERE}: snapshot must be a JSON object. Received: snapshot=[1]")):
        SnapshotRecord.from_json([1], "f", WHERE)


@pytest.mark.parametrize("changes, message", [
    ({"file": ["x"]}, r"file must be a string\. Received: file=\['x'\]"),
    ({"file": "../../etc/passwd"}, r"is not of the form tensors/<digest>\.npy inside the run"),
    ({"sha256": "cd" * 32}, r"does not match its sha256"),
    ({"blake3": SHA}, r"holds one digest, 'sha256' or 'blake3'\. "
                      r"Received: digests=\['sha256', 'blake3'\]"),
    ({"shape": [-1, 4]}, r"shape sizes must be integers >= 0\. Received: shape=\[-1, 4\]"),
    ({"shape": [1] * 33}, r"shape must be a list of at most 32 sizes"),
    ({"shape": [2**62, 2**62]}, r"larger than any stored tensor can be"),
    ({"dtype": "object"}, r"unknown dtype 'object'\. Received: dtype='object'"),
    ({"stored_dtype": 3}, r"stored_dtype must be a string\. Received: stored_dtype=3"),
    ({"lossy": "no"}, r"lossy must be true or false\. Received: lossy='no'"),
    ({"bytes": 1.5}, r"bytes must be an integer\. Received: bytes=1\.5"),
])
def test_tensor_fields_are_checked(changes, message):
    where = f"{WHERE}: tensor 'dense/kernel'"
    with pytest.raises(WeightWatchError, match=re.escape(where) + ": .*" + message):
        TensorRecord.from_json(_tensor(**changes), where)


def test_long_received_values_are_clipped_to_one_line():
    with pytest.raises(WeightWatchError) as e:
        SnapshotRecord.from_json(_snapshot(step="x" * 10_000), "f", WHERE)
    assert len(str(e.value)) < 250 and str(e.value).endswith("...")


def test_valid_header_passes_and_is_returned_as_is():
    header = _header()
    assert check_header(header, "RUN/weightwatch.json") is header


@pytest.mark.parametrize("changes, message", [
    ({"format": "other"}, "not a keras-weightwatch run header"),
    ({"format_version": 4}, "format version 4 is not supported (this keras-weightwatch reads "
                            "version 3); upgrade the package"),
    ({"format_version": True}, "format version True is not supported"),
    ({"weights": {}}, "weights must be a list. Received: weights={}"),
    ({"weights": [{"key": 1}]}, "weights[0]: key must be a string. Received: key=1"),
    ({"weights": [{**_header()["weights"][0], "shape": [-1]}]},
     "weights[0]: shape sizes must be integers >= 0"),
    ({"weights": [{**_header()["weights"][0], "trainable": "yes"}]},
     "weights[0]: trainable must be true or false. Received: trainable='yes'"),
    ({"model": []}, "model must be an object. Received: model=[]"),
    ({"model": {"total_params": "16"}}, "model: total_params must be an integer"),
    ({"model": {"name": 3}}, "model: name must be a string. Received: name=3"),
    ({"model": {"layers": {}}}, "model: layers must be a list"),
    ({"model": {"layers": [{"name": "a"}]}},
     "model layers[0]: layer entry has no field 'class_name' (it must be a string)"),
    ({"model": {"layers": [{**LayerInfo("a", "Dense", 1, 1, 0).to_json(), "params": "1"}]}},
     "model layers[0]: params must be an integer. Received: params='1'"),
    ({"model": {"layers": [{**LayerInfo("a", "Dense", 1, 1, 0).to_json(), "inbound": [1]}]}},
     "model layers[0]: inbound must be a list of layer names or null. Received: inbound=[1]"),
    ({"versions": {"keras": 3}}, "versions must map names to strings"),
    ({"settings": "x"}, "settings must be an object. Received: settings='x'"),
])
def test_header_fields_are_checked(changes, message):
    with pytest.raises(WeightWatchError) as e:
        check_header(_header(**changes), "RUN/weightwatch.json")
    assert str(e.value).startswith("RUN/weightwatch.json: ")
    assert message in str(e.value)


# ------------------------------------------------------------------ stored dtypes and layout


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_dtypes_numpy_lacks_are_stored_as_their_bits(dtype):
    arr = np.array([1.5, -2.0, 0.25, 448.0 if dtype != "float8_e5m2" else 57344.0],
                   getattr(ml_dtypes, dtype))
    stored, stored_dtype, lossy = storage_array(arr, dtype)
    assert (stored.dtype.name, stored_dtype, lossy) == (fmt.BITS_DTYPES[dtype], dtype, False)
    assert stored.tobytes() == arr.tobytes()
    rec = TensorRecord("f", SHA, arr.shape, dtype, stored_dtype, lossy, -1)
    back = from_storage(stored, rec)
    assert back.dtype == arr.dtype and back.tobytes() == arr.tobytes()


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_lossy_store_rounds_to_nearest_and_widens_back(store_dtype):
    arr = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    stored, stored_dtype, lossy = storage_array(arr, "float32", store_dtype)
    assert (stored_dtype, lossy) == (store_dtype, True)
    reference = arr.astype(getattr(ml_dtypes, store_dtype) if store_dtype == "bfloat16"
                           else np.float16)
    rec = TensorRecord("f", SHA, arr.shape, "float32", stored_dtype, lossy, -1)
    back = from_storage(stored, rec)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, reference.astype("float32"))
    # Other dtypes are stored exactly even when a lossy store is asked for.
    ints = np.arange(4, dtype="int32")
    assert storage_array(ints, "int32", store_dtype)[1:] == ("int32", False)


def test_unknown_dtype_cannot_be_stored():
    with pytest.raises(WeightWatchError, match=r"cannot store a tensor of dtype 'int4'"):
        storage_array(np.zeros(2, "int8"), "int4")


def test_check_layout_refuses_other_shape_dtype_and_objects():
    rec = TensorRecord("f", SHA, (3, 4), "bfloat16", "bfloat16", False, -1)
    check_layout("F", (3, 4), np.dtype("uint16"), rec)  # bfloat16 is stored as its bits
    with pytest.raises(WeightWatchError, match=re.escape(
            "F: holds uint16[4, 3] but the snapshot says uint16[3, 4]")):
        check_layout("F", (4, 3), np.dtype("uint16"), rec)
    with pytest.raises(WeightWatchError, match=re.escape(
            "F: holds float32[3, 4] but the snapshot says uint16[3, 4]")):
        check_layout("F", (3, 4), np.dtype("float32"), rec)
    with pytest.raises(WeightWatchError, match="holds Python objects"):
        check_layout("F", (3, 4), np.dtype(object), rec)


def test_npy_header_and_raw_bytes_make_the_file_numpy_writes():
    import io

    for arr in (np.arange(12, dtype="float32").reshape(3, 4), np.array(7, "int64"),
                np.zeros((0, 2), "float16")):
        bio = io.BytesIO()
        np.save(bio, arr, allow_pickle=False)
        assert fmt.npy_header(arr) + bytes(fmt.raw_bytes(arr)) == bio.getvalue()


@pytest.mark.parametrize("shape", [(fmt.ALIGNED_BYTES // 4,), (1000, 1001), (2, 3, 512, 256)])
def test_a_large_arrays_header_fills_a_block_and_numpy_reads_the_file(tmp_path, shape):
    """From ALIGNED_BYTES on, the .npy header is padded to BLOCK bytes (data block-aligned);
    numpy loads such a file as it is, mapped at offset BLOCK; smaller arrays keep numpy's."""
    arr = np.random.default_rng(0).standard_normal(shape).astype("float32")
    header = fmt.npy_header(arr)
    assert len(header) == fmt.BLOCK and header != fmt.plain_npy_header(arr)
    (tmp_path / "a.npy").write_bytes(header + bytes(fmt.raw_bytes(arr)))
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert loaded.offset == fmt.BLOCK and loaded.shape == shape and np.array_equal(loaded, arr)
    small = arr.reshape(-1)[: fmt.ALIGNED_BYTES // 4 - 1]
    assert fmt.npy_header(small) == fmt.plain_npy_header(small)


def test_holds_knows_a_large_tensor_stored_with_numpys_plain_header():
    """A run written before the padding names large tensors by the digest of numpy's plain
    header: `holds` still recognises the weights it holds, and only those."""
    arr = np.random.default_rng(1).standard_normal((1000, 1001)).astype("float32")
    plain = fmt.encode_tensor(arr, "float32", plain=True)
    assert plain.header == fmt.plain_npy_header(arr)
    digest = plain.digest("blake3")
    rec = fmt.TensorRecord(file=f"tensors/{digest}.npy", digest=digest, hash="blake3",
                           shape=arr.shape, dtype="float32", stored_dtype="float32",
                           lossy=False, bytes=plain.nbytes)
    assert fmt.holds(rec, arr)
    changed = arr.copy()
    changed[-1, -1] += 1.0
    assert not fmt.holds(rec, changed)


def test_a_tensor_record_names_its_hash_and_round_trips():
    d = _tensor()
    del d["sha256"]
    with pytest.raises(WeightWatchError, match=re.escape(
            f"{WHERE}: a tensor entry holds one digest, 'sha256' or 'blake3'. "
            "Received: digests=[]")):
        TensorRecord.from_json(d, WHERE)
    d["blake3"] = SHA
    rec = TensorRecord.from_json(d, WHERE)
    assert (rec.hash, rec.digest, rec.sha256) == ("blake3", SHA, SHA)
    assert rec.to_json() == d and TensorRecord.from_json(rec.to_json(), WHERE) == rec
    assert TensorRecord.from_json(_tensor(), WHERE).hash == "sha256"  # format 1


@pytest.mark.parametrize("data, expected", [
    # BLAKE3's published test vectors (the reference implementation's README and test suite)
    (b"", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
    (b"abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"),
])
def test_content_hash_blake3_is_blake3(data, expected):
    h = fmt.content_hash("blake3")
    h.update(data)
    assert h.hexdigest() == expected
    with pytest.raises(WeightWatchError, match="unknown content hash 'md5'"):
        fmt.content_hash("md5")


# ------------------------------------------------------------------ tensors stored as parts


def _part(offset, shape, n=0, **changes):
    digest = f"{n:064x}"
    d = {"file": f"tensors/{digest}.npy", "blake3": digest, "offset": list(offset),
         "shape": list(shape), "bytes": 128}
    d.update(changes)
    return d


def _parts(*boxes):
    return [fmt.PartRecord.from_json(_part(o, s, i), WHERE) for i, (o, s) in enumerate(boxes)]


def _covers_once(shape, boxes) -> bool:
    """The numpy oracle: every box inside the tensor, and each element counted once."""
    count = np.zeros(shape, dtype=int)
    for off, sh in boxes:
        if len(off) != len(shape) or any(o < 0 or o + n > s for o, n, s in
                                         zip(off, sh, shape)):
            return False
        count[tuple(slice(o, o + n) for o, n in zip(off, sh))] += 1
    return bool((count == 1).all())


@pytest.mark.parametrize("boxes, message", [
    ([((0, 0), (6, 4))], "a gap in the tensor of shape [6, 8] (24 of its 48 elements "
                         "covered). Received: offsets=[[0, 0]]"),
    ([((0, 0), (6, 4)), ((0, 3), (6, 5))],
     "two parts overlap. Received: offsets=[[0, 0], [0, 3]], shapes=[[6, 4], [6, 5]]"),
    ([((0, 0), (6, 4)), ((0, 4), (6, 5))],
     "a part lies outside the tensor of shape [6, 8]. Received: offset=[0, 4], shape=[6, 5]"),
    ([((0, 0), (6, 4)), ((-1, 4), (6, 4))],
     "a part lies outside the tensor of shape [6, 8]. Received: offset=[-1, 4]"),
    ([((0, 0), (6, 4)), ((4,), (6,))],
     "a part lies outside the tensor of shape [6, 8]. Received: offset=[4], shape=[6]"),
    ([], "a gap in the tensor of shape [6, 8] (0 of its 48 elements covered). "
         "Received: offsets=[]"),
])
def test_check_tiling_refuses_gaps_overlaps_and_parts_outside(boxes, message):
    parts = [fmt.PartRecord(f"tensors/{i:064x}.npy", f"{i:064x}", "blake3", o, s, 1)
             for i, (o, s) in enumerate(boxes)]
    assert not _covers_once((6, 8), boxes)
    with pytest.raises(WeightWatchError) as e:
        fmt.check_tiling((6, 8), parts, "W")
    assert str(e.value).startswith("W: ") and message in str(e.value)
    assert "Received: " in str(e.value).rsplit(". ", 1)[-1]


def test_check_tiling_agrees_with_a_numpy_count_of_covered_elements():
    rng = np.random.default_rng(0)
    shape = (5, 7)
    verdicts = []
    for _ in range(300):
        rows = sorted({0, *rng.integers(1, 5, size=2).tolist()}) + [5]
        cols = sorted({0, *rng.integers(1, 7, size=2).tolist()}) + [7]
        boxes = [((r0, c0), (r1 - r0, c1 - c0)) for r0, r1 in zip(rows, rows[1:])
                 for c0, c1 in zip(cols, cols[1:])]
        if rng.random() < 0.6:  # damage the grid: move, grow, drop or repeat a box
            i = int(rng.integers(len(boxes)))
            (r, c), (h, w) = boxes[i]
            kind = rng.integers(4)
            if kind == 0:
                boxes[i] = ((r + int(rng.integers(-1, 2)), c + int(rng.integers(-1, 2))), (h, w))
            elif kind == 1:
                boxes[i] = ((r, c), (h + 1, w))
            elif kind == 2:
                boxes.pop(i)
            else:
                boxes.append(boxes[i])
        rng.shuffle(boxes)
        parts = [fmt.PartRecord(f"tensors/{i:064x}.npy", f"{i:064x}", "blake3", o, s, 1)
                 for i, (o, s) in enumerate(boxes)]
        try:
            fmt.check_tiling(shape, parts, "W")
            accepted = True
        except WeightWatchError:
            accepted = False
        assert accepted == _covers_once(shape, boxes), boxes
        verdicts.append(accepted)
    assert 50 < sum(verdicts) < 250  # both verdicts were exercised


def test_a_scalar_is_one_part_with_no_axes():
    fmt.check_tiling((), _parts(((), ())), "W")


def test_parts_digest_names_the_parts_whatever_their_order_not_the_values_alone():
    halves = _parts(((0, 0), (6, 4)), ((0, 4), (6, 4)))
    assert fmt.parts_digest(halves) == fmt.parts_digest(halves[::-1])
    # The same (equal) values split into rows instead of columns: another digest.
    rows = _parts(((0, 0), (3, 8)), ((3, 0), (3, 8)))
    assert fmt.parts_digest(rows) != fmt.parts_digest(halves)
    # One part's content changes: another digest.
    other = [halves[0], dataclasses.replace(halves[1], digest="f" * 64)]
    assert fmt.parts_digest(other) != fmt.parts_digest(halves)
    assert fmt.parts_digest(halves, "sha256") != fmt.parts_digest(halves)


def _parted(*boxes, order=None):
    parts = [_part(o, s, i) for i, (o, s) in enumerate(boxes)]
    recs = [fmt.PartRecord.from_json(p, WHERE) for p in parts]
    listed = parts if order is None else [parts[i] for i in order]
    return {"blake3": fmt.parts_digest(recs), "parts": listed, "shape": [6, 8],
            "dtype": "float32", "stored_dtype": "float32", "lossy": False, "bytes": 256}


def test_a_tensor_of_parts_round_trips_in_any_listed_order():
    d = _parted(((0, 0), (6, 4)), ((0, 4), (6, 4)), order=[1, 0])
    rec = TensorRecord.from_json(d, WHERE)
    assert [p.offset for p in rec.parts] == [(0, 4), (0, 0)] and rec.file == ""
    assert TensorRecord.from_json(json.loads(json.dumps(rec.to_json())), WHERE) == rec
    assert [(p.file, p.shape) for p in rec.pieces()] == [
        (f"tensors/{1:064x}.npy", (6, 4)), (f"tensors/{0:064x}.npy", (6, 4))]
    assert all(p.dtype == "float32" and not p.parts for p in rec.pieces())


_HALVES = (((0, 0), (6, 4)), ((0, 4), (6, 4)))


@pytest.mark.parametrize("entry, message", [
    ({**_parted(*_HALVES), "file": f"tensors/{SHA}.npy"},
     "has either a 'file' or a non-empty list of 'parts'. Received: file="),
    ({**_parted(*_HALVES), "parts": []}, "has either a 'file' or a non-empty list of 'parts'"),
    ({**_parted(*_HALVES), "parts": {"0": 1}}, "parts must be a list. Received: parts="),
    ({k: v for k, v in _parted(*_HALVES).items() if k != "parts"},
     "a tensor entry has a 'file' or 'parts'. Received: file=None, parts=None"),
    ({**_parted(*_HALVES), "blake3": "0" * 64},
     "the blake3 digest is not that of its parts. Received: blake3='000"),
    (_parted(((0, 0), (6, 4))), "leave a gap"),
    (_parted(((0, 0), (6, 5)), ((0, 4), (6, 4))), "two parts overlap. Received: "),
    ({**_parted(*_HALVES), "parts": [_part((0, 0), (6, 4)), [1]]},
     "part 1: part entry must be a JSON object. Received: part entry=[1]"),
    ({**_parted(*_HALVES), "parts": [_part((0, 0), (6, 4)), {**_part((0, 4), (6, 4), 1),
                                                               "offset": None}]},
     "part 1: offset must be a list of at most 32 sizes"),
    ({**_parted(*_HALVES), "parts": [_part((0, 0), (6, 4)), _part((0, 4), (6,), 1)]},
     "part 1: a part's offset and shape have one entry per axis. Received: offset=[0, 4], "
     "shape=[6]"),
    ({**_parted(*_HALVES), "parts": [_part((0, 0), (6, 4)), _part((0, 4), (6, 4), 1,
                                                                  file="../x.npy")]},
     "part 1: tensor file '../x.npy' is not of the form tensors/<digest>.npy"),
    ({**_parted(*_HALVES), "parts": [_part((0, 0), (6, 4)), _part((0, 4), (6, 4), 1,
                                                                  blake3="e" * 64)]},
     "part 1: tensor file 'tensors/000"),
    ({**_parted(*_HALVES), "parts": [_part((0, 0), (6, 4)), _part((0, 4), (6, 4), 1,
                                                                  sha256=SHA)]},
     "part 1: a tensor entry holds one digest, 'sha256' or 'blake3'. "
     "Received: digests=['sha256', 'blake3']"),
    ({**_parted(*_HALVES), "parts": [_part((0, 0), (6, 4)), _part((0, 4), (6, 4), 1,
                                                                  bytes="9")]},
     "part 1: bytes must be an integer. Received: bytes='9'"),
])
def test_malformed_parts_are_refused_naming_the_part(entry, message):
    where = f"{WHERE}: tensor 'dense/kernel'"
    with pytest.raises(WeightWatchError) as e:
        TensorRecord.from_json(entry, where)
    assert str(e.value).startswith(where) and message in str(e.value), str(e.value)


def _shard_record(**changes):
    d = {"step": 3, "label": "epoch", "process": 1, "attempt": "a1",
         "tensors": {"dense/kernel": [_part((0, 4), (6, 4), 1)]}}
    d.update(changes)
    return d


def test_a_shard_record_round_trips():
    rec = fmt.ShardRecord.from_json(_shard_record(), "S")
    assert (rec.step, rec.label, rec.process, rec.attempt) == (3, "epoch", 1, "a1")
    assert rec.tensors["dense/kernel"][0].offset == (0, 4)
    assert fmt.ShardRecord.from_json(json.loads(json.dumps(rec.to_json())), "S") == rec
    assert fmt.shard_record_name("epoch", 3, 1) == "shards/epoch_000003.process_00001.json"
    assert fmt.shard_record_name("initial", -1, 12) == "shards/initial.process_00012.json"


def _sums(**changes):
    d = {"size": 24, "count": 22, "mean": 0.5, "m2": 3.0, "sumsq": 8.5, "max_abs": 2.0,
         "nan": 1, "inf": 1, "diff_sq": 0.25, "prev_sq": 8.0}
    d.update(changes)
    return d


def test_a_shard_records_partial_sums_round_trip_through_its_json():
    rec = fmt.ShardRecord.from_json(_shard_record(stats={"dense/kernel": _sums()}), "S")
    assert rec.stats["dense/kernel"] == stats.Partial(24, 22, 0.5, 3.0, 8.5, 2.0, 1, 1, 0.25, 8.0)
    none = stats.Partial(4, 0, 0.0, 0.0, 0.0, -math.inf, 4, 0, None, None)  # all NaN, no prev
    rec = dataclasses.replace(rec, stats={"dense/kernel": none})
    back = fmt.ShardRecord.from_json(json.loads(fmt.json_bytes(rec.to_json())), "S")
    assert back == rec
    assert fmt.ShardRecord.from_json(_shard_record(), "S").stats == {}  # an older writer's


@pytest.mark.parametrize("changes, message", [
    ({"mean": "0.5"}, "mean must be a number. Received: mean='0.5'"),
    ({"nan": 1.5}, "nan must be an integer"),
    ({"count": 25}, "partial sums count at most `size` finite values and no negative number "
                    "of NaN or Inf. Received: size=24, count=25, nan=1, inf=1"),
    ({"inf": -1}, "Received: size=24, count=22, nan=1, inf=-1"),
])
def test_malformed_partial_sums_are_refused_naming_the_weight(changes, message):
    where = "RUN/shards/x.json"
    with pytest.raises(WeightWatchError) as e:
        fmt.ShardRecord.from_json(_shard_record(stats={"dense/kernel": _sums(**changes)}), where)
    assert str(e.value).startswith(f"{where}: 'dense/kernel' stats") and message in str(e.value)


@pytest.mark.parametrize("changes, message", [
    ({"attempt": None}, "attempt must be a string. Received: attempt=None"),
    ({"process": "1"}, "process must be an integer. Received: process='1'"),
    ({"label": "last"}, "label must be 'initial', 'epoch' or 'batch'"),
    ({"tensors": []}, "tensors must map weight keys to lists of parts. Received: tensors=[]"),
    ({"tensors": {"k": {}}}, "tensors must map weight keys to lists of parts"),
    ({"tensors": {"k": [{"file": "x"}]}}, "'k' part 0: part entry has no field 'offset'"),
])
def test_malformed_shard_records_are_refused(changes, message):
    with pytest.raises(WeightWatchError) as e:
        fmt.ShardRecord.from_json(_shard_record(**changes), "RUN/shards/x.json")
    assert str(e.value).startswith("RUN/shards/x.json") and message in str(e.value), str(e.value)
    missing = _shard_record()
    del missing["attempt"]
    with pytest.raises(WeightWatchError, match="shard record has no field 'attempt'"):
        fmt.ShardRecord.from_json(missing, "RUN/shards/x.json")


def test_stored_as_is_the_dtype_storage_array_stores():
    for dtype, store in [("float32", None), ("float32", "float16"), ("float64", "bfloat16"),
                         ("int32", "float16"), ("float16", "float16"), ("bfloat16", "float16")]:
        arr = np.zeros(3, getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
        assert fmt.stored_as(dtype, store) == storage_array(arr, dtype, store)[1:], (dtype, store)
