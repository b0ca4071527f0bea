"""A JAX top-k layer with the identity-with-projection backward as a ``jax.custom_vjp``.

The forward solves ``y(w) = argmin_{y k-hot} <w, y>``: the indicator of the
``k`` smallest costs (ties: the lower index first, as a stable sort orders
them).  Being piecewise constant, it has derivative zero almost everywhere;
the identity surrogate replaces the backward by

    w_bar = -P'(w)^T y_bar

for a projection ``P`` of the costs: ``None`` (``P(w) = w``), ``"mean"``
(``w - mean(w)``), ``"norm"`` (``w / ||w||``) or ``"std"`` (the centred vector
divided by its norm).  ``P'(w)^T y_bar`` is ``jax.vjp`` of the projection.
Check it with::

    refimpl validate identity_top_k examples/candidates/jax_identity.py:top_k --framework jax
"""

import functools

import jax
import jax.numpy as jnp


def _project(w, projection):
    """P(w) over the last axis."""
    if projection in (None, "none"):
        return w
    if projection == "mean":
        return w - w.mean(-1, keepdims=True)
    if projection == "norm":
        return w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    if projection == "std":
        v = w - w.mean(-1, keepdims=True)
        return v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    raise ValueError(f"unknown projection {projection!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _top_k(w, k, projection):
    order = jnp.argsort(_project(w, projection), axis=-1, stable=True)   # ascending
    rank = jnp.argsort(order, axis=-1)                                   # inverse permutation
    return (rank < k).astype(w.dtype)


def _top_k_fwd(w, k, projection):
    return _top_k(w, k, projection), w


def _top_k_bwd(k, projection, w, y_bar):
    _, pullback = jax.vjp(lambda v: _project(v, projection), w)
    (p_bar,) = pullback(y_bar)
    return (-p_bar,)


_top_k.defvjp(_top_k_fwd, _top_k_bwd)


def top_k(w, *, k, projection=None):
    """k-hot indicator of the ``k`` smallest entries of ``w`` (..., n)."""
    return _top_k(w, k, projection)
