"""The rules run snapshot after snapshot: live (`Monitor`, on the worker) and on a stored run
(`diagnose`, for `weightwatch doctor`), with the same merging of findings.

A finding is one per rule and layer: reported at the first snapshot a rule returns it
(`Finding.step`), then kept with the last snapshot at which it still holds (`last`); it is
*open* while it held at the latest snapshot. Once a weight is non-finite, only that finding
is kept (every later number is noise): the weights that follow are added to it (`also`).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .measures import UNITS, snapshot_unit_measures
from .rules import (
    DEFAULTS,
    ERROR,
    RULES,
    SUBSUMES,
    Context,
    Finding,
    ModelFacts,
    Snap,
    Stats,
    Thresholds,
    value,
)

KEEP_SNAPSHOTS = 8
"""Snapshots the monitor keeps for rules that look back (more than any rule needs)."""
NEEDS = {
    "gradients": ("vanishing/exploding gradients and dead units by gradient need a probe batch:"
                  " pass `gradient_data`"),
    "spectral": "spectral alpha needs spectral metrics: pass `spectral_freq`",
    "traps": "correlation traps need `spectral_traps=True` (with `spectral_freq`)",
}
"""What a rule needs that a run may lack, and the one line that says so."""
NORMALIZED = ("vanishing/exploding gradients and dead units by gradient are not judged: the"
              " model has BatchNormalization, and the probe batch's gradients are taken in"
              " inference mode, where its moving statistics do not normalize early in training")
_NEED_STAT = {"gradients": "grad_norm", "spectral": "alpha", "traps": "num_traps"}


class Monitor:
    """The findings of a run so far, one snapshot at a time (see the module docstring).

    Args:
        facts: The model's facts (`ModelFacts`).
        limits: The thresholds. Defaults to `rules.DEFAULTS`.
    """

    def __init__(self, facts: ModelFacts, limits: Thresholds = DEFAULTS):
        self.facts = facts
        self.limits = limits
        self.findings: dict[tuple[str, str], Finding] = {}
        self.step: int | None = None
        self._history: collections.deque[Snap] = collections.deque(maxlen=KEEP_SNAPSHOTS)
        self._first: Snap | None = None
        self._seen: set[str] = set()
        self._bad: tuple[str, str] | None = None

    def observe(self, step: int, stats: Stats) -> list[Finding]:
        """Judge the snapshot at `step` with its stored statistics; the new findings."""
        snap = Snap(step, stats)
        self._first = self._first or snap
        self._history.append(snap)
        self.step = step
        self._seen.update(need for need, name in _NEED_STAT.items()
                          if any(name in s for s in stats.values()))
        if self._bad is not None:
            self._follow(snap)
            return []
        ctx = Context(self.facts, tuple(self._history), self._first, self.limits)
        current = [f for rule in RULES for f in rule.fn(ctx)]
        bad = [f for f in current if f.rule == "non_finite"]
        current = bad or _subsumed(current)
        if bad:
            self._bad = (bad[0].rule, bad[0].layer)
        new = []
        for f in current:
            old = self.findings.get((f.rule, f.layer))
            if old is None:
                self.findings[(f.rule, f.layer)] = f
                new.append(f)
            else:
                self.findings[(f.rule, f.layer)] = old._replace(last=f.last)
        return new

    def _follow(self, snap: Snap) -> None:
        """Add the weights that became non-finite at `snap` to the non-finite finding."""
        if self._bad is None:
            return
        f = self.findings[self._bad]
        named = {f.key, *(a.partition("@")[0] for a in f.also)}
        new = tuple(f"{k}@{snap.step}" for k in self.facts.keys if k not in named
                    and (value(snap.stats, k, "nan_count") > 0
                         or value(snap.stats, k, "inf_count") > 0))
        self.findings[self._bad] = f._replace(last=snap.step, also=f.also + new)

    def all(self) -> list[Finding]:
        """Every finding so far: errors first, then by the step it was reported."""
        return sorted(self.findings.values(), key=_order)

    def open(self) -> list[Finding]:
        """The findings that held at the latest snapshot."""
        return [f for f in self.all() if f.last == self.step]

    def notes(self) -> list[str]:
        """What no snapshot so far had for the rules that need it, one line each."""
        out = [text for need, text in NEEDS.items() if need not in self._seen]
        if self.facts.normalized and "gradients" in self._seen:
            out.insert(0, NORMALIZED)
        return out

    def stop(self) -> bool:
        """Whether a finding of severity "error" is open (`health="stop"`)."""
        return any(f.severity == ERROR for f in self.open())


def _order(f: Finding) -> tuple[int, int, str]:
    return (0 if f.severity == ERROR else 1, f.step, f.layer)


def _subsumed(found: list[Finding]) -> list[Finding]:
    """`found` without the findings another one on the same layer explains (`SUBSUMES`)."""
    drop = {(other, f.layer) for f in found for other in SUBSUMES.get(f.rule, ())}
    return [f for f in found if (f.rule, f.layer) not in drop]


class Diagnosis(NamedTuple):
    """Every finding of a stored run (`diagnose`).

    Attributes:
        path: The run.
        snapshots: How many snapshots were judged.
        findings: Every finding, errors first.
        notes: What the run lacks for some rules, one line each.

    Example (the README's quickstart run, which is healthy):

    >>> from keras_weightwatch import diagnose
    >>> d = diagnose("runs/exp1")
    >>> d.findings, d.errors, d.to_json()["healthy"]
    ([], [], True)
    """

    path: str
    snapshots: int
    findings: list[Finding]
    notes: list[str]

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity "error"."""
        return [f for f in self.findings if f.severity == ERROR]

    def to_json(self) -> dict[str, Any]:
        """What `weightwatch doctor --json` prints."""
        return {"run": self.path, "snapshots": self.snapshots,
                "healthy": not self.findings, "errors": len(self.errors),
                "findings": [f.to_json() for f in self.findings], "notes": self.notes}


def diagnose(run: Any, limits: Thresholds = DEFAULTS, *, read_tensors: bool = True
             ) -> Diagnosis:
    """Every finding of a stored run, from what its snapshots store (the per-unit numbers
    of runs that did not store them are computed from the stored tensors).

    Args:
        run: A `Run` (or a path: it is opened with `load_run`).
        limits: The thresholds. Defaults to `rules.DEFAULTS`.
        read_tensors: Compute the per-unit numbers a snapshot does not store from its
            tensors. Defaults to True; False judges the stored statistics alone.

    Example:

    >>> from keras_weightwatch import load_run
    >>> from keras_weightwatch.health import diagnose
    >>> d = diagnose("runs/exp1")
    >>> d.snapshots == len(load_run("runs/exp1").snapshots), [f.rule for f in d.findings]
    (True, [])
    """
    if isinstance(run, str):
        from ..run import load_run

        run = load_run(run)
    facts = ModelFacts.from_specs(run.specs, run.derived)
    monitor = Monitor(facts, limits)
    units = facts.unit_kernels() if read_tensors else []
    for snap in run.snapshots:
        monitor.observe(snap.step, with_units(run, snap, units))
    return Diagnosis(str(run.path), len(run.snapshots), monitor.all(), monitor.notes())


def with_units(run: Any, snap: Any, keys: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
    """The snapshot's stored statistics, with the per-unit numbers of `keys` computed from
    its tensors where it does not store them."""
    missing = [k for k in keys if k in snap.tensors and UNITS not in snap.stats.get(k, {})]
    if not missing:
        return snap.stats
    stats = {k: dict(v) for k, v in snap.stats.items()}
    arrays = run.weights(snap.step, keys=missing, effective=True)
    for k, values in snapshot_unit_measures(arrays, missing).items():
        stats.setdefault(k, {}).update(values)
    return stats
