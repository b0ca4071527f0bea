"""Gradient-checking harness: adjoint test, finite differences, comparisons.

Every operator's tests and ``refimpl verify`` use these three checks.

Adjoint (dot-product) test
    For a linear map ``J`` (the Jacobian at a point) with forward mode
    ``u -> J u`` and reverse mode ``v -> J^T v``, the identity
    ``<J u, v> = <u, J^T v>`` holds for every ``u, v``.  The test draws (or is
    given) ``u`` and ``v`` and reports

        err = |<J u, v> - <u, J^T v>| / (sum |J u * v| + sum |u * J^T v|),

    which is ~1e-16 for a correct pair in float64 and O(1) for, e.g., a
    missing transpose.  The denominator is what round-off in the two inner
    products is proportional to; unlike ``||J u|| ||v||`` it is not inflated
    by products of entries from different batch members, so a batch that
    mixes scales 1e-6 and 1e3 cannot hide an error in its small member.  It
    needs no reference and is exact up to round-off, but it only checks that
    JVP and VJP agree with *each other*.

Finite differences
    The derivative of ``F`` along ``u`` is estimated by central differences
    ``D(h) = (F(x + h u) - F(x - h u)) / (2h)`` refined by Richardson
    extrapolation on the halving sequence ``h, h/2, h/4``: the table
    ``R[k][j] = R[k][j-1] + (R[k][j-1] - R[k-1][j-1]) / (4^j - 1)`` cancels
    the ``h^2`` and ``h^4`` error terms, leaving ``O(h^6)`` truncation and
    ``O(eps_mach / h)`` rounding (about 1e-12 relative in float64 at the
    default step).  The estimate is compared with the JVP (``||J u - D||``)
    and with the VJP through ``<D, v>`` versus ``<u, J^T v>``.  Directions may
    be given, so that constrained inputs (marginals of equal mass, symmetric
    matrices) are perturbed only along feasible directions.

Comparison
    ``compare`` reports the normwise errors ``max|a - e|`` and
    ``max|a - e| / max|e|`` and passes when
    ``max|a - e| <= max(atol, rtol * max|e|)``.  Normwise (not elementwise)
    relative error is used because gradients routinely contain entries that
    are zero up to round-off.

All functions take arrays of any supported namespace; a single array or a
tuple of arrays is accepted wherever "arrays" is written.  ``None`` in the
output of a JVP/VJP stands for an exact zero.

References: the dot-product test as in JAX's ``check_grads`` (reverse mode);
Richardson extrapolation as in Press et al., *Numerical Recipes*, sec. 5.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import array_api_compat
import numpy as np

from . import backend

__all__ = [
    "CheckResult",
    "DEFAULT_RTOL",
    "adjoint_test",
    "compare",
    "fd_directional",
    "fd_jacobian",
    "fd_jacobian_check",
]

#: Default relative tolerance of each check per dtype.  float32 values carry
#: ~6e-8 unit round-off, so gradients computed through a solve or an
#: iteration are checked to 1e-4 (a documented, deliberately loose bound).
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4}

#: Default relative finite-difference step (fraction of the input's size).
DEFAULT_FD_STEP = 1e-3


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: ``error <= tol`` means pass."""

    check: str
    error: float
    tol: float
    passed: bool
    detail: str = ""

    def __bool__(self) -> bool:
        return self.passed

    @classmethod
    def judge(cls, check: str, error: float, tol: float, detail: str = "") -> "CheckResult":
        """The result of a check that passes when ``error`` is finite and ``<= tol``."""
        passed = bool(math.isfinite(error) and error <= tol)
        return cls(check, float(error), float(tol), passed, detail)

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.check}: error {self.error:.2e} vs tol {self.tol:.1e} {verdict}{extra}"


_result = CheckResult.judge


# --------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------

def _as_tuple(x: Any, name: str) -> tuple:
    """A single array or a tuple of arrays (None allowed) as a tuple.

    NumPy scalars (what NumPy reductions return) are taken as 0-d arrays.
    """
    if isinstance(x, list):
        raise TypeError(f"argument {name!r} must be an array or a tuple of arrays, got list")
    items = x if isinstance(x, tuple) else (x,)
    return tuple(np.asarray(a) if isinstance(a, np.generic) else a for a in items)


def _validated(arrays: tuple, name: str, *, like: tuple | None = None,
               like_name: str = "", allow_none: bool = False) -> tuple:
    """Check each entry is a finite float array, with the shape of ``like``."""
    if like is not None and len(arrays) != len(like):
        raise ValueError(f"{name!r} has {len(arrays)} arrays but {like_name!r} has {len(like)}")
    for i, a in enumerate(arrays):
        label = f"{name}[{i}]" if len(arrays) > 1 else name
        if a is None:
            if allow_none:
                continue
            raise TypeError(f"argument {label!r} is None")
        backend.check_array(a, label)
        if like is not None and like[i] is not None and tuple(a.shape) != tuple(like[i].shape):
            ref = f"{like_name}[{i}]" if len(like) > 1 else like_name
            raise ValueError(
                f"argument {label!r} has shape {tuple(a.shape)}, expected {tuple(like[i].shape)} like {ref!r}"
            )
    return arrays


