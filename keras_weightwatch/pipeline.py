"""The work behind the callback: what happens to the weights once it decided to take them.

`Pipeline.open(plan, settings, previous_run_dir)` opens the run (`rundir.open_writer`
decides which) for a `fitplan.Plan` made at train begin, and becomes the one owner of
the views, the host buffer pool, the run writer, the TensorBoard event file and the
background worker. On the training thread the callback only asks it to `take` a copy
of the weights and `submit` it (or both at once: `capture`); everything else happens
on the worker (`write`): the tensors, their statistics and the views.

Each part fails on its own: a part that raises is switched off (a view is
dropped everywhere, so its `capture` stops running on the training thread
too) and its error is kept for the callback to report (`pop_failures`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, NamedTuple

import numpy as np

from .capture import (
    BufferPool,
    Shard,
    Snapshot,
    Ticket,
    capture_into,
    clean_logs,
    owned_shards,
    process_index,
)
from .derive import applies, effective, effective_lookup
from .errors import WeightWatchError
from .fitplan import Plan
from .run import (
    RunWriter,
    ShardWriter,
    SnapshotRecord,
    TensorRecord,
    is_run,
    load_run,
)
from .run.remote import FsspecStorage, open_storage
from .rundir import open_writer
from .settings import Settings
from .stats import Partial, combine, finish, partial_stats, same_stats, tensor_stats
from .views import View
from .worker import Worker

EVENTS_SUBDIR = "weights"

Failure = tuple[str, BaseException]


PREFILL_HERE_BYTES = 64 << 20
"""The largest second buffer set that train begin makes on the training thread.

