"""The `weightwatch` command line: parses arguments and renders library results.

Each command is an `_add_<name>(subparsers)` function that registers its
arguments and sets `func`, a function of the parsed arguments that prints
its result and returns the exit code. User errors (a missing run, a damaged
file) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TextIO

from . import _version
from .errors import WeightWatchError
from .store import Run, load_run, verify_run

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and found a problem (verify)
EXIT_ERROR = 2  # bad input: usage, a missing or unreadable run


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_num(x: float) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))
    return f"{x:.3e}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str], right: Sequence[int] = ()) -> str:
    """A plain-text table with a header row; columns in `right` are right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_show(run: Run) -> str:
    """The text of `weightwatch show RUN`."""
    v = run.versions
    m = run.model
    out = [f"run       {run.path}"]
    out.append(
        f"written   keras-weightwatch {v.get('keras_weightwatch', '?')}, "
        f"keras {v.get('keras', '?')}, "
        f"backend {v.get('backend', '?')} {v.get('backend_version', '')}".rstrip()
    )
    out.append(
        f"model     {m.get('name', '?')} ({m.get('class_name', '?')}): "
        f"{_fmt_int(int(m.get('total_params', 0)))} parameters, "
        f"{_fmt_int(int(m.get('trainable_params', 0)))} trainable, "
        f"{_fmt_int(int(m.get('non_trainable_params', 0)))} non-trainable"
    )
    names = [s.name for s in run.snapshots]
    out.append(f"snapshots {len(names)}: {', '.join(names) if names else '(none complete yet)'}")
    lossy = {r.stored_dtype for s in run.snapshots for r in s.tensors.values() if r.lossy}
    if lossy:
        out.append(
            f"precision LOSSY: float weights stored as {', '.join(sorted(lossy))} "
            "(values differ from the model's)"
        )
    out.append("")
    out.append("layers")
    out.append(
        table(
            [(layer.name, layer.class_name, _fmt_int(layer.params)) for layer in run.layers],
            ["name", "class", "params"],
            right=[2],
        )
    )
    out.append("")
    out.append("weights")
    out.append(
        table(
            [
                (s.key, "(" + ", ".join(map(str, s.shape)) + ")", s.dtype,
                 "yes" if s.trainable else "no", _fmt_int(s.size))
                for s in run.specs
            ],
            ["key", "shape", "dtype", "trainable", "params"],
            right=[4],
        )
    )
    history = run.history()
    if history:
        metrics = sorted(history)
        rows = []
        for s in run.snapshots:
            rows.append([s.name] + [_fmt_num(s.logs[k]) if k in s.logs else "-" for k in metrics])
        out.append("")
        out.append("metrics")
        out.append(table(rows, ["step"] + metrics, right=list(range(1, len(metrics) + 1))))
    return "\n".join(out)


def _cmd_show(args: argparse.Namespace, stdout: TextIO) -> int:
    print(render_show(load_run(args.run)), file=stdout)
    return EXIT_OK


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="list a run's snapshots, layers, shapes and metrics")
    p.add_argument("run", help="run directory (the callback's log_dir)")
    p.set_defaults(func=_cmd_show)


def _cmd_verify(args: argparse.Namespace, stdout: TextIO) -> int:
    report = verify_run(args.run)
    for line in report.problems:
        print(f"DAMAGED {line}", file=stdout)
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(
        f"{status}: {report.snapshots} snapshots, {report.files} tensor files checked "
        f"in {report.path}",
        file=stdout,
    )
    return EXIT_OK if report.ok else EXIT_FAILED


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-check every checksum; exit 1 naming each damaged file")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=_cmd_verify)


def _cmd_demo(args: argparse.Namespace, stdout: TextIO) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up notes quiet
    from . import demo

    try:
        result = demo.run_demo(args.logdir, quick=args.quick, progress=stdout)
    except ImportError as e:
        if demo.EXTRA_HINT not in str(e):
            raise
        raise WeightWatchError(str(e)) from e
    print(file=stdout)
    print(demo.render_result(result), file=stdout)
    return EXIT_OK


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train small models on scikit-learn's bundled data into runs to view (no downloads)",
    )
    p.add_argument("--logdir", default="weightwatch-demo",
                   help="where the runs go (default: ./weightwatch-demo)")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds of training instead of about a minute (for tests)")
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightwatch",
        description="Show, verify and compare runs written by keras_weightwatch.WeightWatch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_show, _add_verify, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 a check failed, 2 bad input)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its usage message
        return EXIT_ERROR if e.code not in (0, None) else EXIT_OK
    try:
        return int(args.func(args, stdout))
    except WeightWatchError as e:
        print(f"weightwatch: error: {e}", file=stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
