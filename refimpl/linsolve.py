r"""Differentiable dense linear solve ``x = A^{-1} b``, batched.

Definition
----------
For a non-singular ``A`` (..., n, n) and ``b`` (..., n) (batch dimensions
broadcast), ``x`` is the unique solution of ``A x = b``.

Symbols: ``A`` the matrix, ``b`` the right-hand side, ``x`` the solution,
``x_bar = dL/dx`` the incoming cotangent, ``A_bar, b_bar`` the outgoing ones,
``dA, db, dx`` tangents.

Forward mode (JVP)
------------------
Differentiating ``A x = b`` gives ``dA x + A dx = db``, so

    dx = A^{-1} (db - dA x).

Reverse mode (VJP)
------------------
From ``<x_bar, dx> = <x_bar, A^{-1}(db - dA x)> = <A^{-T} x_bar, db - dA x>``:

    b_bar = A^{-T} x_bar,
    A_bar = -b_bar x^T.

When ``A`` or ``b`` was broadcast against the other's batch dimensions, its
cotangent is summed over those dimensions (the adjoint of broadcasting).

This module is the worked example of the operator contract in docs/design.md:
forward returns a frozen result holding the output, its residuals and
diagnostics; the JVP and VJP take that result.  Sinkhorn, SOFT top-k and the
DEQ backward all end in a solve of this kind.

Examples
--------
>>> import numpy as np
>>> A = np.array([[4.0, 1.0], [2.0, 3.0]]); b = np.array([1.0, 2.0])
>>> res = solve(A, b)
>>> bool(np.allclose(A @ res.x, b))
True
>>> A_bar, b_bar = solve_vjp(res, np.array([1.0, 0.0]))
>>> bool(np.allclose(A.T @ b_bar, [1.0, 0.0]))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import backend
from .backend import matvec, mT, solve_vec, sum_to_shape

__all__ = ["SolveResult", "solve", "solve_jvp", "solve_vjp"]


@dataclass(frozen=True)
class SolveResult:
    """Result of :func:`solve`.

    Attributes
    ----------
    x : the solution (..., n)
    A, b : the inputs (references, not copies; never modified)
    residual : float, max over the batch of ``||A x - b|| / (||A|| ||x|| + ||b||)``
        (the normwise backward error; ~1e-16 in float64 for a stable solve)
    """

    x: Any
    A: Any
    b: Any
    residual: float


def _check_inputs(A, b):
    xp = backend.namespace(A=A, b=b)
    backend.check_array(A, "A", min_ndim=2)
    backend.check_array(b, "b", min_ndim=1)
    n = A.shape[-1]
    if A.shape[-2] != n:
        raise ValueError(f"argument 'A' must be square in its last two axes, got shape {tuple(A.shape)}")
    if b.shape[-1] != n:
        raise ValueError(
            f"argument 'b' has length {b.shape[-1]} in its last axis but 'A' is {n}x{n}"
        )
    try:
        backend.broadcast_shapes(A.shape[:-2], b.shape[:-1])
    except ValueError:
        raise ValueError(
            f"batch shapes of 'A' {tuple(A.shape[:-2])} and 'b' {tuple(b.shape[:-1])} do not broadcast"
        ) from None
    return xp


def _solve_or_raise(xp, A, rhs, what: str):
    """``A^{-1} rhs``, turning a library's LinAlgError (or a non-finite result,
    CuPy's way of failing) into a ``ValueError`` saying what was singular."""
    try:
        x = solve_vec(A, rhs)
    except Exception as exc:  # numpy/strict/torch raise a LinAlgError; CuPy returns non-finite values
        if "LinAlgError" in type(exc).__name__:              # torch's is _LinAlgError
            raise ValueError(what) from exc
        raise
    if not backend.all_true(xp.isfinite(x)):
        raise ValueError(what)
    return x


def _check_result(res) -> None:
    backend.check_result(res, "res", SolveResult, producer="solve()")


def _check_tangent(t, name: str, shape: tuple, like_name: str) -> None:
    if t is None:
        return
    backend.check_array(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"argument {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                         f"like {like_name!r}")


def solve(A, b) -> SolveResult:
    """Solve ``A x = b`` for ``x`` (batched, broadcasting batch dimensions).

    Raises
    ------
    TypeError : ``A`` or ``b`` is not a float32/float64 array, or they have
        different dtypes.
    ValueError : non-finite entries, empty arrays, shape mismatch, or ``A``
        singular to working precision (the solution is not finite).
    """
    xp = _check_inputs(A, b)
    x = _solve_or_raise(xp, A, b, "argument 'A' is singular to working precision")
    r = matvec(A, x) - b
    norm = xp.linalg.vector_norm
    rel = norm(r, axis=-1) / (xp.linalg.matrix_norm(A) * norm(x, axis=-1) + norm(b, axis=-1))
    return SolveResult(x=x, A=A, b=b, residual=float(xp.max(rel)) if rel.ndim else float(rel))


def solve_jvp(res: SolveResult, dA, db):
    """Forward mode: ``dx = A^{-1} (db - dA x)``.  ``dA``/``db`` may be None (zero).

    ``dA`` and ``db`` must be finite arrays with the shapes and dtype of
    ``res.A`` and ``res.b``.
    """
    _check_result(res)
    xp = backend.namespace(x=res.x, dA=dA, db=db)
    _check_tangent(dA, "dA", tuple(res.A.shape), "A")
    _check_tangent(db, "db", tuple(res.b.shape), "b")
    rhs = xp.zeros_like(res.x)
    if db is not None:
        rhs = rhs + db
    if dA is not None:
        rhs = rhs - matvec(dA, res.x)
    # The map is linear in (dA, db): solve for the rescaled right-hand side so
    # that a huge tangent cannot overflow inside the solve, then scale back.
    scale = float(xp.max(xp.abs(rhs))) if rhs.ndim else abs(float(rhs))
    if scale == 0.0 or not math.isfinite(scale):
        scale = 1.0
    return _solve_or_raise(xp, res.A, rhs / scale,
                           "the tangent solve with 'res.A' failed (A singular to working precision)") * scale


def solve_vjp(res: SolveResult, x_bar):
    """Reverse mode: ``b_bar = A^{-T} x_bar``, ``A_bar = -b_bar x^T``.

    Returns ``(A_bar, b_bar)`` with the shapes of ``A`` and ``b``.

    Raises
    ------
    TypeError : ``res`` is not a :class:`SolveResult`, ``x_bar`` not a float
        array of ``res.x``'s dtype.
    ValueError : ``x_bar`` has the wrong shape or non-finite entries, or the
        transposed solve fails (``A^T`` singular to working precision).
    """
    _check_result(res)
    xp = backend.namespace(x=res.x, x_bar=x_bar)
    backend.check_array(x_bar, "x_bar")
    if tuple(x_bar.shape) != tuple(res.x.shape):
        raise ValueError(f"argument 'x_bar' has shape {tuple(x_bar.shape)}, expected {tuple(res.x.shape)}")
    g = _solve_or_raise(xp, mT(res.A), x_bar,          # A^T g = x_bar
                        "the adjoint solve A^T g = x_bar failed: 'res.A' is singular to working "
                        "precision in transposed form")
    A_bar = -(g[..., :, None] * res.x[..., None, :])  # -g x^T
    return sum_to_shape(A_bar, tuple(res.A.shape)), sum_to_shape(g, tuple(res.b.shape))