Before training starts, mapping in fresh pages costs a fraction of what it costs once the
model trains beside the worker (8 MB: about 3 ms at train begin against 15-20 ms on the
worker during the first epoch, on a 2-core machine), so a small set is made at once; a
larger one would hold train begin too long and is made by the worker instead.
"""


class _Deferred(NamedTuple):
    """The initial snapshot, stored and committed, whose views wait for the worker's next job.

    The worker stores the initial snapshot as the first epoch starts, which is when Keras
    traces the training step; beside that, the views' CPU doubled (on 2 cores, 15 against
    30 ms for the reference CNN). So its summaries are written with the next snapshot (or
    at train end), when the first epoch's start has passed; its buffer set is held until
    then. A process that dies during the first epoch keeps the initial snapshot in the run
    but not its TensorBoard summaries.
    """

    snapshot: Snapshot
    """As the views read it (effective kernels: `Pipeline._effective`)."""
    stats: dict[str, dict[str, float]]
    payloads: Mapping[str, Any]
    buffers: list[np.ndarray]
    captured: Snapshot | None = None
    """The snapshot as captured, whose buffers `buffers` are (`snapshot` may share them)."""


_VIEWS_NOW = object()  # a worker job: write deferred views now (train end)


class _Prefill(NamedTuple):
    """A worker job: allocate and touch one more buffer set of these shapes and dtypes."""

    specs: tuple[tuple[tuple[int, ...], np.dtype], ...]


# ------------------------------------------------------------------ the pipeline


class Pipeline:
    """The one owner of a fit's views, buffers, run writer, event file and worker.

    Host buffers: the first set is made on the training thread at train begin
    (`take` of the initial snapshot, or `prefill`); `prefill` has the worker
    make the second one while the first epoch runs, so no epoch end allocates.
    The set of the snapshot written last is kept in the pool as long as another
    set is free, and the next snapshot's update ratios read it there (`claim`)
    instead of from disk.

    Args:
        writer: The open run (see `open_writer`); closed by `close`.
        plan: The model's plan (`Plan.make`).
        settings: The callback's settings.
    """

    pool_class: type[BufferPool] = BufferPool
    """The buffer pool each pipeline makes: the seam through which tests watch allocations."""

    def __init__(self, writer: RunWriter, plan: Plan, settings: Settings):
        self.writer: RunWriter | None = writer
        self.run_dir = writer.path
        self.storage = getattr(writer, "storage", None)
        self._notices: list[str] = []
        self._store_down = False
        if isinstance(self.storage, FsspecStorage):
            self.storage.on_trouble = self._trouble
        self.last_step = writer.last_step
        """The step of the last snapshot submitted, else the run's last step (None: none)."""
        self.needs_initial = not writer.has_initial() and writer.last_step is None
        self.watch = tuple(i for i in plan.watch if i not in plan.sharded)
        self.sharded = {writer.specs[plan.watch.index(i)].key: i for i in plan.sharded}
        self.processes = process_index()[1] if plan.sharded else 1
        self.attempt = plan.attempt
        self.shard_timeout = settings.shard_timeout
        self.n_weights = len(plan.info.weights)
        self.keep_last = settings.keep_last
        self.keep_every = settings.keep_every
        self.keys = [s.key for s in writer.specs if s.key not in self.sharded]
        renamed = {new.key: kept.key for new, kept in zip(plan.specs, writer.specs)}
        self.derived = tuple(d.rekeyed(renamed) for d in plan.info.derived
                             if applies(d.rekeyed(renamed), set(self.keys)))
        """The effective kernels the views read (those whose weights are all watched)."""
        self.events: _GuardedEvents | None = None
        self._views = list(plan.views)  # the one list of the views: a dropped one is gone
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        self._draining = threading.Event()  # set by `close`: the training thread waits
        self._deferred: _Deferred | None = None  # owned by the worker thread
        self._prev_arrays: dict[str, np.ndarray] | None = None
        self._kernels: dict[str, np.ndarray] = {}
        """The effective kernels of the snapshot being written, kept for the next one's."""
        self._prev_kernel = _OneArray()  # the previous snapshot's, one at a time
        self._own_stats: dict[str, dict[str, float]] = {}
        """`tensor_stats` of each tensor at the snapshot written last (`_tensor_stats`)."""
        self._prev_shards: Mapping[str, list[Shard]] = {}
        """This process's shards at the previous snapshot, for the update ratios."""
        self._last_written: Ticket | None = None  # the set of the snapshot written last
        self._set_specs: tuple[tuple[tuple[int, ...], np.dtype], ...] | None = None
        self._worker: Worker | None = None
        self.pool = self.pool_class(settings.max_queue + 1, alive=self._worker_alive)
        self._worker = Worker(self.handle, maxsize=settings.max_queue)

    @classmethod
    def open(cls, plan: Plan, settings: Settings, previous_run_dir: str | None) -> Pipeline:
        """Open the run (see `open_writer`) and start the pipeline that writes it."""
        writer = open_writer(plan, settings, previous_run_dir)
        try:
            return cls(writer, plan, settings)
        except BaseException:
            writer.close()
            raise

    @property
    def views(self) -> list[View]:
        """The views still on (a view that failed is off everywhere)."""
        with self._lock:
            return list(self._views)

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.alive

    def _fail(self, part: str, exc: BaseException) -> None:
        with self._lock:
            self._failures.append((part, exc))

    def _drop(self, view: View, exc: BaseException) -> None:
        with self._lock:
            if view in self._views:
                self._views.remove(view)
        self._fail(f"the {view.name} view", exc)

    def _trouble(self, message: str | None) -> None:
        """The store failed and is being retried (a message), or works again (None)."""
        with self._lock:
            if message is not None and not self._store_down:
                self._notices.append(
                    f"{message}; training goes on and snapshots resume when it is back")
            elif message is None and self._store_down:
                self._notices.append(f"{self.run_dir}: the store is reachable again")
            self._store_down = message is not None

    def pop_notices(self) -> list[str]:
        """What the callback should tell once (a store that is down, then back)."""
        with self._lock:
            out, self._notices = self._notices, []
        return out

    def wants_stop(self) -> bool:
        """Whether a view asks to stop training (`health="stop"` on an error finding)."""
        return any(view.wants_stop() for view in self.views)

    def pop_failures(self) -> list[Failure]:
        """What failed since the last call: the parts that stopped, then the worker's errors."""
        with self._lock:
            out, self._failures = self._failures, []
        if self._worker is not None:
            out += [("the background writer", e) for e in self._worker.pop_errors()]
        return out

    # ------------------------------------------------------------ training thread

    def take(self, model: Any, *, label: str, epoch: int | None,
             logs: Mapping[str, Any]) -> Snapshot:
        """Copy the watched weights into a set of the pool's buffers (step 0 until set)."""
        variables = list(model.weights)
        if len(variables) != self.n_weights:
            raise WeightWatchError(
                f"the model now has {len(variables)} weight tensors but had {self.n_weights} at "
                "train begin; a model whose weights change during fit cannot be watched"
            )
        arrays = capture_into([variables[i] for i in self.watch], self.pool)
        if self._set_specs is None:
            self._set_specs = tuple((a.shape, a.dtype) for a in arrays)
        return Snapshot(step=0, label=label, epoch=epoch, arrays=dict(zip(self.keys, arrays)),
                        logs=clean_logs(logs),
                        shards={k: owned_shards(variables[i]) for k, i in self.sharded.items()})

    def prefill(self, model: Any) -> None:
        """Make sure the buffers of the first epoch ends exist before they end (train begin).

        Makes the first set here unless the initial snapshot already did. The second is
        made here too when it is at most `PREFILL_HERE_BYTES`, else by the worker while
        the first epoch runs.
        """
        if self._set_specs is None:
            snapshot = self.take(model, label="epoch", epoch=None, logs={})
            self.pool.release(list(snapshot.arrays.values()))
        specs = self._set_specs
        if self._worker is None or specs is None or not self.pool.reserve():
            return
        if sum(math.prod(shape) * dt.itemsize for shape, dt in specs) <= PREFILL_HERE_BYTES:
            self.pool.fill(specs)
            return
        try:
            self._worker.submit(_Prefill(specs))
        except BaseException:
            self.pool.unreserve()
            raise

    def submit(self, snapshot: Snapshot, model: Any = None) -> None:
        """Queue a snapshot for the worker, with the payloads the views compute from `model`
        (None: no payloads). Waits while the queue is full."""
        buffers = list(snapshot.arrays.values())  # the pool's set, in capture order
        try:
            payloads = {} if model is None else self._payloads(model)
            if self._worker is None:
                raise WeightWatchError("weightwatch is not watching a fit")
            job = (snapshot, payloads, buffers)
            if self._store_down and not self._worker.offer(job):
                self._skip(snapshot, buffers)
            elif not self._store_down:
                self._worker.submit(job)
        except BaseException:
            self.pool.release(buffers)
            raise
        self.last_step = snapshot.step

    def _skip(self, snapshot: Snapshot, buffers: list[np.ndarray]) -> None:
        """The store is down and the queue full: training goes on without this snapshot."""
        self.pool.release(buffers)
        with self._lock:
            self._notices.append(
                f"{self.run_dir}: snapshot at step {snapshot.step} skipped: the store is "
                "unreachable and the queue of snapshots waiting for it is full")

    def capture(self, model: Any, *, step: int, epoch: int | None,
                logs: Mapping[str, Any], label: str = "epoch") -> None:
        """Take the weights after an epoch (or a batch) and hand them to the worker."""
        snapshot = self.take(model, label=label, epoch=epoch, logs=logs)
        snapshot.step = step
        self.submit(snapshot, model)

    def _payloads(self, model: Any) -> dict[str, Any]:
        out = {}
        for view in self.views:
            payload = view.capture(model)
            if payload is not None:
                out[view.name] = payload
        return out

    def join(self) -> None:
        """Wait until every submitted snapshot is written, its views included."""
        if self._worker is not None:
            if self._worker.alive:
                self._worker.submit(_VIEWS_NOW)
            self._worker.join()

    # ------------------------------------------------------------ worker thread

    def handle(self, job: Any) -> None:
        """The worker's job: write one snapshot, then hand its buffers back, even on failure
        (or make a buffer set ahead of time: `prefill`). The views of an initial snapshot
        that `write` deferred are written first, whatever the job."""
        if isinstance(job, _Prefill):
            self.pool.fill(job.specs)
            return
        self._write_deferred()
        if job is _VIEWS_NOW:
            return
        snapshot, payloads, buffers = job
        try:
            self.write(snapshot, payloads)
        finally:
            if self._deferred is not None and self._deferred.captured is snapshot:
                self._deferred = self._deferred._replace(buffers=buffers)  # still read
            else:
                self._last_written = self.pool.release(buffers)

    def write(self, snapshot: Snapshot, payloads: Mapping[str, Any]) -> None:
        """Its statistics, then store the snapshot, retention; then every view's summaries.

        Once the training thread waits for the worker (train end), the store and the views
        of a snapshot run side by side instead (`_write_side_by_side`). The views of the
        initial snapshot wait for the worker's next job (`_Deferred`).
        """
        seen = self._effective(snapshot)
        stats = self._stats(seen)
        if self._draining.is_set() and not snapshot.shards and self.writer is not None:
            self._write_side_by_side(snapshot, seen, stats, payloads)
            return
        records = self._store(snapshot, stats)
        self._measure(seen, stats, snapshot)
        self._view_stats(stats, payloads)
        self._commit(snapshot, records, stats)
        self._keep_without_run(snapshot)
        if snapshot.label == "initial" and not self._draining.is_set():
            self._deferred = _Deferred(seen, stats, payloads, [], snapshot)
            return
        self._write_views(seen, stats, payloads)

    def _effective(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot as the layers compute with it: each derived kernel (LoRA, quantized)
        replaced by its effective kernel (`derive.effective`), which the statistics and the
        views read; the run stores the snapshot's own arrays."""
        if not self.derived:
            return snapshot
        return dataclasses.replace(
            snapshot, arrays=effective(snapshot.arrays, self.derived, self._kernels))

    def _write_deferred(self) -> None:
        """Write the deferred views of the initial snapshot, then hand its buffers back."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        try:
            self._write_views(deferred.snapshot, deferred.stats, deferred.payloads)
        finally:
            self._last_written = self.pool.release(deferred.buffers or None)

    def _keep_without_run(self, snapshot: Snapshot) -> None:
        """Without a run to read it back from, keep a copy of the snapshot (its arrays live
        in reused buffers) for the next update ratios."""
        if self.writer is None:
            self._prev_arrays = {k: np.array(a, copy=True) for k, a in snapshot.arrays.items()}

    def _write_side_by_side(self, snapshot: Snapshot, seen: Snapshot,
                            stats: dict[str, dict[str, float]],
                            payloads: Mapping[str, Any]) -> None:
        """Store and commit the snapshot on a second thread while this one writes the views;
        their events are held in memory until the snapshot is committed, so the run never
        lags behind what TensorBoard shows. Only while the training thread waits: both
        cores are idle then, and the wait is the user's."""
        self._measure(seen, stats, snapshot)
        self._view_stats(stats, payloads)
        errors: list[BaseException] = []

        def store() -> None:
            try:
                self._commit(snapshot, self._store(snapshot, stats), stats)
            except BaseException as e:  # raised on the worker below, as in `write`
                errors.append(e)

        self._events().hold()
        side = threading.Thread(target=store, name="weightwatch-store", daemon=True)
        side.start()
        try:
            self._write_views(seen, stats, payloads, flush=False)
        finally:
            side.join()
        if errors:
            raise errors[0]
        self._keep_without_run(snapshot)
        self._flush_events()

    def _store(self, snapshot: Snapshot,
               stats: dict[str, dict[str, float]]) -> dict[str, TensorRecord] | None:
        """Store the snapshot's tensors and parts; add the statistics of each sharded weight,
        combined from every process's partial sums, to `stats`."""
        if self.writer is None:
            return None
        try:
            records = self.writer.store_tensors(snapshot)
            if snapshot.shards:
                own = shard_partials(snapshot.shards, self._prev_shards)
                self._prev_shards = snapshot.shards  # fresh copies, never reused
                gathered = self.writer.store_shards(
                    snapshot, self.processes, attempt=self.attempt,
                    timeout=self.shard_timeout)
                records.update(gathered.records)
                stats.update(combined_stats(own, gathered.stats, gathered.records))
            return records
        except Exception as e:
            self._stop_writer(e)
            return None

    def _previous(self, snapshot: Snapshot) -> Callable[[str], Any]:
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

    def _stats(self, snapshot: Snapshot) -> dict[str, dict[str, float]]:
        """Each tensor's statistics; the update ratios against the previous snapshot, read
        from its buffer set while the pool still holds it unchanged, else from the run."""
        held = self.pool.claim(self._last_written)
        self._last_written = None
        try:
            if held is not None:
                arrays = dict(zip(self.keys, held))
                prev: Callable[[str], Any] = arrays.get
            else:
                try:
                    prev = self._previous(snapshot)
                except Exception:
                    prev = lambda key: None  # noqa: E731
            if self.derived:
                prev = effective_lookup(prev, self.derived, self._prev_kernel)
            return self._tensor_stats(snapshot, prev)
        finally:
            self.pool.release(held)

    def _tensor_stats(self, snapshot: Snapshot,
                      prev: Callable[[str], Any]) -> dict[str, dict[str, float]]:
        """Each tensor's statistics; those of a tensor whose bytes did not change since the
        previous snapshot are the previous ones (`same_stats`: a frozen weight is compared,
        not reduced again)."""
        stats: dict[str, dict[str, float]] = {}
        kept, self._own_stats = self._own_stats, {}
        for key, arr in snapshot.arrays.items():
            try:
                before = prev(key)
            except Exception:
                before = None
            got = same_stats(arr, before, kept.get(key))
            stats[key] = got if got is not None else tensor_stats(arr, before)
            self._own_stats[key] = dict(stats[key])  # before the views add theirs
            del before
        return stats

    def _measure(self, snapshot: Snapshot, stats: dict[str, dict[str, float]],
                 stored: Snapshot) -> None:
        """Add the views' own per-tensor numbers (`View.measure`, of the effective `snapshot`
        or, for a view that `measures_stored`, of the `stored` one) to the statistics; keep
        what the views have to tell (`View.pop_notices`) for the callback."""
        for view in self.views:
            try:
                extra = view.measure(stored if view.measures_stored else snapshot)
                notices = view.pop_notices()
            except Exception as e:
                self._drop(view, e)
                continue
            if notices:
                with self._lock:
                    self._notices.extend(notices)
            for key, values in (extra or {}).items():
                if key in stats:
                    stats[key].update(values)

    def _view_stats(self, stats: dict[str, dict[str, float]],
                    payloads: Mapping[str, Any]) -> None:
        """Add the statistics views compute from their payloads (gradient norms) to `stats`."""
        for view in self.views:
            if view.name not in payloads:
                continue
            try:
                extra = view.stats(stats, payloads[view.name])
            except Exception as e:
                self._drop(view, e)
                continue
            for key, values in extra.items():
                if key in stats:
                    stats[key].update(values)

    def _commit(self, snapshot: Snapshot, records: dict[str, TensorRecord] | None,
                stats: dict[str, dict[str, float]]) -> None:
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

    def _events(self) -> _GuardedEvents:
        if self.events is None:
            from .summaries import EventWriter

            if isinstance(self.storage, FsspecStorage):  # objects cannot be appended to
                writer = EventWriter(EVENTS_SUBDIR, storage=self.storage)
            else:
                writer = EventWriter(os.path.join(self.run_dir, EVENTS_SUBDIR))
            self.events = _GuardedEvents(writer)
        return self.events

    def _write_views(self, snapshot: Snapshot, stats: Mapping[str, Mapping[str, float]],
                     payloads: Mapping[str, Any], flush: bool = True) -> None:
        for view in self.views:
            try:
                view.write(snapshot, stats, payloads.get(view.name), self._events())
                notices = view.pop_notices()
            except Exception as e:
                if self.events is not None and self.events.error is not None:
                    self._stop_events(self.events.error)
                    break
                self._drop(view, e)
                continue
            if notices:
                with self._lock:
                    self._notices.extend(notices)
        if flush:
            self._flush_events()

    def _flush_events(self) -> None:
        if self.events is not None and self.events.error is None:
            try:
                self.events.flush()
            except Exception as e:
                self._stop_events(e)

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
        with self._lock:
            self._views = []
        self._fail("the TensorBoard event file", exc)

    # ------------------------------------------------------------ train end

    def close(self) -> list[Failure]:
        """Drain the worker, close the views, the event file and the run (releasing its
        lock), drop the free buffers; return everything that failed, in order."""
        worker_errors: list[Failure] = []
        drained = self._worker is None
        self._draining.set()  # from now on the training thread waits for the worker
        try:
            if self._worker is not None:
                if self._worker.alive:
                    self._worker.submit(_VIEWS_NOW)
                self._worker.close()
                drained = not self._worker.alive
                worker_errors = [("the background writer", e) for e in self._worker.pop_errors()]
        finally:
            self._worker = None
            self._close_parts()
            self.pool.clear(keep=drained)  # a set is handed on only once nothing can touch it
        return self.pop_failures() + worker_errors

    def _close_parts(self) -> None:
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


def shard_partials(shards: Mapping[str, list[Shard]],
                   prev: Mapping[str, list[Shard]]) -> dict[str, Partial]:
    """The partial sums of this process's shards of each weight; each shard's update-ratio
    sums against the shard at the same offset in `prev` (none where there is none)."""
    out = {}
    for key, parts in shards.items():
        before = {s.offset: s.array for s in prev.get(key, ())}
        out[key] = combine(partial_stats(s.array, before.get(s.offset)) for s in parts)
    return out


def combined_stats(own: Mapping[str, Partial], others: Mapping[str, list[Partial]],
                   records: Mapping[str, TensorRecord]) -> dict[str, dict[str, float]]:
    """Each sharded weight's statistics from every process's partial sums, as
    `tensor_stats` gives them for a whole tensor; none for a weight whose sums do not
    cover it (a process that recorded none)."""
    out = {}
    for key, mine in own.items():
        total = combine([mine, *others.get(key, ())])
        if key in records and total.size == math.prod(records[key].shape):
            out[key] = finish(total)
    return out


class ShardPipeline:
    """What a process other than process 0 of a model-parallel run does: at each snapshot,
    copy the shards of the sharded weights it holds (training thread), then, on its worker
    thread, compute their partial sums and store them and its shard record (process 0's
    worker waits for the record, then commits the snapshot). The queue is bounded by
    `max_queue`, as process 0's. It has `Pipeline`'s training-thread interface, so the
    callback's step arithmetic is the same in every process.
    """

    def __init__(self, plan: Plan, settings: Settings):
        specs = plan.specs
        self.run_dir = settings.log_dir
        storage = open_storage(settings.log_dir, settings.storage_options)
        run = load_run(settings.log_dir, settings.storage_options) if is_run(
            storage) else None
        self.last_step: int | None = run.steps[-1] if run is not None and run.steps else None
        self.needs_initial = run is None or not run.steps
        self.sharded = {specs[plan.watch.index(i)].key: i for i in plan.sharded}
        self.process = process_index()[0]
        self.attempt = plan.attempt
        self._prev_shards: Mapping[str, list[Shard]] = {}
        """The shards of the previous snapshot (worker thread only), for the update ratios."""
        self.writer = ShardWriter(storage, specs, settings.durable, settings.store_dtype)
        self._worker = Worker(self.publish, maxsize=settings.max_queue,
                              name="weightwatch-shards")

    def take(self, model: Any, *, label: str, epoch: int | None,
             logs: Mapping[str, Any]) -> Snapshot:
        variables = list(model.weights)
        return Snapshot(step=0, label=label, epoch=epoch, arrays={}, logs=clean_logs(logs),
                        shards={k: owned_shards(variables[i]) for k, i in self.sharded.items()})

    def submit(self, snapshot: Snapshot, model: Any = None) -> None:
        """Queue the snapshot's shards for the worker (waits while the queue is full)."""
        self._worker.submit(snapshot)
        self.last_step = snapshot.step

    def publish(self, snapshot: Snapshot) -> None:
        """The worker's job: the shards' partial sums, then their parts and shard record."""
        partials = shard_partials(snapshot.shards, self._prev_shards)
        self._prev_shards = {}  # a failed publish leaves no stale previous shards
        self.writer.publish(snapshot, self.process, self.attempt, partials)
        self._prev_shards = snapshot.shards

    def capture(self, model: Any, *, step: int, epoch: int | None,
                logs: Mapping[str, Any], label: str = "epoch") -> None:
        snapshot = self.take(model, label=label, epoch=epoch, logs=logs)
        snapshot.step = step
        self.submit(snapshot, model)

    def prefill(self, model: Any) -> None:
        """Nothing to prepare: the shards are copied when taken."""

    def pop_notices(self) -> list[str]:
        return []

    def pop_failures(self) -> list[Failure]:
        return [("writing this process's shards", e) for e in self._worker.pop_errors()]

    def close(self) -> list[Failure]:
        """Finish writing every queued snapshot's shards; return what failed, in order."""
        self._worker.close()
        return self.pop_failures()


class _OneArray(MutableMapping[str, np.ndarray]):
    """One array for whichever key (`derive.effective`'s `reuse`): the previous snapshot's
    effective kernels are read one at a time (the update ratios), each where the last was."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __getitem__(self, key: str) -> np.ndarray:
        if self.array is None:
            raise KeyError(key)
        return self.array

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self.array = value

    def __delitem__(self, key: str) -> None:
        self.array = None

    def __iter__(self) -> Iterator[str]:
        return iter(() if self.array is None else ("",))

    def __len__(self) -> int:
        return int(self.array is not None)


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

    def hold(self) -> None:
        self.writer.hold()

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
