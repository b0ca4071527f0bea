"""refimpl: reference implementations of differentiable operators and their gradients.

Every operator is a set of plain functions side by side (see DESIGN.md):
``res = op(*inputs, **params)`` returns a frozen result; ``op_vjp(res, out_bar)``
and ``op_jvp(res, *tangents)`` differentiate it.  ``refimpl.registry`` lists
the operators; ``refimpl.check`` is the gradient-checking harness.
"""

from . import backend, check, linsolve, registry, sinkhorn

__version__ = "0.1.0"

__all__ = ["backend", "check", "linsolve", "registry", "sinkhorn", "__version__"]
