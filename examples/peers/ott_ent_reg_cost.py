"""OTT-JAX's ``ent_reg_cost`` minus ``eps sum(a) sum(b)``: the entropic value, JAX autodiff.

Peer: OTT-JAX 0.6.0 (``ott.solvers.linear.sinkhorn.Sinkhorn`` with its
defaults: implicit differentiation, ``use_danskin=True``), JAX autodiff.

Mapping of conventions.  ``SinkhornOutput.ent_reg_cost`` is computed as
``reg_ot_cost - eps (entr(a) + entr(b))`` with ``entr(x) = -sum x log x``
(``ott/solvers/linear/sinkhorn.py``), i.e. ``<f, a> + <g, b> + eps (sum(a)
sum(b) - sum(P))``.  refimpl's ``sinkhorn_entropic`` is ``<C, P> + eps sum P
(log P - 1) = <f, a> + <g, b> - eps sum(P)`` at the optimum, so

    ent_reg_cost = sinkhorn_entropic + eps sum(a) sum(b)

(``+ eps`` for probability marginals; the property's docstring,
``<P, C> - eps H(P)`` with the Shannon entropy, would give ``+ eps sum(P)``
instead, which differs when the masses are not 1: with masses 3 and
``eps = 0.2`` the code gives ``+1.8``, not ``+0.6``).  The wrapper subtracts
``eps sum(a) sum(b)`` inside the differentiated function, so the offset's
gradient (``eps sum(b)`` for every entry of ``a``) is removed too.  The rest
as ``ott_reg_ot_cost.py``.  Check it with::

    refimpl validate sinkhorn_entropic examples/peers/ott_ent_reg_cost.py:sinkhorn_entropic --framework jax
"""

import jax.numpy as jnp

from ott_reg_ot_cost import loop_values, solve


def sinkhorn_entropic(C, a, b, *, eps):
    """``<C, P> + eps sum P (log P - 1)`` from OTT's ``ent_reg_cost``."""
    return loop_values(
        lambda Cm, am, bm: solve(Cm, am, bm, eps).ent_reg_cost - eps * jnp.sum(am) * jnp.sum(bm),
        C, a, b)
