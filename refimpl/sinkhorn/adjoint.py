"""Reverse and forward mode: :func:`sinkhorn_vjp`, :func:`sinkhorn_vjp_eps`,
:func:`sinkhorn_jvp`, the gauge and the backward's warnings."""

from __future__ import annotations

import dataclasses
import math
import warnings

from .. import backend
from ..backend import ConditioningWarning, ConvergenceWarning, logsumexp, sum_to_shape
from .forward import _check_result
from .results import SinkhornResult
from .system import (SolveInfo, _check_cg_options, _check_method, _cond_threshold, _kkt_solve, _solve, _System,
                     _system)

# --------------------------------------------------------------------------
# Diagnostics and warnings of a backward solve
# --------------------------------------------------------------------------

#: Relative gradient error, estimated as ``cond(S^) x error`` (the backward's
#: condition number times the forward's reached marginal error), above which
#: a derivative of a converged plan warns (:class:`ConditioningWarning`).
GRADIENT_RESOLUTION_WARN = 1e-3


def _warn_resolution(res: SinkhornResult, cond_max: float, what: str) -> None:
    """ConditioningWarning when the plan's resolution limits the gradient.

    A converged plan satisfies its marginals only to ``error`` (at least the
    dtype's floor ``32 u (1 + max|C|/eps + log nm)``); the implicit
    derivative amplifies that by up to ``cond(S^)``.  In float32 at
    ``eps <~ 0.01 max|C|`` the product reaches 1e-3 to 1e-1: warn, naming
    ``eps`` and the dtype, rather than return the gradient silently.
    """
    xp = backend.namespace(P=res.P)
    err = float(xp.max(res.error))
    est = cond_max * err
    if est > GRADIENT_RESOLUTION_WARN:
        warnings.warn(
            f"sinkhorn {what}: at eps={res.eps:.3g} in {backend.dtype_name(res.P.dtype)} the plan is "
            f"resolved to a relative marginal error {err:.1e} and the backward amplifies it by up to "
            f"cond(S^) = {cond_max:.1e}: the gradient may be off by ~{est:.1e} (relative); use "
            + ("float64 or a larger eps" if backend.dtype_name(res.P.dtype) == "float32"
               else "a larger eps or a smaller tol"),
            ConditioningWarning, stacklevel=3)


def _warn_backward(res: SinkhornResult, info: SolveInfo, method: str, what: str) -> None:
    """ConvergenceWarning for an unconverged forward, ConditioningWarning for an
    ill-conditioned (or truncated) solve, ConvergenceWarning for unconverged CG."""
    xp = backend.namespace(P=res.P)
    cond_max = None
    if info.cond is not None:
        cond_max = float(xp.max(info.cond))
    if not res.all_converged:
        err = float(xp.max(res.error))
        est = "" if cond_max is None else (
            f"; the gradient error may reach ~cond x error = {cond_max:.1e} x {err:.1e} = "
            f"{min(cond_max * err, math.inf):.1e} (relative)")
        warnings.warn(
            f"sinkhorn {what}: the forward did not converge (error {err:.2e} > tol); the implicit "
            f"gradient is exact for the problem with P's own marginals, not for (C, a, b){est}",
            ConvergenceWarning, stacklevel=3)
    if cond_max is not None and res.all_converged and cond_max <= _cond_threshold(res.P.dtype):
        _warn_resolution(res, cond_max, what)     # beyond the threshold: the warning below
    if cond_max is not None:
        thr = _cond_threshold(res.P.dtype)
        dropped = info.n_dropped
        n_drop = int(xp.max(dropped)) if dropped is not None else 0
        if cond_max > thr or n_drop > 0:
            extra = (f"; {n_drop} near-null direction(s) truncated: least-squares (minimum-norm) "
                     f"solution of the consistent singular system, exact for C_bar and for marginal "
                     f"perturbations that keep the mass of each nearly-disconnected block"
                     if n_drop > 0 else "")
            warnings.warn(
                f"sinkhorn {what} (method={method!r}): the backward system is ill-conditioned: "
                f"cond(S^) = {cond_max:.2e} > {thr:.1e} (spectral gap "
                f"{float(xp.min(info.gap)):.2e}); about {math.log10(max(cond_max, 1.0)):.0f} "
                f"digits may be lost{extra}",
                ConditioningWarning, stacklevel=3)
    if info.cg is not None and not info.cg.all_converged:
        warnings.warn(
            f"sinkhorn {what} (method='cg'): conjugate gradients stopped after {info.cg.max_n_iter} "
            f"iterations at relative residual {info.cg.max_error:.2e} > "
            f"cg_tol={info.cg_tol:.0e}; raise cg_max_iter or use method='schur'",
            ConvergenceWarning, stacklevel=3)


