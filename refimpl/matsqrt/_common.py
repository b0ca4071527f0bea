"""Small pieces shared by the matsqrt modules: constants, the symmetric part and
per-member reductions, input validation, iteration options and warnings.

Every function here is written once against the array API standard; the
NumPy-only fast paths live in :mod:`refimpl.matsqrt._kernels`.
"""

from __future__ import annotations

import math
import warnings

import array_api_compat

from .. import backend
from ..backend import ConvergenceWarning, mT

SQRT_METHODS = ("mpa", "mtp", "ns", "eig")
VJP_METHODS = ("exact", "lyapunov_sign", "approximant")
DEFAULT_MPA_ORDER = 5          # [5/5]: 4 matmuls + 1 solve, ~10.7 n^3 flops
DEFAULT_MTP_DEGREE = 10        # 9 matmuls, ~18 n^3 flops
DEFAULT_MAX_ITER = 100


# --------------------------------------------------------------------------
# Symmetric part, per-member reductions
# --------------------------------------------------------------------------

def sym(X):
    """Symmetric part (X + X^T) / 2 (exactly symmetric in floating point)."""
    S = X + mT(X)
    S *= 0.5
    return S


fro = backend.frobenius          # per-member ||X||_F, shape X.shape[:-2]


def dot(X, Y):
    """Per-member Frobenius inner product <X, Y>, shape X.shape[:-2]."""
    xp = array_api_compat.array_namespace(X, Y)
    return xp.sum(X * Y, axis=(-2, -1))


def mm(v):
    """A per-member scalar (batch shape) lifted to broadcast against matrices."""
    return v[..., None, None]


def eps(A) -> float:
    """Machine epsilon of ``A``'s dtype."""
    return float(array_api_compat.array_namespace(A).finfo(A.dtype).eps)


def add_to_diagonal(X, v):
    """``X + v I`` with ``v`` a Python scalar or a per-member array (batch shape)."""
    if not isinstance(v, (int, float)):
        v = mm(v)
    return X + v * backend.eye_like(X)


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------

def member(idx, batch_shape) -> str:
    """`` (batch member (i, j))`` for messages; empty without a batch."""
    return f" (batch member {tuple(int(i) for i in idx)})" if batch_shape else ""


def worst(v, batch_shape):
    """(value, index) of the largest entry of a per-member host (NumPy) array."""
    import numpy as np  # host-side bookkeeping on the error path only
    v = np.asarray(v, dtype=float).reshape(batch_shape)
    idx = np.unravel_index(int(np.argmax(v)), batch_shape) if batch_shape else ()
    return float(v[idx]) if batch_shape else float(v), idx


def check_square(A, name: str):
    """A float array of at least two axes, square and non-empty in the last two."""
    backend.check_array(A, name, min_ndim=2)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"argument {name!r} must be square in its last two axes, "
                         f"got shape {tuple(A.shape)}")
    if A.shape[-1] == 0:
        raise ValueError(f"argument {name!r} is empty (shape {tuple(A.shape)})")


def symmetric_part(A, name: str, sym_tol: float | None):
    """Validate symmetry up to ``sym_tol`` (relative, Frobenius) and return
    ``(sym(A), ||A||_F)``; zero members are rejected."""
    bshape = tuple(A.shape[:-2])
    tol = math.sqrt(eps(A)) if sym_tol is None else backend.check_positive(sym_tol, "sym_tol")
    norm = fro(A)
    if not backend.all_true(norm > 0):
        _, idx = worst(backend.to_host(norm == 0), bshape)
        raise ValueError(f"argument {name!r} is the zero matrix{member(idx, bshape)}: "
                         "no normalisation exists and its root is not differentiable")
    As = sym(A)
    asym = 2.0 * fro(A - As) / norm                   # A - A^T = 2 (A - sym(A))
    if not backend.all_true(asym <= tol):
        val, idx = worst(backend.to_host(asym), bshape)
        raise ValueError(f"argument {name!r} is not symmetric: ||A - A^T||_F / ||A||_F = "
                         f"{val:.2e} > sym_tol = {tol:.1e}{member(idx, bshape)}")
    return As, fro(As)


def psd_tolerance(A, psd_tol) -> float:
    """Accepted negative eigenvalue relative to ||A||_F (default 10 n eps)."""
    if psd_tol is None:
        return 10.0 * A.shape[-1] * eps(A)
    return backend.check_positive(psd_tol, "psd_tol", allow_zero=True)


def raise_not_psd(As, norm, name, *, definite, eigenvalues=None):
    """ValueError naming the member with the most negative relative eigenvalue."""
    xp = array_api_compat.array_namespace(As)
    bshape = tuple(As.shape[:-2])
    lam = backend.to_host(xp.linalg.eigvalsh(As) if eigenvalues is None else eigenvalues)
    lmin = lam[..., 0].reshape(bshape)
    rel = lmin / backend.to_host(norm).reshape(bshape)
    _, idx = worst(-rel, bshape)
    kind = "positive definite" if definite else "positive semidefinite"
    raise ValueError(
        f"argument {name!r} is not symmetric {kind}: smallest eigenvalue "
        f"{float(lmin[idx]):.3e} (relative to ||A||_F: {float(rel[idx]):.2e})"
        f"{member(idx, bshape)}")


def is_positive_definite(A) -> bool:
    """True when every member of ``A`` (..., n, n; one triangle read) has a
    Cholesky factor with a finite, positive diagonal.

    CuPy reports a failed factorisation only inside
    ``cupyx.errstate(linalg='raise')`` (by default it returns garbage), so
    that context is entered (:meth:`refimpl.backend.DevicePolicy.raising_linalg`);
    elsewhere the library's LinAlgError says it.
    """
    xp = array_api_compat.array_namespace(A)
    try:
        with backend.policy_of(A).raising_linalg():
            L = xp.linalg.cholesky(A)
    except Exception as exc:  # LinAlgError of whichever library
        if "LinAlgError" in type(exc).__name__ or "positive" in str(exc).lower():
            return False
        raise
    d = backend.diagonal(L)
    return backend.all_true(xp.isfinite(d)) and backend.all_true(d > 0)


# --------------------------------------------------------------------------
# Iteration options and convergence warnings
# --------------------------------------------------------------------------

def iteration_options(iters, tol, max_iter, dtype_eps: float):
    """Validated ``(iters, tol, max_iter)``: ``tol`` defaults to sqrt(eps)."""
    if iters is not None:
        iters = backend.check_int(iters, "iters", min=1)
    max_iter = backend.check_int(max_iter, "max_iter", min=1)
    tol = math.sqrt(dtype_eps) if tol is None else backend.check_positive(tol, "tol")
    return iters, tol, max_iter


def warn_unconverged(what: str, converged, error, tol: float, stacklevel: int = 3):
    """ConvergenceWarning with the largest residual of an unconverged member."""
    xp = array_api_compat.array_namespace(converged)
    if backend.all_true(converged):
        return
    worst_err = float(xp.max(xp.where(converged, xp.zeros_like(error), error)))
    warnings.warn(f"{what} did not converge: residual {worst_err:.2e} > tol {tol:.1e} "
                  "(increase max_iter/iters, or the input is too ill-conditioned)",
                  ConvergenceWarning, stacklevel=stacklevel)
