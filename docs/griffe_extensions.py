"""Griffe extensions for the API reference (mkdocs.yml lists them).

- `DoctestFences`: the package's docstrings show examples as doctests (`>>>` lines and
  their output) inside free text such as "Example (the README's quickstart run):".
  Markdown would read those lines as prose, so each run of doctest lines is fenced as a
  `pycon` block first.
- `SettingsDefaults`: `WeightWatch`'s signature takes each default from the settings
  record (`freq: int = S.freq`, one source for each); the reference shows the value.
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


class SettingsDefaults(griffe.Extension):
    """Shows a default written `S.<option>` as the settings record's value for it."""

    def on_object(self, *, obj: griffe.Object, loader: Any, **kwargs: Any) -> None:
        """Replace each `S.<option>` default of a function's parameters by its value."""
        if not isinstance(obj, griffe.Function):
            return
        from keras_weightwatch.settings import Settings

        for parameter in obj.parameters:
            text = str(parameter.default) if parameter.default is not None else ""
            name = text[2:]
            if text.startswith("S.") and name.isidentifier() and hasattr(Settings, name):
                parameter.default = repr(getattr(Settings, name))
