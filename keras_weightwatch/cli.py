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
from .run import Run, load_run, verify_run

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


def _count(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0


def _non_finite_lines(run: Run, limit: int = 10) -> list[str]:
    """`NON-FINITE` lines: each snapshot's weights holding NaN or Inf (from the stored stats)."""
    found = []
    for snap in run.snapshots:
        for key, st in snap.stats.items():
            nan, inf = _count(st.get("nan_count")), _count(st.get("inf_count"))
            if nan or inf:
                found.append(f"{snap.name}: {key} ({nan} NaN, {inf} Inf)")
    if not found:
        return []
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return [f"NON-FINITE weights hold NaN/Inf in {len(found)} tensor snapshots: "
            + "; ".join(found[:limit]) + more]


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
    out.extend(_non_finite_lines(run))
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


# --------------------------------------------------------------------------- diff and drift

_SPARKS = "▁▂▃▄▅▆▇█"
_WIDTH = 80


def _fmt_g(x: float | None, digits: int = 4) -> str:
    if x is None:
        return ""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _fmt_cos(x: float | None) -> str:
    if x is None:
        return ""
    return "nan" if math.isnan(x) else f"{x:.4f}"


def _fit(name: str, width: int) -> str:
    """`name`, shortened from the left with `…` to at most `width` characters."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _shape_text(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def render_diff(result) -> str:
    """The text of `weightwatch diff A B`: layers most changed first, in 80 columns.

    Args:
        result: A `diff.DiffResult`.

    Returns:
        The text (no trailing newline).
    """
    cols = [("rel_l2", 8), ("cosine", 7), ("matched", 7), ("max|B-A|", 9), ("rms", 9)]
    name_w = _WIDTH - sum(w + 2 for _, w in cols)
    counts = result.counts()
    out = [f"A  {result.a}", f"B  {result.b}"]
    summary = (
        f"{len(result.tensors)} tensors: {counts['changed']} changed, "
        f"{counts['unchanged']} unchanged"
    )
    for status, words in (("only_a", "only in A"), ("only_b", "only in B"),
                          ("shape_changed", "shape changed")):
        if counts[status]:
            summary += f", {counts[status]} {words}"
    if result.tolerance:
        summary += f" (tolerance {_fmt_g(result.tolerance)})"
    nonfinite = [t for t in result.tensors if t.nonfinite_a or t.nonfinite_b]
    if nonfinite:
        summary += f"; NON-FINITE values in {len(nonfinite)}"
    out += [summary, ""]
    head = "weight".ljust(name_w) + "".join("  " + h.rjust(w) for h, w in cols)
    out += [head, "-" * name_w + "".join("  " + "-" * w for _, w in cols)]

    def row(name: str, values: Sequence[str]) -> str:
        cells = "".join("  " + v.rjust(w) for v, (_, w) in zip(values, cols))
        return (_fit(name, name_w).ljust(name_w) + cells).rstrip()

    def note(name: str, text: str) -> str:
        return (_fit(name, name_w).ljust(name_w) + "  " + text).rstrip()

    for layer in result.layers:
        if layer.unchanged:
            identical = all(t.identical for t in layer.tensors)
            out.append(note(layer.name or "(model)",
                            "identical" if identical else "unchanged (within tolerance)"))
            for t in layer.tensors:
                if t.nonfinite_a or t.nonfinite_b:
                    out.append(f"      NON-FINITE: {t.name} holds {t.nonfinite_a} NaN/Inf in A, "
                               f"{t.nonfinite_b} in B")
            continue
        out.append(row(layer.name or "(model)", [
            _fmt_g(layer.rel_l2), _fmt_cos(layer.cosine), _fmt_cos(layer.matched_cosine), "", "",
        ]))
        for t in layer.tensors:
            name = "  " + t.name
            if t.status == "only_a":
                out.append(note(name, f"only in A {_shape_text(t.shape_a)}"))
            elif t.status == "only_b":
                out.append(note(name, f"only in B {_shape_text(t.shape_b)}"))
            elif t.status == "shape_changed":
                out.append(note(name, f"shape {_shape_text(t.shape_a)} -> "
                                      f"{_shape_text(t.shape_b)}"))
            elif t.unchanged:
                out.append(note(name, "identical" if t.identical else
                                f"unchanged (max|B-A| {_fmt_g(t.max_abs)})"))
            else:
                out.append(row(name, [
                    _fmt_g(t.rel_l2), _fmt_cos(t.cosine), _fmt_cos(t.matched_cosine),
                    _fmt_g(t.max_abs), _fmt_g(t.rms),
                ]))
                if t.units_moved:
                    out.append(f"      the best matching moves {t.units_moved} units")
            if t.nonfinite_a or t.nonfinite_b:
                out.append(f"      NON-FINITE: {t.nonfinite_a} NaN/Inf in A, "
                           f"{t.nonfinite_b} in B")
    out += ["", "rel_l2 = ||B-A|| / ||A||; matched = cosine after the best one-to-one matching",
            "of units (kernels) of B to A's"]
    if result.features is not None:
        f = result.features
        out += ["", f"top {f.k} input features of {f.key_b} by |weight|, A -> B"
                + ("" if f.units == 1 else f" (L2 norm over {f.units} units)")]
        frows = []
        for r in f.rows:
            move = "=" if r.move == 0 else f"{r.move:+d}"
            flip = ""
            if r.sign_flips:
                flip = "flipped" if f.units == 1 else f"{r.sign_flips} units flipped"
            frows.append([r.name, str(r.rank_a), str(r.rank_b), move, _fmt_g(r.weight_a),
                          _fmt_g(r.weight_b), flip])
        out.append(table(frows, ["feature", "rank A", "rank B", "move", "weight A", "weight B",
                                 "sign"], right=[1, 2, 3, 4, 5]))
    return "\n".join(out)


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """Unicode bars for `values` scaled to their largest finite value; NaN and Inf as `!`.

    More values than `width` are binned (the largest of each bin is drawn).

    Example:

    >>> sparkline([0.0, 0.5, 1.0])
    '▁▅█'
    """
    vals = [float(v) for v in values]
    if len(vals) > width:
        n = len(vals)
        bins = [vals[i * n // width:(i + 1) * n // width] for i in range(width)]
        vals = [max(b, key=lambda v: (math.isfinite(v), v)) if b else 0.0 for b in bins]
    finite = [v for v in vals if math.isfinite(v)]
    top = max(finite, default=0.0)
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append("!")
        elif top <= 0:
            out.append(_SPARKS[0])
        else:
            out.append(_SPARKS[min(len(_SPARKS) - 1, int(round(v / top * (len(_SPARKS) - 1))))])
    return "".join(out)


def render_drift(result) -> str:
    """The text of `weightwatch drift RUN`: per layer, change per step and since the start.

    Args:
        result: A `diff.DriftResult`.

    Returns:
        The text (no trailing newline).
    """
    steps = list(result.steps)
    first = steps[0]
    out = [f"run        {result.path}", f"snapshots  {len(steps)}: {', '.join(steps)}"]
    out.append("per step   ||W_t - W_prev|| / ||W_prev||, each layer's tensors together")
    out.append(f"from {first}".ljust(11)
               + f"||W_t - W_{first}|| / ||W_{first}|| at the last snapshot")
    out.append("")
    spark_w = min(24, max(8, len(steps) - 1))
    cols = [("per step", spark_w), ("last", 9), ("max", 9), (f"from {first}", 12)]
    name_w = _WIDTH - sum(w + 2 for _, w in cols)
    out.append("layer".ljust(name_w) + "".join(
        "  " + (h.ljust(w) if i == 0 else h.rjust(w)) for i, (h, w) in enumerate(cols)))
    out.append("-" * name_w + "".join("  " + "-" * w for _, w in cols))
    for layer in result.layers:
        ch = list(layer.step_change)
        finite = [v for v in ch if not math.isnan(v)]
        cells = [sparkline(ch, spark_w).ljust(spark_w), _fmt_g(ch[-1]).rjust(9),
                 _fmt_g(max(finite) if finite else math.nan).rjust(9),
                 _fmt_g(layer.from_initial[-1]).rjust(12)]
        out.append((_fit(layer.name or "(model)", name_w).ljust(name_w)
                    + "".join("  " + c for c in cells)).rstrip())
    return "\n".join(out)


def _layer_regex(text: str) -> str:
    import re

    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None
    return text


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1: {text!r}")
    return value


def _cmd_diff(args: argparse.Namespace, stdout: TextIO) -> int:
    import json

    from . import diff

    try:
        result = diff.diff_runs(
            args.a, args.b, tolerance=args.tolerance, layer=args.layer, match=not args.no_match,
            max_match_units=args.max_match_units, top_k=args.top_k,
        )
        if args.images:
            diff.write_diff_images(args.a, args.b, args.images, layer=args.layer)
    except ImportError as e:
        if diff.EXTRA_HINT not in str(e):
            raise
        raise WeightWatchError(str(e)) from e
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False), file=stdout)
    else:
        print(render_diff(result), file=stdout)
        if args.images:
            print(f"\nkernel images: tensorboard --logdir {args.images}", file=stdout)
    return EXIT_OK


def _add_diff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diff",
        help="compare the weights of two runs, or of two epochs of one run",
        description="Compare every weight tensor of A with B. A and B are run directories, "
        "each optionally with @STEP (an epoch step, 'initial' or 'last'; default: the last "
        "snapshot), e.g. 'weightwatch diff runs/a runs/b' or "
        "'weightwatch diff runs/a@initial runs/a@3'.",
    )
    p.add_argument("a", help="run A, as RUN or RUN@STEP")
    p.add_argument("b", help="run B, as RUN or RUN@STEP")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--layer", type=_layer_regex, metavar="REGEX",
                   help="only weights whose key matches this regular expression")
    p.add_argument("--tolerance", type=_non_negative, default=0.0, metavar="T",
                   help="a tensor with max|B-A| <= T counts as unchanged (default: 0)")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                   help="rows of the named-feature comparison (default: the run's top_k)")
    p.add_argument("--no-match", action="store_true",
                   help="skip the matching of units (no scipy needed)")
    p.add_argument("--max-match-units", type=_positive_int, default=2048, metavar="N",
                   help="match only layers with at most N units (default: 2048)")
    p.add_argument("--images", metavar="DIR",
                   help="write A's, B's and B-A's kernel grids of each conv layer to a new "
                   "TensorBoard run directory DIR")
    p.set_defaults(func=_cmd_diff)


def _cmd_drift(args: argparse.Namespace, stdout: TextIO) -> int:
    import json

    from . import diff

    result = diff.drift(args.run, layer=args.layer)
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False), file=stdout)
    else:
        print(render_drift(result), file=stdout)
    return EXIT_OK


def _add_drift(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "drift", help="per layer, the change between successive snapshots and since the first"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--layer", type=_layer_regex, metavar="REGEX",
                   help="only weights whose key matches this regular expression")
    p.set_defaults(func=_cmd_drift)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightwatch",
        description="Show, verify and compare runs written by keras_weightwatch.WeightWatch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_show, _add_verify, _add_diff, _add_drift, _add_demo):
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
