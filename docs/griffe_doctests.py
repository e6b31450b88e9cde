"""A Griffe extension for the API reference: doctest examples render as code.

The package's docstrings show examples as doctests (`>>>` lines and their output) inside
free text such as "Example (the README's quickstart run):". Markdown would read those
lines as prose, so each run of doctest lines is fenced as a `pycon` block first.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """`text` with each block of doctest lines (a `>>>` line up to a blank line) fenced."""
    out: list[str] = []
    block: list[str] = []
    indent = ""

    def close() -> None:
        if block:
            out.extend([indent + "```pycon", *block, indent + "```"])
            block.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>") and not block:
            indent = line[: len(line) - len(line.lstrip())]
            if out and out[-1].strip():
                out.append("")
            block.append(line)
        elif block and stripped:
            block.append(line)
        else:
            close()
            out.append(line)
    close()
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fences the doctest examples of every docstring Griffe loads."""

    def on_object(self, *, obj: griffe.Object, loader: Any, **kwargs: Any) -> None:
        """Rewrite `obj`'s docstring with its doctests fenced."""
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            inside = obj.docstring.value.count("```")
            if inside == 0:
                obj.docstring.value = fence_doctests(obj.docstring.value)
