"""Build steps of the documentation site (MkDocs hooks, registered in mkdocs.yml).

- The command-line reference (docs/cli.md) is rendered at build time from
  `keras_weightwatch.cli.build_parser()`: every subcommand's usage and arguments, so the
  page cannot drift from the parser, and a new subcommand appears without an edit here.
- The API reference (docs/api.md) gets an entry for every name of
  `keras_weightwatch.__all__` that the page does not already place under a heading.
- A public name without a docstring fails the build: every name of
  `keras_weightwatch.__all__`, every object the API page documents, and the public
  methods and properties those classes define.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
from typing import Any

from mkdocs.exceptions import PluginError

CLI_MARKER = "<!-- cli-reference -->"
API_MARKER = "<!-- api-reference: the rest of __all__ -->"
HELP_WIDTH = "96"  # columns argparse formats the help to (it reads $COLUMNS)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of `parser`, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser) -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return parser.format_help().rstrip() + "\n"
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def render_cli() -> str:
    """Markdown for every subcommand of `weightwatch`: its summary, usage and arguments."""
    from keras_weightwatch.cli import build_parser

    parser = build_parser()
    summaries = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help for a in action._choices_actions}
    rows = "".join(f"| [`weightwatch {n}`](#weightwatch-{n}) | {summaries.get(n) or ''} |\n"
                   for n in subcommands(parser))
    out = ["| command | what it does |\n|---|---|\n" + rows,
           "## `weightwatch`\n", "```text\n" + _help(parser) + "```\n"]
    for name, sub in subcommands(parser).items():
        out.append(f"## `weightwatch {name}`\n")
        summary = (summaries.get(name) or "").rstrip(".")
        if summary:
            out.append(summary[0].upper() + summary[1:] + ".\n")
        out.append("```text\n" + _help(sub) + "```\n")
    return "\n".join(out)


def _own_doc(obj: Any) -> str:
    """The docstring `obj` itself carries; a dataclass's generated signature is none."""
    doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
    doc = (doc or "").strip()
    name = getattr(obj, "__name__", "")
    if isinstance(obj, type) and name and doc.startswith(name + "("):
        return ""  # dataclasses write "Name(field: type, ...)" when a class has no docstring
    return doc


def _fields(cls: type) -> set[str]:
    names = set(getattr(cls, "__dataclass_fields__", {}) or {})
    names |= set(getattr(cls, "_fields", ()) or ())
    return names


def undocumented(paths: list[str]) -> list[str]:
    """Every public name among `paths` (and their classes' public members) without a docstring."""
    missing = []
    for path in paths:
        obj = resolve(path)
        if not _own_doc(obj):
            missing.append(path)
        if inspect.ismodule(obj):
            public = getattr(obj, "__all__", None) or [
                n for n, v in vars(obj).items()
                if inspect.isfunction(v) and v.__module__ == obj.__name__]
            missing += [f"{path}.{n}" for n in public
                        if not n.startswith("_") and not _own_doc(getattr(obj, n))]
            continue
        if not isinstance(obj, type):
            continue
        fields = _fields(obj)
        for name, member in vars(obj).items():
            if name.startswith("_") or name in fields:
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                doc = member.__doc__ if isinstance(member, property) else inspect.getdoc(
                    getattr(obj, name))
                if not (doc or "").strip():
                    missing.append(f"{path}.{name}")
    return missing


def resolve(path: str) -> Any:
    """The object a dotted path names: a module, or an attribute of one."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise PluginError(f"cannot import {path}")


def api_names() -> list[str]:
    """The public names of the package: `keras_weightwatch.__all__` less the version."""
    import keras_weightwatch

    return [n for n in keras_weightwatch.__all__ if n != "__version__"]


def _documented(markdown: str) -> list[str]:
    return re.findall(r"^::: ([\w.]+)", markdown, re.M)


def _api_page(markdown: str) -> str:
    listed = set(_documented(markdown))
    rest = [n for n in api_names() if f"keras_weightwatch.{n}" not in listed]
    block = "".join(f"::: keras_weightwatch.{n}\n\n" for n in rest)
    markdown = markdown.replace(API_MARKER, block)
    paths = sorted(set(_documented(markdown)) | {f"keras_weightwatch.{n}" for n in api_names()})
    missing = undocumented(paths)
    if missing:
        raise PluginError("public names without a docstring: " + ", ".join(missing))
    return markdown


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the generated parts of the CLI and API pages."""
    src = page.file.src_uri
    if src == "cli.md":
        if CLI_MARKER not in markdown:
            raise PluginError(f"docs/cli.md lost its marker {CLI_MARKER}")
        return markdown.replace(CLI_MARKER, render_cli())
    if src == "api.md":
        if API_MARKER not in markdown:
            raise PluginError(f"docs/api.md lost its marker {API_MARKER}")
        return _api_page(markdown)
    return markdown
