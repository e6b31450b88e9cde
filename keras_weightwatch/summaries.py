"""TensorBoard event files: the package's only TensorBoard import.

Summaries are built by pure functions (`scalar`, `histogram`, `image`,
`text`) that return `Summary.Value` protos in the v2 tensor encodings that
`tf.summary` writes, and one object, `EventWriter`, does the I/O. TensorFlow
is never imported: the writer frames records itself (TFRecord framing with a
masked CRC32C from `google-crc32c`) instead of using
`tensorboard.summary.writer`, which imports TensorFlow when it is installed.

Encodings (what TensorBoard's default loader reads):

- scalar: a rank-0 `DT_FLOAT` tensor (a `DT_DOUBLE` scalar is dropped by the
  fast loader);
- histogram: a `DT_DOUBLE` tensor of shape `[k, 3]`, rows `(left, right, count)`;
- image: a rank-1 `DT_STRING` tensor `[width, height, png, png, ...]`;
- text: a rank-0 `DT_STRING` tensor holding Markdown.

Tags come from one function, `tag`, so they are stable across runs and several
runs overlay in TensorBoard; the image views' tags from `response_tag`,
`kernel_tag` and `saliency_tag`, which put each model's images in a group of
their own, headline views first (see `IMAGE_SECTIONS`).
"""

from __future__ import annotations

import glob
import os
import re
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

import google_crc32c
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.histogram import metadata as _histogram_metadata
from tensorboard.plugins.image import metadata as _image_metadata
from tensorboard.plugins.scalar import metadata as _scalar_metadata
from tensorboard.plugins.text import metadata as _text_metadata

# Our event files end with this suffix, so that a later `fit` finds and appends to its own file.
FILE_SUFFIX = ".weightwatch"
FILE_VERSION = "brain.Event:2"

_BAD_TAG_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


def tag(*parts: str) -> str:
    """The TensorBoard tag for a path of names: the package's one tag-naming function.

    Each part may itself hold `/`-separated components (a weight key such as
    `inner/dense_2/kernel`); every component has runs of characters other than
    letters, digits, `_`, `.` and `-` replaced by `_`, and empty components are
    dropped. TensorBoard groups tags by their first component, so tags that
    start with a layer name are grouped by layer.

    Args:
        *parts: The names, outermost first.

    Returns:
        The components joined with `/`.

    Example:

    >>> tag("inner/dense_2/kernel", "l2_norm")
    'inner/dense_2/kernel/l2_norm'
    >>> tag("features", "dense", "% lower status")
    'features/dense/_lower_status'
    """
    comps: list[str] = []
    for part in parts:
        for comp in str(part).split("/"):
            clean = _BAD_TAG_CHARS.sub("_", comp)
            if clean:
                comps.append(clean)
    return "/".join(comps)


# ---------------------------------------------------------------- image tags
#
# TensorBoard's Images tab groups tags by their first component (groups in natural sort
# order, the first two open) and sorts a group's cards by tag, then run. So an image tag
# starts with the model's group name (`naming.model_group`), then a numbered section that
# puts the filtered images first, the kernel grids next and the saliency maps last.

RESPONSES = "1_responses"
"""The section of the filtered images: `<model>/1_responses/<layer>/sample_<i>`."""
KERNELS = "2_kernels"
"""The section of the kernel grids: `<model>/2_kernels/<n>_<weight key>/image`."""
SALIENCY = "3_saliency"
"""The section of the saliency maps: `<model>/3_saliency/<method>/sample_<i>`."""
IMAGE_SECTIONS = (RESPONSES, KERNELS, SALIENCY)


def response_tag(model: str, layer: str, sample: int) -> str:
    """The image tag of conv layer `layer`'s responses to sample image `sample`.

    >>> response_tag("digits_cnn", "conv1", 0)
    'digits_cnn/1_responses/conv1/sample_0'
    """
    return tag(model, RESPONSES, layer, f"sample_{sample}")


def kernel_tag(model: str, key: str, position: int, count: int) -> str:
    """The image tag of a kernel grid: `position` is the kernel's place among the model's
    `count` convolution kernels in model order (zero-padded to `count`'s width), so that
    the grids sort as the layers come.

    >>> kernel_tag("digits_cnn", "conv1/kernel", 0, 2)
    'digits_cnn/2_kernels/0_conv1/kernel/image'
    >>> kernel_tag("resnet50", "conv1_conv/kernel", 0, 53)
    'resnet50/2_kernels/00_conv1_conv/kernel/image'
    """
    width = len(str(max(count - 1, 0)))
    return tag(model, KERNELS, f"{position:0{width}d}_{key}", "image")


