"""A JAX SOFT top-k layer: closed form, with its VJP written out as a ``jax.custom_vjp``.

With anchors 0 and 1 the entropic transport plan of SOFT top-k has the closed
form ``A_i = sigmoid((x_i - theta) / t)``, ``t = eps / 2``, where ``theta`` solves
``sum_i A_i = k`` (``largest=False`` is the same on ``-x``).  Differentiating
the constraint gives ``d theta / d x_i = s_i / S`` with ``s = A (1 - A)`` and
``S = sum_i s_i``, hence the symmetric Jacobian ``J = (diag(s) - s s^T / S) / t``
and the O(n) VJP

    x_bar = s * (A_bar - <s, A_bar> / S) / t.

``theta`` is found by bisection on a residual summed without cancellation
(a count of the scores above ``theta`` plus the sigmoid tails), inside a
``jax.lax.fori_loop``.  Check it with::

    refimpl validate soft_topk examples/candidates/jax_topk.py:soft_topk --framework jax
"""

import functools

import jax
import jax.numpy as jnp


def _parts(x, theta, t):
    """(A, s): the sigmoid and s = A (1 - A), both accurate in the tails."""
    z = (x - theta) / t
    lower, upper = jax.nn.sigmoid(z), jax.nn.sigmoid(-z)         # A and 1 - A
    return jnp.where(z > 0, 1.0 - upper, lower), lower * upper


def _theta(x, k, t, n_steps=200):
    """Root of sum_i sigmoid((x_i - theta)/t) = k by bisection."""

    def excess(theta):
        z = (x - theta) / t
        above = z > 0
        tails = jnp.where(above, -jax.nn.sigmoid(-z), jax.nn.sigmoid(z))
        return above.sum(-1, keepdims=True) + tails.sum(-1, keepdims=True) - k

    def step(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        g = excess(mid)
        # g == 0 exactly (every tail underflowed): stop at mid
        return jnp.where(g >= 0, mid, lo), jnp.where(g <= 0, mid, hi)

    lo = x.min(-1, keepdims=True) - 50.0 * t
    hi = x.max(-1, keepdims=True) + 50.0 * t
    lo, hi = jax.lax.fori_loop(0, n_steps, step, (lo, hi))
    return 0.5 * (lo + hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _soft_topk(x, k, t):
    return _parts(x, _theta(x, k, t), t)[0]


def _soft_topk_fwd(x, k, t):
    A, s = _parts(x, _theta(x, k, t), t)
    return A, s


def _soft_topk_bwd(k, t, s, A_bar):
    S = s.sum(-1, keepdims=True)
    # S == 0: every score is far from the boundary, A is locally constant
    proj = jnp.where(S > 0, (s * A_bar).sum(-1, keepdims=True) / jnp.where(S > 0, S, 1.0), 0.0)
    return (s * (A_bar - proj) / t,)


_soft_topk.defvjp(_soft_topk_fwd, _soft_topk_bwd)


def soft_topk(x, *, k, eps, largest=True):
    """Soft top-k indicator ``A`` (..., n): ``0 <= A <= 1``, ``sum(A) = k``."""
    if not largest:
        return soft_topk(-x, k=k, eps=eps, largest=True)
    if k == 0 or k == x.shape[-1]:                # constant output, zero gradient
        return x * 0.0 + (0.0 if k == 0 else 1.0)
    return _soft_topk(x, k, eps / 2.0)
