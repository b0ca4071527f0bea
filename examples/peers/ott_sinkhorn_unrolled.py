"""OTT-JAX's Sinkhorn solver differentiated through its iterations (unrolled).

Peer: OTT-JAX 0.6.0 (``ott.solvers.linear.sinkhorn.Sinkhorn`` with
``implicit_diff=None``: reverse mode through the stored iterates), JAX autodiff.

Mapping of conventions: as in ``ott_sinkhorn_implicit.py``
(``Geometry(cost_matrix=C, epsilon=eps)``, ``LinearProblem(geom, a, b)``,
``.matrix`` is ``P``; batch members looped over).  Check it with::

    refimpl validate sinkhorn examples/peers/ott_sinkhorn_unrolled.py:sinkhorn --framework jax
"""

from ott_sinkhorn_implicit import loop_members, plan


def sinkhorn(C, a, b, *, eps):
    """Entropic plan ``P(C, a, b)``, gradient by unrolling OTT's iterations."""
    return loop_members(lambda Cm, am, bm: plan(Cm, am, bm, eps, None), C, a, b)
