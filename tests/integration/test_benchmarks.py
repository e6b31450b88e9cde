"""The benchmark scripts keep working: each runs at a tiny size and its ratios add up.

These are not timings (the numbers at this size mean nothing); they check that the
scripts run on the current code and that each printed ratio is the quotient of the
numbers printed beside it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def run(script: str, *args: str) -> str:
    """The benchmark's output, run with `--markdown`: it ends with the docs' table, under
    the command line that produced it (tests/integration/test_doc_tables.py)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--markdown"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("machine: ") and "cores usable" in proc.stdout
    command = f"python benchmarks/{script} {' '.join(args)} --markdown".replace("  ", " ")
    table = re.search(rf"^Measured with `{re.escape(command)}`[^\n]*:\n\n"
                      r"(\|.*\|)\n(\|(?:-+:?\|)+)\n((?:\|.*\|\n?)+)", proc.stdout, re.M)
    assert table, proc.stdout[-2000:]
    header, align, body = table.groups()
    columns = header.count("|") - 1
    assert align.count("|") - 1 == columns and "-:" in align  # measured columns right-aligned
    assert all(row.count("|") - 1 == columns for row in body.strip().splitlines())
    return proc.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, pattern
    return float(m.group(1))


def test_bench_overhead_ratio_is_weightwatch_over_tensorboard():
    out = run("bench_overhead.py", "--images", "256", "--epochs", "2", "--repeats", "1")
    tb = number(r"TensorBoard\(histogram_freq=1, write_images=True\)\)?\s+[\d.]+ s: adds\s+"
                r"(-?[\d.]+) ms", out)
    ww = number(r"WeightWatch\(every view\)\s+[\d.]+ s: adds\s+(-?[\d.]+) ms", out)
    ratio = number(r"RATIO WeightWatch added / TensorBoard added \(per epoch\): (-?[\d.]+)", out)
    assert ratio == pytest.approx(ww / tb, abs=2e-3)
    # the cost measure: hooks' wall time + CPU of the threads each callback started
    tb_cost = number(r"  tensorboard\s+([\d.]+) ms  \(hooks", out)
    ww_cost = number(r"  weightwatch\s+([\d.]+) ms  \(hooks", out)
    cost_ratio = number(r"RATIO cost per epoch, WeightWatch / TensorBoard: ([\d.]+)", out)
    assert cost_ratio == pytest.approx(ww_cost / tb_cost, abs=2e-3)
    assert re.search(r"  weightwatch .*threads started: [^\n]*\bweightwatch\b", out)
    assert number(r"on_train_batch_end ([\d.]+) us per batch", out) > 0
    for hook in ("on_train_begin", "on_epoch_end", "on_train_end"):
        assert re.search(rf"  {hook}\s+[\d.]+ ms", out), hook


def test_bench_worker_stages_prints_each_stage_of_the_first_and_later_snapshots():
    out = run("bench_worker_stages.py", "--fits", "1", "--epochs", "2", "--images", "256")
    rows = {m.group(1).strip(): [float(v) for v in m.group(2).split()]
            for m in re.finditer(r"^(\S.*?\[\S+\])\s+([\d.\s]+)$", out, re.M)}
    whole = rows["snapshot: write [weightwatch]"]  # cpu, wall, faults: first, then later
    assert len(whole) == 6
    for stage in ("stats", "store", "commit"):
        part = rows[f"snapshot: {stage} [weightwatch]"]
        assert part[0] <= whole[0] + 0.1 and part[3] <= whole[3] + 0.1  # within the whole
    assert "train begin: plan [MainThread]" in rows
    assert "capture (take) [MainThread]" in rows
    assert re.search(r"  view HistogramView \[weightwatch\]", out)


def test_bench_100m_hold_memory_and_disk_lines():
    out = run("bench_100m.py", "--width", "128", "--depth", "2", "--repeats", "1",
              "--steps", "2")
    assert number(r"RATIO on_epoch_end hold / get_weights\(\): ([\d.]+)", out) >= 0
    assert number(r"RATIO worst on_epoch_end hold / warm memcpy: ([\d.]+)", out) > 0
    m = re.search(r"RATIO WeightWatch's extra memory / weight bytes: ([\d.]+)\s+\((\d+) MB / "
                  r"(\d+) MB", out)
    assert m
    # every tensor changes each epoch: each snapshot stores the weights' bytes (plus headers)
    per_snapshot = number(r"\(([\d.]+) x weight bytes each", out)
    assert 1.0 <= per_snapshot < 1.1


