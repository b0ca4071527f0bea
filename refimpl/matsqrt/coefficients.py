"""Coefficients and scalar maps of the approximants: exact Taylor and Padé
coefficients (rationals), the scalar function each method applies to a
normalised eigenvalue (:func:`scalar_map`, the "method oracle"), its relative
error in closed form (:func:`relative_error`) and the per-member error bound
(:func:`error_bound`).  See "Forward equations" and "Error bounds" in
:mod:`refimpl.matsqrt`.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import array_api_compat

from .. import backend
from ._common import DEFAULT_MPA_ORDER, DEFAULT_MTP_DEGREE, SQRT_METHODS

# --------------------------------------------------------------------------
# Exact coefficients (rationals)
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def taylor_coefficients(degree: int, *, inverse: bool = False) -> tuple[Fraction, ...]:
    """Exact Taylor coefficients of ``(1 - z)^{1/2}`` (or ``^{-1/2}``) at 0.

    ``(1 - z)^a = sum_k binom(a, k) (-z)^k``, so ``t_0 = 1`` and
    ``t_k = t_{k-1} (k - 1 - a) / k``.

    >>> taylor_coefficients(3)
    (Fraction(1, 1), Fraction(-1, 2), Fraction(-1, 8), Fraction(-1, 16))
    >>> taylor_coefficients(2, inverse=True)
    (Fraction(1, 1), Fraction(1, 2), Fraction(3, 8))
    """
    degree = backend.check_int(degree, "degree", min=0)
    a = Fraction(-1, 2) if inverse else Fraction(1, 2)
    t = [Fraction(1)]
    for k in range(1, degree + 1):
        t.append(t[-1] * (k - 1 - a) / k)
    return tuple(t)


@functools.lru_cache(maxsize=None)
def pade_coefficients(order: int, basis: str = "z") -> tuple[tuple[Fraction, ...], tuple[Fraction, ...]]:
    """Exact coefficients ``(p, q)`` of the [m/m] Padé approximant of sqrt(1 - z).

    ``basis="x"`` returns instead ``(e, o)`` with ``sqrt(x) ~ E(x)/O(x)``, the
    same rational function in ``x = 1 - z``: ``e_j = binom(2m+1, 2j) / 4^m``,
    ``o_j = binom(2m+1, 2j+1) / 4^m`` (positive; ``E(1) = O(1) = 1``).

    ``P(z) = sum_k p_k z^k``, ``Q(z) = sum_k q_k z^k`` with ``q_0 = 1`` and
    ``Q(z) f(z) - P(z) = O(z^{2m+1})`` for ``f(z) = (1 - z)^{1/2}``: the
    coefficients of ``z^{m+1} .. z^{2m}`` of ``Q f`` vanish (an m x m linear
    system for ``q_1..q_m``, solved in rationals), then
    ``p_k = sum_{j<=k} q_j c_{k-j}``.

    >>> p, q = pade_coefficients(1)          # (1 - 3z/4) / (1 - z/4)
    >>> p, q
    ((Fraction(1, 1), Fraction(-3, 4)), (Fraction(1, 1), Fraction(-1, 4)))
    """
    m = backend.check_int(order, "order", min=1)
    backend.check_choice(basis, "basis", ("z", "x"))
    if basis == "x":
        N, scale = 2 * m + 1, Fraction(1, 4 ** m)
        return (tuple(math.comb(N, 2 * j) * scale for j in range(m + 1)),
                tuple(math.comb(N, 2 * j + 1) * scale for j in range(m + 1)))
    c = taylor_coefficients(2 * m)
    # Row r (k = m+1+r): sum_{j=1..m} q_j c_{k-j} = -c_k.
    rows = [[c[m + 1 + r - j] for j in range(1, m + 1)] + [-c[m + 1 + r]] for r in range(m)]
    for col in range(m):                          # Gauss-Jordan in exact arithmetic
        piv = next(r for r in range(col, m) if rows[r][col] != 0)
        rows[col], rows[piv] = rows[piv], rows[col]
        pv = rows[col][col]
        rows[col] = [v / pv for v in rows[col]]
        for r in range(m):
            if r != col and rows[r][col] != 0:
                f = rows[r][col]
                rows[r] = [a - f * b for a, b in zip(rows[r], rows[col])]
    q = (Fraction(1),) + tuple(rows[r][m] for r in range(m))
    p = tuple(sum((q[j] * c[k - j] for j in range(k + 1)), Fraction(0)) for k in range(m + 1))
    return p, q


# --------------------------------------------------------------------------
# Scalar maps ("method oracles") and error bounds
# --------------------------------------------------------------------------

def _approx_params(method, order, degree, iters):
    """The validated order (mpa), degree (mtp) or steps (ns) of a method."""
    backend.check_choice(method, "method", SQRT_METHODS)
    if method == "mpa":
        return backend.check_int(DEFAULT_MPA_ORDER if order is None else order, "order", min=1)
    if method == "mtp":
        return backend.check_int(DEFAULT_MTP_DEGREE if degree is None else degree, "degree", min=1)
    if method == "ns":
        if iters is None:
            raise ValueError("method 'ns' needs 'iters' (the number of steps taken, "
                             "e.g. res.n_iter)")
        return _check_iters_array(iters) if backend._is_array(iters) else \
            backend.check_int(iters, "iters", min=0)
    return None


def _check_iters_array(iters):
    """Steps taken per member (e.g. ``res.n_iter``): a non-negative integer array."""
    xp = array_api_compat.array_namespace(iters)
    if not xp.isdtype(iters.dtype, "integral") or backend.any_true(iters < 0):
        raise TypeError("argument 'iters' must be a non-negative integer or an integer "
                        f"array, got an array of dtype {backend.dtype_name(iters.dtype)}")
    return iters


def _check_eigenvalues(x, name: str):
    """A finite float32/float64 array of (normalised) eigenvalues: NaN, Inf or
    complex values are refused (``max|.|`` would ignore a NaN)."""
    xp = backend.namespace(**{name: x})
    backend.check_array(x, name, min_ndim=1 if name == "l" else None)
    return xp


def _horner(coeffs, x):
    """``sum_k coeffs[k] x^k`` by Horner's rule."""
    out = coeffs[-1] + 0.0 * x
    for a in reversed(coeffs[:-1]):
        out = out * x + a
    return out


