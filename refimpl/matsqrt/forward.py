"""Forward: ``sqrtm`` and ``inv_sqrtm`` (the forward equations of
:mod:`refimpl.matsqrt`) and their result types.

``"mpa"``/``"mtp"`` evaluate a rational (polynomial) function of the
normalised ``W = Z = I - A/c`` or ``W = X = A/c`` (:func:`_forward_rational`),
``"ns"`` runs the coupled Newton–Schulz iteration (:func:`_forward_ns`),
``"eig"`` maps the eigenvalues.  Every array operation is written once
against the array API; on host NumPy the power block, its contraction and
the small SPD solves go through :mod:`refimpl.matsqrt._kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import array_api_compat

from .. import backend
from ..backend import eye_like, mT
from . import _kernels
from ._common import (DEFAULT_MAX_ITER, DEFAULT_MPA_ORDER, DEFAULT_MTP_DEGREE, SQRT_METHODS,
                      add_to_diagonal, check_square, eps, fro, is_positive_definite,
                      iteration_options, mm, psd_tolerance, raise_not_psd, sym, symmetric_part,
                      warn_unconverged)
from .coefficients import pade_coefficients, taylor_coefficients
from .sign import _newton_schulz

@dataclass(frozen=True)
class _Rational:
    """Residuals of ``out = c^gamma sym(D(W)^{-1} N(W))``, ``W = a I + b A/c``
    (``(a, b) = (1, -1)``: W = Z, the paper's basis; ``(0, 1)``: W = X = A/c).
    MTP has D = I."""

    b: float              # coefficient of A/c in W (the I coefficient drops out of dW)
    num: tuple            # float coefficients of N
    den: tuple            # float coefficients of D ((1.0,) for MTP)
    gamma: float          # +1/2 (sqrtm) or -1/2 (inv_sqrtm)
    powers: tuple         # W^0 = I, W^1, ..., W^d
    D: Any                # D(Z) (None for MTP)
    R: Any                # D^{-1} N
    x_max: Any = None     # per member, an upper bound of l_max / c (see _forward_rational)


@dataclass(frozen=True)
class _NewtonSchulz:
    """Residuals of the coupled NS iteration: final Y_T, Z_T and the steps taken."""

    Y: Any
    Z: Any
    history: tuple        # (incoming (Y_k, Z_k), M_k, active mask) per step


@dataclass(frozen=True)
class _Eig:
    """Eigendecomposition A = U diag(l) U^T (l clamped at 0) and s = sqrt(l)."""

    l: Any
    U: Any
    s: Any


@dataclass(frozen=True)
class SqrtmResult:
    """Result of :func:`sqrtm`.

    Attributes
    ----------
    S : the square root (..., n, n), symmetric.
    A : the symmetric part of the input (the matrix actually used).
    method : "mpa" | "mtp" | "ns" | "eig"; ``order`` its [m/m], degree K or
        None; ``options`` the iteration settings (ns).
    normalization : "frobenius" (mpa, mtp), "trace" (ns) or "none" (eig);
        ``scale`` the per-member constant ``c`` used (``||A||_F``, ``tr A`` or 1).
    residual : per member ``||S S - A||_F / ||A||_F``.
    n_iter, error, converged : per member; ns: steps taken and
        ``||I - Z_k Y_k||_F`` at the start of the last one; direct methods:
        0, None and True.
    state : residuals for the backward (private).
    """

    S: Any
    A: Any
    method: str
    order: int | None
    normalization: str
    scale: Any
    residual: Any
    n_iter: Any
    error: Any
    converged: Any
    options: dict = field(default_factory=dict)
    state: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class InvSqrtmResult:
    """Result of :func:`inv_sqrtm`: as :class:`SqrtmResult` with ``S_inv``
    (the inverse root) in place of ``S`` and ``residual = ||S_inv A S_inv -
    I||_F / sqrt(n)``."""

    S_inv: Any
    A: Any
    method: str
    order: int | None
    normalization: str
    scale: Any
    residual: Any
    n_iter: Any
    error: Any
    converged: Any
    options: dict = field(default_factory=dict)
    state: Any = field(default=None, repr=False)


def _poly(coeffs, pows):
    """sum_k coeffs[k] Z^k from precomputed powers."""
    out = coeffs[0] * pows[0]
    for a, P in zip(coeffs[1:], pows[1:]):
        out = out + a * P
    return out


def _power_block(As, scale, shift: float, d: int):
    """``W = shift I + scale A`` and its powers, stacked: ``block[k] = W^{k+1}``
    (d, ..., n, n)."""
    xp = array_api_compat.array_namespace(As)
    if _kernels.applies(As):
        return _kernels.power_block(As, scale, shift, d)
    pows = [add_to_diagonal(As * scale, shift)]
    for _ in range(1, d):
        pows.append(pows[-1] @ pows[0])                  # W^{k+1} = W^k W
    return xp.stack(pows)


def _combine(coef, block):
    """``out[r] = sum_k coef[r, k] block[k]`` for ``block`` (d, ..., n, n):
    ``tensordot(coef, block, axes=1)``, computed member by member.

    One (r x d) @ (d x n^2) product per member (on host NumPy written
    straight into the (r, ..., n, n) result, :func:`_kernels.combine`).  A
    single ``tensordot`` is one large product, which OpenBLAS runs on several
    threads, whose idle threads then slow the forward's next LAPACK calls;
    per member the products stay on one thread (docs/performance.md).
    """
    if _kernels.applies(block):
        return _kernels.combine(coef, block)
    xp = array_api_compat.array_namespace(coef, block)
    d, shape = block.shape[0], tuple(block.shape[1:])
    count, nn = math.prod(shape[:-2]), shape[-2] * shape[-1]
    per_member = xp.permute_dims(xp.reshape(block, (d, count, nn)), (1, 0, 2))
    got = coef @ per_member                            # (count, r, nn)
    return xp.reshape(xp.permute_dims(got, (1, 0, 2)), (coef.shape[0],) + shape)


def _plus_identity(X, v):
    """``X + v I`` for ``X`` a temporary of this module's: written into ``X``
    on host NumPy (:func:`_kernels.add_to_diagonal`, the same values)."""
    return _kernels.add_to_diagonal(X, v) if _kernels.applies(X) else add_to_diagonal(X, v)


def _scaled_sym(R, s):
    """``(R + R^T) s``, exactly symmetric."""
    return (R + mT(R)) * s


def _solve_spd_right(N, D):
    """``N D^{-1} = (D^{-1} N^T)^T`` by one batched LU solve (``D`` symmetric
    positive definite; polynomials in ``W`` commute, so ``D R = N``)."""
    xp = array_api_compat.array_namespace(N, D)
    return mT(xp.linalg.solve(D, mT(N)))


def _coefficient_rows(num, den, a: float, b: float, d: int):
    """The rows contracted with ``I, W, .., W^d``: ``N``, ``D`` (if not 1) and
    ``(A/c)^p`` (``p = min(d, 5)``), each padded to ``d + 1`` coefficients."""
    rows = [r + (0.0,) * (d + 1 - len(r)) for r in ((num, den) if len(den) > 1 else (num,))]
    # (A/c)^p = ((W - a I) / b)^p = b^{-p} sum_k binom(p, k) (-a)^{p-k} W^k
    p = min(d, 5)
    rows.append(tuple(math.comb(p, k) * (-a) ** (p - k) / b ** p for k in range(p + 1))
                + (0.0,) * (d - p))
    return rows, p


def _forward_rational(As, c, num, den, gamma, basis):
    """``out = c^gamma sym(D(W)^{-1} N(W))`` with ``W = Z = I - A/c`` (basis "z")
    or ``W = X = A/c`` (basis "x"); MTP has D = I.

    The powers ``W^1..W^d`` are stacked in one block (d, ..., n, n)
    (:func:`_power_block`), and ``N``, ``D`` and ``(A/c)^p`` (``p = min(d,
    5)``) are one contraction of it with their coefficients (:func:`_combine`,
    one pass over the powers).  The last gives ``x_max = ||(A/c)^p||_F^{1/p}
    >= l_max / c`` (``(sum_i x_i^{2p})^{1/(2p)} >= max_i x_i``, within
    ``n^{1/(2p)}`` of it), plus a rounding margin, capped at 1: the
    backward's bound on the spectrum of the root.

    ``D`` is symmetric positive definite: on ``[0, 1]``, which holds the
    spectrum of ``W`` in either basis, every Padé denominator (and numerator,
    the inverse root's denominator) is positive — its real zeros lie outside,
    down to ``q_m(1) = 0.011``, ``p_m(1) = 0.00098`` at ``m = 5`` (tested for
    m <= 12) — and ``D R = N`` is well posed; it is solved as
    ``R = N D^{-1}`` (:func:`_solve_spd_right`)."""
    xp = array_api_compat.array_namespace(As)
    a, b = (1.0, -1.0) if basis == "z" else (0.0, 1.0)
    d = max(len(num), len(den)) - 1
    block = _power_block(As, mm(b / c), a, d)
    rows, p = _coefficient_rows(num, den, a, b, d)
    coef = xp.asarray([r[1:] for r in rows], dtype=As.dtype, device=backend.device(As))
    ND = _combine(coef, block)                         # N, (D,) (A/c)^p, less their I terms
    N = _plus_identity(ND[0, ...], rows[0][0])
    Ap = _plus_identity(ND[-1, ...], rows[-1][0])
    margin = 2.0 ** p * p * As.shape[-1] ** 1.5 * eps(As)   # rounding of the combination
    x_max = xp.asarray(xp.minimum((fro(Ap) + margin) ** (1.0 / p), xp.ones_like(c)))
    if len(den) > 1:
        D = _plus_identity(ND[1, ...], rows[1][0])
        # D R = N, i.e. R = N D^{-1} (polynomials in W commute), D SPD (above)
        R = _solve_spd_right(N, D)
    else:
        D, R = None, N
    out = _scaled_sym(R, mm(0.5 * c ** gamma))         # c^gamma sym(R)
    pows = (eye_like(As),) + tuple(block[k, ...] for k in range(d))
    return out, _Rational(b=b, num=num, den=den, gamma=gamma, powers=pows, D=D, R=R,
                          x_max=x_max)


def _forward_ns(As, c, *, iters, tol, max_iter):
    """Coupled Newton–Schulz on Y_0 = A / c, Z_0 = I (c = tr A)."""
    eye = eye_like(As)

    def step(state):
        Y, Z = state
        W = Z @ Y                                      # Z_k Y_k -> I
        e = fro(eye - W)
        M = 3.0 * eye - W
        return (0.5 * (Y @ M), 0.5 * (M @ Z)), e, M

    (Y, Z), n_iter, err, conv, hist = _newton_schulz(
        (As / mm(c), eye + 0.0 * As), step, iters=iters, tol=tol, max_iter=max_iter,
        record=True)
    return Y, Z, n_iter, err, conv, _NewtonSchulz(Y=Y, Z=Z, history=tuple(hist))


def _method_options(method, order, degree, iters, tol, max_iter, basis):
    """The validated order (mpa) or degree (mtp) of a method; None otherwise."""
    backend.check_choice(method, "method", SQRT_METHODS)
    backend.check_choice(basis, "basis", ("z", "x"))
    if basis != "z" and method != "mpa":
        raise ValueError(f"argument 'basis' applies to method 'mpa' only (method={method!r})")
    if order is not None and method != "mpa":
        raise ValueError(f"argument 'order' applies to method 'mpa' only (method={method!r})")
    if degree is not None and method != "mtp":
        raise ValueError(f"argument 'degree' applies to method 'mtp' only (method={method!r})")
    if method != "ns" and (iters is not None or tol is not None):
        raise ValueError(f"arguments 'iters'/'tol' apply to method 'ns' only (method={method!r})")
    if method == "mpa":
        return backend.check_int(DEFAULT_MPA_ORDER if order is None else order, "order", min=1)
    if method == "mtp":
        return backend.check_int(DEFAULT_MTP_DEGREE if degree is None else degree, "degree", min=1)
    return None


def _root(A, *, inverse, method, order, degree, basis, iters, tol, max_iter, sym_tol, psd_tol):
    """Shared forward of sqrtm / inv_sqrtm."""
    xp = backend.namespace(A=A)
    check_square(A, "A")
    k = _method_options(method, order, degree, iters, tol, max_iter, basis)
    As, norm = symmetric_part(A, "A", sym_tol)
    bshape, dev = tuple(A.shape[:-2]), backend.device(A)
    n_iter = xp.zeros(bshape, dtype=xp.int64, device=dev)
    err, conv, options = None, xp.ones(bshape, dtype=xp.bool, device=dev), {}
    if method == "eig":
        out, state = _eig_root(As, norm, inverse, psd_tol)
        c, normalization = xp.ones(bshape, dtype=A.dtype, device=dev), "none"
    elif method in ("mpa", "mtp"):
        _check_psd(As, norm, "A", definite=inverse, psd_tol=psd_tol)
        out, state, options = _rational_root(As, norm, inverse, method, k, basis)
        c, normalization = norm, "frobenius"
    else:
        _check_psd(As, norm, "A", definite=inverse, psd_tol=psd_tol)
        iters, tol, max_iter = iteration_options(iters, tol, max_iter, eps(A))
        options = {"iters": iters, "tol": tol, "max_iter": max_iter}
        c, normalization = xp.linalg.trace(As), "trace"
        out, state, n_iter, err, conv = _ns_root(As, c, inverse, iters, tol, max_iter)
    common = dict(A=As, method=method, order=k, normalization=normalization, scale=c,
                  residual=_residual(out, As, norm, inverse), n_iter=n_iter, error=err,
                  converged=conv, options=options, state=state)
    return InvSqrtmResult(S_inv=out, **common) if inverse else SqrtmResult(S=out, **common)


def _eig_root(As, norm, inverse: bool, psd_tol):
    """``U diag(f(l)) U^T``, ``f = sqrt`` or ``1/sqrt``, from ``eigh`` (``l``
    clamped at 0 after the PSD test): ``(out, _Eig)``."""
    xp = array_api_compat.array_namespace(As)
    lam, U = xp.linalg.eigh(As)
    if inverse:   # definite: l_min > 0
        bad = lam[..., 0] <= 0.0
    else:         # semidefinite: l_min >= -psd_tol ||A||_F
        bad = lam[..., 0] < -psd_tolerance(As, psd_tol) * norm
    if backend.any_true(bad):
        raise_not_psd(As, norm, "A", definite=inverse, eigenvalues=lam)
    lam = xp.maximum(lam, xp.zeros_like(lam))
    s = xp.sqrt(lam)
    f = 1.0 / s if inverse else s
    return sym((U * f[..., None, :]) @ mT(U)), _Eig(l=lam, U=U, s=s)


def _rational_root(As, norm, inverse: bool, method: str, k: int, basis: str):
    """MPA (order ``k``) or MTP (degree ``k``) with ``c = ||A||_F``:
    ``(out, _Rational, options)``."""
    if method == "mpa":
        p, q = pade_coefficients(k, basis)
        num, den = (q, p) if inverse else (p, q)
        options = {"basis": basis}
    else:
        num, den, options = taylor_coefficients(k, inverse=inverse), (Fraction(1),), {}
    out, state = _forward_rational(As, norm, tuple(float(v) for v in num),
                                   tuple(float(v) for v in den), -0.5 if inverse else 0.5, basis)
    return out, state, options


def _ns_root(As, c, inverse: bool, iters, tol, max_iter):
    """Coupled Newton–Schulz with ``c = tr A``: ``(out, _NewtonSchulz, n_iter,
    error, converged)``, warning when a member did not converge."""
    Y, Z, n_iter, err, conv, state = _forward_ns(As, c, iters=iters, tol=tol, max_iter=max_iter)
    out = mm(c ** (-0.5 if inverse else 0.5)) * sym(Z if inverse else Y)
    warn_unconverged(f"{'inv_sqrtm' if inverse else 'sqrtm'}(method='ns')",
                     conv, err, tol, stacklevel=5)
    return out, state, n_iter, err, conv


def _residual(out, As, norm, inverse: bool):
    """``||S_inv A S_inv - I||_F / sqrt(n)`` or ``||S S - A||_F / ||A||_F`` per member."""
    if inverse:
        return fro(out @ As @ out - eye_like(As)) / math.sqrt(As.shape[-1])
    SS = out @ out
    SS -= As
    return fro(SS) / norm


def _positive_definite(A) -> bool:
    """:func:`refimpl.matsqrt._common.is_positive_definite`; on host NumPy
    from :data:`_kernels.PD_LOOP_MIN_N` to :data:`_kernels.SMALL_LAPACK_N` by
    LAPACK per member."""
    if _kernels.pd_loop_applies(A):
        return _kernels.is_positive_definite(A)
    return is_positive_definite(A)


def _check_psd(As, norm, name: str, *, definite: bool, psd_tol: float | None):
    """Raise ValueError unless every member is PSD (``definite``: PD)."""
    # a shift below the factorisation's own rounding (~n eps ||A||) decides
    # nothing: a singular PSD member would pass or fail by the rounding luck of
    # the LAPACK at hand
    tau = max(psd_tolerance(As, psd_tol), As.shape[-1] * eps(As))
    xp = array_api_compat.array_namespace(As)
    shifted = As if definite else _plus_identity(xp.asarray(As, copy=True), tau * norm)
    if _positive_definite(shifted):
        return
    raise_not_psd(As, norm, name, definite=definite)


def sqrtm(A, *, method: str = "mpa", order: int | None = None, degree: int | None = None,
          basis: str = "z", iters: int | None = None, tol: float | None = None,
          max_iter: int = DEFAULT_MAX_ITER, sym_tol: float | None = None,
          psd_tol: float | None = None) -> SqrtmResult:
    """Square root ``S = A^{1/2}`` of symmetric positive semidefinite matrices.

    Parameters
    ----------
    A : (..., n, n) float32/float64, symmetric PSD (see the module docstring).
    method : "mpa" (Padé [order/order], default order 5), "mtp" (Taylor,
        default degree 10), "ns" (coupled Newton–Schulz) or "eig".
    order, degree : the MPA order m / the MTP degree K.
    basis : MPA only.  "z" (default, the paper's): P, Q in ``Z = I - A/c``,
        whose alternating coefficients cancel near z = 1: ``sum_k |p_k| /
        |P(1)| = ((1 + sqrt 2)^N + (1 - sqrt 2)^N) / 2`` with ``N = 2m + 1``
        (8119 at m = 5, 1.6e6 at m = 8), so the loss grows like ``(1 +
        sqrt 2)^{2m} = 5.8^m``.  Measured relative error against the scalar
        map (spectral norm, 6x6, cond 1e2..1e8): float64 4e-14 at m = 5, 4e-12
        at m = 8, 3e-9 at m = 12; float32 3e-5 at m = 5, 2e-3 at m = 8; the
        inverse root ~10x more.  "x": the same rational function as
        ``E(X)/O(X)`` in ``X = A/c`` with positive binomial coefficients,
        10-100x less round-off (float64 4e-13 at m = 8, 5e-11 at m = 12;
        float32 3e-6 at m = 5; inverse ~10x more); the remaining loss comes
        from solving with ``O(X)``, whose condition number grows like 4^m.
        Same cost and same derivative.
    iters, tol, max_iter : NS only — fixed step count (the paper's T), or the
        per-member tolerance on ``||I - Z_k Y_k||_F`` (default sqrt(eps)) and
        step limit.
    sym_tol : accepted relative asymmetry (default sqrt(eps)).
    psd_tol : accepted negative eigenvalues, relative to ||A||_F (default
        10 n eps; the Cholesky test uses at least n eps, its own rounding
        level, below which it could not tell the sign).

    Returns
    -------
    SqrtmResult
        ``S`` plus diagnostics (normalisation, residual ``||SS - A||/||A||``,
        iteration counts) and the residuals the VJPs need.

    Raises
    ------
    TypeError : not a float32/float64 array.
    ValueError : non-square, NaN/Inf, non-symmetric, not PSD, zero matrix,
        or a bad option.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[2.0, -1.0], [-1.0, 2.0]])
    >>> S = sqrtm(A, method="mpa", order=8).S
    >>> bool(np.allclose(S @ S, A))
    True
    """
    return _root(A, inverse=False, method=method, order=order, degree=degree, basis=basis,
                 iters=iters,
                 tol=tol, max_iter=max_iter, sym_tol=sym_tol, psd_tol=psd_tol)


def inv_sqrtm(A, *, method: str = "mpa", order: int | None = None, degree: int | None = None,
              basis: str = "z", iters: int | None = None, tol: float | None = None,
              max_iter: int = DEFAULT_MAX_ITER, sym_tol: float | None = None,
              psd_tol: float | None = None) -> InvSqrtmResult:
    """Inverse square root ``S_inv = A^{-1/2}`` of symmetric positive definite matrices.

    Same parameters as :func:`sqrtm` (``psd_tol`` is ignored: ``A`` must be
    definite, i.e. have a Cholesky factor).  MPA computes ``c^{-1/2}
    P(Z)^{-1} Q(Z)``, MTP the Taylor series of ``(1 - z)^{-1/2}``, NS returns
    ``Z_T / sqrt(tr A)``.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[2.0, -1.0], [-1.0, 2.0]])
    >>> T = inv_sqrtm(A, method="eig").S_inv
    >>> bool(np.allclose(T @ A @ T, np.eye(2)))
    True
    """
    return _root(A, inverse=True, method=method, order=order, degree=degree, basis=basis,
                 iters=iters,
                 tol=tol, max_iter=max_iter, sym_tol=sym_tol, psd_tol=psd_tol)


# --------------------------------------------------------------------------
# Derivatives, method "exact": the Loewner matrix in the eigenbasis
