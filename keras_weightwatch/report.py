"""The text the command line and the demo print: reports of runs, diffs and drifts.

Pure functions of library results (`Run`, `DiffResult`, `DriftResult`) to text:
`render_show`, `render_diff`, `render_drift`, `render_spectral` (and the
Markdown summary of the spectral view), and the pieces they share (`table`,
`sparkline`, the number formats). Non-finite numbers are spelled as `textfmt`
spells them. Imports no Keras and no other part of the command line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .compare.records import (
    STATUS_CHANGED,
    STATUS_ONLY_A,
    STATUS_ONLY_B,
    STATUS_SHAPE,
    STATUS_UNCHANGED,
)
from .naming import key_name
from .textfmt import NAN_TEXT, fmt_g, nonfinite_text

if TYPE_CHECKING:
    from .compare.records import DiffResult, DriftResult, FeatureDiff, LayerDiff, TensorDiff
    from .health import Diagnosis
    from .run import Run
    from .run.index import StatColumn
    from .spectral import SpectralMetrics, SpectralResult

WIDTH = 80
"""The width of the diff and drift tables."""
_SPARKS = "▁▂▃▄▅▆▇█"
_STATUS_WORDS = ((STATUS_ONLY_A, "only in A"), (STATUS_ONLY_B, "only in B"),
                 (STATUS_SHAPE, "shape changed"))
_DIFF_COLUMNS = (("rel_l2", 8), ("cosine", 7), ("matched", 7), ("max|B-A|", 9), ("rms", 9))


# --------------------------------------------------------------------------- numbers


def fmt_int(n: int) -> str:
    """`12,345`."""
    return f"{n:,}"


def fmt_num(x: float) -> str:
    """A metric: up to 4 decimals for everyday sizes, else 3 significant digits in e-notation.

    Example:

    >>> fmt_num(0.5), fmt_num(2.0), fmt_num(123456.0), fmt_num(float("nan"))
    ('0.5', '2', '1.235e+05', 'NaN')
    """
    if isinstance(x, float) and not math.isfinite(x):
        return nonfinite_text(x) or ""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))
    return f"{x:.3e}"


def fmt_cos(x: float | None) -> str:
    """A cosine with 4 decimals; "" for None."""
    if x is None:
        return ""
    return NAN_TEXT if math.isnan(x) else f"{x:.4f}"


def shape_text(shape: Sequence[int] | None) -> str:
    """A shape as the Python tuple it is; `-` for None.

    Example:

    >>> shape_text((3, 3, 1, 5)), shape_text((8,)), shape_text(()), shape_text(None)
    ('(3, 3, 1, 5)', '(8,)', '()', '-')
    """
    return "-" if shape is None else str(tuple(int(n) for n in shape))


def _fit(name: str, width: int) -> str:
    """`name`, shortened from the left with `…` to at most `width` characters."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


# --------------------------------------------------------------------------- show


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


def _joined_lines(run: Run, cols: Mapping[str, StatColumn]) -> list[str]:
    """`joined` lines: weights that a run holds from a later snapshot on (LoRA adapters added
    part-way: the snapshots before simply lack them), told by where their statistics start."""
    import numpy as np

    stored = cols["nan_count"].stored
    if not stored.size or stored[0].all():
        return []
    by_step: dict[str, list[str]] = {}
    for j, spec in enumerate(run.specs):
        rows = np.flatnonzero(stored[:, j])
        if rows.size and rows[0] > 0:
            by_step.setdefault(run.snapshots[int(rows[0])].name, []).append(spec.key)
    return [f"joined    {', '.join(keys)} at step {name} (earlier snapshots lack them)"
            for name, keys in by_step.items()]


_RULE_TEXT = {"lora": "base + (alpha/rank) A@B", "int8": "codes / scale",
              "int4": "unpacked codes / scale", "float8": "float8 e4m3 round trip"}
"""How `show` says what each rule of `derive` computes."""


def _effective_lines(run: Run) -> list[str]:
    """`effective` lines: the kernels the views and analyses read as the layer computes with
    them (`Run.derived`), each with its rule, rather than as stored."""
    by_rule: dict[str, list[str]] = {}
    for d in run.derived:
        by_rule.setdefault(d.rule, []).append(d.key)
    return [f"effective {rule} ({_RULE_TEXT.get(rule, rule)}): {', '.join(keys)}"
            for rule, keys in by_rule.items()]


