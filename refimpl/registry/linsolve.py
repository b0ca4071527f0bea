"""Registry entries for the dense linear solve (refimpl.linsolve): cases, oracle, tolerances and
operator-specific checks.  Listed in ``refimpl.registry``."""

from __future__ import annotations

import math

import numpy as np

from .. import linsolve
from . import Case, OpSpec, Tolerance


def _random_matrix(rng, n: int, cond: float) -> np.ndarray:
    """A non-symmetric n x n matrix with 2-norm condition number ``cond``."""
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0.0, -math.log10(cond), n) if n > 1 else np.ones(1)
    return (U * s) @ V.T


def _linear_solve_oracle(A, b):
    """x = A^+ b by SVD least squares (scipy.linalg.lstsq), member by member."""
    import scipy.linalg

    bshape = np.broadcast_shapes(A.shape[:-2], b.shape[:-1])
    A = np.broadcast_to(A, bshape + A.shape[-2:])
    b = np.broadcast_to(b, bshape + b.shape[-1:])
    x = np.empty(bshape + b.shape[-1:])
    for idx in np.ndindex(*bshape):
        x[idx] = scipy.linalg.lstsq(A[idx], b[idx], lapack_driver="gelsd")[0]
    return x


def _linear_solve_spec() -> OpSpec:

    def well_conditioned(rng):
        return {"A": _random_matrix(rng, 5, 10.0), "b": rng.standard_normal(5)}

    def batched_scales(rng):
        scales = np.array([1e-6, 1e-2, 1.0, 1e3])[:, None, None]
        A = np.stack([_random_matrix(rng, 4, 30.0) for _ in range(4)]) * scales
        return {"A": A, "b": rng.standard_normal((4, 4)) * scales[..., 0]}

    def shared_matrix(rng):
        return {"A": _random_matrix(rng, 3, 5.0), "b": rng.standard_normal((2, 3, 3))}

    def ill_conditioned(rng):
        return {"A": _random_matrix(rng, 6, 1e6), "b": rng.standard_normal(6)}

    def scalar(rng):
        return {"A": np.array([[-0.7]]), "b": np.array([2.0])}

    return OpSpec(
        name="linear_solve",
        description="x = A^{-1} b, batched (foundation building block)",
        inputs=("A", "b"),
        core_ndim=(2, 1),
        output="x",
        output_core_ndim=1,
        forward=linsolve.solve,
        vjp=lambda res, x_bar: linsolve.solve_vjp(res, x_bar),
        jvp=lambda res, dA, db: linsolve.solve_jvp(res, dA, db),
        oracle=_linear_solve_oracle,
        cases=(
            Case("well_conditioned", "random 5x5, cond 10", 1, well_conditioned),
            Case("batched_scales", "batch of 4 whose members differ in scale 1e-6..1e3",
                 2, batched_scales, flags=("batched", "scales")),
            Case("shared_matrix", "one A broadcast against a (2, 3) batch of b",
                 3, shared_matrix, flags=("batched", "broadcast")),
            Case("ill_conditioned", "6x6 with cond 1e6 (float64 only)", 4, ill_conditioned,
                 flags=("ill_conditioned",), dtypes=("float64",), fd_step=1e-9,
                 tol={"float64": {"forward": 1e-8, "adjoint": 1e-9, "fd": 1e-6}}),
            Case("scalar", "1x1 system", 5, scalar, flags=("edge",)),
        ),
        tol={
            "float64": Tolerance(forward=1e-11, adjoint=1e-11, fd=1e-8, batch=1e-12),
            "float32": Tolerance(forward=1e-4, adjoint=1e-6, fd=1e-3, batch=1e-5),
        },
        conventions={
            "output": "x solves A x = b (the unique solution; A is non-singular)",
            "broadcasting": "batch dimensions of A (..., n, n) and b (..., n) broadcast; "
                            "the cotangent of a broadcast input is summed over the "
                            "dimensions it was broadcast along, so it has that input's shape",
            "gauge": "none (the gradient is unique)",
        },
    )


#: The specs this module registers, in table order.
BUILDERS = (_linear_solve_spec,)
