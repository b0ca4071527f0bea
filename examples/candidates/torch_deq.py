"""A PyTorch deep-equilibrium layer with the exact implicit gradient.

The layer's output is the fixed point ``z = f(z) = tanh(W z + U x + b)``.  By
the implicit function theorem its VJP for a cotangent ``z_bar`` is

    (I - J^T) u = z_bar,    J = df/dz = diag(1 - z^2) W,
    theta_bar = (df/dtheta)^T u        for theta in (x, W, U, b).

The forward finds ``z`` without gradient tracking (damped Picard iterations,
then Newton's method on ``z - f(z) = 0``), evaluates ``f`` once more at the
fixed point with tracking, and registers a hook that replaces the incoming
gradient ``z_bar`` by ``u``; autograd then applies ``(df/dtheta)^T`` to it.
The linear system is solved densely (small ``d``).  Check it with::

    refimpl validate tanh_deq examples/candidates/torch_deq.py:tanh_deq --framework torch
"""

import torch


def _f(z, x, W, U, b):
    """One layer application tanh(W z + U x + b), batched over leading dimensions."""
    return torch.tanh((W @ z.unsqueeze(-1)).squeeze(-1) + (U @ x.unsqueeze(-1)).squeeze(-1) + b)


def _fixed_point(x, W, U, b, tol=1e-15):
    """z = f(z) by damped Picard (robust start), then Newton (to machine precision)."""
    z = torch.zeros(torch.broadcast_shapes(x.shape[:-1] + b.shape, W.shape[:-1]), dtype=x.dtype)
    eye = torch.eye(z.shape[-1], dtype=x.dtype)
    for _ in range(500):
        z = 0.5 * z + 0.5 * _f(z, x, W, U, b)
        if (z - _f(z, x, W, U, b)).abs().max() < 1e-6:
            break
    for _ in range(50):
        fz = _f(z, x, W, U, b)
        r = z - fz
        if r.abs().max() <= tol * max(1.0, fz.abs().max()):
            break
        J = (1.0 - fz**2).unsqueeze(-1) * W                    # df/dz
        z = z - torch.linalg.solve(eye - J, r.unsqueeze(-1)).squeeze(-1)
    return z


def tanh_deq(x, W, U, b):
    """Fixed point ``z`` (..., d) of ``z = tanh(W z + U x + b)``."""
    with torch.no_grad():
        z_star = _fixed_point(x, W, U, b)
        J = (1.0 - z_star**2).unsqueeze(-1) * W                # J at the fixed point
        A_T = torch.eye(z_star.shape[-1], dtype=x.dtype) - J.mT
    z = _f(z_star, x, W, U, b)             # = z_star, but connected to x, W, U, b
    if z.requires_grad:
        # the gradient arriving at z is z_bar; what must leave through f is u
        z.register_hook(lambda z_bar: torch.linalg.solve(A_T, z_bar.unsqueeze(-1)).squeeze(-1))
    return z
