"""A PyTorch SOFT top-k layer: closed form, gradient by one differentiable Newton step.

With anchors 0 and 1 the entropic transport plan of SOFT top-k has the closed
form ``A_i = sigmoid((x_i - theta) / t)``, ``t = eps / 2``, where ``theta`` is
the root of ``g(theta) = sum_i A_i - k`` (``largest=False`` is the same on
``-x``).  ``theta`` is found by bisection without gradient tracking, then one
Newton step ``theta <- theta - g(theta) / g'(theta)`` is taken *with* gradient
tracking.  At a root, the derivative of that step is the implicit-function
derivative ``d theta / d x_i = s_i / sum_j s_j`` (``s = A (1 - A)``), so autograd
returns the exact gradient.  Check it with::

    refimpl validate soft_topk examples/candidates/torch_topk.py:soft_topk --framework torch
"""

import torch


def _sigmoid(z):
    """sigmoid(z) as ``1 - sigmoid(-z)`` for z > 0: torch's sigmoid backward,
    ``y (1 - y)``, would round ``1 - y`` to 0 there and lose tails below 1e-16."""
    return torch.where(z > 0, 1.0 - torch.sigmoid(-z), torch.sigmoid(z))


def _excess(x, theta, t):
    """g(theta) = sum_i A_i - k + k, summed without cancellation: ``count(x > theta)``
    plus the tails ``sigmoid(z_i)`` (below) or ``-sigmoid(-z_i)`` (above), so that a
    tail of 1e-100 is not lost next to the ones."""
    z = (x - theta) / t
    above = z > 0
    tails = torch.where(above, -torch.sigmoid(-z), torch.sigmoid(z))
    return above.sum(-1, keepdim=True).to(x.dtype) + tails.sum(-1, keepdim=True)


def _theta_bisect(x, k, t, n_steps=200):
    """Root of sum_i sigmoid((x_i - theta)/t) = k by bisection (no gradient)."""
    lo = x.min(dim=-1, keepdim=True).values - 50.0 * t      # sum A ~ n > k here
    hi = x.max(dim=-1, keepdim=True).values + 50.0 * t      # sum A ~ 0 < k here
    for _ in range(n_steps):
        mid = 0.5 * (lo + hi)
        g = _excess(x, mid, t) - k
        # a residual of exactly 0 (every tail underflowed) ends the search at mid
        lo = torch.where(g > 0, mid, torch.where(g == 0, mid, lo))
        hi = torch.where(g < 0, mid, torch.where(g == 0, mid, hi))
    return 0.5 * (lo + hi)


def soft_topk(x, *, k, eps, largest=True):
    """Soft top-k indicator ``A`` (..., n): ``0 <= A <= 1``, ``sum(A) = k``."""
    if not largest:
        return soft_topk(-x, k=k, eps=eps, largest=True)
    n = x.shape[-1]
    if k == 0 or k == n:                          # constant output, zero gradient
        return x * 0.0 + (0.0 if k == 0 else 1.0)
    t = eps / 2.0
    with torch.no_grad():
        theta0 = _theta_bisect(x, k, t)
        z0 = (x - theta0) / t
        s = torch.sigmoid(z0) * torch.sigmoid(-z0)                # A (1 - A), tails kept
        slope = s.sum(-1, keepdim=True) / t                       # -g'(theta0)
    # one Newton step theta0 + g(theta0)/(-g'(theta0)), tracked by autograd; where every
    # s_i underflowed (hard top-k) the output is locally constant: no step, gradient 0
    safe = torch.where(slope > 0, slope, torch.ones_like(slope))
    step = (_excess(x, theta0, t) - k) / safe
    theta = theta0 + torch.where(slope > 0, step, torch.zeros_like(step))
    return _sigmoid((x - theta) / t)
