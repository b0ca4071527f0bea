"""A JAX matrix square root with the Lyapunov backward as a ``jax.custom_vjp``.

For a symmetric positive definite ``A = U diag(lam) U^T`` the root is
``S = U diag(s) U^T`` with ``s = sqrt(lam)``.  Differentiating ``S S = A`` gives
the Lyapunov equation ``S dS + dS S = dA``, whose adjoint for a cotangent ``G``
is, in the eigenbasis,

    A_bar = U [ (U^T sym(G) U) / (s_i + s_j) ] U^T,    sym(G) = (G + G^T) / 2.

``1/(s_i + s_j)`` is finite at repeated eigenvalues, where reverse-mode
through ``jnp.linalg.eigh`` divides by ``lam_i - lam_j = 0``.  Check it with::

    refimpl validate sqrtm examples/candidates/jax_sqrtm.py:sqrtm --framework jax
"""

import jax
import jax.numpy as jnp


def _eig_sqrt(A):
    lam, U = jnp.linalg.eigh(0.5 * (A + A.mT))
    s = jnp.sqrt(jnp.clip(lam, 0.0, None))
    return (U * s[..., None, :]) @ U.mT, (s, U)


@jax.custom_vjp
def sqrtm(A):
    """Principal square root of the SPD matrices ``A`` (..., n, n)."""
    return _eig_sqrt(A)[0]


def _sqrtm_fwd(A):
    return _eig_sqrt(A)


def _sqrtm_bwd(saved, G):
    s, U = saved
    Gs = 0.5 * (G + G.mT)
    inner = (U.mT @ Gs @ U) / (s[..., :, None] + s[..., None, :])
    return (U @ inner @ U.mT,)


sqrtm.defvjp(_sqrtm_fwd, _sqrtm_bwd)
