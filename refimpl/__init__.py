"""refimpl: reference implementations of differentiable operators and their gradients.

Every operator is a set of plain functions side by side (see DESIGN.md):
``res = op(*inputs, **params)`` returns a frozen result; ``op_vjp(res, out_bar)``
and ``op_jvp(res, *tangents)`` differentiate it.  ``refimpl.registry`` lists
the operators; ``refimpl.check`` is the gradient-checking harness.
"""

from . import backend, check, linsolve, registry, sinkhorn, topk
from .topk import soft_sorted_topk, soft_topk, soft_topk_jvp, soft_topk_vjp

__version__ = "0.1.0"

__all__ = ["backend", "check", "linsolve", "registry", "sinkhorn", "topk", "__version__",
           "soft_topk", "soft_topk_vjp", "soft_topk_jvp", "soft_sorted_topk"]
