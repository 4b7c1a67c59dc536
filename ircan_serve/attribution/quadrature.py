"""Where along the path from a' to a the gradient is taken, and with what weight.

The IRCAN score of unit ``i`` is an integral (paper, Eq. 3),

    Attr(a_i) = (a_i - a'_i) * integral_0^1 dP(a' + alpha (a - a'))/da_i d(alpha),

which the paper approximates by the right Riemann sum with m = 20 points (Eq. 4): alpha = k/m,
weight 1/m. Gauss-Legendre quadrature (Captum's ``IntegratedGradients`` default) places n nodes
inside (0, 1) with weights that integrate polynomials of degree 2n - 1 exactly, so a smooth
integrand needs far fewer points for the same accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

QuadratureName = Literal["riemann", "gauss-legendre"]


@dataclass(frozen=True)
class Quadrature:
    """Integration points along the path and their weights (they sum to 1)."""

    alphas: torch.Tensor
    """(n,) float64 points in (0, 1]."""
    weights: torch.Tensor
    """(n,) float64 weights."""

    @property
    def ends_at_target(self) -> bool:
        """Whether the last point is alpha = 1: the activation the prompt has anyway, which the fast
        path's unpatched row stands for."""
        return bool(self.alphas[-1] == 1.0)


def riemann(n_steps: int) -> Quadrature:
    """The paper's right Riemann sum: alpha = k/m, k = 1..m, each weighted 1/m."""
    k = torch.arange(1, n_steps + 1, dtype=torch.float64)
    return Quadrature(k / n_steps, torch.full((n_steps,), 1.0 / n_steps, dtype=torch.float64))


def gauss_legendre(n_steps: int) -> Quadrature:
    """n-node Gauss-Legendre on [0, 1]: the nodes of the degree-n Legendre polynomial mapped from
    [-1, 1], with their weights halved (numpy's ``leggauss``)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    return Quadrature(torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2))


QUADRATURES = {"riemann": riemann, "gauss-legendre": gauss_legendre}
"""Quadrature name (``--quadrature``) -> its points for ``--n-steps`` points."""


def quadrature(name: str, n_steps: int) -> Quadrature:
    """The points and weights of quadrature ``name`` with ``n_steps`` points."""
    return QUADRATURES[name](n_steps)