def test_bench_diff_runs_and_reports_memory():
    out = run("bench_diff.py", "--params", "200000")
    assert number(r"diff_runs\(a, b, match=True\): ([\d.]+) s for \d+ tensors", out) >= 0
    assert number(r"one plain numpy pass .*: ([\d.]+) s", out) > 0
    assert number(r"match=False\):\s+[\d.]+ s = ([\d.]+) x the numpy pass", out) > 0
    assert number(r"tracemalloc peak\s+([\d.]+) MiB", out) > 0


def test_bench_dashboard_times_compare_and_first_paint():
    args = ["--params", "200000"]
    if not os.path.exists("/usr/bin/chromium"):
        args.append("--no-browser")
    out = run("bench_dashboard.py", *args)
    cold = number(r"compare \(diff_runs with matching, over HTTP\): cold ([\d.]+) s", out)
    cached = number(r"cached ([\d.]+) ms", out)
    assert cold > 0 and cached > 0
    assert number(r"compare kernel grid of B, matched \(.*\), after the compare: ([\d.]+) ms",
                  out) > 0
    assert number(r"reference: diff_runs\(a, b\) in this process ([\d.]+) s", out) > 0
    if "--no-browser" not in args:
        assert number(r"fresh browser ([\d.]+) s", out) > 0


def test_bench_gradients_added_time_is_the_sum_of_its_parts():
    out = run("bench_gradients.py", "--train", "64", "--samples", "2", "--repeats", "1",
              "--backends", "tensorflow")
    parts = [float(m) for m in re.findall(
        r"  (?:vanilla|smoothgrad|gradcam|weight gradients)[^\n]*?\s([\d.]+) ms  \(first", out)]
    assert len(parts) == 4
    added = number(r"ADDED per snapshot \(saliency \+ weight gradients\): ([\d.]+) ms", out)
    assert added == pytest.approx(sum(parts), abs=0.25)
    assert number(r"forward \(64 images, inference\)\s+([\d.]+) ms", out) > 0


def _quotient_of(ratio: float, num: float, den: float, unit: float) -> bool:
    """`ratio` (printed to 0.01) is num / den, each printed to `unit`."""
    low = (num - unit / 2) / (den + unit / 2) - 0.005
    high = (num + unit / 2) / max(den - unit / 2, 1e-12) + 0.005
    return low <= ratio <= high


def test_bench_spectral_ratios_and_agreement():
    pytest.importorskip("weightwatcher")
    out = run("bench_spectral.py", "--width", "64", "--depth", "2", "--big-width", "96",
              "--big-depth", "2", "--repeats", "1")
    text, table = out.split("\nMeasured with")
    sections = text.split("\n\n")[1:]
    assert len(sections) == 3
    # the Markdown table: one row per section, its last cell the section's ours / floor
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3
    for section, row in zip(sections, rows):
        ratio = re.search(r"RATIO ours / floor: ([\d.]+)", section).group(1)
        assert row[-1] == f"**{ratio}** |"
    # the spectral view's worker CPU per snapshot: at least the metrics of the same kernels
    worker = number(r"WORKER spectral view, reference CNN: ([\d.]+) ms CPU", sections[1])
    assert worker > 0
    for section in sections:
        ours = number(r"ours \(tensor_spectral per kernel\)\s+([\d.]+) ms CPU", section)
        floor = number(r"floor \(float64 Gram \+ eigvalsh\)\s+([\d.]+) ms CPU", section)
        assert _quotient_of(number(r"RATIO ours / floor: ([\d.]+)", section), ours, floor, 0.01)
    for section in sections[:2]:
        ours = number(r"ours \(tensor_spectral per kernel\)\s+([\d.]+) ms CPU", section)
        ww = number(r"weightwatcher analyze\(\)\s+([\d.]+) ms CPU", section)
        assert _quotient_of(number(r"RATIO weightwatcher / ours: ([\d.]+)", section),
                            ww, ours, 0.01)
        for column in ("spectral_norm", "stable_rank", "log_norm", "alpha", "alpha_weighted"):
            assert number(rf"{column} ([\d.e+-]+)", section) < 1e-5, column


