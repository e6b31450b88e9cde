"""`keras_weightwatch.run.format`: records, their JSON, the declarative checks, stored dtypes.

No file is touched here: the format is data and checks of data.
"""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest

from keras_weightwatch import WeightWatchError
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
