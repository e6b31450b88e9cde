"""summaries: tags, v2 encodings read back by TensorBoard's own reader, framing, appending."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.compat.proto import types_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util

from keras_weightwatch import summaries
from keras_weightwatch.images import encode_png
from keras_weightwatch.summaries import EventWriter, tag


def _load(logdir):
    acc = pea.EventAccumulator(str(logdir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize(
    "parts, expected",
    [
        (("dense/kernel", "l2_norm"), "dense/kernel/l2_norm"),
        (("inner/dense_2/kernel", "histogram"), "inner/dense_2/kernel/histogram"),
        (("features", "dense", "% lower status"), "features/dense/_lower_status"),
        (("features", "dense", "a b:c"), "features/dense/a_b_c"),
        (("dense/kernel#2", "mean"), "dense/kernel_2/mean"),
        (("a//b/", "c.d-e"), "a/b/c.d-e"),
    ],
)
def test_tag(parts, expected):
    assert tag(*parts) == expected


def _natural_key(text):
    """TensorBoard's natural sort of tag and group names: digit runs compare as numbers."""
    import re

    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


def test_image_tags_group_by_model_with_the_headline_views_first():
    """TensorBoard's Images tab groups tags by their first component and sorts a group's
    cards by tag: each model's images are one group; responses, kernels, saliency follow
    in that order, and the kernels in model order, however many there are."""
    for count in (1, 3, 12, 101):
        keys = [f"layer{i}/kernel" for i in range(count)]  # model order
        tags = [summaries.kernel_tag("net", k, i, count) for i, k in enumerate(keys)]
        for order in (sorted, lambda t: sorted(t, key=_natural_key)):
            assert order(tags) == tags
        assert {t.split("/")[0] for t in tags} == {"net"}
        assert all(t.endswith(f"_{k}/image") for t, k in zip(tags, keys))
    tags = {
        summaries.saliency_tag("net", "vanilla", 0): 2,
        summaries.kernel_tag("net", "conv/kernel", 0, 1): 1,
        summaries.response_tag("net", "conv", 10): 0,
        summaries.response_tag("net", "conv", 9): 0,
    }
    for order in (sorted, lambda t: sorted(t, key=_natural_key)):
        assert [tags[t] for t in order(tags)] == [0, 0, 1, 2]
    sections = [t.split("/")[1] for t in sorted(tags)]
    assert list(dict.fromkeys(sections)) == list(summaries.IMAGE_SECTIONS)
    # the parts are cleaned like every tag's
    assert summaries.response_tag("my net", "c 1", 2) == "my_net/1_responses/c_1/sample_2"
    assert (summaries.kernel_tag("m", "blk/conv/kernel#2", 3, 4)
            == "m/2_kernels/3_blk/conv/kernel_2/image")
@pytest.mark.parametrize(
    "names",
    [
        [f"feature_{i}" for i in range(500)],  # all clean: the joined fast path
        ["LSTAT", "% lower status", "a/b", "", "x.y-z", "ünï", "a b"],  # each cleaned on its own
        ["a", "a", "b"],
        [1, 2, "three"],
    ],
)
@pytest.mark.parametrize("prefix", ["features/dense", "features/my layer", ""])
def test_tags_under_equals_tag_of_each_name(prefix, names):
    assert summaries.tags_under(prefix, names) == [tag(prefix, n) for n in names]


def test_every_kind_reads_back_with_tensorboard(tmp_path):
    png = encode_png(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    buckets = np.array([[0.0, 0.5, 2.0], [0.5, 1.0, 3.0]])
    with EventWriter(tmp_path) as w:
        for step in (-1, 0, 1):
            w.write(
                step,
                [
                    summaries.scalar("s", step * 1.5),
                    summaries.histogram("h", buckets + step),
                    summaries.image("i", [png, png], 3, 2),
                    summaries.text("t", f"| a |\n|---|\n| {step} |"),
                ],
                wall_time=100.0 + step,
            )
        w.write(2, [summaries.scalar("s", float("nan"))])
    acc = _load(tmp_path)
    assert sorted(acc.Tags()["tensors"]) == ["h", "i", "s", "t"]
    assert acc.SummaryMetadata("s").plugin_data.plugin_name == "scalars"
    assert acc.SummaryMetadata("h").plugin_data.plugin_name == "histograms"
    assert acc.SummaryMetadata("i").plugin_data.plugin_name == "images"
    assert acc.SummaryMetadata("t").plugin_data.plugin_name == "text"
    scal = acc.Tensors("s")
    assert [e.step for e in scal] == [-1, 0, 1, 2]
    assert [e.wall_time for e in scal[:3]] == [99.0, 100.0, 101.0]
    assert all(e.tensor_proto.dtype == types_pb2.DT_FLOAT for e in scal)
    got = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in scal]
    assert got[:3] == [-1.5, 0.0, 1.5] and np.isnan(got[3])
    hist = acc.Tensors("h")
    assert hist[0].tensor_proto.dtype == types_pb2.DT_DOUBLE
    np.testing.assert_array_equal(tensor_util.make_ndarray(hist[2].tensor_proto), buckets + 1)
    img = tensor_util.make_ndarray(acc.Tensors("i")[0].tensor_proto)
    assert img.shape == (4,) and list(img[:2]) == [b"3", b"2"] and img[2] == png
    txt = tensor_util.make_ndarray(acc.Tensors("t")[1].tensor_proto)
    assert txt.shape == () and txt.item().decode() == "| a |\n|---|\n| 0 |"


