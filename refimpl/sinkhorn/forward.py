"""The forward: input checks, the tolerance floor and :func:`sinkhorn`
(the iterations themselves are in :mod:`refimpl.sinkhorn.iterations`)."""

from __future__ import annotations

import math
import warnings

from .. import backend
from ..backend import ConvergenceWarning
from .iterations import _Problem, _range_test, _scaling_limits, _solve_potentials, _use_scaling
from .results import SinkhornResult

# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------

def _check_rho(rho, name: str) -> float | None:
    """``None`` (or ``+inf``): a hard constraint; otherwise a finite ``rho > 0``."""
    if rho is None or (isinstance(rho, (int, float)) and rho == math.inf):
        return None
    return backend.check_positive(rho, name)


def _damping(rho: float | None, eps: float) -> float:
    """``tau = rho / (rho + eps)`` of the unbalanced update (1 on a hard side)."""
    return 1.0 if rho is None else rho / (rho + eps)


def _mass_tolerance(dtype) -> float:
    """Relative mass mismatch accepted for a balanced problem: 1e-9, or a few
    float32 ulps (rounding each entry to float32 moves the mass by <= u)."""
    return 1e-9 if backend.dtype_name(dtype) == "float64" else 8.0 * 2.0 ** -24


def _check_inputs(C, a, b, eps, rho_a, rho_b):
    xp = backend.namespace(C=C, a=a, b=b)
    backend.check_array(C, "C", min_ndim=2)
    backend.check_array(a, "a", min_ndim=1)
    backend.check_array(b, "b", min_ndim=1)
    for name, x in (("a", a), ("b", b)):
        if x.dtype != C.dtype:
            raise TypeError(f"argument {name!r} has dtype {backend.dtype_name(x.dtype)} but 'C' "
                            f"has {backend.dtype_name(C.dtype)}; pass one dtype")
    n, m = C.shape[-2], C.shape[-1]
    if n == 0 or m == 0:
        raise ValueError(f"argument 'C' must have n >= 1 rows and m >= 1 columns, got shape {tuple(C.shape)}")
    if a.shape[-1] != n:
        raise ValueError(f"argument 'a' has length {a.shape[-1]} but 'C' has {n} rows (shape {tuple(C.shape)})")
    if b.shape[-1] != m:
        raise ValueError(f"argument 'b' has length {b.shape[-1]} but 'C' has {m} columns (shape {tuple(C.shape)})")
    try:
        batch = tuple(xp.broadcast_shapes(tuple(C.shape[:-2]), tuple(a.shape[:-1]), tuple(b.shape[:-1])))
    except ValueError:
        raise ValueError(f"batch shapes of 'C' {tuple(C.shape[:-2])}, 'a' {tuple(a.shape[:-1])} and "
                         f"'b' {tuple(b.shape[:-1])} do not broadcast") from None
    eps = backend.check_positive(eps, "eps")
    cmax = _check_kernel_range(xp, C, eps)
    rho_a = _check_rho(rho_a, "rho_a")
    rho_b = _check_rho(rho_b, "rho_b")
    for name, x in (("a", a), ("b", b)):
        if backend.any_true(x < 0):
            raise ValueError(f"argument {name!r} has negative entries; marginals must be positive")
        if backend.any_true(x == 0):
            raise ValueError(f"argument {name!r} has zero entries; marginals must be positive "
                             f"(drop zero-mass points, or use a tiny positive mass)")
    if rho_a is None and rho_b is None:
        f64 = xp.float64
        mass_a = xp.sum(xp.astype(a, f64), axis=-1)
        mass_b = xp.sum(xp.astype(b, f64), axis=-1)
        rel = xp.abs(mass_a - mass_b) / xp.maximum(mass_a, mass_b)
        worst = float(xp.max(rel))
        if worst > _mass_tolerance(C.dtype):
            raise ValueError(
                f"argument 'b' has total mass different from 'a' (relative mismatch {worst:.2e} > "
                f"{_mass_tolerance(C.dtype):.0e}); the balanced problem needs sum(a) == sum(b) "
                f"(or pass rho_a/rho_b for unbalanced transport)")
    return xp, batch, n, m, eps, rho_a, rho_b, cmax


