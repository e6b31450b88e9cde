"""Every table of measured numbers in the docs names the command that produced it.

Which tables are measurements: the docs right-align the columns of numbers a benchmark
measured (`---:` in the table's delimiter row), and left-align reference tables (options,
tags, fields, support matrices, what-is-where). So a table with a right-aligned column is
a table of measured numbers, and it must name its command: `python benchmarks/bench_<name>.py
[arguments]` (any `python`, e.g. `.venv/bin/python`), or `weightwatch ...` for a table of
the command line's own output, in the paragraph right above the table or right after it.
Each benchmark named
exists, accepts the options it is given, and can print its table as Markdown
(`--markdown`). A left-aligned table that still holds several timings or sizes (a number
with ms, s, us, MB, GB ...) is taken for a measured table that lost its alignment, and fails.

No benchmark runs here: this reads README.md and docs/*.md, and the benchmarks' sources.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT)
                             for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
COMMAND = re.compile(r"python\S*\s+benchmarks/bench_\w+\.py|`weightwatch [a-z]+[^`]*`")
QUANTITY = re.compile(r"\b\d[\d,.]*\s?(?:ns|us|µs|ms|s|min|KB|MB|GB|MiB|GiB)\b")


def _lines(path: str) -> list[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    # fenced blocks are no tables: blank them, keeping the line numbers
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.S | re.M).splitlines()


def tables(path: str):
    """(first line, last line, lines) of every Markdown table of a page."""
    lines = _lines(path)
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            yield i, j - 1, lines
            i = j
        else:
            i += 1


def measured(lines: list[str], start: int) -> bool:
    return "-:" in lines[start + 1]


def context(lines: list[str], start: int, end: int) -> str:
    """The paragraph right above the table and the paragraph right after it."""
    def paragraph(i: int, step: int) -> list[str]:
        while 0 <= i < len(lines) and not lines[i].strip():
            i += step
        out = []
        while (0 <= i < len(lines) and lines[i].strip()
               and not lines[i].startswith(("#", "|"))):
            out.append(lines[i])
            i += step
        return out

    return "\n".join(paragraph(start - 1, -1)[::-1] + paragraph(end + 1, 1))


def all_tables():
    for path in DOCS:
        for start, end, lines in tables(path):
            yield path, start, end, lines


def test_the_docs_have_measured_and_reference_tables():
    kinds = [measured(lines, start) for _, start, _, lines in all_tables()]
    assert kinds.count(True) >= 7 and kinds.count(False) >= 10


@pytest.mark.parametrize("path", DOCS)
def test_each_measured_table_names_the_command_that_produced_it(path):
    missing = []
    for start, end, lines in tables(path):
        if measured(lines, start) and not COMMAND.search(context(lines, start, end)):
            missing.append(f"{path}:{start + 1}: {lines[start][:80]}")
    assert missing == []


@pytest.mark.parametrize("path", DOCS)
def test_a_table_of_timings_is_aligned_as_measured(path):
    for start, end, lines in tables(path):
        cells = [c for row in lines[start + 2:end + 1] for c in row.split("|")[1:-1]]
        timings = [c for c in cells if QUANTITY.search(re.sub(r"`[^`]*`", "", c))]
        assert measured(lines, start) or len(timings) < 2, (path, start + 1, timings)


def _options(script: str) -> set[str]:
    with open(os.path.join(ROOT, "benchmarks", script), encoding="utf-8") as f:
        return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", f.read()))


def test_the_commands_the_docs_name_exist_with_those_options():
    named = 0
    for path in DOCS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        for script, args in re.findall(r"python\S*\s+benchmarks/(bench_\w+\.py)([^`\n]*)", text):
            assert os.path.exists(os.path.join(ROOT, "benchmarks", script)), (path, script)
            given = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args))
            assert given <= _options(script), (path, script, given - _options(script))
            named += 1
    assert named >= 8


def test_every_benchmark_prints_its_table_as_markdown():
    scripts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks",
                                                                         "bench_*.py")))
    assert len(scripts) >= 10
    assert [s for s in scripts if "--markdown" not in _options(s)] == []
