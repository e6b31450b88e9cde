"""The health rules on real trainings: every planted pathology is found, exactly, at its layer
and no later than one snapshot after the stored data shows it; healthy trainings have no
finding at all. The same cases make bench_health.py's confusion table (docs/HEALTH.md).

Each case trains with `health="warn"`: the warnings the fit emitted name the same finding as
`weightwatch doctor`'s `diagnose` of the stored run.
"""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks"))

import health_cases as hc  # noqa: E402
from health_verdict import judge  # noqa: E402


@pytest.mark.parametrize("case", hc.PLANTED, ids=[c.train.__name__ for c in hc.PLANTED])
def test_a_planted_pathology_is_found_exactly(case, tmp_path):
    v = judge(case, str(tmp_path / "run"))
    assert [(f.rule, f.layer) for f in v.findings] == [(case.rule, case.layer)]
    f = v.findings[0]
    assert v.shows_at is not None
    later = [s for s in v.steps if s > v.shows_at]
    assert f.since <= f.step <= (later[0] if later else v.shows_at)
    assert v.ok
    # Live, the fit warned once, naming the same rule, layer and step.
    assert len(v.warned) == 1
    assert f"{case.rule} in layer {case.layer!r} at step {f.step}" in v.warned[0]


@pytest.mark.parametrize("case", hc.HEALTHY, ids=[c.train.__name__ for c in hc.HEALTHY])
def test_a_healthy_training_has_no_finding(case, tmp_path):
    v = judge(case, str(tmp_path / "run"))
    assert v.findings == [] and v.warned == []
    assert v.ok
