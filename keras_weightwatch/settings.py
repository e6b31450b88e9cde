"""WeightWatch's settings: one frozen record of every option.

`Settings` is the one place that holds each option's default, checks its type
and value (a `TypeError`/`ValueError` ending `Received: name=value`), and turns
the options into `get_config()` and the settings recorded in the run header.
The views are built from its typed fields (`views.build_views`). The checks
that need the model run at train begin, before the first epoch: `validate`
here (the include/exclude filter), and each view's own `prepare`.

Pure Python and numpy: no Keras import.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .capture import ModelInfo
from .errors import received

IF_EXISTS = ("continue", "new", "error")
RESPONSE_MODES = ("kernel", "activation")
STORE_DTYPES = ("float16", "bfloat16")
HEALTH_MODES = ("warn", "stop")
"""The values of `health` besides None (off): see `WeightWatch`."""
SECRET_OPTIONS = frozenset({"storage_options"})
"""Options never recorded (`to_config`, the run header): they may hold credentials."""
SALIENCY_METHODS = ("vanilla", "smoothgrad", "gradcam", "hirescam")

Check = Callable[[str, Any], Any]


# ------------------------------------------------------------------ one check per kind of option


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer >= {minimum}. {received(name, value)}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. {received(name, value)}")
    return int(value)


def optional_int(name: str, value: Any) -> int | None:
    return None if value is None else positive_int(name, value)


def positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number > 0. {received(name, value)}")
    if not 0 < value < float("inf"):
        raise ValueError(f"`{name}` must be a number > 0. {received(name, value)}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False. {received(name, value)}")
    return bool(value)


def choice(choices: Sequence[Any]) -> Check:
    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}. {received(name, value)}")
        return value

    return check


def names(name: str, value: Any) -> tuple[str, ...] | None:
    """None or a list of strings (feature names, layer names)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a list of strings. {received(name, value)}")
    out = list(value)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise TypeError(
            f"`{name}` must hold only strings; found {bad[0]!r}. {received(name, value)}"
        )
    return tuple(out)


def unique_names(name: str, value: Any) -> tuple[str, ...] | None:
    out = names(name, value)
    if out is not None and len(set(out)) != len(out):
        dupes = sorted({n for n in out if out.count(n) > 1})
        raise ValueError(
            f"`{name}` must be unique; {dupes} appear more than once. {received(name, value)}"
        )
    return out


def layer_name(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"`{name}` must be a layer name. {received(name, value)}")
    return value