def _non_finite_lines(run: Run, cols: Mapping[str, StatColumn], limit: int = 10) -> list[str]:
    """`NON-FINITE` lines: each snapshot's weights holding NaN or Inf (from the stored stats)."""
    import numpy as np

    counts = [np.where(np.isfinite(c.values), np.trunc(c.values), 0)
              for c in (cols["nan_count"], cols["inf_count"])]
    rows = np.flatnonzero(((counts[0] != 0) | (counts[1] != 0)).any(axis=1))
    found = []
    for snap in (run.snapshots[i] for i in rows):  # the few snapshots with some, in full
        for key, st in snap.stats.items():
            nan, inf = st.get("nan_count"), st.get("inf_count")
            if not (nan or inf):  # 0, None or absent: nothing to count (the common case)
                continue
            nan, inf = _count(nan), _count(inf)
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
        f"{fmt_int(int(m.get('total_params', 0)))} parameters, "
        f"{fmt_int(int(m.get('trainable_params', 0)))} trainable, "
        f"{fmt_int(int(m.get('non_trainable_params', 0)))} non-trainable"
    )
    out += [f"{label:<9} {text}" for label, text in fit_lines(m)]
    names = [s.name for s in run.snapshots]
    out.append(f"snapshots {len(names)}: {', '.join(names) if names else '(none complete yet)'}")
    lossy = run.lossy_dtypes()
    if lossy:
        out.append(
            f"precision LOSSY: float weights stored as {', '.join(sorted(lossy))} "
            "(values differ from the model's)"
        )
    cols = run.stat_columns(SHOW_STATS)  # every snapshot's, decoded once
    out.extend(_non_finite_lines(run, cols))
    out.extend(_joined_lines(run, cols))
    out.extend(_effective_lines(run))
    out.append("")
    out.append("layers")
    out.append(
        table(
            [(layer.name, layer.class_name, fmt_int(layer.params)) for layer in run.layers],
            ["name", "class", "params"],
            right=[2],
        )
    )
    out.append("")
    out.append("weights")
    out.append(
        table(
            [
                (s.key, shape_text(s.shape), s.dtype,
                 "yes" if s.trainable else "no", fmt_int(s.size))
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
        for name, s in zip(names, run.snapshots):
            rows.append([name] + [fmt_num(s.logs[k]) if k in s.logs else "-" for k in metrics])
        out.append("")
        out.append("metrics")
        out.append(table(rows, ["step"] + metrics, right=list(range(1, len(metrics) + 1))))
    out += stored_spectral_lines(run, cols)
    out += adapter_lines(run)
    gradient_lines = render_gradients(run, cols=cols)
    if gradient_lines:
        out += ["", *gradient_lines]
    return "\n".join(out)


OPTIMIZER_SHOWN = ("learning_rate", "momentum", "nesterov", "beta_1", "beta_2", "epsilon",
                   "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "amsgrad")
"""The optimizer settings `show` and the dashboard's run list name (where set)."""


def _value_text(value: object) -> str:
    if isinstance(value, float):
        return fmt_num(value)
    if isinstance(value, Mapping):  # a learning-rate schedule: its class
        return str(value.get("class_name", "schedule"))
    return str(value)


def fit_lines(model: Mapping[str, object]) -> list[tuple[str, str]]:
    """What the run header records about the fit besides its weights, as (label, text): the
    hyperparameter-search trial (`model.trial`) and the optimizer (`model.optimizer`)."""
    out = []
    trial = model.get("trial")
    if isinstance(trial, Mapping):
        hp = trial.get("hyperparameters")
        values = ", ".join(f"{k}={v}" for k, v in hp.items()) if isinstance(hp, Mapping) else ""
        out.append(("trial", f"{trial.get('id', '?')}, execution {trial.get('execution', '?')}"
                    + (f": {values}" if values else "")))
    opt = model.get("optimizer")
    if isinstance(opt, Mapping):
        shown = [f"{k}={_value_text(opt[k])}" for k in OPTIMIZER_SHOWN
                 if opt.get(k) not in (None, False)]
        out.append(("optimizer", " ".join([str(opt.get("class_name", "?")), ", ".join(shown)])
                    .strip()))
    return out


_STORED = ("alpha", "alpha_weighted", "stable_rank", "spectral_norm", "log_norm", "num_spikes")


def stored_spectral_lines(run: Run, cols: Mapping[str, StatColumn] | None = None) -> list[str]:
    """`show`'s spectral section: the metrics stored at the last snapshot that has them
    (`cols`: the run's `stat_columns` holding `spectral_norm`, when already read)."""
    cols = cols if cols is not None else run.stat_columns(("spectral_norm",))
    have = cols["spectral_norm"].stored.any(axis=1)
    snaps = [s for s, h in zip(run.snapshots, have) if h]
    if not snaps:
        return []
    from .spectral import stored_metric

    snap = snaps[-1]
    rows = [[key] + [fmt_num(stored_metric(st, name)) for name in _STORED]
            for key, st in snap.stats.items() if "spectral_norm" in st]
    steps = ", ".join(s.name for s in snaps)
    return ["", f"spectral  at {snap.name} (stored at {steps}; any step: weightwatch spectral)",
            table(rows, ["weight", "alpha", "alpha_weighted", "stable_rank", "spectral_norm",
                         "log_norm", "spikes"], right=[1, 2, 3, 4, 5, 6])]


def adapter_lines(run: Run, width: int = 16) -> list[str]:
    """`show`'s `adapters` section: each LoRA layer's update size ||(alpha/r) A@B|| / ||base||
    across the snapshots and at the last one that stores it, the update ratios of its A and B
    there, and a mark on the adapters not training (the statistics `views.adapters` stores);
    [] for a run without them."""
    import numpy as np

    loras = [d for d in run.derived if d.rule == "lora"]
    column = {s.key: j for j, s in enumerate(run.specs)}
    loras = [d for d in loras if d.key in column]
    update = run.stat_columns(("lora_update",))["lora_update"]
    have = update.stored[:, [column[d.key] for d in loras]].any(axis=1) if loras else []
    if not np.any(have):
        return []
    snap = run.snapshots[int(np.flatnonzero(have)[-1])]
    rows, stalled = [], []
    for d in loras:
        st = snap.stats.get(d.key, {})
        if "lora_update" not in st:
            continue
        ratios = [snap.stats.get(d.inputs[r], {}).get("update_ratio") for r in ("a", "b")]
        idle = int(_count(st.get("lora_idle")))
        if st.get("lora_stalled") == 1:
            stalled.append(d.layer)
            status = f"NOT TRAINING: not moved for {idle} snapshots"
        else:
            status = "training" if idle == 0 else f"not moved for {idle} snapshots"
        j = column[d.key]
        series = update.values[update.stored[:, j], j]
        rows.append([d.layer, sparkline([float(x) for x in series], width),
                     fmt_num(_number(st.get("lora_update"))),
                     *("-" if r is None else fmt_num(_number(r)) for r in ratios), status])
    head = f"adapters  at {snap.name}: update = ||(alpha/r) A@B|| / ||base||"
    if stalled:
        head += f"; {len(stalled)} of {len(rows)} NOT TRAINING: {', '.join(stalled)}"
    return ["", head, table(rows, ["layer", "update over snapshots", "update", "A ratio",
                                   "B ratio", "status"], right=[2, 3, 4])]


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


GRADIENT_STATS = ("grad_norm", "grad_to_weight")
"""The statistics the callback's `gradient_data` stores per weight (see `views.gradients`)."""
SHOW_STATS = ("nan_count", "inf_count", "spectral_norm", *GRADIENT_STATS)
"""The statistics `show` reads of every snapshot."""


def render_gradients(run: Run, width: int = 24,
                     cols: Mapping[str, StatColumn] | None = None) -> list[str]:
    """`show`'s `gradients` lines: each weight's ||g|| on the probe batch across the snapshots
    that have it, and its last ||g|| and ||g|| / ||W||; [] without any (`cols`: the run's
    `stat_columns` holding `GRADIENT_STATS`, when already read)."""
    import numpy as np

    cols = cols if cols is not None else run.stat_columns(GRADIENT_STATS)
    norm, ratio = cols["grad_norm"], cols["grad_to_weight"]
    if not norm.stored.any():
        return []
    series = []
    for j, spec in enumerate(run.specs):
        at = np.flatnonzero(norm.stored[:, j])
        if not len(at):
            continue
        last = at[-1]
        r = math.nan if not ratio.stored[last, j] or ratio.none[last, j] else float(
            ratio.values[last, j])
        series.append((spec.key, [float(x) for x in norm.values[at, j]], r))
    return _gradient_table(series, int(norm.stored.any(axis=1).sum()), width)


def drift_gradient_lines(result: DriftResult, width: int = 24) -> list[str]:
    """`drift`'s `gradients` lines, from the gradient statistics the result read: as `show`'s."""
    series = []
    has = [False] * len(result.steps)
    for layer in result.layers:
        for g in layer.gradients:
            kept = [i for i, v in enumerate(g.grad_norm) if not math.isnan(v)]
            if not kept:
                continue
            for i in kept:
                has[i] = True
            series.append((g.key, [g.grad_norm[i] for i in kept], g.grad_to_weight[kept[-1]]))
    lines = _gradient_table(series, sum(has), width)
    return ["", *lines] if lines else []


def _gradient_table(series: Sequence[tuple[str, Sequence[float], float]], steps: int,
                    width: int) -> list[str]:
    """(key, ||g|| at each snapshot that has it, the last ||g||/||W||) per weight, as a table."""
    if not series:
        return []
    rows = [[key, sparkline(norms, min(width, max(8, len(norms)))), fmt_g(norms[-1]),
             "-" if math.isnan(ratio) else fmt_g(ratio)] for key, norms, ratio in series]
    return [f"gradients of the loss on the probe batch ({steps} snapshots; one batch: noisy)",
            table(rows, ["key", "||g|| per snapshot", "last ||g||", "||g||/||W||"],
                  right=[2, 3])]


# --------------------------------------------------------------------------- diff


def render_diff(result: DiffResult) -> str:
    """The text of `weightwatch diff A B`: layers most changed first, in 80 columns.

    Args:
        result: A `DiffResult`.

    Returns:
        The text (no trailing newline).
    """
    name_w = WIDTH - sum(w + 2 for _, w in _DIFF_COLUMNS)
    out = [f"A  {result.a}", f"B  {result.b}", _diff_summary(result), ""]
    out.append("weight".ljust(name_w) + "".join("  " + h.rjust(w) for h, w in _DIFF_COLUMNS))
    out.append("-" * name_w + "".join("  " + "-" * w for _, w in _DIFF_COLUMNS))
    for layer in result.layers:
        out += _layer_lines(layer, name_w)
    out += ["", "rel_l2 = ||B-A|| / ||A||; matched = cosine after the best one-to-one matching",
            "of B's hidden units to A's (a model's outputs and --fixed layers keep their",
            "order); blank where no matching applies"]
    if any(t.effective for t in result.tensors):
        out += ["(LoRA), (int8), ...: the effective kernel, the one the layer computes with",
                "(base + (alpha/rank) A@B; codes / scale), compared under its stored key;",
                "the adapters and scales it derives from are listed under it"]
    out += stored_diff_lines(result)
    if result.features is not None:
        out += ["", *_feature_lines(result.features)]
    return "\n".join(out)


def _a_to_b(a: float, b: float) -> str:
    return f"{fmt_num(a)} -> {fmt_num(b)}"


def stored_diff_lines(result: DiffResult) -> list[str]:
    """`diff`'s sections of what both snapshots store beside a tensor: its spectral metrics
    (`spectral_freq`) and its gradient norms (`gradient_data`), A -> B; [] without any."""
    out: list[str] = []
    spectral = [t for t in result.tensors if t.spectral_a is not None and t.spectral_b is not None]
    if spectral:
        rows = [[t.name] + [_a_to_b(getattr(t.spectral_a, n), getattr(t.spectral_b, n))
                            for n in ("alpha", "stable_rank", "spectral_norm", "log_norm")]
                for t in spectral if t.spectral_a is not None and t.spectral_b is not None]
        out += ["", "spectral metrics stored in both snapshots, A -> B (alpha 2-6 is usual)",
                table(rows, ["weight", "alpha", "stable_rank", "spectral_norm", "log_norm"])]
    grads = [t for t in result.tensors if t.gradients_a is not None and t.gradients_b is not None]
    if grads:
        rows = [[t.name] + [_a_to_b(getattr(t.gradients_a, n), getattr(t.gradients_b, n))
                            for n in ("grad_norm", "grad_to_weight")]
                for t in grads if t.gradients_a is not None and t.gradients_b is not None]
        out += ["", "gradient norms on the probe batch stored in both snapshots, A -> B "
                "(each run's own probe batch)",
                table(rows, ["weight", "||g||", "||g||/||W||"])]
    return out


def _diff_summary(result: DiffResult) -> str:
    counts = result.counts()
    summary = (
        f"{len(result.tensors)} tensors: {counts[STATUS_CHANGED]} changed, "
        f"{counts[STATUS_UNCHANGED]} unchanged"
    )
    for status, words in _STATUS_WORDS:
        if counts[status]:
            summary += f", {counts[status]} {words}"
    if result.tolerance:
        summary += f" (tolerance {fmt_g(result.tolerance)})"
    nonfinite = [t for t in result.tensors if t.nonfinite_a or t.nonfinite_b]
    if nonfinite:
        summary += f"; NON-FINITE values in {len(nonfinite)}"
    if result.inputs:
        summary += f"; {len(result.inputs)} LoRA adapters or scales under their kernels"
    return summary


def _row(name: str, values: Sequence[str], name_w: int) -> str:
    cells = "".join("  " + v.rjust(w) for v, (_, w) in zip(values, _DIFF_COLUMNS))
    return (_fit(name, name_w).ljust(name_w) + cells).rstrip()


def _note(name: str, text: str, name_w: int) -> str:
    return (_fit(name, name_w).ljust(name_w) + "  " + text).rstrip()


def _layer_lines(layer: LayerDiff, name_w: int) -> list[str]:
    name = layer.name or "(model)"
    moved_inputs = any(not i.unchanged for t in layer.tensors for i in t.inputs)
    if layer.unchanged and not moved_inputs:
        identical = all(t.identical for t in layer.tensors)
        out = [_note(name, "identical" if identical else "unchanged (within tolerance)", name_w)]
        for t in layer.tensors:
            if t.nonfinite_a or t.nonfinite_b:
                out.append(f"      NON-FINITE: {t.name} holds {t.nonfinite_a} NaN/Inf in A, "
                           f"{t.nonfinite_b} in B")
        return out
    out = [_row(name, [fmt_g(layer.rel_l2), fmt_cos(layer.cosine),
                       fmt_cos(layer.matched_cosine), "", ""], name_w)]
    for t in layer.tensors:
        out += _tensor_lines(t, name_w)
        if t.units_fixed and t.compared and not t.unchanged:
            out.append(f"      units kept in order ({layer.units_fixed or 'fixed'}): "
                       "never matched")
    return out


_RULE_WORDS = {"lora": "LoRA"}


def _rules_text(rules: str | None) -> str | None:
    if rules is None:
        return None
    return "+".join(_RULE_WORDS.get(r, r) for r in rules.split("+"))


def effective_mark(t: TensorDiff) -> str:
    """` (LoRA)`, ` (int8)`: how the effective kernel compared is derived; ` (LoRA in B)`
    where A's is the stored kernel (a snapshot from before LoRA was enabled); "" for a
    stored weight."""
    a, b = _rules_text(t.rule_a), _rules_text(t.rule_b)
    if a == b:
        return "" if a is None else f" ({a})"
    if a is None or b is None:
        return f" ({a or b} in {'A' if b is None else 'B'})"
    return f" ({a} -> {b})"


def _tensor_lines(t: TensorDiff, name_w: int, indent: str = "  ") -> list[str]:
    out = _status_lines(t, indent + (t.name if t.part_of is None else key_name(t.name))
                        + effective_mark(t), name_w)
    for i in t.inputs:
        out += _tensor_lines(i, name_w, indent + "  + ")
    return out


def _status_lines(t: TensorDiff, name: str, name_w: int) -> list[str]:
    if t.status == STATUS_ONLY_A:
        out = [_note(name, f"only in A {shape_text(t.shape_a)}", name_w)]
    elif t.status == STATUS_ONLY_B:
        out = [_note(name, f"only in B {shape_text(t.shape_b)}", name_w)]
    elif t.status == STATUS_SHAPE:
        out = [_note(name, f"shape {shape_text(t.shape_a)} -> {shape_text(t.shape_b)}", name_w)]
    elif t.unchanged:
        out = [_note(name, "identical" if t.identical else
                     f"unchanged (max|B-A| {fmt_g(t.max_abs)})", name_w)]
    else:
        out = [_row(name, [fmt_g(t.rel_l2), fmt_cos(t.cosine), fmt_cos(t.matched_cosine),
                           fmt_g(t.max_abs), fmt_g(t.rms)], name_w)]
        if t.units_moved:
            out.append(f"      the best matching moves {t.units_moved} units")
    if t.nonfinite_a or t.nonfinite_b:
        out.append(f"      NON-FINITE: {t.nonfinite_a} NaN/Inf in A, {t.nonfinite_b} in B")
    return out


_RANKED_BY = {"weight": ("by |weight|", "weight"),
              "row_norm": ("by the L2 norm of its kernel row over {units} units", "row norm"),
              "effect": ("by the measured effect on the output (as the runs' tables)", "effect")}


def _feature_lines(f: FeatureDiff) -> list[str]:
    heading, column = _RANKED_BY.get(f.ranked_by, (f.ranked_by, f.ranked_by))
    out = [f"top {f.k} input features of {f.key_b} {heading.format(units=f.units)}, A -> B"]
    if f.note:
        out.append(f"  ({f.note})")
    if f.rank_changed:
        summary = [f"rank changed: {', '.join(f.rank_changed)}"]
        if f.entered:
            summary.append(f"entered the top {f.k}: {', '.join(f.entered)}")
        if f.left:
            summary.append(f"left it: {', '.join(f.left)}")
        out.append("; ".join(summary))
    else:
        out.append(f"the same top {f.k} in the same order")
    rows = []
    for r in f.rows:
        move = "=" if r.move == 0 else f"{r.move:+d}"
        flip = ""
        if r.sign_flips:
            flip = "flipped" if f.units == 1 else f"{r.sign_flips} units flipped"
        rows.append([r.name, str(r.rank_a), str(r.rank_b), move, fmt_g(r.weight_a),
                     fmt_g(r.weight_b), flip])
    out.append(table(rows, ["feature", "rank A", "rank B", "move", f"{column} A",
                            f"{column} B", "sign"], right=[1, 2, 3, 4, 5]))
    return out


# --------------------------------------------------------------------------- drift


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


def render_drift(result: DriftResult) -> str:
    """The text of `weightwatch drift RUN`: per layer, change per step and since the start.

    Args:
        result: A `DriftResult`.

    Returns:
        The text (no trailing newline).
    """
    steps = list(result.steps)
    first = steps[0]
    out = [f"run        {result.path}", f"snapshots  {len(steps)}: {', '.join(steps)}"]
    out.append("per step   ||W_t - W_prev|| / ||W_prev||, each layer's tensors together")
    out.append(f"from {first}".ljust(10) + " "
               + f"||W_t - W_{first}|| / ||W_{first}|| at the last snapshot")
    out.append("")
    spark_w = min(24, max(8, len(steps) - 1))
    cols = [("per step", spark_w), ("last", 9), ("max", 9), (f"from {first}", 12)]
    name_w = WIDTH - sum(w + 2 for _, w in cols)
    out.append("layer".ljust(name_w) + "".join(
        "  " + (h.ljust(w) if i == 0 else h.rjust(w)) for i, (h, w) in enumerate(cols)))
    out.append("-" * name_w + "".join("  " + "-" * w for _, w in cols))
    for layer in result.layers:
        ch = list(layer.step_change)
        finite = [v for v in ch if not math.isnan(v)]
        cells = [sparkline(ch, spark_w).ljust(spark_w), fmt_g(ch[-1]).rjust(9),
                 fmt_g(max(finite) if finite else math.nan).rjust(9),
                 fmt_g(layer.from_initial[-1]).rjust(12)]
        out.append((_fit(layer.name or "(model)", name_w).ljust(name_w)
                    + "".join("  " + c for c in cells)).rstrip())
    out += alpha_lines(result)
    out += drift_gradient_lines(result)
    return "\n".join(out)


# --------------------------------------------------------------------------- spectral


_SPECTRAL_HEADER = ["weight", "shape", "alpha", "alpha_weighted", "stable_rank", "spectral_norm",
                    "log_norm", "spikes", "note"]


def _matrix_text(m: SpectralMetrics) -> str:
    rows, cols = m.matrix_shape
    return f"{rows}x{cols}" + ("" if m.matrices == 1 else f" x{m.matrices}")


def _spectral_cells(key: str, m: SpectralMetrics) -> list[str]:
    from .spectral import alpha_note

    return [key, _matrix_text(m), fmt_num(m.alpha), fmt_num(m.alpha_weighted),
            fmt_num(m.stable_rank), fmt_num(m.spectral_norm), fmt_num(m.log_norm),
            str(m.num_spikes), alpha_note(m.alpha, m.reason) or ""]


def render_spectral(result: SpectralResult) -> str:
    """The text of `weightwatch spectral RUN[@STEP]`: one row per kernel."""
    out = [f"run    {result.path}", f"step   {result.step}",
           "shape  rows x cols of each matrix (x the kernel positions of a convolution)", ""]
    if not result.tensors:
        return "\n".join(out + ["no Dense or convolution kernel in this snapshot"])
    rows = [_spectral_cells(key, m) for key, m in result.tensors.items()]
    header, right = list(_SPECTRAL_HEADER), [2, 3, 4, 5, 6, 7]
    if any(m.num_traps is not None for m in result.tensors.values()):
        header.insert(-1, "traps")
        right.append(8)
        for row, m in zip(rows, result.tensors.values()):
            row.insert(-1, "-" if m.num_traps is None else str(m.num_traps))
    out.append(table(rows, header, right=right))
    return "\n".join(out)


def spectral_markdown(step: int, metrics: Mapping[str, SpectralMetrics]) -> str:
    """The Markdown summary the spectral view writes at a snapshot: the kernels whose alpha
    left 2-6, and those without alpha and why."""
    from .spectral import ALPHA_RANGE, alpha_note

    low, high = ALPHA_RANGE
    fitted = [k for k, m in metrics.items() if math.isfinite(m.alpha)]
    outside = [k for k in fitted if alpha_note(metrics[k].alpha) is not None]
    missing = [k for k in metrics if k not in fitted]
    out = [f"**Spectral health at step {step}**: {len(fitted)} of {len(metrics)} kernels have "
           f"an alpha; {len(outside)} outside {low:g}-{high:g} (well-trained layers usually lie "
           "inside)."]
    trapped = [f"`{k}` ({m.num_traps})" for k, m in metrics.items() if m.has_traps]
    if trapped:
        out += ["", "**Correlation traps** (eigenvalues of the shuffled matrix above the "
                f"Marchenko-Pastur edge: entries of outsized magnitude) in {', '.join(trapped)}."]
    if outside or missing:
        out += ["", "| " + " | ".join(_SPECTRAL_HEADER) + " |",
                "|" + "---|" * len(_SPECTRAL_HEADER)]
        for key in outside + missing:
            cells = _spectral_cells(f"`{key}`", metrics[key])
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def alpha_lines(result: DriftResult) -> list[str]:
    """`drift`'s alpha section: each layer's stored alpha at the snapshots that have one."""
    layers = [layer for layer in result.layers
              if layer.alpha is not None and any(math.isfinite(a) for a in layer.alpha)]
    if not layers:
        return []
    out = ["", "alpha (power law of the ESD tail, at the snapshots with spectral metrics; "
           "2-6 is usual)"]
    rows = []
    for layer in layers:
        alpha = layer.alpha or ()
        kept = [(s, a) for s, a in zip(result.steps, alpha) if math.isfinite(a)]
        values = [a for _, a in kept]
        rows.append([layer.name or "(model)", sparkline(values, 24), kept[0][0], fmt_num(values[0]),
                     kept[-1][0], fmt_num(values[-1]), fmt_num(min(values)),
                     fmt_num(max(values))])
    out.append(table(rows, ["layer", "alpha", "from", "alpha", "to", "alpha", "min", "max"],
                     right=[3, 5, 6, 7]))
    return out


def render_doctor(diagnosis: Diagnosis) -> str:
    """`weightwatch doctor`: every finding of a run (errors first), each with its layer, the
    steps it holds at, what is wrong and what to check first; then what was not checked."""
    d = diagnosis
    n_err = len(d.errors)
    head = (f"{d.path}: {d.snapshots} snapshots, healthy (no finding)" if not d.findings else
            f"{d.path}: {d.snapshots} snapshots, {n_err} error(s),"
            f" {len(d.findings) - n_err} warning(s)")
    lines = [head]
    for f in d.findings:
        held = f"step {f.step}" + (f" (shown since {f.since})" if f.since != f.step else "")
        held += f", last at {f.last}" if f.last != f.step else ""
        lines += ["", f"{f.severity.upper():8}{f.rule} in layer {f.layer}: {held}",
                  f"        {f.message}", f"        first check: {f.hint}"]
        if f.also:
            lines.append("        followed by: " + ", ".join(f.also))
    if d.notes:
        lines += [""] + [f"not checked: {n}" for n in d.notes]
    return "\n".join(lines)