def test_bench_write_ratio_is_runwriter_over_plain_writes():
    out = run("bench_write.py", "--width", "64", "--depth", "2", "--repeats", "1", "--profile")
    raw = number(r"write\+fsync per tensor: median ([\d.]+) s", out)
    ours = number(r"RunWriter snapshot:\s+median ([\d.]+) s", out)
    ratio = number(r"RATIO RunWriter / write\+fsync per tensor: ([\d.]+)", out)
    assert _quotient_of(ratio, ours, raw, 0.001)  # each time printed to a millisecond
    assert "profile, reference CNN: 2,004,106 parameters" in out
    buffered = number(r"buffered, pages handed back ([\d.]+) ms;", out)
    direct = number(r"past the page cache \(O_DIRECT\) ([\d.]+) ms", out)
    assert _quotient_of(number(r"RATIO buffered / past the page cache: ([\d.]+)", out),
                        buffered, direct, 0.1)


def test_bench_long_run_compares_the_index_with_the_snapshot_files():
    out = run("bench_long_run.py", "--snapshots", "20", "--repeats", "1")
    assert "run: 20 snapshots of 4 tensors" in out
    # (at this size the times round to a millisecond or two: only their presence is checked)
    assert number(r"load_run\s+with index\s+([\d.]+) s", out) >= 0
    assert number(r"weightwatch show\s+with index\s+([\d.]+) s", out) > 0
    assert number(r"RATIO load_run without / with index: ([\d.]+)", out) > 0
    assert number(r"RATIO show without / with index: ([\d.]+)", out) > 0


def test_bench_growth_table_grows_with_parameters():
    out = run("bench_growth.py", "--params", "1e4,1e5", "--repeats", "1", "--no-tensorboard")
    rows = re.findall(r"^\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+[\d.]+", out, re.M)
    assert len(rows) == 2
    (p1, b1, _), (p2, b2, _) = [(int(p.replace(",", "")), int(b.replace(",", "")), x)
                                for p, b, x in rows]
    # every tensor changes: a snapshot stores at least the weights' 4 bytes per parameter
    assert b1 >= 4 * p1 and b2 >= 4 * p2
    # the fit's columns: a hold, the worker's CPU and the event file's growth per snapshot
    fits = re.findall(r"^\s+[\d,]+\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)"
                      r"\s+([\d,]+)\s+nan$", out, re.M)
    assert len(fits) == 2
    for hold, worker, events in fits:
        assert float(hold) > 0 and float(worker) > 0 and int(events.replace(",", "")) > 0
    assert re.search(r"^GROWTH .* hold x[\d.]+, worker CPU x[\d.]+, event bytes x[\d.]+", out,
                     re.M)


def test_bench_object_storage_prints_both_places_and_their_ratio():
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    out = run("bench_object_storage.py", "--model", "dense", "--width", "64", "--depth", "2",
              "--epochs", "2", "--repeats", "1")
    local = number(r"local disk\s+worker\s+([\d.]+) ms/snapshot", out)
    s3 = number(r"S3 \(moto\)\s+worker\s+([\d.]+) ms/snapshot", out)
    ratio = number(r"RATIO S3 worker time / local disk worker time: ([\d.]+)", out)
    assert ratio == pytest.approx(s3 / local, rel=0.05, abs=0.01)


def test_bench_lora_frozen_base_is_stored_and_hashed_once():
    out = run("bench_lora.py", "--params", "200000", "--width", "128", "--epochs", "3",
              "--markdown")

    def count(pattern: str) -> float:
        return number(pattern, out.replace(",", ""))

    for measure, unit, places in (("hold", " ms", 0.01), ("worker CPU", " ms", 0.01),
                                  ("bytes written", "", 1)):
        m = re.search(rf"    {measure} ([\d.,]+){unit}[^:]*?, [a-z ]+ ([\d.,]+){unit}: "
                      r"RATIO ([\d.]+)", out)
        assert m, measure
        num, den, ratio = (float(g.replace(",", "")) for g in m.groups())
        assert _quotient_of(ratio, num, den, places), measure
    # every snapshot after the first writes the adapters (they train) and hashes only them:
    # the frozen base is neither hashed nor written again (12 base kernels of 128 x 128)
    adapters = count(r"bytes written \d+ adapters (\d+):")
    assert adapters == 12 * 2 * 128 * 8 * 4
    assert adapters <= count(r"hashed per snapshot (\d+) bytes") < adapters + 128 * 128 * 4
    assert count(r"bytes written (\d+)") >= adapters
    assert "each of the 12 base kernels in one file" in out
    rows = re.findall(r"^\| 196,608 \| 24,576 \| .*\*\*([\d.]+)\*\* \|$", out, re.M)
    assert len(rows) == 1