# --------------------------------------------------------------------------
# Gauge
# --------------------------------------------------------------------------

def gauge_fix(a_bar, b_bar):
    """Canonical representative ``(a_bar - mean(a_bar), b_bar + mean(a_bar))``.

    For a balanced problem ``(a_bar + k 1, b_bar - k 1)`` acts identically on
    every feasible direction (``1^T da = 1^T db``); this picks the member with
    ``sum(a_bar) == 0`` per batch member.  When ``a`` was broadcast against a
    batch of ``b`` (or vice versa) the shift is summed/broadcast to ``b_bar``'s
    shape.  Used by :func:`sinkhorn_vjp` and by the registry's
    ``canonicalize``.
    """
    xp = backend.namespace(a_bar=a_bar, b_bar=b_bar)
    backend.check_array(a_bar, "a_bar", min_ndim=1)
    backend.check_array(b_bar, "b_bar", min_ndim=1)
    try:
        backend.broadcast_shapes(tuple(a_bar.shape[:-1]), tuple(b_bar.shape[:-1]))
    except ValueError:
        raise ValueError(f"batch shapes of 'a_bar' {tuple(a_bar.shape[:-1])} and 'b_bar' "
                         f"{tuple(b_bar.shape[:-1])} do not broadcast") from None
    shift = xp.mean(a_bar, axis=-1, keepdims=True)
    out_b = b_bar + shift
    if tuple(out_b.shape) != tuple(b_bar.shape):
        out_b = b_bar + sum_to_shape(shift, tuple(b_bar.shape[:-1]) + (1,))
    return a_bar - shift, out_b


# --------------------------------------------------------------------------
# Reverse mode (VJP)
# --------------------------------------------------------------------------

def _check_cotangent(res: SinkhornResult, X, name: str):
    backend.namespace(P=res.P, **{name: X})
    backend.check_array(X, name)
    if tuple(X.shape) != tuple(res.P.shape):
        raise ValueError(f"argument {name!r} has shape {tuple(X.shape)}, expected {tuple(res.P.shape)} like P")
    if X.dtype != res.P.dtype:
        raise TypeError(f"argument {name!r} has dtype {backend.dtype_name(X.dtype)}, expected "
                        f"{backend.dtype_name(res.P.dtype)} like P")


def _marginal_factors(res: SinkhornResult):
    """``r / a'`` and ``c / b'`` for the problem ``P`` solves exactly:
    1 on a balanced side, ``exp(-f / rho_a)`` / ``exp(-g / rho_b)`` otherwise."""
    xp = backend.namespace(f=res.f)
    fa = None if res.rho_a is None else xp.exp(-res.f / res.rho_a)
    fb = None if res.rho_b is None else xp.exp(-res.g / res.rho_b)
    return fa, fb


# An isolated node (a row or column of P that underflowed to exact zeros,
# small eps before convergence) is the limit of a node whose mass tends to 0.
# For a column, c_j -> 0 in the row j of M gives dg_j -> eps w_b,j / (c_j (1 + beta))
# with P_ij dg_j / eps -> w_ij w_b,j / (1 + beta), w_ij = P_ij / c_j the column's
# relative weights (finite, from log P): the tangent mass w_b,j enters column j
# along w and leaves the rows' right-hand side; transposed,
# v_j = sum_i w_ij (G_ij - u_i) / (1 + beta).  Rows likewise.

def _node_weights(res: SinkhornResult, axis: int):
    """``P_ij / c_j`` (``axis=-2``) or ``P_ij / r_i`` (``axis=-1``) from ``log P``."""
    xp = backend.namespace(P=res.P)
    log_P = res.log_P
    return xp.exp(log_P - logsumexp(log_P, axis=axis, keepdims=True))


