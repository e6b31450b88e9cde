"""What a comparison is given: `RUN@STEP` targets, open runs, the checks of its arguments.

Every function that takes a user's argument here raises an error ending
`Received: name=value`; reading a tensor goes through `load`, which gives the
*effective* kernel of a LoRA or quantized layer (what the layer computes with, under
its stored kernel's key); `chains`, `content`, `rule_of` and `shape_of` describe that
kernel from the records alone (what it derives from, its shape), without reading it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from ..derive import applies, effective_shapes
from ..derive import chains as derive_chains
from ..errors import WeightWatchError, received
from ..run import Derivation, Run, SnapshotRecord, load_run

_STEP_RE = re.compile(r"^(initial|last|-?\d+)$")

Target = str | os.PathLike | Run
"""A run directory, `"path@step"`, or an open `Run`."""


def split_target(target: str | os.PathLike) -> tuple[str, str]:
    """Split `RUN@STEP` into the run directory and the step (`"last"` when absent).

    STEP is an epoch step, `initial` or `last`. A directory whose own name
    holds `@` is taken whole when it exists.

    Example:

    >>> split_target("runs/exp1@3")
    ('runs/exp1', '3')
    >>> split_target("runs/exp1")
    ('runs/exp1', 'last')
    """
    text = os.fspath(target)
    if "@" in text and not os.path.isdir(text):
        path, step = text.rsplit("@", 1)
        if not _STEP_RE.match(step):
            raise WeightWatchError(
                f"{text}: {step!r} is not a step; use RUN@EPOCH, RUN@initial or RUN@last"
            )
        return path, step
    return text, "last"


def _step_value(step: str | int) -> str | int:
    if isinstance(step, str) and step not in ("initial", "last"):
        return int(step)
    return step


def open_snapshot(target: Target, step: str | int | None) -> tuple[Run, SnapshotRecord]:
    """The run and the snapshot a target names (`step`, when given, wins over `@STEP`)."""
    if isinstance(target, Run):
        run, text_step = target, "last"
    elif isinstance(target, (str, os.PathLike)):
        path, text_step = split_target(target)
        run = load_run(path)
    else:
        raise TypeError(
            f"a run must be a path, 'path@step' or a Run. {received('run', target)}"
        )
    snap = run.snapshot(_step_value(text_step) if step is None else step)
    return run, snap


def label(run: Run, snap: SnapshotRecord) -> str:
    """A snapshot as `path@step`."""
    return f"{run.path}@{snap.name}"


def load(run: Run, snap: SnapshotRecord, key: str, verify: bool) -> np.ndarray:
    """One tensor of a snapshot (memory-mapped): the effective kernel for a derived key (a
    LoRA layer's `base + scale * A @ B`, a quantized layer's dequantized kernel), as the
    layer computed with it at that snapshot."""
    return run.weights(snap.step, keys=[key], verify=verify, effective=True)[key]


Chains = dict[str, tuple[Derivation, ...]]
"""Weight key -> the derivations of its effective kernel, in the order they apply."""


def chains(run: Run) -> Chains:
    """Each derived key of `run` -> its derivations (a LoRA on a quantized kernel: two)."""
    return derive_chains(run.derived)


def applied(chain: tuple[Derivation, ...], snap: SnapshotRecord) -> tuple[Derivation, ...]:
    """The derivations of `chain` that apply in `snap` (a snapshot taken before LoRA was
    enabled holds no adapters: its stored kernel is the one the layer computed with)."""
    return tuple(d for d in chain if applies(d, snap.tensors))


def content(snap: SnapshotRecord, key: str, chain: tuple[Derivation, ...]) -> tuple[Any, ...]:
    """What `load` of `key` is a function of: the stored tensor's SHA-256 and, for each
    derivation that applies, its rule, its numbers and the SHA-256 of every input. Equal
    contents give bit-identical tensors."""
    out: list[Any] = [snap.tensors[key].sha256]
    for d in applied(chain, snap):
        out.append((d.rule, repr(sorted(d.params.items())),
                    tuple(sorted((role, snap.tensors[k].sha256) for role, k in d.inputs.items()))))
    return tuple(out)


def rule_of(snap: SnapshotRecord, chain: tuple[Derivation, ...]) -> str | None:
    """The rules that derive the tensor `load` gives (`"lora"`, `"int8"`, `"int8+lora"`), or
    None where it is the stored weight itself."""
    return "+".join(d.rule for d in applied(chain, snap)) or None


def shape_of(snap: SnapshotRecord, key: str, chain: tuple[Derivation, ...]
             ) -> tuple[int, ...] | None:
    """The shape of the tensor `load` gives (an int4 kernel's unpacked shape), from the
    records alone; None where the snapshot has no such weight."""
    if key not in snap.tensors:
        return None
    needed = {key, *(k for d in chain for k in d.inputs.values())}
    return effective_shapes(chain, {k: snap.tensors[k].shape for k in needed
                                    if k in snap.tensors})[key]


def input_roles(*runs: Run) -> dict[str, tuple[str, str]]:
    """Each stored weight that an effective kernel of `runs` derives from, besides the kernel
    itself (LoRA adapters, quantization scales) -> (that kernel's key, its role)."""
    out: dict[str, tuple[str, str]] = {}
    for run in runs:
        for d in run.derived:
            for role, k in d.inputs.items():
                if k != d.key:
                    out.setdefault(k, (d.key, role))
    return out


def ordered_keys(run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord
                 ) -> list[str]:
    """Keys of A in A's weight order, then keys only in B in B's order."""
    def order(run: Run, snap: SnapshotRecord) -> list[str]:
        keys = [s.key for s in run.specs if s.key in snap.tensors]
        return keys + sorted(k for k in snap.tensors if k not in set(keys))

    ka = order(run_a, snap_a)
    kb = order(run_b, snap_b)
    seen = set(ka)
    return ka + [k for k in kb if k not in seen]


def compile_layer(layer: str | re.Pattern | None) -> re.Pattern | None:
    """The `layer=` regular expression, compiled (None: every weight)."""
    if layer is None or isinstance(layer, re.Pattern):
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"`layer` must be a regular expression string. {received('layer', layer)}")
    try:
        return re.compile(layer)
    except re.error as e:
        raise ValueError(
            f"`layer` is not a valid regular expression ({e}). {received('layer', layer)}"
        ) from None


def check_tolerance(tolerance: Any) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)):
        raise TypeError(f"`tolerance` must be a number >= 0. {received('tolerance', tolerance)}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"`tolerance` must be a number >= 0. {received('tolerance', tolerance)}")
    return float(tolerance)


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer >= 1. {received(name, value)}")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. {received(name, value)}")
    return int(value)


def check_fixed_units(value: Any, known: set[str]) -> tuple[str, ...]:
    """`fixed_units`: layer names (a name or a sequence of names) of the runs compared."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"`fixed_units` must be a layer name or a sequence of layer names. "
            f"{received('fixed_units', value)}"
        )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"`fixed_units` names no layer of the runs ({unknown[0]!r}; layers with weights: "
            f"{', '.join(sorted(known)) or 'none'}). {received('fixed_units', value)}"
        )
    return tuple(names)