def _norm(arrays: tuple) -> float:
    """Euclidean norm of the concatenation of the (non-None) arrays."""
    total = 0.0
    for a in arrays:
        if a is not None:
            xp = array_api_compat.array_namespace(a)
            total += float(xp.sum(a * a))
    return math.sqrt(total)


def _dot(xs: tuple, ys: tuple) -> tuple[float, float]:
    """(sum of inner products, sum of |products|), in float64 on the host.

    The second number bounds what round-off can do to the first.  None
    stands for zero.
    """
    total, magnitude = 0.0, 0.0
    for x, y in zip(xs, ys):
        if x is None or y is None:
            continue
        p = backend.to_host(x).astype(np.float64) * backend.to_host(y).astype(np.float64)
        total += float(np.sum(p))
        magnitude += float(np.sum(np.abs(p)))
    return total, magnitude


def _dtype_of(arrays: tuple) -> str:
    names = [backend.dtype_name(a.dtype) for a in arrays if a is not None]
    return "float32" if "float32" in names else "float64"


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def compare(actual: Any, expected: Any, *, rtol: float | None = None,
            atol: float = 0.0, name: str = "compare") -> CheckResult:
    """Normwise comparison of ``actual`` with a reference ``expected``.

    Parameters
    ----------
    actual, expected : array or tuple of arrays (any namespace; compared on host)
    rtol : relative tolerance; default from :data:`DEFAULT_RTOL` by the dtype
        of ``actual``.
    atol : absolute floor, for references that are (close to) zero.

    Returns
    -------
    CheckResult
        ``error = max|a - e| / max(max|e|, atol / rtol)``, passed when
        ``max|a - e| <= max(atol, rtol * max|e|)``.  NaN or Inf in ``actual``
        is a failure (``error = inf``), not an exception.

    Examples
    --------
    >>> import numpy as np
    >>> compare(np.array([1.0, 2.0 + 1e-12]), np.array([1.0, 2.0])).passed
    True
    >>> compare(np.array([1.0, 2.1]), np.array([1.0, 2.0])).passed
    False
    """
    acts = _as_tuple(actual, "actual")
    exps = _as_tuple(expected, "expected")
    if len(acts) != len(exps):
        raise ValueError(f"'actual' has {len(acts)} arrays but 'expected' has {len(exps)}")
    for i, (a, e) in enumerate(zip(acts, exps)):
        label = f"[{i}]" if len(acts) > 1 else ""
        for val, nm in ((a, "actual"), (e, "expected")):
            if not backend._is_array(val):
                raise TypeError(f"argument '{nm}{label}' must be an array, got {type(val).__name__}")
        if tuple(a.shape) != tuple(e.shape):
            raise ValueError(
                f"argument 'actual{label}' has shape {tuple(a.shape)} but "
                f"'expected{label}' has shape {tuple(e.shape)}"
            )
    if rtol is None:
        rtol = DEFAULT_RTOL[_dtype_of(acts)]
    diff = 0.0
    ref = 0.0
    for a, e in zip(acts, exps):
        ha = backend.to_host(a).astype(np.float64)
        he = backend.to_host(e).astype(np.float64)
        if not np.all(np.isfinite(he)):
            raise ValueError("argument 'expected' contains NaN or Inf")
        if ha.size == 0:
            continue
        if not np.all(np.isfinite(ha)):
            return CheckResult(name, math.inf, rtol, False, "actual contains NaN or Inf")
        diff = max(diff, float(np.max(np.abs(ha - he))))
        ref = max(ref, float(np.max(np.abs(he))))
    if rtol > 0:
        denom = max(ref, atol / rtol)
        error = diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
        tol = rtol
    else:
        error, tol = diff, atol
    return _result(name, error, tol, f"max abs {diff:.2e}, max |ref| {ref:.2e}")


# --------------------------------------------------------------------------
# Adjoint (dot-product) test
# --------------------------------------------------------------------------

