"""A NumPy linear solve with its VJP: the ``--framework numpy --vjp`` convention.

NumPy has no autodiff, so ``refimpl validate`` takes the gradient from a
function you supply, called as

    vjp(*inputs, out_bar, **params) -> tuple with one cotangent per input

(the same inputs and keywords as the forward, then the output cotangent;
return None for an input the output does not depend on)::

    refimpl validate linear_solve examples/numpy_linear_solve.py:linear_solve \\
        --framework numpy --vjp examples/numpy_linear_solve.py:linear_solve_vjp
"""

import numpy as np


def linear_solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x`` with ``A x = b``, batched with broadcasting."""
    return np.linalg.solve(A, b[..., None])[..., 0]


def _sum_to_shape(a: np.ndarray, shape) -> np.ndarray:
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


def linear_solve_vjp(A: np.ndarray, b: np.ndarray, x_bar: np.ndarray):
    """``(A_bar, b_bar)`` with ``b_bar = A^{-T} x_bar`` and ``A_bar = -b_bar x^T``."""
    x = linear_solve(A, b)
    b_bar = np.linalg.solve(np.swapaxes(A, -1, -2), x_bar[..., None])[..., 0]
    A_bar = -b_bar[..., :, None] * x[..., None, :]
    return _sum_to_shape(A_bar, A.shape), _sum_to_shape(b_bar, b.shape)
