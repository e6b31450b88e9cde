"""Which run directory a fit writes to, and what the run header records about the machine.

`open_writer` opens (or creates) the run a fit writes: the callback's own from an
earlier fit, or `log_dir` as `if_exists` says (`error`, `continue`, or `new`: the
first free `log_dir-N`, reserved race-free). `diverged_run` tells a fit that
continues a run from one that only shares its directory (the model's weights are not
the run's last snapshot), and `start_beside` gives such a fit a directory of its own.
`other_architecture` finds the run a fit would write whose weights are of another
architecture (neither the same nor extended by the model's, see
`run.writer.architecture_change`), and `beside_other` gives that fit a directory of its
own, or refuses it with `if_exists="error"`.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _version
from .capture import WeightSpec, host_views
from .errors import RunBusyError, WeightWatchError, received
from .fitplan import Plan, Trial
from .run import RunWriter, holds, is_run, load_run
from .run.reader import read_header
from .run.remote import is_url, open_storage
from .run.writer import Change, architecture_change, other_architecture_refusal
from .settings import Settings


class RunDirError(WeightWatchError):
    """The run directory cannot be created or opened (a disk or permission fault)."""


def versions() -> dict[str, str]:
    """The versions the run header records: this package, Keras, its backend, numpy, Python."""
    import keras

    backend = keras.backend.backend()
    out = {
        "keras_weightwatch": _version.__version__,
        "keras": keras.__version__,
        "backend": backend,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    version = _distribution_version(backend)
    if version is not None:
        out["backend_version"] = version
    return out


@functools.cache
def _distribution_version(backend: str) -> str | None:
    """The installed version of the backend's distribution (read once per process: searching
    the installed distributions took a few ms at every train begin)."""
    from importlib import metadata

    dist = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "jax": ("jax",), "torch": ("torch",)}
    for name in dist.get(backend, ()):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None



def reserve_new_dir(path: str, settings: Settings | None = None) -> str:
    """`path-2` (or `-3`, ...): the first that did not exist, created here so that two
    writers racing for a new run directory never get the same one. (At a URL the first
    prefix holding nothing; there the run's lease settles a race.)"""
    n = 2
    while True:
        candidate = f"{path}-{n}"
        if is_url(path):
            options = settings.storage_options if settings is not None else None
            if not open_storage(candidate, options).isdir():
                return candidate
            n += 1
            continue
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1


def _run_dir(settings: Settings, previous: str | None) -> str:
    """Where this fit writes: the previous fit's run, or `log_dir` by `if_exists`."""
    if previous is not None:
        return previous  # a later fit of this instance continues its own run
    path = settings.log_dir
    if is_run(path, settings.storage_options):
        if settings.if_exists == "error":
            raise WeightWatchError(
                f"{path}: already holds a run; pass if_exists='continue' to append to it "
                "or if_exists='new' to start a new one beside it"
            )
        if settings.if_exists == "new":
            path = reserve_new_dir(path, settings)
    return path


def _continued(settings: Settings, previous: str | None) -> str | None:
    """The run a fit would continue: the callback's own from an earlier fit, else `log_dir`
    when `if_exists="continue"` (None: the fit starts a run, or refuses one)."""
    if previous is not None:
        return previous
    return settings.log_dir if settings.if_exists == "continue" else None


class Diverged(NamedTuple):
    """A run whose last snapshot is not the weights a fit starts from."""

    run_dir: str
    last_step: int


def diverged_run(plan: Plan, settings: Settings, previous: str | None,
                 model: Any) -> Diverged | None:
    """The run this fit would continue although the model's weights are not its last snapshot.

    A fit continues a run when it starts where the run left off. When the
    model's watched weights equal the run's last snapshot (compared by the
    SHA-256 the run records for each tensor, no tensor file read), or there is
    no run to continue, this returns None and the fit opens its run as usual.
    Otherwise the fit is a new training (a re-run of a script, another model of
    the same architecture) unless it resumes at `initial_epoch > 0`, which only
    the first epoch's index tells: this returns the run, for the callback to
    decide at the first epoch (`start_beside`). A model that extends the run's
    weights (LoRA adapters added) is compared on the run's weights, by key. A run
    of another architecture (`other_architecture`), or one that cannot be read,
    returns None: opening it reports that as before.
    """
    path = _continued(settings, previous)
    if path is None or not is_run(path, settings.storage_options):
        return None
    try:
        run = load_run(path, settings.storage_options)
    except WeightWatchError:
        return None
    change = architecture_change(run.specs, plan.specs)
    if not run.snapshots or (change is not None and not change.extends):
        return None
    last = run.snapshots[-1]
    variables = list(model.weights)
    watched = _compared(run.specs, plan, change)
    current = host_views([variables[i] for _, i in watched])
    for (key, _), arr in zip(watched, current):
        rec = last.tensors.get(key)
        if rec is None:
            return None  # nothing to compare with: continue as before
        if not holds(rec, arr):
            return Diverged(path, last.step)
    return None


def _compared(run_specs: Sequence[WeightSpec], plan: Plan,
              change: Change | None) -> list[tuple[str, int]]:
    """(the run's key, index into `model.weights`) of each weight the run holds: matched by
    position for the same architecture, by key for a model that extends the run's."""
    if change is None:
        return [(spec.key, i) for spec, i in zip(run_specs, plan.watch)]
    by_key = {plan.info.weights[i].key: i for i in plan.watch}
    return [(spec.key, by_key[spec.key]) for spec in run_specs]


class Other(NamedTuple):
    """A run of another architecture that a fit would write (see `other_architecture`)."""

    run_dir: str
    what: str
    """What differs, in words (`Change.what`)."""


def other_architecture(plan: Plan, settings: Settings, previous: str | None) -> Other | None:
    """The run this fit would write (the callback's own from an earlier fit, else `log_dir`)
    when its weights are of another architecture than the model's: not the same and not
    extended by the model's (a model that adds LoRA adapters continues its run). None when
    there is none, or the fit starts a new run anyway (`if_exists="new"`, no earlier fit)."""
    path = previous if previous is not None else settings.log_dir
    options = settings.storage_options
    if previous is None and settings.if_exists == "new":
        return None
    try:
        storage = open_storage(path, options)
        if not is_run(storage):
            return None
        header = read_header(storage)  # the header alone: no snapshot is listed
        specs = [WeightSpec.from_json(w) for w in header.get("weights", [])]
    except (OSError, WeightWatchError):
        return None  # opening the run reports it
    change = architecture_change(specs, plan.specs)
    if change is None or change.extends:
        return None
    return Other(path, change.what)


def beside_other(settings: Settings, other: Other) -> str:
    """A new run directory beside `other.run_dir` for a model of another architecture:
    `log_dir-2` (or `-3`, ...); refused with `if_exists="error"`, naming what differs."""
    if settings.if_exists == "error":
        raise WeightWatchError(f"{other_architecture_refusal(other.run_dir, other.what)}. "
                               f"{received('if_exists', settings.if_exists)}")
    return reserve_new_dir(settings.log_dir, settings)


def start_beside(settings: Settings, run_dir: str) -> str:
    """A new run directory beside `run_dir` for a fit that does not continue it (see
    `diverged_run`): `log_dir-2` (or `-3`, ...); refused with `if_exists="error"`."""
    if settings.if_exists == "error":
        raise WeightWatchError(
            f"{run_dir}: holds a run whose last snapshot is not the model's weights, and fit "
            "starts at epoch 0; pass if_exists='new' to start a new run beside it, or "
            "fit(initial_epoch=k) to continue it"
        )
    return reserve_new_dir(settings.log_dir, settings)


def trial_settings(settings: Settings, trial: Trial) -> tuple[Settings, Trial]:
    """Where a trial execution of a hyperparameter search writes: `log_dir/<trial
    id>/execution<k>` (KerasTuner's TensorBoard directories). Where the tuner did not say
    which execution this is, `k` is the first whose directory holds no run yet."""
    if trial.execution is None:
        k = 0
        while is_run(settings.within(trial.id, f"execution{k}").log_dir,
                     settings.storage_options):
            k += 1
        trial = trial._replace(execution=k)
    return settings.within(*trial.parts()), trial


def open_writer(plan: Plan, settings: Settings, previous: str | None) -> RunWriter:
    """Open (or create) the run this fit writes to.

    `previous` is the run an earlier fit of the same callback wrote; with
    `if_exists="new"`, a model whose architecture changed since starts a new
    run beside it (with the other choices `RunWriter.open` refuses it).
    """
    specs = plan.specs
    options = settings.storage_options
    try:
        if settings.if_exists == "new" and previous is not None and is_run(previous, options):
            change = architecture_change(load_run(previous, options).specs, specs)
            if change is not None and not change.extends:
                previous = None
        run_dir = _run_dir(settings, previous)
    except OSError as e:
        raise RunDirError(f"{settings.log_dir}: cannot open the run: {e}") from e
    try:
        while True:
            try:
                return RunWriter.open(
                    run_dir, plan.info, settings=settings.header(plan.feature_key),
                    versions=versions(), durable=settings.durable,
                    store_dtype=settings.store_dtype, weights=specs,
                    storage=open_storage(run_dir, options),
                    samples=plan.samples(settings), responses=plan.response_layers,
                )
            except RunBusyError:
                # Another writer took this directory first (it may not have written
                # its header yet): with if_exists="new", start beside it instead.
                if settings.if_exists != "new" or previous is not None:
                    raise
                run_dir = reserve_new_dir(settings.log_dir, settings)
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot create the run directory: {e}") from e

