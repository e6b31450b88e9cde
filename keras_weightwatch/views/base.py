"""The View protocol, and the model helpers views share (training thread only).

A view has four hooks:

- `prepare(model, info)` runs on the training thread at train begin. It checks
  the view's arguments against the model (a feature layer that does not exist,
  sample images of the wrong shape) and raises `ValueError`/`TypeError` before
  any epoch runs.
- `restrict(keys)` runs right after it, with the keys of the weights that the
  include/exclude filter keeps: the view drops what it would read of the others,
  or raises when it cannot do without them.
- `capture(model)` runs on the training thread at each snapshot, for the rare
  view that needs Keras to compute something (a layer's activations). It
  returns a payload of numpy arrays, or None.
- `measure(snapshot)` runs on the background worker before the snapshot file is
  written: per-tensor numbers the view computes (spectral metrics) that the run stores
  beside each tensor's statistics, so that `show`, `drift` and `diff` read them. It
  returns weight key -> name -> number, or None.
  A view with `measures_stored` gets the snapshot as the run stores it instead of the
  effective one; what it has to tell the user (`pop_notices`, read after `measure` and
  after `write`) becomes a warning; `wants_stop` asks the callback to stop training.
- `stats(stats, payload)` runs on the background worker before the snapshot
  is committed, with the weights' statistics so far: the statistics the view
  adds to the stored ones (weight key -> name -> number), e.g. gradient
  norms. Most views add none.
- `write(snapshot, stats, payload, events)` runs on the background worker with
  numpy arrays only, and writes summaries through `events`.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from ..capture import ModelInfo, Snapshot
from ..errors import received

Stats = Mapping[str, Mapping[str, float]]


class View:
    """Base class of a view; see the module docstring."""

    name = "view"
    measures_stored = False
    """Whether `measure` gets the snapshot as stored (a LoRA layer's base kernel under its
    key) instead of the effective one (the adapters view)."""

    def prepare(self, model: Any, info: ModelInfo) -> None:
        """Check arguments against the model (training thread, train begin)."""

    def restrict(self, keys: Set[str]) -> None:
        """Keep off the weights the include/exclude filter leaves out (train begin)."""

    def capture(self, model: Any) -> Any:
        """Compute a payload that needs Keras (training thread, each snapshot)."""
        return None

    def measure(self, snapshot: Snapshot) -> Stats | None:
        """Per-tensor numbers to store with the snapshot's statistics (worker thread)."""
        return None

    def pop_notices(self) -> list[str]:
        """What the callback should tell the user once, as a warning (worker thread)."""
        return []

    def wants_stop(self) -> bool:
        """Whether the view asks the callback to stop training (the health view's "stop")."""
        return False

    def stats(self, stats: Stats, payload: Any) -> Stats:
        """Statistics to store with the snapshot, from this view's payload (worker thread)."""
        return {}

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        """Write this view's summaries for one snapshot (worker thread)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever the view holds (train end)."""


def keras_module() -> Any:
    """Keras, imported when a view first needs it (reading runs never does)."""
    import keras

    return keras


def all_layers(model: Any) -> list[Any]:
    """Every layer of the model, nested ones included, in model order."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def weight_keys(model: Any, info: ModelInfo) -> dict[int, str]:
    """id(variable) -> the run's key for it."""
    return {id(v): spec.key for v, spec in zip(model.weights, info.weights)}


def variable_key(layer: Any, attr: str, keys: Mapping[int, str]) -> str | None:
    """The run's key of the variable behind `layer.<attr>` (`kernel`, `embeddings`), or None.

    A LoRA or quantized layer's `kernel` is a property computed from its variables at each
    access (a new tensor each time); the variable it starts from is `_kernel`. The views
    read that key, under which the worker hands them the effective kernel (`derive`).
    """
    for name in ("_" + attr, attr):
        var = getattr(layer, name, None)
        if var is not None and id(var) in keys:
            return keys[id(var)]
    return None


def find_layer(model: Any, name: str, arg: str) -> Any:
    """The layer called `name`, nested ones included; else a ValueError about argument `arg`."""
    for layer in all_layers(model):
        if layer.name == name:
            return layer
    names = [layer.name for layer in all_layers(model)]
    raise ValueError(
        f"`{arg}`: the model has no layer named {name!r} (it has {names}). {received(arg, name)}"
    )


def model_inputs(model: Any) -> list[Any]:
    """The model's symbolic inputs, or [] for a model that has none known (subclassed)."""
    try:
        return list(model.inputs)
    except (AttributeError, ValueError):
        return []


class PngFiles:
    """PNG files under a directory the views also write to (`responses_dir`): a local
    path or any fsspec URL (`s3://bucket/pngs`, `memory://pngs`), through the run's storage
    seam, so a URL is never taken for a local directory named `s3:`. Each file is written
    whole (a temporary file renamed into place, or one PUT), so a reader never sees half.

    Args:
        where: The directory or URL.
        storage_options: fsspec options for a URL (the callback passes its own
            `storage_options`). Defaults to None.
    """

    def __init__(self, where: str, storage_options: Mapping[str, Any] | None = None):
        self.where = where
        self._options = storage_options
        self._storage: Any = None  # opened at the first write (on the worker)

    def write(self, name: str, png: bytes) -> None:
        """Write `png` as `name` (a `/`-separated path below the directory)."""
        if self._storage is None:
            from ..run.remote import open_storage

            self._storage = open_storage(self.where, self._options)
        folder = name.rpartition("/")[0]
        if folder:
            self._storage.makedirs(folder)
        self._storage.write_atomic(name, [png], durable=False)