def saliency_tag(model: str, method: str, sample: int) -> str:
    """The image tag of the saliency maps of sample image `sample` by `method`.

    >>> saliency_tag("digits_cnn", "hirescam", 1)
    'digits_cnn/3_saliency/hirescam/sample_1'
    """
    return tag(model, SALIENCY, method, f"sample_{sample}")
_CLEAN_NAMES = re.compile(r"[A-Za-z0-9_.\-]*")


def tags_under(prefix: str, names: Sequence[str]) -> list[str]:
    """`[tag(prefix, name) for name in names]`, for thousands of names at once.

    When every name is already one clean, non-empty component (the common case: generated
    feature names), the tags are the prefix joined to each name, checked with one regex
    over all of them instead of one per name.
    """
    head = tag(prefix)
    if all(isinstance(n, str) and n for n in names) and _CLEAN_NAMES.fullmatch("".join(names)):
        return [f"{head}/{n}" if head else n for n in names]
    return [tag(head, n) for n in names]


# ---------------------------------------------------------------- summary values (pure)


def _shape(dims: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in dims]
    )


def scalar(name: str, value: float, description: str = "") -> summary_pb2.Summary.Value:
    """A scalar summary value (rank-0 `DT_FLOAT`), NaN and Inf allowed.

    Args:
        name: The tag.
        value: The number.
        description: Markdown shown beside the chart. Defaults to "".

    Example:

    >>> scalar("dense/kernel/l2_norm", 1.5).tensor.float_val[0]
    1.5
    """
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=_shape([]), float_val=[float(value)]
    )
    meta = _scalar_metadata.create_summary_metadata(display_name=name, description=description)
    return summary_pb2.Summary.Value(tag=name, metadata=meta, tensor=tensor)


def histogram(name: str, buckets: np.ndarray, description: str = "") -> summary_pb2.Summary.Value:
    """A histogram summary value from `(left, right, count)` rows (see `histograms.histogram`).

    Args:
        name: The tag.
        buckets: Array of shape `[k, 3]`.
        description: Markdown shown beside the chart. Defaults to "".
    """
    arr = np.asarray(buckets, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"histogram buckets must have shape [k, 3]. Received: shape={arr.shape}")
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_DOUBLE,
        tensor_shape=_shape(arr.shape),
        tensor_content=np.ascontiguousarray(arr, dtype="<f8").tobytes(),
    )
    meta = _histogram_metadata.create_summary_metadata(display_name=name, description=description)
    return summary_pb2.Summary.Value(tag=name, metadata=meta, tensor=tensor)


def image(
    name: str,
    pngs: Sequence[bytes],
    width: int,
    height: int,
    description: str = "",
) -> summary_pb2.Summary.Value:
    """An image summary value: one or more PNGs of one size at one step.

    Args:
        name: The tag.
        pngs: Encoded PNG images (see `images.encode_png`).
        width: Width in pixels (of the first image, as `tf.summary.image` records it).
        height: Height in pixels.
        description: Markdown shown beside the image. Defaults to "".
    """
    if not pngs:
        raise ValueError("image() needs at least one PNG. Received: pngs=[]")
    values = [str(int(width)).encode(), str(int(height)).encode(), *[bytes(p) for p in pngs]]
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=_shape([len(values)]), string_val=values
    )
    meta = _image_metadata.create_summary_metadata(display_name=name, description=description)
    return summary_pb2.Summary.Value(tag=name, metadata=meta, tensor=tensor)


def text(name: str, markdown: str, description: str = "") -> summary_pb2.Summary.Value:
    """A text summary value: a rank-0 `DT_STRING` holding Markdown (tables render as tables).

    Args:
        name: The tag.
        markdown: The Markdown text.
        description: Markdown shown beside the text. Defaults to "".
    """
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=_shape([]), string_val=[markdown.encode("utf-8")]
    )
    meta = _text_metadata.create_summary_metadata(display_name=name, description=description)
    return summary_pb2.Summary.Value(tag=name, metadata=meta, tensor=tensor)


# ---------------------------------------------------------------- records and files


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def valid_length(path: str) -> int:
    """The length of the longest prefix of `path` made of complete, checksummed records."""
    good = 0
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return good
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
                return good
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return good
            if struct.unpack("<I", footer)[0] != _masked_crc(data):
                return good
            good += 12 + length + 4


def _own_files(logdir: str) -> list[str]:
    return sorted(
        glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*" + FILE_SUFFIX))
    )


