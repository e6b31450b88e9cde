"""WeightWatch: the Keras callback. It decides *when*; other modules decide *what* and *how*."""

from __future__ import annotations

import os
import platform
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from . import _version
from .capture import BufferPool, ModelInfo, Snapshot, capture_into, clean_logs, describe_model
from .distribute import is_writer
from .errors import RunBusyError, WeightWatchError, WeightWatchWarning, received
from .run import (
    RunWriter,
    SnapshotRecord,
    TensorRecord,
    architecture_mismatch,
    is_run,
    load_run,
)
from .stats import tensor_stats
from .views import FeatureView, KernelImageView, ResponseView, View, build_views
from .worker import Worker

IF_EXISTS = ("continue", "new", "error")
RESPONSE_MODES = ("kernel", "activation")
STORE_DTYPES = ("float16", "bfloat16")
EVENTS_SUBDIR = "weights"


def _versions() -> dict[str, str]:
    from importlib import metadata

    backend = keras.backend.backend()
    out = {
        "keras_weightwatch": _version.__version__,
        "keras": keras.__version__,
        "backend": backend,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    dist = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "jax": ("jax",), "torch": ("torch",)}
    for name in dist.get(backend, ()):
        try:
            out["backend_version"] = metadata.version(name)
            break
        except metadata.PackageNotFoundError:
            continue
    return out


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer >= {minimum}. {received(name, value)}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. {received(name, value)}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False. {received(name, value)}")
    return bool(value)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}. {received(name, value)}")
    return str(value)


def _check_names(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a list of strings. {received(name, value)}")
    names = list(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise TypeError(
            f"`{name}` must hold only strings; found {bad[0]!r}. {received(name, value)}"
        )
    return names


def _check_optional_int(name: str, value: Any) -> int | None:
    return None if value is None else _check_positive_int(name, value)


def _check_patterns(name: str, value: Any) -> list[str] | None:
    """None, a regular expression, or a list of them; each must compile."""
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if isinstance(patterns, bytes) or not isinstance(patterns, Sequence):
        raise TypeError(
            f"`{name}` must be a regular expression or a list of them. {received(name, value)}"
        )
    patterns = list(patterns)
    if not patterns:
        raise ValueError(f"`{name}` must not be an empty list. {received(name, value)}")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"`{name}` must hold only strings; found {pattern!r}. {received(name, value)}"
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"`{name}`: {pattern!r} is not a valid regular expression ({e}). "
                f"{received(name, value)}"
            ) from None
    return patterns


def watched(keys_and_layers: Sequence[tuple[str, str]], include: Sequence[str] | None,
            exclude: Sequence[str] | None) -> list[int]:
    """Indices of the weights an include/exclude filter keeps.

    A weight is kept when `include` is None or one of its patterns is found
    (`re.search`) in the weight's key or its layer's path, and no pattern of
    `exclude` is.
    """
    inc = [re.compile(p) for p in include or ()]
    exc = [re.compile(p) for p in exclude or ()]

    def hit(patterns: list[re.Pattern], key: str, layer: str) -> bool:
        return any(p.search(key) or (layer and p.search(layer)) for p in patterns)

    return [
        i
        for i, (key, layer) in enumerate(keys_and_layers)
        if (include is None or hit(inc, key, layer)) and not hit(exc, key, layer)
    ]


def _restrict_views(views: list[View], keys: set[str]) -> None:
    """Keep the views off weights that the include/exclude filter leaves out."""
    for view in views:
        if isinstance(view, KernelImageView):
            view.kernels = [k for k in view.kernels if k[0] in keys]
        elif isinstance(view, FeatureView) and view.key not in keys:
            raise ValueError(
                f"the top-k feature table reads {view.key!r}, which `include`/`exclude` leave "
                f"out; include it or drop `feature_names`. Received: feature weight={view.key!r}"
            )
        elif isinstance(view, ResponseView):
            kept = [t for t in view.targets if t["key"] in keys]
            if not kept:
                names = [t["key"] for t in view.targets]
                raise ValueError(
                    f"the responses to `sample_images` need the kernels {names}, which "
                    "`include`/`exclude` leave out; include them or drop `sample_images`. "
                    f"Received: response kernels={names}"
                )
            view.targets = kept


def _check_log_dir(log_dir: Any) -> str:
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(
            f"`log_dir` must be a path (str or os.PathLike). {received('log_dir', log_dir)}"
        )
    path = os.fspath(log_dir)
    if not path:
        raise ValueError(f"`log_dir` must not be empty. {received('log_dir', log_dir)}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"`log_dir` must be a directory (or not exist yet), but it is a file. "
            f"{received('log_dir', log_dir)}"
        )
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"`log_dir` cannot be written: {probe} is not a writable directory. "
            f"{received('log_dir', log_dir)}"
        )
    return path


