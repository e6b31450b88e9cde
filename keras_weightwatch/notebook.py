"""HTML summaries of a `Run` and a `DiffResult`, for Jupyter (`_repr_html_`)."""

from __future__ import annotations

import html
from typing import Any

from .textfmt import nonfinite_text

# `Run` and `DiffResult` call these from their `_repr_html_`; they are typed `Any` here so
# that this module imports neither (no cycle run <-> notebook <-> compare).
Run = Any
DiffResult = Any

MAX_ROWS = 50
"""Rows a summary table shows before it says how many it left out."""


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    text = nonfinite_text(x)
    return f"{x:.6g}" if text is None else text


def _table(head: list[str], rows: list[list[str]], total: int) -> str:
    e = html.escape
    out = ["<table><thead><tr>", *[f"<th>{e(h)}</th>" for h in head], "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    if total > len(rows):
        out.append(f"<p>… and {total - len(rows)} more</p>")
    return "".join(out)


def run_html(run: Run) -> str:
    """The run's path, snapshots, last metrics and weights, as an HTML table."""
    snaps = run.snapshots
    logs = run.logs() if snaps else {}
    last = snaps[-1] if snaps else None
    rows = []
    for spec in run.specs[:MAX_ROWS]:
        st = last.stats.get(spec.key, {}) if last is not None else {}
        rows.append([spec.key, "×".join(map(str, spec.shape)) or "scalar", spec.dtype,
                     _num(st.get("l2_norm")), _num(st.get("update_ratio"))])
    steps = ", ".join(s.name for s in snaps[:8]) + (" …" if len(snaps) > 8 else "")
    metrics = ", ".join(f"{k} {_num(v)}" for k, v in logs.items())
    return (
        f"<div><b>Run</b> <code>{html.escape(run.path)}</code>: {len(snaps)} snapshots "
        f"({html.escape(steps)}); {len(run.specs)} weights"
        + (f"; last {html.escape(metrics)}" if metrics else "")
        + _table(["weight", "shape", "dtype", "l2 norm", "update ratio"], rows, len(run.specs))
        + "</div>"
    )


def _name(t: Any) -> str:
    """A diff row's name: an effective kernel's with how it is derived (`dense/kernel (lora)`,
    `(lora in B)` where A's is the stored kernel), an input of one (a LoRA adapter, a scale)
    indented under it."""
    if t.part_of is not None:
        return f"\u00a0\u00a0+ {t.name}"
    a, b = t.rule_a, t.rule_b
    if a == b:
        return t.name if a is None else f"{t.name} ({a})"
    if a is None or b is None:
        return f"{t.name} ({a or b} in {'A' if b is None else 'B'})"
    return f"{t.name} ({a} -> {b})"


def diff_html(result: DiffResult) -> str:
    """The diff's counts and every tensor's numbers, most changed layers first; each LoRA or
    quantized kernel as its effective kernel, with its adapters and scales under it."""
    counts = ", ".join(f"{k} {v}" for k, v in result.counts().items() if v)
    ts = [row for t in result.tensors for row in (t, *t.inputs)]
    rows = [[_name(t), t.status, _num(t.rel_l2), _num(t.cosine), _num(t.matched_cosine),
             _num(t.max_abs)] for t in ts[:MAX_ROWS]]
    return (
        f"<div><b>Diff</b> <code>{html.escape(result.a)}</code> vs "
        f"<code>{html.escape(result.b)}</code>: {html.escape(counts)}"
        + _table(["tensor", "status", "rel-L2", "cosine", "matched cosine", "max |Δ|"], rows,
                 len(ts))
        + "</div>"
    )
