"""OTT-JAX's ``reg_ot_cost``: the KL-regularised value, envelope gradient, JAX autodiff.

Peer: OTT-JAX 0.6.0 (``ott.solvers.linear.sinkhorn.Sinkhorn`` with its
defaults: implicit differentiation, ``use_danskin=True``), JAX autodiff.

Mapping of conventions.  For ``Geometry(cost_matrix=C, epsilon=eps)`` and
``LinearProblem(geom, a=a, b=b)`` (balanced), the output's ``reg_ot_cost``
is ``compute_kl_reg_cost`` (``ott/solvers/linear/sinkhorn.py``):
``<a, f - eps log a> + <b, g - eps log b> + eps (sum(a) sum(b) - sum(P))``,
which at the optimum is ``<C, P> + eps KL(P | a b^T)`` with
``KL(P | Q) = sum P log(P / Q) - P + Q`` -- refimpl's operator
``sinkhorn_kl``, with no offset or scaling (equal to refimpl's
``kl_value`` to round-off, checked numerically for unit and non-unit
masses).  OTT evaluates it with ``stop_gradient`` on the potentials
(Danskin), so its gradient is the envelope gradient.  One problem at a time;
leading batch dimensions (of ``C``, ``a``, ``b``, broadcast against each
other) are looped over and the values stacked.  Check it with::

    refimpl validate sinkhorn_kl examples/peers/ott_reg_ot_cost.py:sinkhorn_kl --framework jax
"""

import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn

from ott_sinkhorn_implicit import MAX_ITER, THRESHOLD


def loop_values(solve, C, a, b):
    """Apply ``solve(C_m, a_m, b_m) -> scalar`` to every batch member; the values
    shaped like the batch (a 0-d array unbatched)."""
    batch = jnp.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    if not batch:
        return solve(C, a, b)
    n, m = C.shape[-2:]
    C = jnp.broadcast_to(C, batch + (n, m)).reshape(-1, n, m)
    a = jnp.broadcast_to(a, batch + (n,)).reshape(-1, n)
    b = jnp.broadcast_to(b, batch + (m,)).reshape(-1, m)
    return jnp.stack([solve(C[i], a[i], b[i]) for i in range(C.shape[0])]).reshape(batch)


def solve(C, a, b, eps):
    """OTT's Sinkhorn output for one problem (default differentiation settings)."""
    geom = geometry.Geometry(cost_matrix=C, epsilon=eps)
    problem = linear_problem.LinearProblem(geom, a=a, b=b)
    return ott_sinkhorn.Sinkhorn(threshold=THRESHOLD, max_iterations=MAX_ITER)(problem)


def sinkhorn_kl(C, a, b, *, eps):
    """``<C, P> + eps KL(P | a b^T)`` as OTT's ``reg_ot_cost``."""
    return loop_values(lambda Cm, am, bm: solve(Cm, am, bm, eps).reg_ot_cost, C, a, b)