def adjoint_test(jvp: Callable, vjp: Callable, tangents: Any, cotangents: Any,
                 *, tol: float | None = None, name: str = "adjoint") -> CheckResult:
    """Dot-product test ``<J u, v> == <u, J^T v>``.

    Parameters
    ----------
    jvp : callable ``jvp(*tangents) -> output tangent(s)``
    vjp : callable ``vjp(*cotangents) -> input cotangent(s)`` (None = zero)
    tangents : the direction(s) ``u``, shaped like the inputs
    cotangents : the cotangent(s) ``v``, shaped like the outputs
    tol : bound on the normalised error (default :data:`DEFAULT_RTOL`)

    Examples
    --------
    >>> import numpy as np
    >>> M = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> adjoint_test(lambda u: M @ u, lambda v: M.T @ v,
    ...              np.array([1.0, -1.0]), np.array([0.5, 2.0])).passed
    True
    >>> adjoint_test(lambda u: M @ u, lambda v: M @ v,      # missing transpose
    ...              np.array([1.0, -1.0]), np.array([0.5, 2.0])).passed
    False
    """
    u = _validated(_as_tuple(tangents, "tangents"), "tangents")
    v = _validated(_as_tuple(cotangents, "cotangents"), "cotangents")
    Ju = _validated(_as_tuple(jvp(*u), "jvp output"), "jvp output", like=v,
                    like_name="cotangents")
    JTv = _validated(_as_tuple(vjp(*v), "vjp output"), "vjp output", like=u,
                     like_name="tangents", allow_none=True)
    if tol is None:
        tol = DEFAULT_RTOL[_dtype_of(u + v)]
    (lhs, mag_l), (rhs, mag_r) = _dot(Ju, v), _dot(u, JTv)
    scale = mag_l + mag_r
    error = abs(lhs - rhs) / scale if scale > 0 else 0.0
    return _result(name, error, tol, f"<Ju,v>={lhs:.6e}, <u,J^Tv>={rhs:.6e}")


# --------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------

def _fd_step(inputs: tuple, tangents: tuple, rel_step: float) -> float:
    """Step t so that no input moves by more than ``rel_step`` times its size."""
    t = math.inf
    for x, u in zip(inputs, tangents):
        if u is None:
            continue
        xp = array_api_compat.array_namespace(u)
        umax = float(xp.max(xp.abs(u))) if u.size else 0.0
        if umax == 0.0:
            continue
        xmax = float(xp.max(xp.abs(x))) if x.size else 0.0
        t = min(t, rel_step * (xmax if xmax > 0 else 1.0) / umax)
    return t if math.isfinite(t) else rel_step


def fd_directional(f: Callable, inputs: Any, tangents: Any, *,
                   rel_step: float = DEFAULT_FD_STEP, levels: int = 3,
                   step: float | None = None) -> tuple[tuple, float]:
    """Directional derivative ``d/dt F(x + t u)`` at ``t = 0``.

    Central differences at steps ``h, h/2, ..., h/2^(levels-1)`` combined by
    Richardson extrapolation (error ``O(h^(2 levels))``).

    Parameters
    ----------
    f : callable ``f(*inputs) -> array or tuple of arrays``
    inputs, tangents : arrays (tangent None = input held fixed)
    rel_step : ``h`` as a fraction of the largest input entry (per input,
        the smallest such step is used); ignored when ``step`` is given.
    levels : number of step halvings (1 = plain central difference).

    Returns
    -------
    (derivative, error_estimate)
        The extrapolated derivative as a tuple shaped like ``f``'s output,
        and ``||R[L][L] - R[L][L-1]||``, the usual a-posteriori estimate of
        its error.
    """
    x = _validated(_as_tuple(inputs, "inputs"), "inputs")
    u = _validated(_as_tuple(tangents, "tangents"), "tangents", like=x,
                   like_name="inputs", allow_none=True)
    if levels < 1:
        raise ValueError(f"argument 'levels' must be >= 1, got {levels}")
    h = step if step is not None else _fd_step(x, u, rel_step)

    def central(hk: float) -> tuple:
        plus = [xi if ui is None else xi + hk * ui for xi, ui in zip(x, u)]
        minus = [xi if ui is None else xi - hk * ui for xi, ui in zip(x, u)]
        fp = _as_tuple(f(*plus), "f output")
        fm = _as_tuple(f(*minus), "f output")
        return tuple((a - b) / (2.0 * hk) for a, b in zip(fp, fm))

    table: list[list[tuple]] = []
    for k in range(levels):
        row = [central(h / 2.0 ** k)]
        for j in range(1, k + 1):
            c = 4.0 ** j - 1.0
            row.append(tuple(a + (a - b) / c for a, b in zip(row[j - 1], table[k - 1][j - 1])))
        table.append(row)
    best = table[-1][-1]
    if levels == 1:
        err = math.nan
    else:
        err = _norm(tuple(a - b for a, b in zip(best, table[-1][-2])))
    return best, err