def optional_path(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path. {received(name, value)}")
    return None if value is None else os.fspath(value)


def patterns(name: str, value: Any) -> tuple[str, ...] | None:
    """None, a regular expression, or a list of them; each must compile."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if isinstance(items, bytes) or not isinstance(items, Sequence):
        raise TypeError(
            f"`{name}` must be a regular expression or a list of them. {received(name, value)}"
        )
    items = list(items)
    if not items:
        raise ValueError(f"`{name}` must not be an empty list. {received(name, value)}")
    for pattern in items:
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
    return tuple(items)


def check_log_dir(name: str, value: Any) -> str:
    """A directory that exists or can be created, and can be written; or an fsspec URL
    (`s3://bucket/runs/exp1`), checked when the run is opened at train begin."""
    from .run.remote import is_url, local_path

    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike). {received(name, value)}")
    path = os.fspath(value)
    if not path:
        raise ValueError(f"`{name}` must not be empty. {received(name, value)}")
    if is_url(path):
        return path.rstrip("/")
    path = local_path(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"`{name}` must be a directory (or not exist yet), but it is a file. "
            f"{received(name, value)}"
        )
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"`{name}` cannot be written: {probe} is not a writable directory. "
            f"{received(name, value)}"
        )
    return str(path)


def check_storage_options(name: str, value: Any) -> dict[str, Any] | None:
    """None or a mapping with string keys (its values are never shown: they may be secrets)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(
            f"`{name}` must be a dict of fsspec options with string keys. "
            f"Received: {name} of type {type(value).__name__}"
        )
    return dict(value)


def _numeric(name: str, arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"`{name}` must be {what}. Received: {name} with dtype {arr.dtype}")


def check_feature_data(name: str, value: Any) -> np.ndarray | None:
    """None or a numeric sample of inputs, shape (samples >= 2, features)."""
    if value is None:
        return None
    arr = np.asarray(value)
    shape = f"Received: {name} with shape {arr.shape}"
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (samples, features). {shape}")
    _numeric(name, arr, "numeric")
    if arr.shape[0] < 2:
        raise ValueError(f"`{name}` needs at least 2 samples. {shape}")
    return arr


def check_sample_images(name: str, value: Any) -> np.ndarray | None:
    """None or a non-empty numeric batch of images, 4-D."""
    if value is None:
        return None
    arr = np.asarray(value)
    _numeric(name, arr, "numeric images")
    shape = f"Received: {name} with shape {arr.shape}"
    if arr.ndim != 4:
        raise ValueError(
            f"`{name}` must be a 4-D batch (N, H, W, C) in the model's input layout. {shape}"
        )
    if arr.shape[0] < 1:
        raise ValueError(f"`{name}` is empty. {shape}")
    return arr


SPECTRAL_EXTRA = "pip install 'keras-weightwatch[spectral]'"


def spectral_every(name: str, value: Any) -> int | None:
    """None (off) or every how many snapshots; on, the worker needs threadpoolctl to keep its
    LAPACK threads off the training cores."""
    out = optional_int(name, value)
    if out is not None:
        import importlib.util

        if importlib.util.find_spec("threadpoolctl") is None:
            raise ImportError(
                f"`{name}` needs threadpoolctl, to bound the threads of the eigenvalue "
                f"computation: {SPECTRAL_EXTRA}. {received(name, value)}"
            )
    return out
def saliency_methods(name: str, value: Any) -> tuple[str, ...] | None:
    """None, one saliency method, or a list of them (each once)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if isinstance(items, bytes) or not isinstance(items, Sequence) or not items:
        raise TypeError(
            f"`{name}` must be one of {list(SALIENCY_METHODS)} or a non-empty list of them. "
            f"{received(name, value)}"
        )
    for method in items:
        if method not in SALIENCY_METHODS:
            raise ValueError(
                f"`{name}`: {method!r} is not a saliency method; choose among "
                f"{list(SALIENCY_METHODS)}. {received(name, value)}"
            )
    return tuple(dict.fromkeys(items))


def optional_index(name: str, value: Any) -> int | None:
    """None or an integer >= 0 (a class index)."""
    return None if value is None else positive_int(name, value, minimum=0)


def check_gradient_data(name: str, value: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """None or a probe batch `(x, y)`: numeric arrays with the same number of examples."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"`{name}` must be a pair (x, y) of arrays. "
                        f"Received: {name} of type {type(value).__name__}")
    x, y = (np.asarray(v) for v in value)
    for part, arr in (("x", x), ("y", y)):
        _numeric(name, arr, f"numeric arrays; its {part} is not")
        if arr.ndim < 1 or arr.shape[0] < 1:
            raise ValueError(f"`{name}`: {part} must hold at least one example. "
                             f"Received: {name} {part} with shape {arr.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"`{name}`: x and y must hold the same number of examples. "
                         f"Received: {name} with shapes {x.shape} and {y.shape}")
    return (x, y)


def _option(default: Any, check: Check, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"check": check}, **kwargs)


class Needs(NamedTuple):
    """An option that does nothing unless one of `any_of` is on: set without it, it is refused."""

    option: str
    any_of: tuple[str, ...]
    what: str
    """What the option sets, as the message says it."""


NEEDS = (
    Needs("top_k", ("feature_names", "feature_layer", "feature_data"),
          "the rows of the top-k feature table"),
    Needs("max_kernel_tiles", ("kernel_images", "sample_images"),
          "the tiles of the kernel grids and the response grids"),
    Needs("response_mode", ("sample_images",), "how the responses to the sample images are made"),
    Needs("response_layers", ("sample_images",), "the layers the sample images are filtered by"),
    Needs("responses_dir", ("sample_images",), "where the response grids are also written"),
    Needs("spectral_traps", ("spectral_freq",),
          "whether the spectral metrics count correlation traps"),
    Needs("keep_every", ("keep_last",),
          "which snapshots retention keeps besides the last `keep_last`"),
)
"""Every option that only refines another: the pairs `Settings` refuses one without the other."""