def _isolated_vjp(res: SinkhornResult, sys: _System, G, u, v):
    """Marginal adjoints of isolated nodes (decoupled, 0, in the solve)."""
    xp = backend.namespace(P=res.P)
    if sys.iso_c is not None:
        v_iso = xp.sum(_node_weights(res, -2) * (G - u[..., :, None]), axis=-2) / (1.0 + sys.beta)
        v = xp.where(sys.iso_c, v_iso, v)
    if sys.iso_r is not None:
        u_iso = xp.sum(_node_weights(res, -1) * (G - v[..., None, :]), axis=-1) / (1.0 + sys.alpha)
        u = xp.where(sys.iso_r, u_iso, u)
    return u, v


def _isolated_jvp(res: SinkhornResult, sys: _System, wa, wb):
    """Route the marginal tangents of isolated nodes: ``(wa', wb', dP_iso or None)``."""
    xp = backend.namespace(P=res.P)
    dP_iso = None
    if sys.iso_c is not None:
        inflow = xp.where(sys.iso_c, wb, xp.zeros_like(wb)) / (1.0 + sys.beta)
        dP_iso = _node_weights(res, -2) * inflow[..., None, :]
        wa = wa - xp.sum(dP_iso, axis=-1)
        wb = wb - inflow * (1.0 + sys.beta)
    if sys.iso_r is not None:
        inflow = xp.where(sys.iso_r, wa, xp.zeros_like(wa)) / (1.0 + sys.alpha)
        routed = _node_weights(res, -1) * inflow[..., :, None]
        wb = wb - xp.sum(routed, axis=-2)
        wa = wa - inflow * (1.0 + sys.alpha)
        dP_iso = routed if dP_iso is None else dP_iso + routed
    return wa, wb, dP_iso


def _implicit_vjp(res: SinkhornResult, G, method: str, **cg_options):
    """Full-batch ``(C_bar, u, v, info)`` (:class:`SolveInfo`) before gauge
    fixing and reduction.

    Every output is linear in ``G``: when ``max|G|`` lies outside
    ``[2^-100, 2^100]`` the solve runs on ``G / s``, ``s`` the power of two
    nearest ``max|G|`` (an exact scaling), and its outputs are multiplied by
    ``s``, so that a cotangent near the overflow (or underflow) threshold
    cannot overflow inside the solver (CG's inner products square it).
    """
    xp = backend.namespace(P=res.P)
    gmax = float(xp.max(xp.abs(G)))
    if 0.0 < gmax < math.inf and not 2.0 ** -100 <= gmax <= 2.0 ** 100:
        scale = 2.0 ** math.frexp(gmax)[1]
        C_bar, u, v, info = _implicit_vjp(res, G / scale, method, **cg_options)
        return C_bar * scale, u * scale, v * scale, info
    sys = _system(res)
    P = res.P
    T = P * G
    t_a = xp.sum(T, axis=-1)
    t_b = xp.sum(T, axis=-2)
    if method == "kkt":
        # K z = [G; 0; 0]:  C_bar = -z_p, (u, v) = (z_a, z_b).
        zp, u, v = _kkt_solve(sys, res.eps, G, xp.zeros_like(t_a), xp.zeros_like(t_b))
        info = SolveInfo()
        C_bar = -zp
    else:
        (u, v), info = _solve(sys, t_a, t_b, method, **cg_options)
        # C_bar = -(1/eps)(T - P * (u 1^T + 1 v^T))
        C_bar = -(T - P * (u[..., :, None] + v[..., None, :])) / res.eps
    u, v = _isolated_vjp(res, sys, G, u, v)
    return C_bar, u, v, info


def _info_for_warning(res: SinkhornResult, info: SolveInfo, method: str) -> SolveInfo:
    """Dense methods without their own spectral information borrow the
    conditioning diagnostic (eigenvalues of the scaled Schur complement)."""
    if info.cond is None and method in ("reduced", "kkt"):
        cnd = res.conditioning
        info = dataclasses.replace(info, cond=cnd.cond, gap=cnd.spectral_gap)
    return info


def _reverse(res: SinkhornResult, P_bar, method: str, cg_tol, cg_max_iter, warn: bool, what: str):
    """Checked inputs, one implicit solve and its warnings: full-batch
    ``(C_bar, a_bar, b_bar)``, marginal gradients gauge fixed (balanced)."""
    _check_result(res)
    _check_method(method)
    _check_cotangent(res, P_bar, "P_bar")
    cg_options = _check_cg_options(method, cg_tol, cg_max_iter)
    warn = backend.check_flag(warn, "warn")
    C_bar, u, v, info = _implicit_vjp(res, P_bar, method, **cg_options)
    if warn:
        _warn_backward(res, _info_for_warning(res, info, method), method, what)
    fa, fb = _marginal_factors(res)
    a_bar = u if fa is None else u * fa
    b_bar = v if fb is None else v * fb
    if res.balanced:
        a_bar, b_bar = gauge_fix(a_bar, b_bar)
    return C_bar, a_bar, b_bar


