"""The benchmarks' tables in the form the docs show them (each script's `--markdown`).

A measured table is printed right under the command that produced it, so it can go into
the docs as it is: the docs right-align measured columns, and name the command beside
every table of measured numbers (tests/integration/test_doc_tables.py checks both).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Sequence


def command_line(argv: Sequence[str] | None = None) -> str:
    """This benchmark's command line as the docs write it: `python benchmarks/<script> ...`."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.basename(argv[0])
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in argv[1:])])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]],
                   label_columns: int = 1) -> str:
    """A Markdown table: the first `label_columns` columns left-aligned (what was
    measured), the others right-aligned (the numbers)."""
    align = ["---" if i < label_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        cells = [str(c) for c in row] + [""] * (len(header) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_markdown(header: Sequence[str], rows: Iterable[Sequence[object]],
                   label_columns: int = 1, note: str = "") -> None:
    """Print the command line, then the table (after a blank line, as Markdown wants)."""
    print(f"\nMeasured with `{command_line()}`{note}:\n")
    print(markdown_table(header, rows, label_columns))
