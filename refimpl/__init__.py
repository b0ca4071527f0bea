"""refimpl: reference implementations of differentiable operators and their gradients.

Every operator is a set of plain functions side by side (see DESIGN.md):
``res = op(*inputs, **params)`` returns a frozen result; ``op_vjp(res, out_bar)``
and ``op_jvp(res, *tangents)`` differentiate it.  ``refimpl.registry`` lists
the operators; ``refimpl.check`` is the gradient-checking harness.
"""

from . import backend, check, linsolve, matsqrt, registry
from .matsqrt import (inv_sqrtm, inv_sqrtm_jvp, inv_sqrtm_vjp, lyapunov, matrix_sign, sqrtm,
                      sqrtm_jvp, sqrtm_vjp)

__version__ = "0.1.0"

__all__ = ["backend", "check", "linsolve", "matsqrt", "registry", "__version__",
           "inv_sqrtm", "inv_sqrtm_jvp", "inv_sqrtm_vjp", "lyapunov", "matrix_sign", "sqrtm",
           "sqrtm_jvp", "sqrtm_vjp"]
