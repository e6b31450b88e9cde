"""How numbers are spelled in the package's text: one spelling of NaN and of Inf.

The command line, the TensorBoard text tables and the JSON of a diff and a drift
all write a non-finite number with these words (the words the reports already use
for counts: "3 NaN, 1 Inf"). Pure Python.
"""

from __future__ import annotations

import math

NAN_TEXT = "NaN"
INF_TEXT = "Inf"
NEG_INF_TEXT = "-Inf"


def nonfinite_text(x: float) -> str | None:
    """`NAN_TEXT`, `INF_TEXT` or `NEG_INF_TEXT` for a non-finite number; None for a finite one.

    Example:

    >>> nonfinite_text(float("-inf")), nonfinite_text(1.0)
    ('-Inf', None)
    """
    if math.isnan(x):
        return NAN_TEXT
    if math.isinf(x):
        return INF_TEXT if x > 0 else NEG_INF_TEXT
    return None


def fmt_g(x: float | None, digits: int = 4) -> str:
    """`x` with `digits` significant digits; "" for None.

    Example:

    >>> fmt_g(3.14159), fmt_g(float("nan")), fmt_g(None)
    ('3.142', 'NaN', '')
    """
    if x is None:
        return ""
    text = nonfinite_text(x)
    return text if text is not None else f"{x:.{digits}g}"
