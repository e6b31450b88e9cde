"""The query parameters of the dashboard's routes: parsed, bounded and checked.

Every route reads its parameters through these functions, so a malformed or
oversized value is refused with the same kind of error (`BadRequest`, HTTP 400)
before any file is touched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import received

MAX_QUERY_BYTES = 4096
"""The longest query string any route accepts."""
MAX_VALUE_CHARS = 1024
"""The longest value of one parameter."""

_STEP_RE = re.compile(r"^(initial|last|-?\d{1,12})$")


class BadRequest(ValueError):
    """A query parameter is missing, malformed, too long or names nothing there is (HTTP 400)."""


@dataclass(frozen=True)
class Pair:
    """Two snapshots to compare: run A at step A, run B at step B."""

    run_a: str
    step_a: str
    run_b: str
    step_b: str


def check_query(query_string: bytes | str) -> None:
    """Refuse a query string longer than `MAX_QUERY_BYTES`."""
    if len(query_string) > MAX_QUERY_BYTES:
        raise BadRequest(
            f"the query string is {len(query_string)} bytes; at most {MAX_QUERY_BYTES} "
            f"are accepted. Received: query={str(query_string)[:60]!r}..."
        )


def text(args: Mapping[str, str], name: str, default: str | None = None) -> str:
    """A required (or defaulted) text parameter, at most `MAX_VALUE_CHARS` long, no NUL."""
    value = args.get(name, default)
    if value is None:
        raise BadRequest(f"the parameter {name!r} is required. {received(name, None)}")
    if len(value) > MAX_VALUE_CHARS or "\x00" in value:
        raise BadRequest(
            f"{name} must be text of at most {MAX_VALUE_CHARS} characters without NUL. "
            f"{received(name, value[:60])}"
        )
    return value


def run_name(args: Mapping[str, str], name: str = "run") -> str:
    """A run's name: a relative path inside the log directory, with no `..`, `.` or `\\`."""
    value = text(args, name)
    if value == ".":  # the log directory itself is a run
        return value
    parts = value.split("/")
    if (
        not value
        or value.startswith("/")
        or "\\" in value
        or os.path.isabs(value)
        or any(p in ("", ".", "..") for p in parts)
        or re.match(r"^[A-Za-z]:", value)
    ):
        raise BadRequest(
            "a run is named by its relative path inside the log directory "
            f"(no '..', '.', empty or absolute parts, no backslash). {received(name, value)}"
        )
    return value


def step(args: Mapping[str, str], name: str = "step", default: str = "last") -> str:
    """`initial`, `last` or an integer step."""
    value = text(args, name, default)
    if not _STEP_RE.match(value):
        raise BadRequest(
            f"{name} must be 'initial', 'last' or an integer step. {received(name, value)}"
        )
    return value


def index(args: Mapping[str, str], name: str, default: int = 0) -> int:
    """An integer index >= 0 of at most 6 digits."""
    value = text(args, name, str(default))
    if not re.match(r"^\d{1,6}$", value):
        raise BadRequest(f"{name} must be an integer index >= 0. {received(name, value)}")
    return int(value)


def choice(args: Mapping[str, str], name: str, options: tuple[str, ...]) -> str:
    """One of `options` (the first is the default)."""
    value = text(args, name, options[0])
    if value not in options:
        raise BadRequest(f"{name} must be one of {list(options)}. {received(name, value)}")
    return value


def pair(args: Mapping[str, str]) -> Pair:
    """Runs `a` and `b` (b defaults to a) at steps `sa` and `sb`."""
    run_a = run_name(args, "a")
    run_b = run_name(args, "b") if "b" in args else run_a
    return Pair(run_a, step(args, "sa"), run_b, step(args, "sb"))