def _reserve_new_dir(path: str) -> str:
    """`path-2` (or `-3`, ...): the first that did not exist, created here so that two
    writers racing for a new run directory never get the same one."""
    n = 2
    while True:
        candidate = f"{path}-{n}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1


class _Pipeline:
    """What happens to a snapshot on the worker: store, statistics, views.

    Each part fails on its own: with `strict=False`, a part that raises is
    switched off and its error is handed to the training thread as a warning;
    the other parts go on.
    """

    def __init__(self, writer: RunWriter, views: list[View], run_dir: str, strict: bool,
                 pool: BufferPool | None = None, keep_last: int | None = None,
                 keep_every: int | None = None):
        self.writer: RunWriter | None = writer
        self.views = list(views)
        self.run_dir = run_dir
        self.strict = strict
        self.pool = pool
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.events: Any = None
        self._failures: list[tuple[str, BaseException]] = []
        self._lock = threading.Lock()
        self._prev_arrays: dict[str, np.ndarray] | None = None

    def _fail(self, part: str, exc: BaseException) -> None:
        with self._lock:
            self._failures.append((part, exc))

    def pop_failures(self) -> list[tuple[str, BaseException]]:
        with self._lock:
            out, self._failures = self._failures, []
        return out

    def _previous(self, snapshot: Snapshot) -> Any:
        """A function key -> the weight at the previous snapshot (or None), read one at a time.

        Reading one tensor at a time keeps at most one earlier tensor mapped.
        """
        if self.writer is not None:
            writer = self.writer
            prev: SnapshotRecord | None = writer.previous(snapshot.step)
            if prev is None:
                return lambda key: None
            return lambda key: writer.read(prev.tensors[key]) if key in prev.tensors else None
        arrays = self._prev_arrays
        return lambda key: None if arrays is None else arrays.get(key)

    def handle(self, job: tuple) -> None:
        """Write one snapshot; then hand its buffers back to the pool, even on failure."""
        buffers = job[2] if len(job) > 2 else None
        try:
            self._handle(job[0], job[1])
        finally:
            if self.pool is not None:
                self.pool.release(buffers)

    def _events(self) -> Any:
        if self.events is None:
            from .summaries import EventWriter

            self.events = _GuardedEvents(EventWriter(os.path.join(self.run_dir, EVENTS_SUBDIR)))
        return self.events

    def _stop_writer(self, exc: BaseException) -> None:
        """Stop writing snapshots after a failure; release the run's lock right away."""
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: S110 - the failure being reported is the one that matters
                pass
        self._fail("snapshots", exc)

    def _stop_events(self, exc: BaseException) -> None:
        """The event file failed (disk full, ...): every view stops, with one warning."""
        self.views = []
        self._fail("the TensorBoard event file", exc)

    def _handle(self, snapshot: Snapshot, payloads: dict[str, Any]) -> None:
        records: dict[str, TensorRecord] | None = None
        if self.writer is not None:
            try:
                records = self.writer.store_tensors(snapshot)
            except Exception as e:
                self._stop_writer(e)
        try:
            prev = self._previous(snapshot)
        except Exception:
            prev = lambda key: None  # noqa: E731
        stats = {}
        for key, arr in snapshot.arrays.items():
            try:
                before = prev(key)
            except Exception:
                before = None
            stats[key] = tensor_stats(arr, before)
            del before
        if self.writer is not None and records is not None:
            try:
                self.writer.commit_snapshot(snapshot, records, stats)
            except Exception as e:
                self._stop_writer(e)
        if self.writer is not None and self.keep_last is not None:
            try:
                self.writer.apply_retention(self.keep_last, self.keep_every)
            except Exception as e:
                self.keep_last = None
                self._fail("snapshot retention", e)
        if self.writer is None:
            # The arrays live in reused buffers: keep a copy for the next update ratio.
            self._prev_arrays = {k: np.array(a, copy=True) for k, a in snapshot.arrays.items()}
        for view in list(self.views):
            try:
                view.write(snapshot, stats, payloads.get(view.name), self._events())
            except Exception as e:
                if self.events is not None and self.events.error is not None:
                    self._stop_events(self.events.error)
                    break
                self.views.remove(view)
                self._fail(f"the {view.name} view", e)
        if self.events is not None and self.events.error is None:
            try:
                self.events.flush()
            except Exception as e:
                self._stop_events(e)

    def close(self) -> None:
        for view in self.views:
            try:
                view.close()
            except Exception as e:
                self._fail(f"the {view.name} view", e)
        if self.events is not None:
            try:
                self.events.close()
            except Exception as e:
                self._fail("the TensorBoard event file", e)
        if self.writer is not None:
            self.writer.close()


