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
from .compare.records import DEFAULT_MAX_MATCH_UNITS
from .errors import WeightWatchError
from .report import render_diff, render_drift, render_show
from .run import load_run, verify_run

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and found a problem (verify; doctor: a finding of severity error)
EXIT_ERROR = 2  # bad input: usage, a missing or unreadable run
DEMO_LOGDIR = "weightwatch-demo"  # `demo.run_demo`'s default too (demo is imported lazily)


def _cmd_show(args: argparse.Namespace, stdout: TextIO) -> int:
    from .run.index import no_collection

    with no_collection():  # a long run's records form no cycles; collecting walks them all
        text = render_show(load_run(args.run))
    print(text, file=stdout)
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
        demo.run_and_print(args.logdir, quick=args.quick, stdout=stdout)
    except ImportError as e:
        if demo.EXTRA_HINT not in str(e):
            raise
        raise WeightWatchError(str(e)) from e
    return EXIT_OK


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train small models on scikit-learn's bundled data into runs to view (no downloads)",
    )
    p.add_argument("--logdir", default=DEMO_LOGDIR,
                   help=f"where the runs go (default: ./{DEMO_LOGDIR})")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds of training instead of about a minute (for tests)")
    p.set_defaults(func=_cmd_demo)


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

    from .compare import EXTRA_HINT, diff_runs
    from .diff_images import write_diff_images

    try:
        result = diff_runs(
            args.a, args.b, tolerance=args.tolerance, layer=args.layer, match=not args.no_match,
            max_match_units=args.max_match_units, top_k=args.top_k,
            fixed_units=tuple(args.fixed or ()),
        )
        tags = None
        if args.images:
            tags = write_diff_images(args.a, args.b, args.images, layer=args.layer,
                                     match=not args.no_match,
                                     diff=None if args.no_match else result)
    except ImportError as e:
        if EXTRA_HINT not in str(e):
            raise
        raise WeightWatchError(str(e)) from e
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False), file=stdout)
    else:
        print(render_diff(result), file=stdout)
        if tags:
            print(f"\nkernel images: tensorboard --logdir {args.images}", file=stdout)
        elif tags is not None:
            print("\nkernel images: nothing to draw: A and B share no convolution kernel "
                  f"of the same shape; {args.images} not written", file=stdout)
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
    p.add_argument("--max-match-units", type=_positive_int, default=DEFAULT_MAX_MATCH_UNITS,
                   metavar="N", help="match only layers with at most N units "
                   f"(default: {DEFAULT_MAX_MATCH_UNITS})")
    p.add_argument("--fixed", action="append", metavar="LAYER",
                   help="never permute this layer's units (repeatable); the model's outputs "
                   "are always kept in order")
    p.add_argument("--images", metavar="DIR",
                   help="write A's, B's and B-A's kernel grids of each conv layer to a new "
                   "TensorBoard run directory DIR")
    p.set_defaults(func=_cmd_diff)


def _cmd_drift(args: argparse.Namespace, stdout: TextIO) -> int:
    import json

    from .compare import drift

    result = drift(args.run, layer=args.layer)
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


def _cmd_spectral(args: argparse.Namespace, stdout: TextIO) -> int:
    import json

    from .compare.inputs import open_snapshot
    from .report import render_spectral

    run, snap = open_snapshot(args.run, None)
    result = run.spectral(snap.step, traps=args.traps)
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False), file=stdout)
    else:
        print(render_spectral(result), file=stdout)
    return EXIT_OK


def _add_spectral(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spectral",
        help="weightwatcher's spectral metrics (alpha, stable rank, ...) of every kernel",
        description="Compute the spectral metrics of every Dense and convolution kernel of a "
        "snapshot from its stored tensors (any run, with or without spectral_freq). RUN may "
        "end in @STEP (an epoch step, 'initial' or 'last'; default: the last snapshot).",
    )
    p.add_argument("run", help="run directory, as RUN or RUN@STEP")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (NaN and Inf as null)")
    p.add_argument("--traps", action="store_true",
                   help="also count correlation traps (eigenvalues of the element-wise "
                   "shuffled matrix above the Marchenko-Pastur edge; about twice the time)")
    p.set_defaults(func=_cmd_spectral)


def _cmd_doctor(args: argparse.Namespace, stdout: TextIO) -> int:
    import json

    from .health import diagnose
    from .report import render_doctor

    diagnosis = diagnose(load_run(args.run))
    if args.json:
        print(json.dumps(diagnosis.to_json(), indent=1), file=stdout)
    else:
        print(render_doctor(diagnosis), file=stdout)
    return EXIT_FAILED if diagnosis.errors else EXIT_OK


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="the health rules on every snapshot of a run; exit 1 on a finding of severity error",
        description="Judge every snapshot of a run with the health rules (non-finite and "
        "exploding weights, layers not learning, update ratios too large, vanishing or "
        "exploding gradients, dead units, unbroken symmetry, LoRA adapters that do not move, "
        "spectral warnings), from what the run stores: runs written before the rules existed "
        "too. Exit status: 0 no finding of severity error (warnings are printed), 1 at least "
        "one error, 2 usage errors (a missing or unreadable run).",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document: the findings, the notes, healthy/errors")
    p.set_defaults(func=_cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightwatch",
        description="Show, verify and compare runs written by keras_weightwatch.WeightWatch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_show, _add_verify, _add_diff, _add_drift, _add_spectral, _add_doctor,
                _add_demo):
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