def _mpa_even_odd(m: int, x):
    """E(x) = sum_j binom(N, 2j) x^j and O(x) = sum_j binom(N, 2j+1) x^j, N = 2m+1:
    sqrt(x) coth(N artanh sqrt x) = E(x) / O(x) (positive coefficients, stable on [0, 1])."""
    N = 2 * m + 1
    E = _horner([float(math.comb(N, 2 * j)) for j in range(m + 1)], x)
    O = _horner([float(math.comb(N, 2 * j + 1)) for j in range(m + 1)], x)
    return E, O


def _ns_w(x, iters):
    """w_T of the scalar NS recursion w_{k+1} = w_k (3 - w_k)^2 / 4, w_0 = x.
    ``iters`` may be an int or an integer array broadcasting against x."""
    xp = array_api_compat.array_namespace(x)
    if isinstance(iters, int):
        its = xp.full(x.shape, iters, dtype=xp.int64, device=backend.device(x))
    else:
        its = xp.broadcast_to(iters, x.shape)
    w = x
    for k in range(int(xp.max(its)) if its.size else 0):
        w = xp.where(its > k, w * (3.0 - w) ** 2 / 4.0, w)
    return w


def scalar_map(x, *, method: str, order: int | None = None, degree: int | None = None,
               iters=None, inverse: bool = False):
    """The scalar function each method applies to a normalised eigenvalue.

    For ``A = U diag(l) U^T`` and ``x = l / c`` (``c`` the method's
    normalisation), the forward is, in exact arithmetic,
    ``S = sqrt(c) U diag(phi(x)) U^T`` (``S_inv = c^{-1/2} U diag(phi(x)) U^T``):

    * eig: ``sqrt(x)`` (``1/sqrt(x)``);
    * mpa: ``E(x)/O(x) = sqrt(x) coth((2m+1) artanh sqrt x)`` (``O/E``) — the
      binomial closed form, independent of :func:`pade_coefficients`;
    * mtp: ``sum_k t_k (1 - x)^k`` (Taylor coefficients of ``(1 - z)^{±1/2}``);
    * ns: ``sqrt(x w_T)`` (``sqrt(w_T / x)``), ``w_T`` from the scalar recursion
      (``iters`` = the steps taken, e.g. ``res.n_iter[..., None]``).

    This is the "method oracle": the matrix result must agree with it to
    round-off, which separates implementation bugs from approximation error.

    ``x`` must be a finite float32/float64 array (``TypeError`` /
    ``ValueError`` naming it otherwise).
    """
    xp = _check_eigenvalues(x, "x")
    inverse = backend.check_flag(inverse, "inverse")
    k = _approx_params(method, order, degree, iters)
    if method == "eig":
        return 1.0 / xp.sqrt(x) if inverse else xp.sqrt(x)
    if method == "mpa":
        E, O = _mpa_even_odd(k, x)
        return O / E if inverse else E / O
    if method == "mtp":
        t = [float(v) for v in taylor_coefficients(k, inverse=inverse)]
        return _horner(t, 1.0 - x)
    w = _ns_w(x, k)
    return xp.sqrt(w / x) if inverse else xp.sqrt(x * w)


