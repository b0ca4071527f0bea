"""OTT-JAX's soft top-k mask (``ott.tools.soft_sort.topk_mask``) as a SOFT top-k.

Peer: OTT-JAX 0.6.0, JAX autodiff (implicit differentiation of OTT's
Sinkhorn, its default).

Mapping of conventions.  refimpl's ``soft_topk: fn(x, *, k, eps, largest) -> A``
transports the scores ``x`` (mass ``1/n`` each) onto the anchors ``(0, 1)``
with masses ``((n-k)/n, k/n)`` and cost ``(x_i - y_j)^2``, regularisation
``eps``, and returns ``A_i = n P_i2``.  ``topk_mask(x, k=k)`` solves the same
transport (targets ``linspace(0, 1, 2)``, target weights ``(1 - k/n, k/n)``,
OTT's default squared-Euclidean point-cloud cost) and returns
``ranks / (n - 1) = n P_i2``, except that it first squashes ``x`` through a
sigmoid of the whitened scores; passing ``squashing_fun=identity`` and
``epsilon=eps`` (absolute) makes the two the same map.  ``largest=False``
is ``topk_mask(-x)``.  ``topk_mask`` works on one axis and asserts
``k < n``; leading batch dimensions are looped over.  Check it with::

    refimpl validate soft_topk examples/peers/ott_topk.py:soft_topk --framework jax
"""

import jax.numpy as jnp
from ott.tools import soft_sort

THRESHOLD = 1e-13
MAX_ITER = 20000


def _identity(z):
    return z


def _mask(x, k, eps):
    return soft_sort.topk_mask(x, k=k, squashing_fun=_identity, epsilon=eps,
                               threshold=THRESHOLD, max_iterations=MAX_ITER)


def soft_topk(x, *, k, eps, largest):
    """SOFT top-k indicator ``A(x)`` by OTT's ``topk_mask``."""
    s = x if largest else -x
    if s.ndim == 1:
        return _mask(s, k, eps)
    flat = s.reshape(-1, s.shape[-1])
    return jnp.stack([_mask(row, k, eps) for row in flat]).reshape(s.shape)
