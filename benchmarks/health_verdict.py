"""One case of `health_cases` judged: run it, diagnose the run, compare with what was planted.

Shared by bench_health.py (the confusion table) and tests/integration/test_health_cases.py.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
from health_cases import Case

from keras_weightwatch.errors import WeightWatchWarning
from keras_weightwatch.health import Finding, diagnose
from keras_weightwatch.run import load_run


class Verdict(NamedTuple):
    """A case's findings (from `diagnose`), the health warnings the fit emitted, the step at
    which the stored data first shows the planted problem, and the snapshot steps."""

    case: Case
    findings: list[Finding]
    warned: list[str]
    shows_at: int | None
    steps: list[int]

    @property
    def ok(self) -> bool:
        """Exactly the planted finding (none for a healthy case), at the planted layer, no
        later than one snapshot after the data shows it."""
        if self.case.rule is None:
            return not self.findings
        if len(self.findings) != 1:
            return False
        f = self.findings[0]
        return (f.rule == self.case.rule and f.layer == self.case.layer
                and self.shows_at is not None and f.step <= self._next(self.shows_at))

    def _next(self, step: int) -> int:
        later = [s for s in self.steps if s > step]
        return later[0] if later else step


def judge(case: Case, run_dir: str) -> Verdict:
    """Train `case` into `run_dir` (health="warn"), then diagnose the run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case.train(run_dir)
    warned = [str(w.message) for w in caught
              if issubclass(w.category, WeightWatchWarning) and "health " in str(w.message)]
    run = load_run(run_dir)
    return Verdict(case, diagnose(run).findings, warned, _shows_at(case, run), run.steps)


def _shows_at(case: Case, run: Any) -> int | None:
    """The step at which the stored data first shows the planted problem."""
    if case.shows_at == "initial":
        return int(run.snapshots[0].step)
    if isinstance(case.shows_at, int):
        return case.shows_at
    if case.rule == "exploding_weights":
        return _grown(run, f"{case.layer}/kernel")
    return None


def _grown(run: Any, key: str, factor: float = 10.0) -> int | None:
    """The first step at which `key`'s stored norm is `factor` times its first one."""
    norms = np.array([s.stats[key]["l2_norm"] for s in run.snapshots])
    at = np.flatnonzero(norms >= factor * norms[0])
    return int(run.snapshots[at[0]].step) if at.size else None