def sinkhorn_vjp(res: SinkhornResult, P_bar, *, method: str = "schur", cg_tol: float | None = None,
                 cg_max_iter: int | None = None, warn: bool = True):
    r"""Implicit reverse mode: ``(C_bar, a_bar, b_bar)`` from ``P_bar = dL/dP``.

    Parameters
    ----------
    res : result of :func:`sinkhorn`.
    P_bar : (..., n, m) cotangent, any values (not only symmetric, not only
        of a particular loss).
    method : ``"schur"`` (dense, smaller side; LU, or a truncated eigen
        solve when ill-conditioned; default),
        ``"cg"`` (matrix-free conjugate gradients for large problems),
        ``"reduced"`` (the paper's (n + m - 1) dense system), ``"kkt"`` (full
        KKT system, tiny sizes only).  All agree to round-off.
    cg_tol, cg_max_iter : CG tolerance on the residual in the D_c^{-1} norm
        relative to the right-hand side (default 1e-12 in
        float64, 1e-5 in float32) and iteration limit (default
        ``max(1000, 10 min(n, m))``).
    warn : issue ConvergenceWarning (unconverged forward or CG) and
        ConditioningWarning (cond(S^) > 1/sqrt(u), or truncated directions,
        or a converged plan too coarse for its gradient, below).

    Accuracy in float32
    -------------------
    The gradient inherits the plan's marginal error amplified by up to
    ``cond(S^)``.  A float32 plan is resolved only to its rounding floor
    ``32 u (1 + max|C|/eps + log nm)`` (``u = 6e-8``), so at ``eps`` of a
    few hundredths of ``max|C|`` and below the float32 gradient can be off
    by 1e-3 to 1e-1 relative.  Whenever ``cond(S^) x max(error)`` exceeds
    ``GRADIENT_RESOLUTION_WARN`` (1e-3) a ConditioningWarning naming ``eps``
    and the dtype is issued (when ``cond(S^) > 1/sqrt(u)`` the
    ill-conditioning warning above is issued instead); float64 or a larger
    ``eps`` avoids it.

    Returns
    -------
    (C_bar, a_bar, b_bar) shaped like ``(C, a, b)`` (broadcast inputs get the
    sum over the batch).  Balanced: gauge fixed, ``sum(a_bar) == 0`` per
    member, ``C_bar`` has zero row and column sums.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> C = rng.random((3, 4)); a = np.full(3, 1 / 3); b = np.full(4, 0.25)
    >>> from refimpl.sinkhorn import sinkhorn
    >>> res = sinkhorn(C, a, b, eps=0.2, tol=1e-13)
    >>> G = rng.standard_normal((3, 4))
    >>> C_bar, a_bar, b_bar = sinkhorn_vjp(res, G)
    >>> bool(abs(a_bar.sum()) < 1e-14)
    True
    >>> bars_kkt = sinkhorn_vjp(res, G, method="kkt")
    >>> all(np.allclose(x, y, atol=1e-12) for x, y in zip((C_bar, a_bar, b_bar), bars_kkt))
    True
    """
    C_bar, a_bar, b_bar = _reverse(res, P_bar, method, cg_tol, cg_max_iter, warn, "VJP")
    return (sum_to_shape(C_bar, tuple(res.C.shape)), sum_to_shape(a_bar, tuple(res.a.shape)),
            sum_to_shape(b_bar, tuple(res.b.shape)))


def sinkhorn_vjp_eps(res: SinkhornResult, P_bar, *, method: str = "schur", cg_tol: float | None = None,
                     cg_max_iter: int | None = None, warn: bool = True):
    r"""Derivative of ``L(P)`` with respect to the temperature: ``<C_bar, log P>``.

    ``log P = (f 1^T + 1 g^T - C) / eps`` and the marginal conditions do not
    involve ``eps``, so ``dP/deps`` equals the JVP along ``dC = log P``
    (balanced or not).  For balanced problems this is also
    ``-<C_bar, C> / eps``.

    Returns an array with the batch shape (one derivative per member; for the
    single ``eps`` shared by a batch, ``dL/deps`` is its sum).  Accuracy in
    float32 and its ConditioningWarning: as :func:`sinkhorn_vjp`.
    """
    C_bar, _, _ = _reverse(res, P_bar, method, cg_tol, cg_max_iter, warn, "eps-derivative")
    return backend.namespace(P=res.P).sum(C_bar * res.log_P, axis=(-2, -1))


