"""The conditioning diagnostic and the error bound of Eisenberger et al.
(Theorem 5)."""

from __future__ import annotations

import math

from .. import backend
from .forward import _check_result
from .results import Conditioning, ErrorBound, SinkhornResult
from .system import _cond_from, _cond_threshold, _schur_operator, _spectrum, _system

# --------------------------------------------------------------------------
# Conditioning diagnostic and the paper's error bound
# --------------------------------------------------------------------------

def sinkhorn_conditioning(res: SinkhornResult) -> Conditioning:
    r"""Spectrum of the scaled Schur complement ``S^`` of the smaller side.

    ``S^ = D_c^{-1/2} (D_c - P^T D_r^{-1} P) D_c^{-1/2}`` (balanced;
    eigenvalues ``1 - sigma_k^2`` of the normalised plan
    ``D_r^{-1/2} P D_c^{-1/2}``, the smallest exactly 0) or its unbalanced
    analogue, by a dense ``eigvalsh`` (``O(min(n, m)^3)``).  The spectral gap
    collapses like ``exp(-Delta / eps)`` when the ``eps -> 0`` limit is a
    permutation (assignment-type costs), and is 0 when ``P`` splits into
    disconnected blocks.
    """
    _check_result(res)
    xp = backend.namespace(P=res.P)
    sys = _system(res)
    side = "cols"
    if sys.n < sys.m:
        sys = sys.transposed()
        side = "rows"
    with backend.serial_dense(sys.P, sys.m):
        gap, lam_max = _spectrum(sys, _schur_operator(sys))
    return Conditioning(spectral_gap=gap, lambda_max=lam_max, cond=_cond_from(xp, gap, lam_max),
                        side=side, threshold=_cond_threshold(res.P.dtype))


def constraint_pinv_norm(n: int, m: int) -> float:
    r"""``kappa = ||E~^+||_2`` for the marginal operator with the last column
    constraint dropped (Eisenberger et al., Thm. 5).

    ``E~^T E~ = [[m I_n, 1 1^T], [1 1^T, n I_{m-1}]]`` has eigenvalues ``m``
    (multiplicity n - 1), ``n`` (m - 2) and
    ``((n + m) +- sqrt((n + m)^2 - 4n)) / 2`` (for m >= 2; ``m`` alone when
    m = 1), so ``kappa = 1 / sqrt(lambda_min)``.
    """
    if n < 1 or m < 1:
        raise ValueError(f"n and m must be >= 1, got n={n}, m={m}")
    eigs = []
    if m == 1:
        eigs.append(float(m))
    else:
        s = n + m
        eigs.append(2.0 * n / (s + math.sqrt(s * s - 4.0 * n)))   # the smaller root, stably
        if n >= 2:
            eigs.append(float(m))
        if m >= 3:
            eigs.append(float(n))
    return 1.0 / math.sqrt(min(eigs))


def sinkhorn_error_bound(res: SinkhornResult, *, C1: float, C2: float, reference=None,
                         P_err=None) -> ErrorBound:
    r"""Theorem 5 of Eisenberger et al. (2022): gradient error of an unconverged plan.

    For ``P(tau)`` (this result) and the exact plan ``P*`` with
    ``||P* - P(tau)||_F = P_err``, a loss whose gradient and Hessian in P are
    bounded by ``||grad_P L||_F <= C1`` and ``||Hess_P L|| <= C2`` along the
    segment between the two plans, and entry bounds
    ``sigma_- <= P_ij <= sigma_+`` on that segment, the implicit gradients
    satisfy

        ||C_bar* - C_bar(tau)||_F    <= (sigma_+ / eps) (C1 / sigma_- + C2) P_err,
        ||[a;b]_bar* - [a;b]_bar(tau)||_2
                         <= kappa sqrt(sigma_+ / sigma_-) (C1 / sigma_- + C2) P_err,

    ``kappa = ||E~^+||_2`` (:func:`constraint_pinv_norm`).  The second bound
    is for the marginal gradients in the paper's gauge (last entry of
    ``b_bar`` zero): shift both to it before comparing, since the norm of
    the difference depends on the gauge (in the ``sum(a_bar) = 0`` gauge
    that :func:`sinkhorn_vjp` returns it can be larger).  The paper states
    ``C2`` for the Frobenius norm of the Hessian; ``C2`` here may be its
    operator norm (never larger), the Lipschitz constant of ``grad_P L``
    that a mean-value argument needs; the tests find the bound holding with
    it (error / bound <= 0.2 over 1500 random unconverged problems).

    Parameters
    ----------
    res : the (unconverged) result, balanced.
    C1, C2 : the loss bounds (for ``L = <G, P>``: ``C1 = ||G||_F``, ``C2 = 0``).
    reference : a converged result for the same inputs: then
        ``P_err = ||P_ref - P||_F`` and ``sigma_-/sigma_+`` are the min/max
        of both plans' entries (the segment's entries lie between them).
    P_err : alternatively a known bound on ``||P* - P||_F``: then
        ``sigma_- = min P - P_err`` and ``sigma_+ = max P + P_err`` (the
        Frobenius ball contains the segment); the bound is ``inf`` where
        ``sigma_- <= 0``.

    Returns
    -------
    ErrorBound (batch-shaped arrays).  Valid but loose, and vacuous at small
    eps where ``sigma_-`` collapses.
    """
    _check_result(res)
    if not res.balanced:
        raise ValueError("sinkhorn_error_bound: Theorem 5 is stated for the balanced problem")
    C1 = backend.check_positive(C1, "C1", allow_zero=True)
    C2 = backend.check_positive(C2, "C2", allow_zero=True)
    if (reference is None) == (P_err is None):
        raise ValueError("pass exactly one of 'reference' (a converged SinkhornResult) or 'P_err'")
    xp = backend.namespace(P=res.P)
    P = res.P
    core = (-2, -1)
    if reference is not None:
        _check_result(reference, "reference")
        if tuple(reference.P.shape) != tuple(P.shape):
            raise ValueError(f"argument 'reference' has plan shape {tuple(reference.P.shape)}, "
                             f"expected {tuple(P.shape)}")
        if not reference.all_converged:
            raise ValueError("argument 'reference' did not converge; it stands for the exact plan P*")
        D = reference.P - P
        err = xp.sqrt(xp.sum(D * D, axis=core))
        s_minus = xp.minimum(xp.min(P, axis=core), xp.min(reference.P, axis=core))
        s_plus = xp.maximum(xp.max(P, axis=core), xp.max(reference.P, axis=core))
    else:
        err = xp.full(tuple(P.shape[:-2]), backend.check_positive(P_err, "P_err", allow_zero=True),
                      dtype=P.dtype, device=backend.device(P))
        s_minus = xp.min(P, axis=core) - err
        s_plus = xp.max(P, axis=core) + err
    kappa = constraint_pinv_norm(P.shape[-2], P.shape[-1])
    ok = s_minus > 0
    sm = xp.where(ok, s_minus, xp.ones_like(s_minus))
    factor = C1 / sm + C2
    bound_C = xp.where(ok, s_plus / res.eps * factor * err, xp.full_like(err, math.inf))
    bound_ab = xp.where(ok, kappa * xp.sqrt(s_plus / sm) * factor * err, xp.full_like(err, math.inf))
    return ErrorBound(C=bound_C, ab=bound_ab, P_err=err, sigma_minus=s_minus, sigma_plus=s_plus,
                      kappa=kappa)
