"""The health rules on planted pathologies and healthy trainings: the confusion table.

Every planted case of `health_cases.PLANTED` is a real Keras training with exactly one
problem planted; every healthy case (`health_cases.HEALTHY`, and the four runs of the
full `weightwatch demo`) has none. Each is trained with `health="warn"`, then judged by
`weightwatch doctor`'s `diagnose`. The table says, per case, what was planted, what was
reported (rule, layer, the step reported / the step the stored data first shows it), and
whether it is exactly right; then the confusion matrix, planted rule x reported rule.

Run:  .venv/bin/python benchmarks/bench_health.py --markdown
      (about 2 minutes on 2 cores; --no-demo leaves the demo's runs out)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import health_cases as hc
from health_verdict import Verdict, judge
from machine import machine

from keras_weightwatch.health import RULE_NAMES, diagnose


def _demo_verdicts(root: str) -> list[tuple[str, list]]:
    from keras_weightwatch.demo import run_demo

    result = run_demo(os.path.join(root, "demo"))
    return [(f"demo: {name}", diagnose(path).findings) for name, path in result.runs.items()]


def _row(v: Verdict) -> str:
    planted = f"{v.case.rule} @ {v.case.layer}" if v.case.rule else "nothing (healthy)"
    got = "; ".join(f"{f.rule} @ {f.layer}, step {f.step}" for f in v.findings) or "none"
    shows = "-" if v.shows_at is None else str(v.shows_at)
    return f"| {v.case.name} | {planted} | {got} | {shows} | {'yes' if v.ok else '**NO**'} |"


def _matrix(verdicts: list[Verdict], demo: list[tuple[str, list]]) -> list[str]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for v in verdicts:
        counts[v.case.rule or "healthy"].update([f.rule for f in v.findings] or ["none"])
    for _, findings in demo:
        counts["healthy"].update([f.rule for f in findings] or ["none"])
    cols = [r for r in RULE_NAMES if any(r in c for c in counts.values())] + ["none"]
    lines = ["| planted \\ reported | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for planted in [r for r in RULE_NAMES if r in counts] + ["healthy"]:
        cells = [str(counts[planted][c] or "") for c in cols]
        lines.append(f"| {planted} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--no-demo", action="store_true", help="leave the demo's runs out")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        verdicts = [judge(c, os.path.join(root, c.train.__name__))
                    for c in hc.PLANTED + hc.HEALTHY]
        demo = [] if args.no_demo else _demo_verdicts(root)
    print(f"{len(verdicts) + len(demo)} trainings in {time.perf_counter() - t0:.0f} s\n")
    if not args.markdown:
        for v in verdicts:
            print(f"{v.case.name}: planted {v.case.rule}, reported "
                  f"{[(f.rule, f.layer, f.step) for f in v.findings]}: {'ok' if v.ok else 'WRONG'}")
        for name, findings in demo:
            print(f"{name}: reported {[(f.rule, f.layer) for f in findings]}")
        bad = sum(not v.ok for v in verdicts) + sum(bool(d[1]) for d in demo)
        print(f"\n{bad} case(s) wrong")
        return 1 if bad else 0
    print("| case | planted | reported (rule @ layer, step) | data shows it at | exact |")
    print("|---|---|---|---|---|")
    for v in verdicts:
        print(_row(v))
    for name, findings in demo:
        got = "; ".join(f"{f.rule} @ {f.layer}" for f in findings) or "none"
        print(f"| {name} | nothing (healthy) | {got} | - | {'yes' if not findings else '**NO**'} |")
    print()
    print("\n".join(_matrix(verdicts, demo)))
    bad = [v for v in verdicts if not v.ok] + [d for d in demo if d[1]]
    print(f"\n{len(bad)} case(s) wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