def _check_kernel_range(xp, C, eps: float):
    """Refuse a log kernel ``-C / eps`` that overflows the dtype of ``C``
    (``max|C| / eps`` above its largest finite number): every entry of the
    plan would then be NaN or 0, with no digit to report.  Returns
    ``max|C|`` per member of ``C``'s batch."""
    cmax = xp.max(xp.abs(C), axis=(-2, -1))
    worst = float(xp.max(cmax))
    big = float(xp.finfo(C.dtype).max)
    if worst / eps > big:
        raise ValueError(f"arguments 'C' and 'eps': max|C| / eps = {worst:.3e} / {eps:.3e} overflows "
                         f"{backend.dtype_name(C.dtype)} (largest {big:.2e}); rescale C or raise eps")
    return cmax


def _check_result(res, name: str = "res"):
    backend.check_result(res, name, SinkhornResult, producer="sinkhorn()")


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------

def _tolerance_floor(xp, C, cmax, a, b, batch, eps: float, balanced: bool,
                     rho_b: float | None = None):
    """Per-member relative L1 error the dtype can resolve.

    Entries of ``log P = (f + g - C) / eps`` carry absolute rounding errors of
    about ``u (|C| + |f| + |g|) / eps``, i.e. relative errors of that size in
    ``P``: ``floor = 32 u (1 + max|C| / eps + log(n m))``.  A balanced problem
    whose masses differ by ``delta`` (accepted up to 1e-9 relative) cannot get
    below ``delta`` either.  ``cmax`` is ``max|C|`` per member of ``C``.

    A relaxed column side (``rho_b`` given) is measured against the target
    ``t = b exp(-g / rho_b)``.  At the fixed point
    ``g / rho_b = beta_b (log b - LSE_i(K_ij + phi_i))`` with
    ``beta_b = eps / (eps + rho_b) = 1 - tau_b``, so ``log t`` carries the
    absolute rounding ``u beta_b (|log b| + |LSE|)`` of that difference; the
    ``|LSE|`` part is covered above, the ``|log b|`` part adds
    ``32 u beta_b max_j |log b_j|`` to the floor.
    """
    u = backend.unit_roundoff(C.dtype)
    n, m = C.shape[-2], C.shape[-1]
    floor = 32.0 * u * (1.0 + cmax / eps + math.log(n * m + 1.0))
    if rho_b is not None:
        # Rounding of the relaxed target b exp(-g / rho_b): u beta_b |log b|.
        beta_b = eps / (eps + rho_b)
        log_b_max = xp.max(xp.abs(xp.log(b)), axis=-1)
        floor = floor + 32.0 * u * beta_b * log_b_max
    if balanced:
        mass_a = xp.sum(a, axis=-1)
        mass_b = xp.sum(b, axis=-1)
        floor = xp.maximum(xp.broadcast_to(floor, batch),
                           xp.broadcast_to(2.0 * xp.abs(mass_a - mass_b) / mass_b, batch))
    return xp.broadcast_to(floor, batch)


