"""Intervals and paired tests for accuracies on the same rows.

* :func:`wilson_interval`: the 95% Wilson score interval of a proportion (good at small n and
  near 0 or 1, unlike the normal approximation).
* :func:`mcnemar`: the exact McNemar test of two methods scored on the same rows: under the null
  hypothesis the discordant rows (one right, the other wrong) split 50/50, so the two-sided
  p-value is a binomial tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson interval of ``k`` successes out of ``n``."""
    if n <= 0:
        raise ValueError("an interval needs n > 0")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class PairedTest(BaseModel):
    """Method B against method A on the same rows."""

    n: int
    a_only: int
    """Rows A gets right and B wrong."""
    b_only: int
    """Rows B gets right and A wrong."""
    difference: float
    """Accuracy of B minus accuracy of A."""
    p_value: float
    """Exact two-sided McNemar p-value."""


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> PairedTest:
    """Exact McNemar test of ``b`` against ``a`` (per-row correctness on the same rows)."""
    if len(a) != len(b):
        raise ValueError(f"paired test on different rows: {len(a)} vs {len(b)}")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    m = a_only + b_only
    if m == 0:
        p = 1.0
    else:
        tail = sum(math.comb(m, i) for i in range(min(a_only, b_only) + 1)) / 2**m
        p = min(1.0, 2 * tail)
    n = len(a)
    return PairedTest(n=n, a_only=a_only, b_only=b_only, difference=(b_only - a_only) / n if n else 0.0,
                      p_value=p)
