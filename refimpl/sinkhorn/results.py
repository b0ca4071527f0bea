"""Result objects of the Sinkhorn operator: the forward's plan and diagnostics,
the backward's conditioning, the error bound and the unrolled tape."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from .. import backend
from ..iteration import Converging

# --------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SinkhornResult(Converging):
    """Result of :func:`sinkhorn` (whole-batch summary: :class:`refimpl.iteration.Converging`).

    Attributes
    ----------
    P : the plan (..., n, m), ``exp((f 1^T + 1 g^T - C) / eps)``.
    f, g : dual potentials (..., n), (..., m).
    C, a, b : the inputs (references, never modified).
    eps, rho_a, rho_b : the parameters (``rho = None``: balanced side).
    tol : array (batch shape), the tolerance each member was held to:
        ``max(tol, floor)`` where ``floor`` is what its dtype can resolve
        (see :func:`sinkhorn`).
    max_iter, check_every : iteration limits used.
    n_iter : int array (batch shape), iterations run per member.
    error : array (batch shape), the relative L1 marginal error of ``P``.
    converged : bool array (batch shape), ``error <= tol``.
    """

    P: Any
    f: Any
    g: Any
    C: Any
    a: Any
    b: Any
    eps: float
    rho_a: float | None
    rho_b: float | None
    tol: Any
    max_iter: int
    check_every: int
    n_iter: Any
    error: Any
    converged: Any

    @property
    def balanced(self) -> bool:
        """Both marginals are hard constraints."""
        return self.rho_a is None and self.rho_b is None

    @functools.cached_property
    def log_P(self):
        """``log P = (f 1^T + 1 g^T - C) / eps``, finite even where ``P`` underflows."""
        return (self.f[..., :, None] + self.g[..., None, :] - self.C) / self.eps

    @functools.cached_property
    def conditioning(self) -> "Conditioning":
        """Spectral diagnostics of the backward system (see :func:`sinkhorn_conditioning`)."""
        from .bounds import sinkhorn_conditioning     # bounds needs this module first

        return sinkhorn_conditioning(self)


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of the (scaled) Schur complement ``S^`` of the backward system.

    Attributes
    ----------
    spectral_gap : smallest relevant eigenvalue of ``S^ = D_c^{-1/2} S D_c^{-1/2}``
        (balanced: the second smallest, ``1 - sigma_2^2``; unbalanced: the
        smallest).  Batch-shaped array.
    lambda_max : largest eigenvalue of ``S^`` (<= 1 + beta).
    cond : ``lambda_max / spectral_gap`` (``inf`` where the gap is not
        resolved); the backward loses about ``log10(cond)`` digits.
    side : ``"cols"`` (m x m system, rows eliminated) or ``"rows"``.
    threshold : the ``cond`` above which a ConditioningWarning is issued,
        ``1 / sqrt(unit round-off)`` (more than half the digits at risk).
    """

    spectral_gap: Any
    lambda_max: Any
    cond: Any
    side: str
    threshold: float

    @property
    def reliable(self):
        """``cond <= threshold`` per member (bool array)."""
        return self.cond <= self.threshold


@dataclass(frozen=True)
class ErrorBound:
    """Theorem 5 of Eisenberger et al. (2022) evaluated for one result.

    Attributes
    ----------
    C : bound on ``||C_bar* - C_bar(tau)||_F``.
    ab : bound on ``||[a_bar; b_bar]* - [a_bar; b_bar](tau)||_2`` in the
        paper's gauge (last entry of ``b_bar`` zero).
    P_err : ``||P* - P(tau)||_F`` used.
    sigma_minus, sigma_plus : entry bounds of the plans used.
    kappa : ``||E~^+||_2``.
    """

    C: Any
    ab: Any
    P_err: Any
    sigma_minus: Any
    sigma_plus: Any
    kappa: float


@dataclass(frozen=True)
class UnrolledResult:
    """Result of :func:`sinkhorn_unrolled`: the plan after exactly ``n_iter``
    iterations and the tape the reverse pass needs.

    ``row_softmax[k]`` and ``col_softmax[k]`` (each (..., n, m)) are the
    Jacobians of the k-th row and column log-sum-exp: ``2 n_iter - 1``
    matrices, the ``O(n_iter n m)`` memory of reverse-mode autodiff.
    """

    P: Any
    f: Any
    g: Any
    C: Any
    a: Any
    b: Any
    eps: float
    rho_a: float | None
    rho_b: float | None
    n_iter: int
    row_softmax: tuple
    col_softmax: tuple

    @property
    def tape_nbytes(self) -> int:
        """Bytes held by the recorded softmax matrices."""
        total = 0
        for s in self.row_softmax + self.col_softmax:
            total += math.prod(s.shape) * (8 if backend.dtype_name(s.dtype) == "float64" else 4)
        return total
