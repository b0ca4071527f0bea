"""refimpl: reference implementations of differentiable operators and their gradients.

Every operator is a set of plain functions side by side (see docs/design.md):
``res = op(*inputs, **params)`` returns a frozen result; ``op_vjp(res, out_bar)``
and ``op_jvp(res, *tangents)`` differentiate it.  ``refimpl.registry`` lists
the operators; ``refimpl.check`` is the gradient-checking harness.

``refimpl.sinkhorn`` is both the module and (called) the forward
``refimpl.sinkhorn.sinkhorn``, as docs/design.md names it.
"""

from . import backend, check, combinatorial, deq, linsolve, matsqrt, registry, sinkhorn, topk
from .matsqrt import (inv_sqrtm, inv_sqrtm_jvp, inv_sqrtm_vjp, lyapunov, matrix_sign, sqrtm,
                      sqrtm_jvp, sqrtm_vjp)
from .sinkhorn import sinkhorn_jvp, sinkhorn_unrolled_vjp, sinkhorn_vjp
from .topk import soft_sorted_topk, soft_topk, soft_topk_jvp, soft_topk_vjp

__version__ = "0.2.0"

__all__ = [
    "__version__",
    # modules
    "backend", "check", "combinatorial", "deq", "linsolve", "matsqrt", "registry", "sinkhorn",
    "topk",
    # Sinkhorn (refimpl.sinkhorn is callable: the forward)
    "sinkhorn_jvp", "sinkhorn_unrolled_vjp", "sinkhorn_vjp",
    # SOFT top-k
    "soft_sorted_topk", "soft_topk", "soft_topk_jvp", "soft_topk_vjp",
    # matrix square root
    "inv_sqrtm", "inv_sqrtm_jvp", "inv_sqrtm_vjp", "lyapunov", "matrix_sign", "sqrtm",
    "sqrtm_jvp", "sqrtm_vjp",
]
