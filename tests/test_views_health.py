"""views.health: the health rules live in a fit, read back with TensorBoard's own reader."""

from __future__ import annotations

import os
import re
import warnings

import pytest
from health_helpers import constant_fit, diverging_fit, healthy_fit
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.util import tensor_util

import keras_weightwatch
from keras_weightwatch import WeightWatch, WeightWatchWarning, load_run
from keras_weightwatch.health import ModelFacts, Monitor
from keras_weightwatch.health.measures import UNIT_STAT_NAMES, UNITS_DUPLICATE
from keras_weightwatch.health.rules import ERROR, WARNING, Finding
from keras_weightwatch.views.health import (
    COUNT_TAGS,
    FINDINGS_TAG,
    finding_text,
    findings_markdown,
)

HEALTH_TAGS = {FINDINGS_TAG, *COUNT_TAGS.values()}


def _acc(run_dir):
    acc = pea.EventAccumulator(os.path.join(run_dir, "weights"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return acc


def _texts(acc):
    return {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode()
            for e in acc.Tensors(FINDINGS_TAG)}


def _scalars(acc, tag):
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def _open_by_step(run_dir):
    """The open findings at each snapshot, replayed from what the run stores."""
    run = load_run(run_dir)
    monitor = Monitor(ModelFacts.from_specs(run.specs, run.derived))
    out = {}
    for snap in run.snapshots:
        monitor.observe(snap.step, snap.stats)
        out[snap.step] = monitor.open()
    return out


def _rows(text):
    """The table rows of a `health/findings` text: (severity, rule, layer, since)."""
    return [tuple(c.strip() for c in line.split("|")[1:5]) for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| severity")]


@pytest.fixture(scope="module")
def constant_run(tmp_path_factory):
    """A fit with one planted finding (symmetry in `constant`) and the warnings it gave."""
    path = str(tmp_path_factory.mktemp("health") / "run")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        constant_fit(path, epochs=3, health="warn")
    return path, [w for w in record if issubclass(w.category, WeightWatchWarning)], record


def test_findings_table_names_the_planted_layer_at_each_step(constant_run):
    path, _, _ = constant_run
    texts = _texts(_acc(path))
    assert sorted(texts) == [-1, 0, 1, 2]
    assert texts[-1].startswith("No open finding at step -1")
    for step in (0, 1, 2):
        assert texts[step].startswith(f"**0 error(s), 1 warning(s)** open at step {step}")
        assert _rows(texts[step]) == [("warning", "symmetry", "constant", "-1")]
        assert "constant/kernel: 16 of 16 units are identical" in texts[step]
    assert "Not checked: " in texts[0] and "`gradient_data`" in texts[0]


def test_count_scalars_equal_the_open_findings_at_each_step(constant_run):
    path, _, _ = constant_run
    acc = _acc(path)
    opened = _open_by_step(path)
    for severity, tag in COUNT_TAGS.items():
        assert _scalars(acc, tag) == {
            step: float(sum(f.severity == severity for f in found))
            for step, found in opened.items()}
    assert _scalars(acc, COUNT_TAGS[WARNING]) == {-1: 0.0, 0: 1.0, 1: 1.0, 2: 1.0}


def test_one_warning_per_new_finding_naming_rule_layer_and_step(constant_run):
    _, ours, everything = constant_run
    assert [str(w.message) for w in everything] == [str(w.message) for w in ours]
    (w,) = ours
    assert re.match(r"weightwatch: health warning: symmetry in layer 'constant' at step 0 "
                    r"\(since step -1\): constant/kernel: 16 of 16 units", str(w.message))
    assert "First check: a constant or zero kernel initialiser?" in str(w.message)


def test_unit_numbers_are_stored_with_each_unit_kernel(constant_run):
    path, _, _ = constant_run
    run = load_run(path)
    for snap in run.snapshots:
        assert set(UNIT_STAT_NAMES) <= set(snap.stats["constant/kernel"])
        assert snap.stats["constant/kernel"][UNITS_DUPLICATE] == 16
        assert not set(UNIT_STAT_NAMES) & set(snap.stats["constant/bias"])
        assert not set(UNIT_STAT_NAMES) & set(snap.stats["out/kernel"])  # one unit


def test_warn_on_a_healthy_fit_writes_the_tags_and_warns_nothing(tmp_path):
    healthy_fit(tmp_path / "run", health="warn")  # any warning fails the test
    acc = _acc(str(tmp_path / "run"))
    assert HEALTH_TAGS <= set(acc.Tags()["tensors"])
    assert set(_scalars(acc, COUNT_TAGS[ERROR]).values()) == {0.0}
    assert all(t.startswith("No open finding") for t in _texts(acc).values())


def test_health_none_writes_no_health_tags_and_no_unit_numbers(tmp_path):
    constant_fit(tmp_path / "run", epochs=2, health=None)  # a warning would fail the test
    acc = _acc(str(tmp_path / "run"))
    tags = set(acc.Tags()["tensors"])
    assert tags and not any(t.startswith("health/") for t in tags)
    run = load_run(tmp_path / "run")
    assert all(not set(UNIT_STAT_NAMES) & set(st) for s in run.snapshots
               for st in s.stats.values())


def test_stop_ends_a_diverging_fit_after_storing_the_first_nan(tmp_path):
    path = str(tmp_path / "run")
    with pytest.warns(WeightWatchWarning, match=r"health error: non_finite in layer 'hidden1' "
                      r"at step 0: hidden1/kernel holds \d+ NaN"):
        history = diverging_fit(path, epochs=10, health="stop")
    assert len(history.history["loss"]) < 10
    run = load_run(path)
    first_bad = [s.step for s in run.snapshots
                 if any(st.get("nan_count", 0) > 0 for st in s.stats.values())]
    assert first_bad and run.snapshots[-1].step == first_bad[0]
    assert run.snapshots[-1].stats["hidden1/kernel"]["nan_count"] > 0
    assert keras_weightwatch.verify_run(path).ok
    assert _scalars(_acc(path), COUNT_TAGS[ERROR])[first_bad[0]] == 1.0


def test_warn_does_not_stop_a_diverging_fit(tmp_path):
    with pytest.warns(WeightWatchWarning, match="non_finite in layer 'hidden1'") as record:
        history = diverging_fit(tmp_path / "run", epochs=3, health="warn")
    assert len(history.history["loss"]) == 3
    assert len([w for w in record if issubclass(w.category, WeightWatchWarning)]) == 1


def test_bad_health_value_is_refused():
    with pytest.raises(ValueError, match=r"^`health` must be one of \['warn', 'stop', None\]\. "
                       r"Received: health='maybe'$"):
        WeightWatch("unused", health="maybe")


# ------------------------------------------------------------------------ the pure helpers


def _finding(rule="symmetry", severity=WARNING, step=3, since=3, message="m|n"):
    return Finding(rule, severity, "dense", "dense/kernel", step, since, step, message, "h")


def test_finding_text_names_since_only_when_earlier():
    assert finding_text(_finding()) == (
        "health warning: symmetry in layer 'dense' at step 3: m|n. First check: h")
    assert "at step 3 (since step -1)" in finding_text(_finding(since=-1))


def test_findings_markdown_escapes_pipes_and_counts_closed_findings():
    shown = [_finding(severity=ERROR, rule="non_finite"), _finding()]
    text = findings_markdown(5, shown, [*shown, _finding(rule="large_update")], ["a", "b"])
    lines = text.splitlines()
    assert lines[0] == ("**1 error(s), 1 warning(s)** open at step 5 "
                        "(1 earlier, no longer holding)")
    assert _rows(text) == [("error", "non_finite", "dense", "3"),
                           ("warning", "symmetry", "dense", "3")]
    assert "| m\\|n |" in text
    assert lines[-1] == "Not checked: a; b."
    assert findings_markdown(7, [], [], []) == "No open finding at step 7\n"
