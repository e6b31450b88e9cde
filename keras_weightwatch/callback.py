"""WeightWatch: the Keras callback. It decides *when*; the pipeline decides *what* and *how*.

The callback keeps the hooks Keras calls and the step arithmetic: which epochs
are due, and which step each snapshot gets. Everything else it asks of its
`Settings` (the options, checked) and of its `Pipeline` (the views, the host
buffers, the run writer, the event file and the background worker).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

from .capture import Snapshot
from .distribute import is_writer
from .errors import WeightWatchError, WeightWatchWarning
from .fitplan import Plan, Trial, find_trial
from .pipeline import Pipeline, ShardPipeline
from .rundir import (
    Diverged,
    RunDirError,
    beside_other,
    diverged_run,
    other_architecture,
    start_beside,
    trial_settings,
)
from .settings import Settings

S = Settings  # the defaults below are the record's own: one source for each


def _iterations(model: Any) -> int:
    """The optimizer's iteration count (training batches so far), read once per fit."""
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    if iterations is None:
        return 0
    return int(keras.ops.convert_to_numpy(iterations))
_OPTIONS = frozenset(f.name for f in dataclasses.fields(Settings))


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
    have the step before the first epoch (-1 for a fresh `fit`). A `fit`
    that resumes a run continues it: its steps carry on after the run's last
    step unless `initial_epoch` already does. A fit resumes a run when it
    starts where the run left off: from the weights of the run's last snapshot
    (a second `fit` of the same model, a restored checkpoint), at
    `fit(initial_epoch=k)` with k > 0, or with the same model as this
    callback's previous fit. Any other fit at `initial_epoch=0` (the same
    script run again, a new model of the same architecture) is a new
    training and never mixes into the run (see `if_exists`). The same model
    fine-tuned with `layer.enable_lora(rank)` continues its run: the adapters
    join it from the first snapshot of the fine-tune on. A model of another
    architecture never breaks the fit: it writes a run of its own beside it.

    In a KerasTuner search (which deep-copies the callbacks for every execution
    of every trial), each trial execution writes its own run,
    `log_dir/<trial id>/execution<k>` as KerasTuner names its TensorBoard
    directories, and its header records the trial's hyperparameters; every
    run header records the optimizer's and the layers' configuration.

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
        batch_freq: Also take a snapshot every `batch_freq` training batches
            (as `keras.callbacks.TensorBoard(update_freq=...)` writes batch-level
            summaries). Steps then count training batches, as TensorBoard's
            batch-level steps do: the initial weights have the optimizer's
            iteration count before training (0 for a fresh model), the snapshot
            after the `b`-th batch of the fit step `b` (plus that count), and
            each epoch snapshot the step of the epoch's last batch. Defaults to
            None: snapshots at epoch ends only, steps count epochs, and no batch
            hook runs.
        histograms: Write a histogram of every weight tensor. Defaults to True.
        kernel_images: Draw the kernels of convolution layers as image grids.
            Defaults to True.
        max_kernel_tiles: The most tiles one kernel grid (or response grid)
            holds; needs `kernel_images` or `sample_images`. Defaults to 256.
        feature_names: Names of the model's input features, for the top-k
            feature table and one scalar per feature (`features/<layer>/<name>`;
            for a layer with more than 100 input features, only the features
            in each snapshot's table get a scalar, see
            `views.MAX_FEATURE_SCALARS`). `feature_layer` or `feature_data`
            alone also turn the table on, with names `feature_0`, ....
            Defaults to None (no table).
        top_k: How many features the table lists; needs `feature_names`,
            `feature_layer` or `feature_data`. Defaults to 5.
        feature_layer: The name of the Dense layer whose kernel is read for the
            table. Defaults to None: the first Dense layer fed by the input.
        feature_data: A sample of inputs, shape (n, features): flags features
            whose correlation with another is 0.9 or more and gives
            standardized weights. Defaults to None.
        sample_images: Images (N, H, W, C in the model's input layout) to
            convolve with the kernels of the first Conv2D layer at the model's
            top level (a model without one is refused). In `"kernel"` mode the
            images must fit that layer's own input: a model with several
            inputs works when the layer is fed directly by one of them.
            Defaults to None.
        response_mode: `"kernel"` (each kernel's plain cross-correlation with
            the image, no bias or activation) or `"activation"` (the layer's
            output, computed by running the model on the images: it needs a
            model with exactly one input). Needs `sample_images`. Defaults to
            `"kernel"`.
        response_layers: Names of the Conv2D layers whose responses are
            drawn; needs `sample_images`. Defaults to None: the first one.
        responses_dir: Also write the response grids as PNG files here: a
            directory or any fsspec URL (`s3://bucket/pngs`, opened with
            `storage_options`); needs `sample_images`. Defaults to None.
        if_exists: What to do when `log_dir` already holds a run:
            `"continue"` appends to it when the fit resumes it (a model of the
            same architecture, starting from the run's last snapshot or at
            `initial_epoch` > 0; the same model with LoRA adapters added
            too); a new training at `initial_epoch=0`, or a model of another
            architecture, goes to a new run in `log_dir-2` (or `-3`, ...)
            with one `WeightWatchWarning` naming both directories (and what
            differs). `"new"` always starts a new run in `log_dir-2` (or `-3`,
            ...), `"error"` raises (naming what differs). Defaults to
            `"continue"`.
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
        keep_every: With `keep_last` (which it needs), also keep every
            snapshot whose step is a multiple of `keep_every`. Defaults to None.
        include: A regular expression, or a list of them: watch only the
            weights whose key (`dense/kernel`) or layer path (`dense`) one of
            them matches (`re.search`). Defaults to None (every weight).
        exclude: A regular expression, or a list of them: leave out the
            weights whose key or layer path one of them matches. Excluded
            weights are neither stored nor shown in any view. Defaults to
            None.
        storage_options: For a `log_dir` that is an fsspec URL
            (`s3://bucket/runs/exp1`, `gs://...`, `memory://...`; needs
            `pip install 'keras-weightwatch[s3]'`), options of its file
            system: credentials, `endpoint_url`, ... They are handed to
            fsspec only, never written into the run, `get_config()` or a
            message. Defaults to None: the protocol's own configuration (for
            S3, the `AWS_*` environment variables, `AWS_ENDPOINT_URL` and the
            `~/.aws` files).
        spectral_freq: Every `spectral_freq`-th snapshot of a fit, starting with its first,
            also gets weightwatcher's spectral metrics of every Dense and convolution
            kernel (power-law `alpha`, `alpha_weighted`, `stable_rank`, `spectral_norm`,
            `log_norm`, spikes; see `keras_weightwatch.spectral`): scalars, an ESD
            histogram per kernel and a summary table in TensorBoard, and the numbers in the
            snapshot's statistics. Computed on the background thread with one LAPACK
            thread; it costs about 22 ms per snapshot for a 2M-parameter CNN but about
            8 CPU seconds per 4096x4096 kernel (48 s for 100M parameters), so it is off
            by default. Needs threadpoolctl (`pip install 'keras-weightwatch[spectral]'`).
            Defaults to None (off).
        spectral_traps: Also count each kernel's correlation traps at those snapshots
            (`num_traps`, stored with the metrics: eigenvalues of the element-wise shuffled
            matrix above its Marchenko–Pastur edge, as weightwatcher's
            `analyze(randomize=True)`), at about twice the cost of the metrics. Needs
            `spectral_freq`. Defaults to False.
        saliency: Draw where the model looks in each of `sample_images`: a
            method or a list of them among `"vanilla"` (|d score/d pixel|),
            `"smoothgrad"` (vanilla averaged over noisy copies), `"gradcam"`
            (Grad-CAM on a convolution layer) and `"hirescam"` (HiResCAM: the
            activations times their gradients, position by position). Images
            `<model>/3_saliency/<method>/sample_<i>`; needs `sample_images`.
            Defaults to None (off).
        saliency_class: The class each map explains. Defaults to None: each
            image's predicted class.
        saliency_layer: Grad-CAM's and HiResCAM's layer. Defaults to None: the
            last convolution layer at the model's top level.
        gradient_data: A probe batch `(x, y)`: at each snapshot, every watched
            trainable weight's gradient of the compiled loss on it (inference
            mode, no optimizer step), as scalars `<weight key>/grad_norm` and
            `<weight key>/grad_to_weight` (||g|| / ||W||), also stored in the
            snapshot's statistics. Defaults to None (off).
        gradient_freq: Compute `gradient_data`'s gradients and the saliency
            maps at every `gradient_freq`-th snapshot (the initial one
            included). Defaults to 1.
        gradient_histograms: Also write a histogram of each gradient
            (`<weight key>/grad_histogram`); needs `gradient_data`. Defaults to
            False.
        shard_timeout: In a model-parallel run whose weights are sharded
            across processes, how many seconds process 0 waits at each
            snapshot for every other process to record its shards before the
            snapshot fails (naming the missing record). Defaults to 300.
        health: Run the health rules (`keras_weightwatch.health`, docs/HEALTH.md) on
            each snapshot: non-finite or exploding weights, layers not learning, update
            ratios too large, vanishing or exploding gradients, dead units, unbroken
            symmetry, LoRA adapters that do not move, spectral warnings. `"warn"`: one
            `WeightWatchWarning` per new finding (layer, step, what, what to check first),
            a `health/findings` table and `health/errors`/`health/warnings` counts in
            TensorBoard, the per-unit numbers in the snapshot's statistics. `"stop"`: the
            same, and a finding of severity "error" stops training at the end of its epoch
            (as `TerminateOnNaN` does), once the snapshot that shows it is stored; the
            training thread then waits for each snapshot to be judged at its epoch end.
            None: off. Defaults to `"warn"`.

    Example:

    ```python
    from keras_weightwatch import WeightWatch, load_run

    model.fit(x, y, epochs=20, callbacks=[WeightWatch("runs/exp1")])
    run = load_run("runs/exp1")
    run.epochs            # [0, 1, ..., 19]
    run.weights(3)        # {"dense/kernel": array(...), ...} after epoch index 3
    ```
    """


    pipeline_class: type[Pipeline] = Pipeline
    """The pipeline each fit opens (`pipeline_class.open(plan, settings, run_dir)`): the
    seam through which tests and benchmarks pass a pipeline of their own."""

    def __init__(
        self,
        log_dir: str | os.PathLike,
        freq: int = S.freq,
        *,
        batch_freq: int | None = S.batch_freq,
        histograms: bool = S.histograms,
        kernel_images: bool = S.kernel_images,
        max_kernel_tiles: int = S.max_kernel_tiles,
        feature_names: Sequence[str] | None = S.feature_names,
        top_k: int = S.top_k,
        feature_layer: str | None = S.feature_layer,
        feature_data: Any = S.feature_data,
        sample_images: Any = S.sample_images,
        response_mode: str = S.response_mode,
        response_layers: Sequence[str] | None = S.response_layers,
        responses_dir: str | os.PathLike | None = S.responses_dir,
        if_exists: str = S.if_exists,
        strict: bool = S.strict,
        durable: bool = S.durable,
        max_queue: int = S.max_queue,
        store_dtype: str | None = S.store_dtype,
        keep_last: int | None = S.keep_last,
        keep_every: int | None = S.keep_every,
        include: str | Sequence[str] | None = S.include,
        exclude: str | Sequence[str] | None = S.exclude,
        storage_options: Mapping[str, Any] | None = S.storage_options,
        spectral_freq: int | None = S.spectral_freq,
        spectral_traps: bool = S.spectral_traps,
        saliency: str | Sequence[str] | None = S.saliency,
        saliency_class: int | None = S.saliency_class,
        saliency_layer: str | None = S.saliency_layer,
        gradient_data: Any = S.gradient_data,
        gradient_freq: int = S.gradient_freq,
        gradient_histograms: bool = S.gradient_histograms,
        shard_timeout: float = S.shard_timeout,
        health: str | None = S.health,
    ):
        super().__init__()
        self.settings = Settings.create(
            log_dir=log_dir, freq=freq, batch_freq=batch_freq, histograms=histograms,
            kernel_images=kernel_images,
            max_kernel_tiles=max_kernel_tiles, feature_names=feature_names, top_k=top_k,
            feature_layer=feature_layer, feature_data=feature_data, sample_images=sample_images,
            response_mode=response_mode, response_layers=response_layers,
            responses_dir=responses_dir, if_exists=if_exists, strict=strict, durable=durable,
            max_queue=max_queue, store_dtype=store_dtype, keep_last=keep_last,
            keep_every=keep_every, include=include, exclude=exclude,
            storage_options=storage_options,
            spectral_freq=spectral_freq, spectral_traps=spectral_traps,
            saliency=saliency,
            saliency_class=saliency_class, saliency_layer=saliency_layer,
            gradient_data=gradient_data, gradient_freq=gradient_freq,
            gradient_histograms=gradient_histograms, shard_timeout=shard_timeout,
            health=health,
        )
        # Resolved at the first on_train_begin, kept for later fits of this instance.
        self.run_dir: str | None = None
        self.pipeline: Pipeline | None = None  # the fit in progress; None between fits
        self._pending_initial: Snapshot | None = None
        self._offset: int | None = None
        # With batch_freq: the step before this fit's first batch, the batches trained in
        # this fit (at the last batch end, and before the current epoch), the last mark.
        self._base: int | None = None
        self._batches = 0
        self._epoch_start = 0
        self._epoch: int | None = None
        self._mark = 0
        if self.settings.batch_freq is not None:
            # Only then: a callback with a batch hook makes Keras wait for every batch.
            self.on_train_batch_end = self._on_train_batch_end
        self._undecided: tuple[Plan, Diverged] | None = None
        self._watched: weakref.ref[Any] | None = None  # the model of the last fit that opened a run
        self._fit_settings = self.settings  # this fit's: `log_dir` a trial's own in a search
        self._trial: Trial | None = None  # the search trial of the run in `run_dir`

    def __getattr__(self, name: str) -> Any:
        # The options stay readable as attributes (`cb.freq`), as in earlier releases.
        settings = self.__dict__.get("settings")
        if settings is not None and name in _OPTIONS:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_config(self) -> dict[str, Any]:
        """The callback's settings, as recorded in the run header."""
        return self.settings.to_config()

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.pipeline is not None:  # a previous fit of this instance ended with an exception
            self._shutdown(report=False)
        self._pending_initial = None
        self._offset = None
        self._base, self._batches, self._epoch_start, self._mark = None, 0, 0, 0
        self._undecided = None
        plan = Plan.make(self.model, self.settings, find_trial())  # bad arguments raise here
        plan = self._in_trial(plan)
        settings = self._fit_settings
        if not is_writer(self.model):
            if plan.sharded:  # model parallel: each process stores the shards it holds
                self._guard(lambda: self._open_shards(plan))
            return  # another process of a distributed run writes; this one stays inactive
        other = other_architecture(plan, settings, self.run_dir)
        if other is not None:  # never continued: a run of its own beside it
            beside = beside_other(settings, other)  # with if_exists="error", refused here
            if settings.if_exists == "continue":
                warnings.warn(
                    f"weightwatch: {other.run_dir} holds a run of another architecture "
                    f"({other.what}), so this fit is written to {beside}, beside it.",
                    WeightWatchWarning, stacklevel=2)
            self._open(plan, beside)
            return
        # The model this callback watched in its last fit continues its run whatever its
        # weights (EarlyStopping may have restored its best ones); any other model only
        # when it starts from the run's last snapshot or at initial_epoch > 0.
        if self.run_dir is None or self._watched is None or self._watched() is not self.model:
            diverged = diverged_run(plan, settings, self.run_dir, self.model)
            if diverged is not None:
                self._undecided = (plan, diverged)  # the first epoch's index decides
                return
        self._open(plan, self.run_dir)

    def _in_trial(self, plan: Plan) -> Plan:
        """Under a hyperparameter search: this fit's settings write to the trial execution's
        own directory (`rundir.trial_settings`), and the plan records the trial. A later fit
        of the same trial execution continues its run; any other never does."""
        self._fit_settings = self.settings
        trial = plan.trial
        if trial is None:
            return plan
        mine = self._trial
        same = mine is not None and self.run_dir is not None and mine.id == trial.id and (
            trial.execution is None or trial.execution == mine.execution)
        if not same:
            self.run_dir = None
        chosen = mine if same and mine is not None else trial
        self._fit_settings, settled = trial_settings(self.settings, chosen)
        self._trial = settled
        return plan.with_trial(settled._replace(hyperparameters=trial.hyperparameters))

    def _open(self, plan: Plan, run_dir: str | None) -> None:
        """Open the fit's pipeline on `run_dir` (None: by `if_exists`); take the initial weights."""
        try:
            pipeline = self.pipeline_class.open(plan, self._fit_settings, run_dir)
        except RunDirError as e:
            if self.settings.strict:
                raise
            self._report("snapshots", e)  # a disk or permission fault: training goes on
            return
        self.pipeline, self.run_dir = pipeline, pipeline.run_dir
        self._watched = weakref.ref(self.model)
        if pipeline.needs_initial:
            self._pending_initial = pipeline.take(self.model, label="initial", epoch=None, logs={})
        self._guard(lambda: pipeline.prefill(self.model))  # no epoch end allocates buffers

    def _open_shards(self, plan: Plan) -> None:
        """A process other than 0 of a model-parallel run: store its shards of each snapshot."""
        pipeline = ShardPipeline(plan, self._fit_settings)
        self.pipeline, self.run_dir = pipeline, pipeline.run_dir  # type: ignore[assignment]
        if pipeline.needs_initial:
            self._pending_initial = pipeline.take(self.model, label="initial", epoch=None, logs={})

    def _decide(self, epoch: int) -> None:
        """At the first epoch of a fit whose weights are not the run's last snapshot: resume
        the run at `initial_epoch > 0`, else start a new run beside it."""
        if self._undecided is None:
            return
        (plan, diverged), self._undecided = self._undecided, None
        if epoch > 0:
            self._open(plan, diverged.run_dir)
            return
        beside = start_beside(self._fit_settings, diverged.run_dir)
        if self.settings.if_exists == "continue":
            warnings.warn(
                f"weightwatch: {diverged.run_dir} holds a run whose last snapshot (step "
                f"{diverged.last_step}) is not this model's weights, and fit starts at epoch 0, "
                f"so this is a new training: it is written to {beside}, beside it. To continue "
                f"{diverged.run_dir} instead, start from its last weights or pass "
                f"fit(initial_epoch={diverged.last_step + 1}).",
                WeightWatchWarning,
                stacklevel=3,
            )
        self._open(plan, beside)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch_start, self._epoch = self._batches, epoch
        self._decide(epoch)
        pipeline = self.pipeline
        if pipeline is None or self._offset is not None:
            return
        last = pipeline.last_step
        if self.settings.batch_freq is not None:
            self._base = _iterations(self.model) if last is None else max(
                _iterations(self.model), last)
            self._offset = 0
            initial_step = self._base
        else:
            self._offset = last + 1 - epoch if last is not None and epoch <= last else 0
            initial_step = epoch + self._offset - 1
        if self._pending_initial is not None:
            snap, self._pending_initial = self._pending_initial, None
            snap.step = initial_step
            self._guard(lambda: pipeline.submit(snap, self.model))

    def _on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """With `batch_freq`: a snapshot every `batch_freq` batches (not at an epoch's last
        batch, which the epoch end takes). Where none is due this is a few additions."""
        self._batches = self._epoch_start + batch + 1
        every = self.settings.batch_freq or 1  # set: this hook exists only then
        if self._batches // every <= self._mark:
            return
        steps = self.params.get("steps") if self.params else None
        pipeline = self.pipeline
        if pipeline is None or self._base is None or (steps and batch + 1 >= steps):
            return
        self._mark = self._batches // every
        step, epoch = self._base + self._batches, self._epoch
        self._guard(lambda: pipeline.capture(self.model, step=step, epoch=epoch,
                                             logs=logs or {}, label="batch"))

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        self._guard(self._collect)
        if self.pipeline is None:
            return
        if self._offset is None:
            self._offset = 0
        step: int | None = epoch + self._offset
        if self.settings.batch_freq is not None:
            step = self._batch_step(epoch)
        elif not self._due(epoch):
            step = None
        if step is None:
            return
        self._guard(lambda: pipeline.capture(self.model, step=step, epoch=epoch, logs=logs or {}))
        if self.settings.health == "stop" and self.pipeline is not None:
            self._guard(self._stop_if_unhealthy)

    def _stop_if_unhealthy(self) -> None:
        """`health="stop"`: wait until the snapshot is judged; stop training on an error."""
        pipeline = self.pipeline
        if pipeline is None:
            return
        pipeline.join()
        if pipeline.wants_stop():
            self.model.stop_training = True
        self._collect()

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._undecided = None  # a fit that ran no epoch leaves a run it did not continue as it was
        pipeline = self.pipeline
        if pipeline is None:
            return
        if self._pending_initial is not None and pipeline.last_step is None:  # fit ran no epoch
            snap, self._pending_initial = self._pending_initial, None
            snap.step = -1
            self._guard(lambda: pipeline.submit(snap))
        self._shutdown(report=True)

    # ------------------------------------------------------------------ steps
    def _batch_step(self, epoch: int) -> int | None:
        """With `batch_freq`: the step of an epoch end's snapshot (batches trained), or None
        when none is due or a batch snapshot already took this step."""
        if self._base is None or self.pipeline is None:
            return None
        step = self._base + self._batches
        due = self._due(epoch) or self._batches // (self.settings.batch_freq or 1) > self._mark
        if not due or step == self.pipeline.last_step:
            return None
        self._mark = self._batches // (self.settings.batch_freq or 1)
        return step

    def _due(self, epoch: int) -> bool:
        """A snapshot is due every `freq` epochs, after the last epoch, and when training stops."""
        last_epoch = self.params.get("epochs") if self.params else None
        return (
            epoch % self.settings.freq == 0
            or (last_epoch is not None and epoch >= last_epoch - 1)
            or bool(getattr(self.model, "stop_training", False))
        )

    # ------------------------------------------------------------------ errors
    def _report(self, part: str, exc: BaseException) -> None:
        if self.settings.strict:
            raise WeightWatchError(f"weightwatch: {part} failed: {exc}") from exc
        warnings.warn(
            f"weightwatch: {part} stopped after an error ({type(exc).__name__}: {exc}); "
            "training goes on without it",
            WeightWatchWarning,
            stacklevel=3,
        )

    def _collect(self) -> None:
        if self.pipeline is not None:
            for notice in self.pipeline.pop_notices():
                warnings.warn(f"weightwatch: {notice}", WeightWatchWarning, stacklevel=3)
            for part, exc in self.pipeline.pop_failures():
                self._report(part, exc)

    def _guard(self, fn: Callable[[], None]) -> None:
        """Run a training-thread step. On failure stop watching; raise if strict, else warn."""
        try:
            fn()
        except Exception as e:
            self._shutdown(report=False)
            if self.settings.strict:
                raise
            self._report("capturing weights", e)

    def _shutdown(self, report: bool) -> None:
        """Drain the worker, close files, release the run's lock; then report what failed."""
        pipeline, self.pipeline = self.pipeline, None
        self._pending_initial = None
        self._undecided = None
        failures = [] if pipeline is None else pipeline.close()
        notices = [] if pipeline is None else pipeline.pop_notices()
        for notice in notices if report else []:
            warnings.warn(f"weightwatch: {notice}", WeightWatchWarning, stacklevel=3)
        if report:
            for part, exc in failures:
                self._report(part, exc)