def fd_jacobian(f: Callable, x: Any, *, rel_step: float = DEFAULT_FD_STEP,
                levels: int = 3) -> np.ndarray:
    """Dense Jacobian ``dF/dx`` of shape ``(F.size, x.size)`` on the host.

    One Richardson-extrapolated directional derivative per entry of ``x``
    (a single array); meant for small problems and tests.
    """
    backend.check_array(x, "x")
    xp = array_api_compat.array_namespace(x)
    cols = []
    host_shape = tuple(x.shape)
    for j in range(math.prod(host_shape)):
        e = np.zeros(math.prod(host_shape))
        e[j] = 1.0
        ej = backend.from_host(e.reshape(host_shape), xp, device=backend.device(x),
                               dtype=x.dtype)
        (d,), _ = fd_directional(f, (x,), (ej,), rel_step=rel_step, levels=levels,
                                 step=rel_step * max(1.0, float(xp.max(xp.abs(x)))))
        cols.append(backend.to_host(d).reshape(-1))
    return np.stack(cols, axis=1)


def fd_jacobian_check(f: Callable, inputs: Any, tangents: Any, *,
                      cotangents: Any = None, vjp: Callable | None = None,
                      jvp: Callable | None = None, tol: float | None = None,
                      rel_step: float = DEFAULT_FD_STEP, levels: int = 3,
                      name: str = "fd") -> list[CheckResult]:
    """Check a JVP and/or a VJP against finite differences along ``tangents``.

    Parameters
    ----------
    f : callable ``f(*inputs)`` -> output array(s); evaluate it in float64.
    inputs : the point ``x``.
    tangents : the direction ``u`` (e.g. a feasible direction).
    cotangents : ``v`` for the VJP check (required with ``vjp``).
    vjp, jvp : the derivatives under test, as in :func:`adjoint_test`.
    tol : bound on each normalised error (default :data:`DEFAULT_RTOL`
        of the tested derivative's dtype, never below 1e-9, the accuracy of
        the extrapolated difference itself).

    Returns
    -------
    list of CheckResult
        ``name + "_jvp"``: ``||J u - D|| / max(||D||, ||J u||)``;
        ``name + "_vjp"``: ``|<D, v> - <u, J^T v>| / (sum |D v| + sum |u J^T v|)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([0.3, -1.2])
    >>> f = lambda x: np.sin(x) * x[::-1]
    >>> J = np.diag(np.cos(x) * x[::-1]) + np.diag(np.sin(x)) @ np.eye(2)[::-1]
    >>> [r.passed for r in fd_jacobian_check(f, x, np.array([1.0, 0.5]),
    ...     jvp=lambda u: J @ u, vjp=lambda v: J.T @ v,
    ...     cotangents=np.array([0.2, 1.0]))]
    [True, True]
    """
    if vjp is None and jvp is None:
        raise ValueError("fd_jacobian_check needs 'vjp' or 'jvp'")
    x = _validated(_as_tuple(inputs, "inputs"), "inputs")
    u = _validated(_as_tuple(tangents, "tangents"), "tangents", like=x,
                   like_name="inputs", allow_none=True)
    D, err_est = fd_directional(f, x, u, rel_step=rel_step, levels=levels)
    detail = f"fd error estimate {err_est / max(_norm(D), 1e-300):.1e}"
    results = []
    if jvp is not None:
        Ju = _validated(_as_tuple(jvp(*u), "jvp output"), "jvp output", like=D,
                        like_name="f output")
        t = tol if tol is not None else max(DEFAULT_RTOL[_dtype_of(Ju)], 1e-9)
        scale = max(_norm(D), _norm(Ju))
        diff = _norm(tuple(a - b for a, b in zip(Ju, D)))
        results.append(_result(f"{name}_jvp", diff / scale if scale > 0 else 0.0, t, detail))
    if vjp is not None:
        if cotangents is None:
            raise ValueError("fd_jacobian_check with 'vjp' needs 'cotangents'")
        v = _validated(_as_tuple(cotangents, "cotangents"), "cotangents", like=D,
                       like_name="f output")
        JTv = _validated(_as_tuple(vjp(*v), "vjp output"), "vjp output", like=x,
                         like_name="inputs", allow_none=True)
        t = tol if tol is not None else max(DEFAULT_RTOL[_dtype_of(JTv)], 1e-9)
        (lhs, mag_l), (rhs, mag_r) = _dot(D, v), _dot(u, JTv)
        scale = mag_l + mag_r
        results.append(_result(f"{name}_vjp", abs(lhs - rhs) / scale if scale > 0 else 0.0,
                               t, detail + f"; <D,v>={lhs:.6e}, <u,J^Tv>={rhs:.6e}"))
    return results


def random_like(rng: np.random.Generator, arrays: Sequence, *, like_device: bool = True) -> tuple:
    """Standard-normal host-generated arrays shaped and placed like ``arrays``."""
    out = []
    for a in arrays:
        xp = array_api_compat.array_namespace(a)
        out.append(backend.from_host(rng.standard_normal(tuple(a.shape)), xp,
                                     device=backend.device(a), dtype=a.dtype))
    return tuple(out)
