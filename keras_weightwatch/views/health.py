"""`HealthView`: the health rules on each snapshot as it is written (`health.Monitor`).

On the worker, before the snapshot is stored, `measure` adds the per-unit numbers the rules
read (`health.measures`: units, collapsed and duplicate units of each Dense and convolution
kernel, from the effective kernels); after it is stored, `write` judges the snapshot with its
full statistics (gradients and spectral metrics included), writes a Markdown table
`health/findings` of the open findings and the scalars `health/errors` and `health/warnings`
(how many are open), and hands each new finding to the callback as one warning
(`pop_notices`). With `stop`, a finding of severity "error" asks the callback to stop
training (`wants_stop`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence, Set
from typing import Any

from ..capture import ModelInfo, Snapshot
from ..health.measures import snapshot_unit_measures
from ..health.monitor import Monitor
from ..health.rules import ERROR, WARNING, Finding, ModelFacts
from .base import Stats, View

FINDINGS_TAG = "health/findings"
COUNT_TAGS = {ERROR: "health/errors", WARNING: "health/warnings"}


class HealthView(View):
    """The health rules, live (see the module docstring).

    Args:
        mode: `"warn"` (one warning per new finding) or `"stop"` (also stop training on a
            finding of severity "error").
    """

    name = "health"

    def __init__(self, mode: str = "warn"):
        self.mode = mode
        self.monitor: Monitor | None = None
        self.units: list[str] = []
        self._notices: list[str] = []
        self._stop = threading.Event()

    def prepare(self, model: Any, info: ModelInfo) -> None:
        facts = ModelFacts.from_specs(info.weights, info.derived)
        self.monitor = Monitor(facts)
        self.units = facts.unit_kernels()
        self._notices = []
        self._stop.clear()

    def restrict(self, keys: Set[str]) -> None:
        self.units = [k for k in self.units if k in keys]

    def measure(self, snapshot: Snapshot) -> Stats | None:
        return snapshot_unit_measures(snapshot.arrays, self.units)

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        if self.monitor is None:
            return
        from ..summaries import scalar, text

        new = self.monitor.observe(snapshot.step, stats)
        self._notices.extend(finding_text(f) for f in new)
        if self.mode == "stop" and self.monitor.stop():
            self._stop.set()
        shown = self.monitor.open()
        values = [scalar(tag, sum(f.severity == sev for f in shown))
                  for sev, tag in COUNT_TAGS.items()]
        values.append(text(FINDINGS_TAG, findings_markdown(
            snapshot.step, shown, self.monitor.all(), self.monitor.notes())))
        events.write(snapshot.step, values, wall_time=snapshot.time)

    def pop_notices(self) -> list[str]:
        out, self._notices = self._notices, []
        return out

    def wants_stop(self) -> bool:
        return self._stop.is_set()


def finding_text(f: Finding) -> str:
    """The one warning of a new finding: rule, layer, step, what, and what to check."""
    since = f" (since step {f.since})" if f.since != f.step else ""
    return (f"health {f.severity}: {f.rule} in layer {f.layer!r} at step {f.step}{since}: "
            f"{f.message}. First check: {f.hint}")


def findings_markdown(step: int, shown: Sequence[Finding], every: Sequence[Finding],
                      notes: Sequence[str]) -> str:
    """The `health/findings` table: the open findings at `step`, and how many closed."""
    errors = sum(f.severity == ERROR for f in shown)
    head = (f"**{errors} error(s), {len(shown) - errors} warning(s)** open at step {step}"
            if shown else f"No open finding at step {step}")
    closed = len(every) - len(shown)
    lines = [head + (f" ({closed} earlier, no longer holding)" if closed else ""), ""]
    if shown:
        lines += ["| severity | rule | layer | since | what | first check |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {f.severity} | {f.rule} | {f.layer} | {f.since} | {_cell(f.message)} |"
                  f" {_cell(f.hint)} |" for f in shown]
    if notes:
        lines += ["", "Not checked: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def _cell(s: str) -> str:
    return s.replace("|", "\\|")