def _is_on(value: Any) -> bool:
    return value is not None and value is not False


def _missing(settings: Settings, needs: Needs) -> str:
    """The refusal of an option set without any option it needs."""
    if len(needs.any_of) == 1:
        wanted = f"`{needs.any_of[0]}`"
    else:
        wanted = ", ".join(f"`{n}`" for n in needs.any_of[:-1]) + f" or `{needs.any_of[-1]}`"
    given = ", ".join(
        f"{n}={_shown(getattr(settings, n))!r}" for n in (needs.option, *needs.any_of)
    )
    return (
        f"`{needs.option}` sets {needs.what} and does nothing without {wanted}; pass "
        f"{'it' if len(needs.any_of) == 1 else 'one of them'} or leave `{needs.option}` out. "
        f"Received: {given}"
    )


# ------------------------------------------------------------------ the record


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every WeightWatch option, checked. See `WeightWatch` for what each one does.

    Build it with `Settings(log_dir, ...)` (or `Settings.create(**options)`):
    each option is checked and normalised when the record is made (paths to
    `str`, lists to tuples, arrays to `np.ndarray`). Its defaults are the
    defaults of `WeightWatch(...)`.
    """

    log_dir: str = _option(dataclasses.MISSING, check_log_dir)
    freq: int = _option(1, positive_int)
    batch_freq: int | None = _option(None, optional_int)
    histograms: bool = _option(True, boolean)
    kernel_images: bool = _option(True, boolean)
    max_kernel_tiles: int = _option(256, positive_int)
    feature_names: tuple[str, ...] | None = _option(None, unique_names)
    top_k: int = _option(5, positive_int)
    feature_layer: str | None = _option(None, layer_name)
    feature_data: np.ndarray | None = _option(None, check_feature_data, compare=False)
    sample_images: np.ndarray | None = _option(None, check_sample_images, compare=False)
    response_mode: str = _option("kernel", choice(RESPONSE_MODES))
    response_layers: tuple[str, ...] | None = _option(None, names)
    responses_dir: str | None = _option(None, optional_path)
    if_exists: str = _option("continue", choice(IF_EXISTS))
    strict: bool = _option(False, boolean)
    durable: bool = _option(True, boolean)
    max_queue: int = _option(1, positive_int)
    store_dtype: str | None = _option(None, choice(STORE_DTYPES + (None,)))
    keep_last: int | None = _option(None, optional_int)
    keep_every: int | None = _option(None, optional_int)
    include: tuple[str, ...] | None = _option(None, patterns)
    exclude: tuple[str, ...] | None = _option(None, patterns)
    storage_options: dict[str, Any] | None = _option(
        None, check_storage_options, compare=False, repr=False)
    """Handed to fsspec only: never in `get_config()`, the run header, or a message."""
    spectral_freq: int | None = _option(None, spectral_every)
    spectral_traps: bool = _option(False, boolean)
    saliency: tuple[str, ...] | None = _option(None, saliency_methods)
    saliency_class: int | None = _option(None, optional_index)
    saliency_layer: str | None = _option(None, layer_name)
    gradient_data: tuple[np.ndarray, np.ndarray] | None = _option(
        None, check_gradient_data, compare=False)
    gradient_freq: int = _option(1, positive_int)
    gradient_histograms: bool = _option(False, boolean)
    shard_timeout: float = _option(300, positive_number)
    health: str | None = _option("warn", choice(HEALTH_MODES + (None,)))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            checked = f.metadata["check"](f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, checked)
        from .run.remote import filesystem, is_url

        for url in (self.log_dir, self.responses_dir):
            if url is not None and is_url(url):
                filesystem(url, self.storage_options)  # the missing extra, named now
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for needs in NEEDS:
            value = getattr(self, needs.option)
            if value != defaults[needs.option] and not any(
                _is_on(getattr(self, n)) for n in needs.any_of
            ):
                raise ValueError(_missing(self, needs))
        self._check_needs()

    def _check_needs(self) -> None:
        """Options that would do nothing without another are refused, naming the missing one."""
        if self.saliency is not None and self.sample_images is None:
            raise ValueError(
                "`saliency` draws saliency maps of `sample_images`; pass sample_images=. "
                "Received: sample_images=None"
            )
        for option in ("saliency_class", "saliency_layer"):
            if getattr(self, option) is not None and self.saliency is None:
                raise ValueError(f"`{option}` needs `saliency` (which maps to draw). "
                                 "Received: saliency=None")
        if self.gradient_histograms and self.gradient_data is None:
            raise ValueError("`gradient_histograms` needs `gradient_data` (the probe batch "
                             "the gradients are taken on). Received: gradient_data=None")
        if self.gradient_freq != 1 and self.gradient_data is None and self.saliency is None:
            raise ValueError(
                "`gradient_freq` sets how often `gradient_data` and `saliency` run; neither "
                "is given. Received: gradient_data=None, saliency=None"
            )

    @classmethod
    def create(cls, **options: Any) -> Settings:
        """The settings of `WeightWatch(**options)`, checked."""
        return cls(**options)

    @property
    def wants_features(self) -> bool:
        """Whether the top-k feature table is asked for."""
        return (
            self.feature_names is not None
            or self.feature_layer is not None
            or self.feature_data is not None
        )

    def to_config(self) -> dict[str, Any]:
        """The options as JSON values: lists for sequences, the shape of each array."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in SECRET_OPTIONS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = list(value.shape)
            elif isinstance(value, tuple):
                value = [list(v.shape) if isinstance(v, np.ndarray) else v for v in value]
            out[f.name] = value
        return out

    def header(self, feature_key: str | None = None) -> dict[str, Any]:
        """The settings the run header records: `to_config()`, and the kernel the feature
        table reads (`feature_key`, for `diff`) when there is one."""
        out = self.to_config()
        if feature_key is not None:
            out["feature_key"] = feature_key
        return out

    def within(self, *parts: str) -> Settings:
        """These settings with `log_dir` one directory deeper (`log_dir/<part>/...`): where
        a hyperparameter search's trial execution writes its own run."""
        from .run.remote import is_url

        if is_url(self.log_dir):
            return dataclasses.replace(self, log_dir="/".join((self.log_dir, *parts)))
        return dataclasses.replace(self, log_dir=os.path.join(self.log_dir, *parts))

    def validate(self, info: ModelInfo) -> tuple[int, ...]:
        """Check the settings against the model; return the indices of the weights to watch.

        A weight is watched when `include` is None or one of its patterns is
        found (`re.search`) in the weight's key or its layer's path, and no
        pattern of `exclude` is. A filter that leaves no weight is refused.
        """
        watch = watched([(w.key, w.layer) for w in info.weights], self.include, self.exclude)
        if not watch and info.weights:
            raise ValueError(
                f"`include`/`exclude` leave none of the model's {len(info.weights)} weights to "
                f"watch (keys such as {[w.key for w in info.weights[:3]]}). "
                f"Received: include={_shown(self.include)!r}, exclude={_shown(self.exclude)!r}"
            )
        return tuple(watch)


def _shown(value: Any) -> Any:
    """A tuple option as a list, as `get_config()` gives it."""
    return list(value) if isinstance(value, tuple) else value


def watched(keys_and_layers: Sequence[tuple[str, str]], include: Sequence[str] | None,
            exclude: Sequence[str] | None) -> list[int]:
    """Indices of the weights an include/exclude filter keeps (see `Settings.validate`)."""
    inc = [re.compile(p) for p in include or ()]
    exc = [re.compile(p) for p in exclude or ()]

    def hit(patterns: list[re.Pattern], key: str, layer: str) -> bool:
        return any(p.search(key) or (layer and p.search(layer)) for p in patterns)

    return [
        i
        for i, (key, layer) in enumerate(keys_and_layers)
        if (include is None or hit(inc, key, layer)) and not hit(exc, key, layer)
    ]