def relative_error(x, *, method: str, order: int | None = None, degree: int | None = None,
                   iters=None, inverse: bool = False):
    """Relative error ``phi(x) / x^{±1/2} - 1`` of a method at normalised eigenvalue(s) x.

    Closed forms, with ``s = sqrt x``, ``rho = (1 - s)/(1 + s)``, ``N = 2m + 1``:

    * mpa: ``2 rho^N / (1 - rho^N)`` (inverse: ``-2 rho^N / (1 + rho^N)``);
    * mtp: ``(sum_{k<=K} t_k z^k - x^{±1/2}) / x^{±1/2}``, ``z = 1 - x``
      (the negated series tail; for sqrtm ``<= 0``... i.e. the polynomial
      overestimates, the tail is ``sum_{k>K} |t_k| z^k``);
    * ns: ``sqrt(w_T) - 1`` (both roots);
    * eig: 0.

    ``x = 0`` gives ``inf`` for mpa/mtp (sqrtm) — a relative error at a zero
    eigenvalue is unbounded — and -1 for ns.
    """
    xp = _check_eigenvalues(x, "x")
    inverse = backend.check_flag(inverse, "inverse")
    k = _approx_params(method, order, degree, iters)
    if method == "eig":
        return xp.zeros_like(x)
    pos = x > 0
    x1 = xp.where(pos, x, xp.ones_like(x))          # keeps x = 0 out of divisions
    s = xp.sqrt(x1)
    if method == "mpa":
        rho_N = ((1.0 - s) / (1.0 + s)) ** (2 * k + 1)
        if inverse:
            return xp.where(pos, -2.0 * rho_N / (1.0 + rho_N), -xp.ones_like(x))
        return xp.where(pos, 2.0 * rho_N / (1.0 - rho_N), xp.full_like(x, math.inf))
    if method == "mtp":
        t = [float(v) for v in taylor_coefficients(k, inverse=inverse)]
        T = _horner(t, 1.0 - x1)
        rel = T * s - 1.0 if inverse else T / s - 1.0
        return xp.where(pos, rel, -xp.ones_like(x) if inverse else xp.full_like(x, math.inf))
    w = _ns_w(x, k)
    return xp.sqrt(w) - 1.0


def error_bound(l, *, method: str, order: int | None = None, degree: int | None = None,
                iters=None, inverse: bool = False):
    """Per-member bound on the relative error of a method, from the spectrum.

    Parameters
    ----------
    l : (..., n) eigenvalues of A (>= 0; clamped at 0).
    method, order, degree, iters, inverse : as in :func:`scalar_map`
        (``iters`` for ns: the steps taken, e.g. ``res.n_iter``).

    Returns
    -------
    (...,) ``beta = max_i |relative_error(l_i / c)|`` with the method's
    normalisation ``c`` (``||A||_F = ||l||_2`` for mpa/mtp, ``tr A`` for ns).
    In exact arithmetic the computed root then satisfies
    ``||S_method - A^{1/2}||_2 <= beta ||A^{1/2}||_2`` (likewise for
    ``A^{-1/2}``), and every eigenvalue is off by at most the factor beta.

    ``l`` must be a finite float32/float64 array of at least one dimension:
    a NaN would otherwise vanish in the max and give a bound of 0.
    """
    xp = _check_eigenvalues(l, "l")
    l = xp.maximum(l, xp.zeros_like(l))
    if method == "ns":
        c = xp.sum(l, axis=-1, keepdims=True)
        if iters is not None and backend._is_array(iters):
            iters = iters[..., None]
    else:
        c = xp.sqrt(xp.sum(l * l, axis=-1, keepdims=True))
    rel = relative_error(l / c, method=method, order=order, degree=degree, iters=iters,
                         inverse=inverse)
    return xp.max(xp.abs(rel), axis=-1)