class EventWriter:
    """Writes TensorBoard events to one event file in `logdir`, or to objects of a store.

    The file is created on the first write. When `logdir` already holds an
    event file of this package (from an earlier `fit` of the same run), new
    events are appended to it instead of starting a second file, after
    cutting off a record that an interrupted write left incomplete; so one run
    has one event file however many times it is fitted.

    An object store cannot append: with `storage` (a `run.Storage`), `logdir`
    is a name inside it and each `flush` writes the events since the last one
    as a new whole object (one per snapshot), named
    `events.out.tfevents.<milliseconds>.<host>.<pid>.<n>.weightwatch` with
    strictly increasing milliseconds, so TensorBoard, which reads the event
    files of a directory in name order, reads them in the order written.

    `hold` keeps the events written after it in memory until the next `flush`
    (a writer that must not show a step before something else is done).

    Args:
        logdir: The directory for the event file (created when needed).
        storage: Write objects into this storage instead. Defaults to None.

    Example:

    ```python
    with EventWriter("runs/exp1/weights") as w:
        w.write(0, [scalar("dense/kernel/l2_norm", 1.5)])
    ```
    """

    def __init__(self, logdir: str | os.PathLike, *, storage: Any = None):
        self.logdir = os.fspath(logdir)
        self.path: str | None = None
        self._file: BinaryIO | None = None
        self._closed = False
        self._storage = storage
        self._pending: list[bytes] = []  # framed events not handed to the file or store yet
        self._held = False
        self._last_ms = 0
        self._count = 0

    def _open(self) -> BinaryIO:
        if self._closed:
            raise ValueError(f"the event writer for {self.logdir} is closed")
        if self._file is None:
            os.makedirs(self.logdir, exist_ok=True)
            existing = _own_files(self.logdir)
            if existing:
                path = existing[-1]
                keep = valid_length(path)
                f: BinaryIO = open(path, "r+b")
                f.truncate(keep)
                f.seek(keep)
                new = keep == 0
            else:
                name = (
                    f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                    f"{os.getpid()}{FILE_SUFFIX}"
                )
                path = os.path.join(self.logdir, name)
                f = open(path, "xb")
                new = True
            self._file = f
            self.path = path
            if new:
                ev = event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION)
                f.write(frame_record(ev.SerializeToString()))
        return self._file

    def _put_object(self) -> None:
        """Write the pending events as one new object, named after everything before it."""
        ms = max(self._last_ms + 1, time.time_ns() // 1_000_000)
        name = (f"{self.logdir}/events.out.tfevents.{ms:013d}.{socket.gethostname()}."
                f"{os.getpid()}.{self._count}{FILE_SUFFIX}")
        head = event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION)
        if self._count == 0:
            self._storage.makedirs(self.logdir)
        self._storage.write_atomic(
            name, [frame_record(head.SerializeToString()), *self._pending], True)
        self._pending, self._last_ms, self._count = [], ms, self._count + 1
        self.path = self._storage.where(name)

    def write(
        self,
        step: int,
        values: Iterable[summary_pb2.Summary.Value],
        wall_time: float | None = None,
    ) -> None:
        """Write one event holding `values` at `step` (nothing when `values` is empty).

        Args:
            step: The TensorBoard step.
            values: Summary values (from `scalar`, `histogram`, `image`, `text`).
            wall_time: Seconds since the epoch. Defaults to now.
        """
        values = list(values)
        if not values:
            return
        ev = event_pb2.Event(
            wall_time=time.time() if wall_time is None else float(wall_time),
            step=int(step),
            summary=summary_pb2.Summary(value=values),
        )
        record = frame_record(ev.SerializeToString())
        if self._storage is None and not self._held:
            self._open().write(record)
        elif self._closed:
            raise ValueError(f"the event writer for {self.logdir} is closed")
        else:
            self._pending.append(record)

    def hold(self) -> None:
        """Keep the events written from now on in memory until the next `flush`."""
        self._held = True

    def flush(self) -> None:
        """Hand written events to the operating system (or the store), where TensorBoard
        can read them; ends a `hold`."""
        self._held = False
        self._write_pending()
        if self._file is not None:
            self._file.flush()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        if self._storage is not None:
            self._put_object()
            return
        self._open().write(b"".join(self._pending))
        self._pending = []

    def close(self) -> None:
        """Flush and close the file. Safe to call more than once."""
        if not self._closed:
            self._held = False
            self._write_pending()
        self._closed = True
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
