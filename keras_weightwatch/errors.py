"""The package's one error type and its one warning type."""

from __future__ import annotations


class WeightWatchError(Exception):
    """Raised for a run directory that cannot be read, written or trusted.

    Every failure the package detects in a run directory (a missing or damaged
    tensor file, a manifest that does not parse or names a file outside the run,
    a run written by a model of another architecture, a second writer) raises
    this error with a message that names the file and what was wrong with it.

    Bad arguments to a public function raise `ValueError` or `TypeError`
    instead, as Keras does.

    Example:

    >>> from keras_weightwatch import WeightWatchError, load_run
    >>> try:
    ...     load_run("/nonexistent/run")
    ... except WeightWatchError as e:
    ...     print(type(e).__name__)
    WeightWatchError
    """


class RunBusyError(WeightWatchError):
    """The run directory is being written by another WeightWatch (its lock is held).

    A `WeightWatchError`; `WeightWatch(if_exists="new")` catches it and starts
    its run in a fresh directory beside the busy one instead.
    """


class WeightWatchWarning(UserWarning):
    """Warns that a part of the monitoring stopped while training went on.

    With `WeightWatch(strict=False)` (the default), a failure to write a
    snapshot or a view (disk full, permission revoked, run directory deleted)
    is reported once with this warning, the affected part stops, and `fit`
    completes. `strict=True` raises `WeightWatchError` instead.

    It also says, once, that a fit which does not resume the run in `log_dir`
    (a new training at `initial_epoch=0`) was written to a new run beside it.

    Example: turn it into an error for one block of code, as `strict=True`
    would for the whole callback.

    >>> import warnings
    >>> from keras_weightwatch import WeightWatchWarning
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", WeightWatchWarning)
    ...     try:
    ...         warnings.warn("weightwatch: snapshots stopped", WeightWatchWarning)
    ...     except WeightWatchWarning as w:
    ...         print("stopped:", w)
    stopped: weightwatch: snapshots stopped
    """


def received(name: str, value: object) -> str:
    """The Keras-style tail of an argument error: `Received: name=value`."""
    return f"Received: {name}={value!r}"
