"""OTT-JAX's Sinkhorn solver with implicit differentiation, returning the plan.

Peer: OTT-JAX 0.6.0 (``ott.solvers.linear.sinkhorn.Sinkhorn`` with its default
``implicit_diff=ImplicitDiff()``), JAX autodiff.

Mapping of conventions.  refimpl's ``sinkhorn: fn(C, a, b, *, eps) -> P`` is
the plan of ``min <P, C> - eps H(P)``, ``P 1 = a``, ``P^T 1 = b``.  OTT solves
the same problem for ``Geometry(cost_matrix=C, epsilon=eps)`` (an absolute
epsilon: no ``relative_epsilon``, no cost scaling) and
``LinearProblem(geom, a=a, b=b)``; the output's ``.matrix`` is ``P``.
OTT's ``threshold`` bounds the marginal violation at which the iterations
stop.  OTT takes one problem at a time here; leading batch dimensions (of
``C``, ``a``, ``b``, broadcast against each other) are looped over and the
plans stacked.  Check it with::

    refimpl validate sinkhorn examples/peers/ott_sinkhorn_implicit.py:sinkhorn --framework jax
"""

import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import implicit_differentiation, sinkhorn as ott_sinkhorn

THRESHOLD = 1e-13
MAX_ITER = 50000


def loop_members(solve, C, a, b):
    """Apply ``solve(C_m, a_m, b_m)`` to every batch member and stack the plans."""
    batch = jnp.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    if not batch:
        return solve(C, a, b)
    n, m = C.shape[-2:]
    C = jnp.broadcast_to(C, batch + (n, m)).reshape(-1, n, m)
    a = jnp.broadcast_to(a, batch + (n,)).reshape(-1, n)
    b = jnp.broadcast_to(b, batch + (m,)).reshape(-1, m)
    plans = [solve(C[i], a[i], b[i]) for i in range(C.shape[0])]
    return jnp.stack(plans).reshape(batch + (n, m))


def plan(C, a, b, eps, implicit_diff):
    """OTT's entropic plan for one problem."""
    geom = geometry.Geometry(cost_matrix=C, epsilon=eps)
    problem = linear_problem.LinearProblem(geom, a=a, b=b)
    solver = ott_sinkhorn.Sinkhorn(threshold=THRESHOLD, max_iterations=MAX_ITER,
                                   implicit_diff=implicit_diff)
    return solver(problem).matrix


def sinkhorn(C, a, b, *, eps):
    """Entropic plan ``P(C, a, b)``, gradient by OTT's implicit differentiation."""
    return loop_members(
        lambda Cm, am, bm: plan(Cm, am, bm, eps, implicit_differentiation.ImplicitDiff()),
        C, a, b)