def sinkhorn(C, a, b, *, eps, tol: float = 1e-10, max_iter: int = 10_000,
             rho_a: float | None = None, rho_b: float | None = None,
             check_every: int = 10, warn: bool = True) -> SinkhornResult:
    r"""Entropic OT plan by stabilised Sinkhorn iterations (batched).

    Parameters
    ----------
    C : (..., n, m) cost, finite.
    a, b : (..., n), (..., m) positive marginals; for a balanced problem
        ``sum(a) == sum(b)`` to a relative 1e-9 (float32: ~5e-7).
    eps : temperature > 0 (Python float, shared by the batch).
    tol : stopping tolerance on the relative L1 marginal error (see the
        module docstring).  It is raised, per member, to the floor its dtype
        can resolve, ``32 u (1 + max|C| / eps + log(nm))`` (u the unit
        round-off: ~1e-14 to 1e-12 in float64, ~1e-5 in float32), and for
        balanced problems to twice the relative mass mismatch; the value used
        is ``result.tol``.
    max_iter : iteration limit (one iteration = a row and a column update).
    rho_a, rho_b : KL relaxation strengths (``None``: hard constraint).
    check_every : the error is measured (a host sync) every this many
        iterations and at ``max_iter``.
    warn : issue a ConvergenceWarning when some member did not converge.

    Returns
    -------
    SinkhornResult

    Raises
    ------
    TypeError : non-array input, unsupported or mixed dtypes.
    ValueError : NaN/Inf, empty arrays, shape mismatch, ``eps <= 0``,
        ``max|C| / eps`` beyond the dtype's largest number, non-positive
        marginals, unequal masses (balanced), bad ``rho``/``tol``/``max_iter``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> C = rng.random((4, 3)); a = np.full(4, 0.25); b = np.array([0.5, 0.25, 0.25])
    >>> res = sinkhorn(C, a, b, eps=0.1, tol=1e-12)
    >>> bool(np.abs(res.P.sum(0) - b).sum() <= 1e-12 * b.sum())
    True
    """
    xp, batch, n, m, eps, rho_a, rho_b, cmax = _check_inputs(C, a, b, eps, rho_a, rho_b)
    tol = backend.check_positive(tol, "tol", allow_zero=True)
    max_iter = backend.check_int(max_iter, "max_iter", min=1)
    check_every = backend.check_int(check_every, "check_every", min=1)
    warn = backend.check_flag(warn, "warn")
    dev = backend.device(C)
    dt = C.dtype
    balanced = rho_a is None and rho_b is None
    tau_a, tau_b = _damping(rho_a, eps), _damping(rho_b, eps)

    K = -C / eps                                          # log Gibbs kernel
    lim, row_floor, col_floor = _scaling_limits(xp, dt, n, m)
    range_w, range_c = _range_test(xp, lim, row_floor, col_floor, n, m, dt, dev)
    b_full = xp.broadcast_to(b, batch + (m,))
    pb = _Problem(K=K, a=xp.broadcast_to(a, batch + (n,)), b=b_full,
                  log_a=xp.broadcast_to(xp.log(a), batch + (n,)),
                  log_b=xp.broadcast_to(xp.log(b), batch + (m,)), mass_b=xp.sum(b_full, axis=-1),
                  tol=xp.maximum(_tolerance_floor(xp, C, cmax, a, b, batch, eps, balanced, rho_b),
                                 xp.full(batch, tol, dtype=dt, device=dev)),
                  tau_a=tau_a, tau_b=tau_b, beta=0.0 if rho_b is None else eps / rho_b, lim=lim,
                  row_lo=xp.asarray(row_floor, dtype=dt, device=dev),
                  col_lo=xp.asarray(col_floor, dtype=dt, device=dev), range_w=range_w,
                  range_c=range_c)
    # Matrix-vector products of a matrix up to 32 MiB: memory-bound, one thread.
    with backend.single_threaded_blas(C, n * m <= backend.SERIAL_MATVEC_ENTRIES):
        phi, psi, diag = _solve_potentials(xp, pb, batch, max_iter=max_iter, check_every=check_every,
                                           use_scaling=_use_scaling(n, m, backend.policy_of(C)))

    P = xp.exp(K + phi[..., :, None] + psi[..., None, :])
    # Batch-shaped diagnostics as arrays (NumPy reductions to 0-d give scalars).
    error, tol_eff, n_iter = (xp.asarray(v) for v in (diag.error, pb.tol, diag.n_iter))
    # A member whose rounding floor reaches 1 has no resolved digit: its
    # relative L1 error (at most 2) says nothing, so it is never "converged".
    resolvable = tol_eff < 1.0
    converged = xp.asarray(diag.converged & resolvable)
    res = SinkhornResult(P=P, f=eps * phi, g=eps * psi, C=C, a=a, b=b, eps=eps, rho_a=rho_a,
                         rho_b=rho_b, tol=tol_eff, max_iter=max_iter, check_every=check_every,
                         n_iter=n_iter, error=error, converged=converged)
    if warn and not res.all_converged:
        n_bad = int(xp.sum(xp.astype(~converged, xp.int64)))
        total = math.prod(batch) if batch else 1
        worst = xp.argmax(xp.reshape(error / tol_eff, (-1,)))      # the member furthest from its tol
        err_w = float(xp.reshape(error, (-1,))[worst])
        tol_w = float(xp.reshape(tol_eff, (-1,))[worst])
        raised = f" (tol={tol:.1e} raised to the dtype's floor)" if tol_w > tol else ""
        if not backend.all_true(resolvable):
            why = (f"eps={eps:.1e} is too small for {backend.dtype_name(dt)}: the rounding floor "
                   f"of the log-domain plan, 32 u (1 + max|C|/eps + log nm), is {tol_w:.1e} >= 1, "
                   f"so the plan has no resolved digit; use a larger eps or float64")
        else:
            why = (f"did not converge in max_iter={max_iter} iterations: error {err_w:.2e} > tol "
                   f"{tol_w:.2e}{raised}; increase max_iter or eps")
        warnings.warn(
            f"sinkhorn: {n_bad} of {total} problem(s) {why}. "
            f"The result has converged=False (result.error, result.tol per member).",
            ConvergenceWarning, stacklevel=2)
    return res
