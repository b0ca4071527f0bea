"""A JAX Sinkhorn layer with the implicit (KKT) gradient as a ``jax.custom_vjp``.

The entropic transport plan for cost ``C`` (..., n, m), marginals ``a`` (..., n),
``b`` (..., m) and regularisation ``eps`` is

    P = exp((f 1^T + 1 g^T - C) / eps),   P 1 = a,   P^T 1 = b,

with the potentials ``f``, ``g`` found by log-domain Sinkhorn updates in a
``jax.lax.while_loop`` (so the function also works under ``jax.jit``).  A
``while_loop`` cannot be reverse-differentiated, and need not be: the
optimality conditions give the VJP for a cotangent ``G = P_bar`` through one
linear solve with the plan's own marginals ``r = P 1``, ``c = P^T 1``,

    [[diag(r), P], [P^T, diag(c)]] [u; v] = [(P * G) 1; (P * G)^T 1],
    C_bar = -(P * (G - u 1^T - 1 v^T)) / eps,   a_bar = u,   b_bar = v.

The system is singular along ``(1, -1)`` (adding a constant to ``u`` and
subtracting it from ``v`` changes nothing); adding ``e e^T`` with
``e = (1, -1)`` picks the solution orthogonal to it.  Check it with::

    refimpl validate sinkhorn examples/candidates/jax_sinkhorn.py:sinkhorn --framework jax
"""

import functools

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp


def _plan(f, g, C, eps):
    return jnp.exp((f[..., :, None] + g[..., None, :] - C) / eps)


def _solve_potentials(C, a, b, eps, tol, max_iter):
    """Log-domain Sinkhorn until the relative L1 row-marginal error is <= tol."""
    log_a, log_b = jnp.log(a), jnp.log(b)
    batch = jnp.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    f = jnp.zeros(batch + C.shape[-2:-1], C.dtype)
    g = jnp.zeros(batch + C.shape[-1:], C.dtype)

    def step(state):
        f, g, it, _ = state
        f = eps * (log_a - logsumexp((g[..., None, :] - C) / eps, axis=-1))
        g = eps * (log_b - logsumexp((f[..., :, None] - C) / eps, axis=-2))
        row = _plan(f, g, C, eps).sum(-1)
        err = jnp.max(jnp.sum(jnp.abs(row - a), -1) / jnp.sum(a, -1))
        return f, g, it + 1, err

    def not_done(state):
        return (state[3] > tol) & (state[2] < max_iter)

    f, g, _, _ = jax.lax.while_loop(not_done, step, (f, g, 0, jnp.inf))
    return f, g


def _sum_to(x, shape):
    """Sum a broadcast cotangent back to the input's shape."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    return x.sum(axis=tuple(i for i, s in enumerate(shape) if s == 1), keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sinkhorn(C, a, b, eps, tol, max_iter):
    return _plan(*_solve_potentials(C, a, b, eps, tol, max_iter), C, eps)


def _sinkhorn_fwd(C, a, b, eps, tol, max_iter):
    P = _sinkhorn(C, a, b, eps, tol, max_iter)
    return P, (P, a.shape, b.shape)


def _sinkhorn_bwd(eps, tol, max_iter, saved, G):
    P, a_shape, b_shape = saved
    n, m = P.shape[-2:]
    PG = P * G
    r, c = P.sum(-1), P.sum(-2)
    # KKT matrix M = [[diag(r), P], [P^T, diag(c)]], scaled to D M D with D = diag(1/sqrt(r; c))
    # (unit diagonal, so marginal entries of 1e-12 do not ruin the solve); its null vector
    # D^{-1} (1, -1) is removed by adding q q^T, q the normalised null vector
    dr, dc = 1.0 / jnp.sqrt(r), 1.0 / jnp.sqrt(c)
    Ps = dr[..., :, None] * P * dc[..., None, :]
    batch = Ps.shape[:-2]
    eye_n = jnp.broadcast_to(jnp.eye(n, dtype=P.dtype), batch + (n, n))
    eye_m = jnp.broadcast_to(jnp.eye(m, dtype=P.dtype), batch + (m, m))
    K = jnp.concatenate([jnp.concatenate([eye_n, Ps], -1),
                         jnp.concatenate([Ps.mT, eye_m], -1)], -2)
    q = jnp.concatenate([jnp.sqrt(r), -jnp.sqrt(c)], -1)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    K = K + q[..., :, None] * q[..., None, :]
    d = jnp.concatenate([dr, dc], -1)
    rhs = d * jnp.concatenate([PG.sum(-1), PG.sum(-2)], -1)
    uv = d * jnp.linalg.solve(K, rhs[..., None])[..., 0]
    u, v = uv[..., :n], uv[..., n:]
    C_bar = -P * (G - u[..., :, None] - v[..., None, :]) / eps
    return C_bar, _sum_to(u, a_shape), _sum_to(v, b_shape)


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def sinkhorn(C, a, b, *, eps, tol=1e-12, max_iter=50_000):
    """Entropic OT plan ``P`` (..., n, m), differentiable in ``C``, ``a`` and ``b``."""
    return _sinkhorn(C, a, b, eps, tol, max_iter)