class _GuardedEvents:
    """The run's `EventWriter`, remembering its first I/O error.

    A failing event file (disk full, directory gone) is one failure, reported
    once, not one per view that writes to it; once it failed, closing it does
    not report the same error again.
    """

    def __init__(self, writer: Any):
        self.writer = writer
        self.error: OSError | None = None

    def write(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.writer.write(*args, **kwargs)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.writer.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError:
            if self.error is None:
                raise


class WeightWatch(keras.callbacks.Callback):
    """Snapshot every layer's weights at each epoch and show them in TensorBoard.

    At train begin and at the end of every `freq`-th epoch, WeightWatch copies
    every weight of every layer, as `layer.get_weights()` returns it, into a
    run directory that `load_run` (or numpy alone) reads back, and writes
    TensorBoard summaries of them under `log_dir/weights`. Everything after
    the copy (checksums, files, statistics, images) runs on a background
    thread, so training waits only for the copy.

    Steps follow `keras.callbacks.TensorBoard`: the snapshot taken after the
    epoch with index `e` (0 for the first) has step `e`; the initial weights
    have the step before the first epoch (-1 for a fresh `fit`). A second
    `fit` with the same run continues it: its steps carry on after the run's
    last step unless `initial_epoch` already does.

    It works on every Keras backend (TensorFlow is never imported on JAX or
    PyTorch). In a multi-process run only one process writes (the chief of a
    TensorFlow multi-worker strategy, JAX process 0, `torch.distributed`
    rank 0; see `distribute.is_writer`); the others take no snapshot and
    write nothing.

    Args:
        log_dir: The run directory. It may be the same `log_dir` as a
            `keras.callbacks.TensorBoard` of the same run: WeightWatch's
            event files go to its `weights` subdirectory.
        freq: Take a snapshot after every `freq`-th epoch (epochs with index
            `e % freq == 0`) and after the last epoch of `fit`. Defaults to 1.
        histograms: Write a histogram of every weight tensor. Defaults to True.
        kernel_images: Draw the kernels of convolution layers as image grids.
            Defaults to True.
        max_kernel_tiles: The most tiles one kernel grid holds. Defaults to 256.
        feature_names: Names of the model's input features, for the top-k
            feature table and one scalar per feature (`features/<layer>/<name>`;
            for a layer with more than 100 input features, only the features
            in each snapshot's table get a scalar, see
            `views.MAX_FEATURE_SCALARS`). Defaults to None (no table).
        top_k: How many features the table lists. Defaults to 5.
        feature_layer: The name of the Dense layer whose kernel is read for the
            table. Defaults to None: the first Dense layer fed by the input.
        feature_data: A sample of inputs, shape (n, features): flags features
            whose correlation with another is 0.9 or more and gives
            standardized weights. Defaults to None.
        sample_images: Images (N, H, W, C in the model's input layout) to
            convolve with the kernels of the first conv layer. Defaults to None.
        response_mode: `"kernel"` (each kernel's plain cross-correlation with
            the image, no bias or activation) or `"activation"` (the layer's
            output). Defaults to `"kernel"`.
        response_layers: Names of the conv layers whose responses are drawn.
            Defaults to None: the first conv layer.
        responses_dir: Also write the response grids as PNG files here.
            Defaults to None.
        if_exists: What to do when `log_dir` already holds a run:
            `"continue"` appends to it (it must come from a model of the same
            architecture), `"new"` starts a new run in `log_dir-2` (or `-3`,
            ...), `"error"` raises. Defaults to `"continue"`.
        strict: Raise `WeightWatchError` when writing fails, instead of
            warning once and letting training go on. Defaults to False.
        durable: fsync every file before it becomes part of the run, so that
            completed snapshots survive a power loss, not only a crash.
            Defaults to True.
        max_queue: How many captured snapshots may wait for the background
            writer, besides the one it is writing, before training waits for
            it. Captures copy into reused host buffers, at most `max_queue + 1`
            copies of the weights (one while the writer keeps up). Defaults
            to 1.
        store_dtype: Store float32/float64 weights in a reduced precision,
            `"float16"` (relative error at most 2**-11, values beyond
            +-65504 become inf) or `"bfloat16"` (relative error at most
            2**-8, float32's range). LOSSY: loaded weights then differ from
            `get_weights()`; each tensor's record says `lossy: true` and
            `weightwatch show` says so. Statistics and views still use the
            exact weights. Defaults to None (exact).
        keep_last: Keep only the last `keep_last` epoch snapshots (plus the
            initial one and those `keep_every` keeps), deleting older ones
            and the tensor files no remaining snapshot needs. Defaults to
            None (keep every snapshot).
        keep_every: With `keep_last`, also keep every snapshot whose step is
            a multiple of `keep_every`. Defaults to None.
        include: A regular expression, or a list of them: watch only the
            weights whose key (`dense/kernel`) or layer path (`dense`) one of
            them matches (`re.search`). Defaults to None (every weight).
        exclude: A regular expression, or a list of them: leave out the
            weights whose key or layer path one of them matches. Excluded
            weights are neither stored nor shown in any view. Defaults to
            None.

    Example:

    ```python
    from keras_weightwatch import WeightWatch, load_run

    model.fit(x, y, epochs=20, callbacks=[WeightWatch("runs/exp1")])
    run = load_run("runs/exp1")
    run.epochs            # [0, 1, ..., 19]
    run.weights(3)        # {"dense/kernel": array(...), ...} after epoch index 3
    ```
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        freq: int = 1,
        *,
        histograms: bool = True,
        kernel_images: bool = True,
        max_kernel_tiles: int = 256,
        feature_names: Sequence[str] | None = None,
        top_k: int = 5,
        feature_layer: str | None = None,
        feature_data: Any = None,
        sample_images: Any = None,
        response_mode: str = "kernel",
        response_layers: Sequence[str] | None = None,
        responses_dir: str | os.PathLike | None = None,
        if_exists: str = "continue",
        strict: bool = False,
        durable: bool = True,
        max_queue: int = 1,
        store_dtype: str | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ):
        super().__init__()
        self.log_dir = _check_log_dir(log_dir)
        self.freq = _check_positive_int("freq", freq)
        self.histograms = _check_bool("histograms", histograms)
        self.kernel_images = _check_bool("kernel_images", kernel_images)
        self.max_kernel_tiles = _check_positive_int("max_kernel_tiles", max_kernel_tiles)
        self.feature_names = _check_names("feature_names", feature_names)
        names = self.feature_names
        if names is not None and len(set(names)) != len(names):
            dupes = sorted({n for n in self.feature_names if self.feature_names.count(n) > 1})
            raise ValueError(
                f"`feature_names` must be unique; {dupes} appear more than once. "
                f"{received('feature_names', feature_names)}"
            )
        self.top_k = _check_positive_int("top_k", top_k)
        if feature_layer is not None and not isinstance(feature_layer, str):
            raise TypeError(
                f"`feature_layer` must be a layer name. {received('feature_layer', feature_layer)}"
            )
        self.feature_layer = feature_layer
        self.feature_data = None if feature_data is None else np.asarray(feature_data)
        if self.feature_data is not None and self.feature_data.ndim != 2:
            raise ValueError(
                "`feature_data` must be a 2-D array (samples, features). "
                f"Received: feature_data with shape {self.feature_data.shape}"
            )
        self.sample_images = None if sample_images is None else np.asarray(sample_images)
        self.response_mode = _check_choice("response_mode", response_mode, RESPONSE_MODES)
        self.response_layers = _check_names("response_layers", response_layers)
        if responses_dir is not None and not isinstance(responses_dir, (str, os.PathLike)):
            raise TypeError(
                f"`responses_dir` must be a path. {received('responses_dir', responses_dir)}"
            )
        self.responses_dir = None if responses_dir is None else os.fspath(responses_dir)
        self.if_exists = _check_choice("if_exists", if_exists, IF_EXISTS)
        self.strict = _check_bool("strict", strict)
        self.durable = _check_bool("durable", durable)
        self.max_queue = _check_positive_int("max_queue", max_queue)
        if store_dtype is not None:
            _check_choice("store_dtype", store_dtype, STORE_DTYPES + (None,))
        self.store_dtype = store_dtype
        self.keep_last = _check_optional_int("keep_last", keep_last)
        self.keep_every = _check_optional_int("keep_every", keep_every)
        if self.keep_every is not None and self.keep_last is None:
            raise ValueError(
                "`keep_every` needs `keep_last` (how many of the latest snapshots to keep "
                f"besides every keep_every-th). {received('keep_every', keep_every)}"
            )
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        # Resolved at the first on_train_begin, kept for later fits of this instance.
        self.run_dir: str | None = None
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._pipeline: _Pipeline | None = None
        self._worker: Worker | None = None
        self._views: list[View] = []
        self._info: ModelInfo | None = None
        self._keys: list[str] = []
        self._watch: list[int] = []
        self._n_weights = 0
        self._pool: BufferPool | None = None
        self._pending_initial: Snapshot | None = None
        self._offset: int | None = None
        self._last_step: int | None = None
        self._active = False

    def get_config(self) -> dict[str, Any]:
        """The callback's settings, as recorded in the run header."""
        return {
            "log_dir": self.log_dir,
            "freq": self.freq,
            "histograms": self.histograms,
            "kernel_images": self.kernel_images,
            "max_kernel_tiles": self.max_kernel_tiles,
            "feature_names": self.feature_names,
            "top_k": self.top_k,
            "feature_layer": self.feature_layer,
            "feature_data": None if self.feature_data is None else list(self.feature_data.shape),
            "sample_images": None if self.sample_images is None else list(self.sample_images.shape),
            "response_mode": self.response_mode,
            "response_layers": self.response_layers,
            "responses_dir": self.responses_dir,
            "if_exists": self.if_exists,
            "strict": self.strict,
            "durable": self.durable,
            "max_queue": self.max_queue,
            "store_dtype": self.store_dtype,
            "keep_last": self.keep_last,
            "keep_every": self.keep_every,
            "include": self.include,
            "exclude": self.exclude,
        }

    def _view_settings(self) -> dict[str, Any]:
        settings = self.get_config()
        settings["feature_data"] = self.feature_data
        settings["sample_images"] = self.sample_images
        return settings

    def _resolve_run_dir(self) -> str:
        if self.run_dir is not None:
            return self.run_dir  # a later fit of this instance continues its own run
        path = self.log_dir
        if is_run(path):
            if self.if_exists == "error":
                raise WeightWatchError(
                    f"{path}: already holds a run; pass if_exists='continue' to append to it "
                    "or if_exists='new' to start a new one beside it"
                )
            if self.if_exists == "new":
                path = _reserve_new_dir(path)
        return path

    # ------------------------------------------------------------------ errors
    def _report(self, part: str, exc: BaseException) -> None:
        if self.strict:
            raise WeightWatchError(f"weightwatch: {part} failed: {exc}") from exc
        warnings.warn(
            f"weightwatch: {part} stopped after an error ({type(exc).__name__}: {exc}); "
            "training goes on without it",
            WeightWatchWarning,
            stacklevel=3,
        )

    def _collect(self) -> None:
        if self._pipeline is not None:
            for part, exc in self._pipeline.pop_failures():
                self._report(part, exc)
        if self._worker is not None:
            for exc in self._worker.pop_errors():
                self._report("the background writer", exc)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._active:  # a previous fit of this instance ended with an exception
            self._shutdown(report=False)
        self._reset()
        model = self.model
        info = describe_model(model)
        views = build_views(self._view_settings())
        for view in views:
            view.prepare(model, info)  # bad arguments raise here, before any epoch
        watch = watched([(w.key, w.layer) for w in info.weights], self.include, self.exclude)
        if not watch and info.weights:
            raise ValueError(
                f"`include`/`exclude` leave none of the model's {len(info.weights)} weights to "
                f"watch (keys such as {[w.key for w in info.weights[:3]]}). "
                f"Received: include={self.include!r}, exclude={self.exclude!r}"
            )
        specs = [info.weights[i] for i in watch]
        _restrict_views(views, {w.key for w in specs})
        if not is_writer(model):
            return  # another process of a distributed run writes; this one stays inactive
        if self.if_exists == "new" and self.run_dir is not None and is_run(self.run_dir):
            if architecture_mismatch(load_run(self.run_dir).specs, specs):
                self.run_dir = None  # the model changed since the last fit: a new run beside
        run_dir = self._resolve_run_dir()
        settings = self.get_config()
        for view in views:
            if isinstance(view, FeatureView):  # the kernel the table reads, for `diff`
                settings["feature_key"] = view.key
        try:
            while True:
                try:
                    writer = RunWriter.open(
                        run_dir,
                        info,
                        settings=settings,
                        versions=_versions(),
                        durable=self.durable,
                        store_dtype=self.store_dtype,
                        weights=specs,
                    )
                    break
                except RunBusyError:
                    # Another writer took this directory first (it may not have written
                    # its header yet): with if_exists="new", start beside it instead.
                    if self.if_exists != "new" or self.run_dir is not None:
                        raise
                    run_dir = _reserve_new_dir(self.log_dir)
        except OSError as e:
            error = WeightWatchError(f"{run_dir}: cannot create the run directory: {e}")
            if self.strict:
                raise error from e
            self._report("snapshots", error)  # a disk or permission fault: training goes on
            return
        self.run_dir = run_dir
        self._info = info
        self._keys = [s.key for s in writer.specs]
        self._watch = watch
        self._n_weights = len(info.weights)
        self._views = views
        self._worker = None
        self._pool = BufferPool(self.max_queue + 1, alive=lambda: self._worker_alive())
        self._pipeline = _Pipeline(
            writer, views, run_dir, self.strict, self._pool, self.keep_last, self.keep_every
        )
        self._worker = Worker(self._pipeline.handle, maxsize=self.max_queue)
        self._last_step = writer.last_step
        self._active = True
        if not writer.has_initial() and writer.last_step is None:
            self._pending_initial = self._capture(
                model, step=0, label="initial", epoch=None, logs={}
            )

    def _capture(self, model: Any, *, step: int, label: str, epoch: int | None,
                 logs: Mapping[str, Any]) -> Snapshot:
        variables = list(model.weights)
        if len(variables) != self._n_weights:
            raise WeightWatchError(
                f"the model now has {len(variables)} weight tensors but had {self._n_weights} at "
                "train begin; a model whose weights change during fit cannot be watched"
            )
        if self._pool is None:
            raise WeightWatchError("weightwatch is not watching a fit")
        arrays = capture_into([variables[i] for i in self._watch], self._pool)
        snap = Snapshot(
            step=step,
            label=label,
            epoch=epoch,
            arrays=dict(zip(self._keys, arrays)),
            logs=clean_logs(logs),
        )
        return snap

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.alive

    def _payloads(self, model: Any) -> dict[str, Any]:
        out = {}
        for view in self._views:
            payload = view.capture(model)
            if payload is not None:
                out[view.name] = payload
        return out

    def _submit(self, snapshot: Snapshot, payloads: dict[str, Any]) -> None:
        buffers = list(snapshot.arrays.values())  # the pool's set, in capture order
        if self._worker is None:
            if self._pool is not None:
                self._pool.release(buffers)
            return
        try:
            self._worker.submit((snapshot, payloads, buffers))
        except BaseException:
            if self._pool is not None:
                self._pool.release(buffers)
            raise
        self._last_step = snapshot.step

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._active or self._offset is not None:
            return
        last = self._last_step
        self._offset = last + 1 - epoch if last is not None and epoch <= last else 0
        if self._pending_initial is not None:
            snap, self._pending_initial = self._pending_initial, None
            snap.step = epoch + self._offset - 1
            self._guard(lambda: self._submit(snap, self._payloads(self.model)))

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._active:
            return
        self._guard(self._collect)
        model = self.model
        last_epoch = self.params.get("epochs") if self.params else None
        due = (
            epoch % self.freq == 0
            or (last_epoch is not None and epoch >= last_epoch - 1)
            or bool(getattr(model, "stop_training", False))
        )
        if not due:
            return
        if self._offset is None:
            self._offset = 0
        step = epoch + self._offset

        def take() -> None:
            snap = self._capture(model, step=step, label="epoch", epoch=epoch, logs=logs or {})
            self._submit(snap, self._payloads(model))

        self._guard(take)

    def _guard(self, fn: Any) -> None:
        """Run a training-thread step. On failure stop watching; raise if strict, else warn."""
        try:
            fn()
        except Exception as e:
            self._shutdown(report=False)
            if self.strict:
                raise
            self._report("capturing weights", e)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if not self._active:
            return
        if self._pending_initial is not None and self._last_step is None:  # fit ran no epoch
            snap, self._pending_initial = self._pending_initial, None
            snap.step = -1
            self._guard(lambda: self._submit(snap, {}))
        self._shutdown(report=True)

    def _shutdown(self, report: bool) -> None:
        """Drain the worker, close files, release the run's lock; then report what failed."""
        self._active = False
        self._pending_initial = None
        worker, pipeline, pool = self._worker, self._pipeline, self._pool
        self._worker = None
        self._pipeline = None
        self._pool = None
        failures: list[tuple[str, BaseException]] = []
        try:
            if worker is not None:
                worker.close()
                failures += [("the background writer", e) for e in worker.pop_errors()]
        finally:
            if pipeline is not None:
                pipeline.close()
                failures = pipeline.pop_failures() + failures
            if pool is not None:
                pool.clear()
        if report:
            for part, exc in failures:
                self._report(part, exc)
