"""A JAX deep-equilibrium layer with the exact implicit gradient as a ``jax.custom_vjp``.

The output is the fixed point ``z = f(z) = tanh(W z + U x + b)``.  By the
implicit function theorem its VJP for a cotangent ``z_bar`` is

    (I - J^T) u = z_bar,    J = df/dz = diag(1 - z^2) W,
    theta_bar = (df/dtheta)^T u        for theta in (x, W, U, b);

the last product is ``jax.vjp`` of one layer application at the fixed point
(which also sums the gradients of broadcast parameters).  The forward runs
damped Picard iterations, then Newton's method on ``z - f(z) = 0``, both in
``jax.lax.while_loop``.  Check it with::

    refimpl validate tanh_deq examples/candidates/jax_deq.py:tanh_deq --framework jax
"""

import jax
import jax.numpy as jnp


def _f(z, x, W, U, b):
    """One layer application tanh(W z + U x + b), batched over leading dimensions."""
    return jnp.tanh((W @ z[..., None])[..., 0] + (U @ x[..., None])[..., 0] + b)


def _fixed_point(x, W, U, b, tol=1e-15):
    """z = f(z): damped Picard to 1e-6 (robust start), then Newton to ``tol``."""
    shape = jnp.broadcast_shapes(x.shape[:-1] + b.shape, W.shape[:-1])
    eye = jnp.eye(shape[-1], dtype=x.dtype)

    def residual(z):
        return jnp.max(jnp.abs(z - _f(z, x, W, U, b)))

    def picard(state):
        z, it = state
        return 0.5 * z + 0.5 * _f(z, x, W, U, b), it + 1

    def newton(state):
        z, it = state
        fz = _f(z, x, W, U, b)
        J = (1.0 - fz**2)[..., :, None] * W
        return z - jnp.linalg.solve(eye - J, (z - fz)[..., None])[..., 0], it + 1

    z = jnp.zeros(shape, x.dtype)
    z, _ = jax.lax.while_loop(lambda s: (residual(s[0]) > 1e-6) & (s[1] < 500), picard, (z, 0))
    z, _ = jax.lax.while_loop(lambda s: (residual(s[0]) > tol) & (s[1] < 50), newton, (z, 0))
    return z


@jax.custom_vjp
def tanh_deq(x, W, U, b):
    """Fixed point ``z`` (..., d) of ``z = tanh(W z + U x + b)``."""
    return _fixed_point(x, W, U, b)


def _tanh_deq_fwd(x, W, U, b):
    z = _fixed_point(x, W, U, b)
    return z, (z, x, W, U, b)


def _tanh_deq_bwd(saved, z_bar):
    z, x, W, U, b = saved
    J = (1.0 - z**2)[..., :, None] * W                          # df/dz at the fixed point
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    u = jnp.linalg.solve(eye - J.mT, z_bar[..., None])[..., 0]  # (I - J^T) u = z_bar
    _, pullback = jax.vjp(lambda *theta: _f(z, *theta), x, W, U, b)
    return pullback(u)


tanh_deq.defvjp(_tanh_deq_fwd, _tanh_deq_bwd)