# --------------------------------------------------------------------------
# Forward mode (JVP)
# --------------------------------------------------------------------------

def _full_tangent(res, x, name: str, core: tuple):
    """A tangent broadcast to the full batch (``None`` -> zeros)."""
    xp = backend.namespace(P=res.P)
    shape = tuple(res.P.shape[:-2]) + core
    if x is None:
        return xp.zeros(shape, dtype=res.P.dtype, device=backend.device(res.P))
    backend.namespace(P=res.P, **{name: x})
    backend.check_array(x, name)
    ref = {"dC": res.C, "da": res.a, "db": res.b}[name]
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"argument {name!r} has shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
    return xp.broadcast_to(x, shape)


def sinkhorn_jvp(res: SinkhornResult, dC=None, da=None, db=None, *, method: str = "schur",
                 cg_tol: float | None = None, cg_max_iter: int | None = None, warn: bool = True):
    r"""Implicit forward mode: ``dP`` for tangents ``(dC, da, db)`` (None = 0).

    ``M [df; dg] = [(P * dC) 1 + eps (r/a') da; (P * dC)^T 1 + eps (c/b') db]``,
    ``dP = P * (df 1^T + 1 dg^T - dC) / eps``.  For balanced problems an
    infeasible tangent is first projected to
    ``(da + 1 (1^T db - 1^T da) / n, db)`` (adjoint of the VJP's gauge).
    Accuracy in float32 and its ConditioningWarning: as :func:`sinkhorn_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(2)
    >>> C = rng.random((3, 3)); a = np.full(3, 1 / 3)
    >>> from refimpl.sinkhorn import sinkhorn
    >>> res = sinkhorn(C, a, a, eps=0.3, tol=1e-13)
    >>> dP = sinkhorn_jvp(res, dC=rng.standard_normal((3, 3)))
    >>> bool(np.allclose(dP.sum(1), 0, atol=1e-14) and np.allclose(dP.sum(0), 0, atol=1e-14))
    True
    """
    _check_result(res)
    _check_method(method)
    opts = _check_cg_options(method, cg_tol, cg_max_iter)
    warn = backend.check_flag(warn, "warn")
    xp = backend.namespace(P=res.P)
    n, m = res.P.shape[-2], res.P.shape[-1]
    dC_ = _full_tangent(res, dC, "dC", (n, m))
    da_ = _full_tangent(res, da, "da", (n,))
    db_ = _full_tangent(res, db, "db", (m,))
    if res.balanced:
        # Projection onto 1^T da = 1^T db whose adjoint is gauge_fix.
        da_ = da_ + (xp.sum(db_, axis=-1, keepdims=True) - xp.sum(da_, axis=-1, keepdims=True)) / n
    sys = _system(res)
    P = res.P
    fa, fb = _marginal_factors(res)
    wa = da_ if fa is None else fa * da_
    wb = db_ if fb is None else fb * db_
    wa, wb, dP_iso = _isolated_jvp(res, sys, wa, wb)
    if method == "kkt":
        # K [dP; -df; -dg] = [-dC; (r/a') da; (c/b') db]
        dP, _, _ = _kkt_solve(sys, res.eps, -dC_, wa, wb)
        info = SolveInfo()
    else:
        PdC = P * dC_
        # M [df; dg] = [(P * dC) 1 + eps (r/a') da; (P * dC)^T 1 + eps (c/b') db]
        rhs_a = xp.sum(PdC, axis=-1) + res.eps * wa
        rhs_b = xp.sum(PdC, axis=-2) + res.eps * wb
        (df, dg), info = _solve(sys, rhs_a, rhs_b, method, **opts)
        dP = P * (df[..., :, None] + dg[..., None, :] - dC_) / res.eps
    if dP_iso is not None:
        dP = dP + dP_iso
    if warn:
        _warn_backward(res, _info_for_warning(res, info, method), method, "JVP")
    return dP