def test_histogram_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"Received: shape=\(3,\)"):
        summaries.histogram("h", np.zeros(3))


def test_framing_matches_tensorboard_crc():
    data = b"hello weights"
    rec = summaries.frame_record(data)
    header = struct.pack("<Q", len(data))
    assert rec == (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def test_reopen_appends_to_the_same_file(tmp_path):
    with EventWriter(tmp_path) as w:
        w.write(0, [summaries.scalar("s", 1.0)])
    first = w.path
    size = os.path.getsize(first)
    with EventWriter(tmp_path) as w2:
        w2.write(1, [summaries.scalar("s", 2.0)])
    assert w2.path == first and os.path.getsize(first) > size
    assert os.listdir(tmp_path) == [os.path.basename(first)]
    acc = _load(tmp_path)
    assert [e.step for e in acc.Tensors("s")] == [0, 1]
    # one file_version record only: the file starts with it and it is not repeated
    with open(first, "rb") as f:
        assert f.read().count(b"brain.Event:2") == 1


def test_reopen_cuts_off_a_torn_record(tmp_path):
    with EventWriter(tmp_path) as w:
        w.write(0, [summaries.scalar("s", 1.0)])
    good = os.path.getsize(w.path)
    torn = summaries.frame_record(b"x" * 50)[:30]
    with open(w.path, "ab") as f:
        f.write(torn)
    assert summaries.valid_length(w.path) == good
    with EventWriter(tmp_path) as w2:
        w2.write(1, [summaries.scalar("s", 2.0)])
    assert [e.step for e in _load(tmp_path).Tensors("s")] == [0, 1]


def test_close_twice_and_write_after_close(tmp_path):
    w = EventWriter(tmp_path)
    w.write(0, [])  # nothing to write: no file yet
    assert os.listdir(tmp_path) == []
    w.write(0, [summaries.scalar("s", 1.0)])
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(1, [summaries.scalar("s", 1.0)])


def test_held_events_reach_the_file_only_at_the_next_flush(tmp_path):
    big = "x" * 50_000  # larger than any write buffer: written through unless held
    w = EventWriter(tmp_path)
    w.write(0, [summaries.text("t", "before")])
    w.flush()
    w.hold()
    w.write(1, [summaries.text("t", big)])
    w.write(2, [summaries.scalar("s", 2.0)])
    assert [e.step for e in _load(tmp_path).Tensors("t")] == [0]  # held: not in the file
    assert os.path.getsize(w.path) < len(big)
    w.flush()
    acc = _load(tmp_path)
    assert [e.step for e in acc.Tensors("t")] == [0, 1]
    assert [e.step for e in acc.Tensors("s")] == [2]
    w.write(3, [summaries.text("t", big)])  # the hold ended with the flush
    assert os.path.getsize(w.path) > 2 * len(big)
    w.hold()
    w.write(4, [summaries.scalar("s", 4.0)])
    w.close()  # closing writes what is held
    assert [e.step for e in _load(tmp_path).Tensors("s")] == [2, 4]


def test_writing_does_not_import_tensorflow(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from keras_weightwatch import summaries\n"
        "from keras_weightwatch.views import build_views\n"
        f"w = summaries.EventWriter({str(tmp_path)!r})\n"
        "w.write(0, [summaries.scalar('s', 1.0), summaries.text('t', 'x')])\n"
        "w.close()\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_event_writer_into_a_store_writes_one_whole_object_per_flush_in_name_order(tmp_path):
    """Object stores cannot append: each flush is a new object, and the objects' names sort
    in the order they were written, which is the order TensorBoard reads them in."""
    from keras_weightwatch.run import LocalStorage

    storage = LocalStorage(tmp_path)  # any Storage: the writer only calls write_atomic
    w = EventWriter("weights", storage=storage)
    for step in range(5):
        w.write(step, [summaries.scalar("loss", float(10 - step))])
        w.flush()
    w.write(5, [summaries.scalar("loss", 5.0)])
    w.close()  # the pending event goes out with close
    names = os.listdir(tmp_path / "weights")
    assert len(names) == 6 and all(n.startswith("events.out.tfevents.") for n in names)
    order = [int(n.split(".")[-2]) for n in sorted(names)]  # the writer's own counter
    assert order == list(range(6))
    acc = pea.EventAccumulator(str(tmp_path / "weights"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    got = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
    assert got == [(s, float(10 - s)) for s in range(6)]
    with pytest.raises(ValueError, match="closed"):
        w.write(6, [summaries.scalar("loss", 0.0)])
