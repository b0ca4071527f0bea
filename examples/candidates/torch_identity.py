"""A PyTorch top-k layer with the identity-with-projection backward.

The forward solves ``y(w) = argmin_{y k-hot} <w, y>``: the indicator of the
``k`` smallest costs (ties: the lower index first, as a stable sort orders
them).  It is piecewise constant, so its true derivative is zero almost
everywhere.  The identity surrogate instead returns

    w_bar = -P'(w)^T y_bar

for a projection ``P`` applied to the costs: ``None`` (``P(w) = w``),
``"mean"`` (``w - mean(w)``), ``"norm"`` (``w / ||w||``) or ``"std"`` (the
centred vector divided by its norm).  The straight-through construction

    y = stop_gradient(y_hard) - (P(w) - stop_gradient(P(w)))

has the value ``y_hard`` and the derivative ``-P'(w)``, so autograd returns the
surrogate gradient.  Check it with::

    refimpl validate identity_top_k examples/candidates/torch_identity.py:top_k --framework torch
"""

import torch


def _project(w, projection):
    """P(w) over the last axis."""
    if projection in (None, "none"):
        return w
    if projection == "mean":
        return w - w.mean(-1, keepdim=True)
    if projection == "norm":
        return w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    if projection == "std":
        v = w - w.mean(-1, keepdim=True)
        return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    raise ValueError(f"unknown projection {projection!r}")


def top_k(w, *, k, projection=None):
    """k-hot indicator of the ``k`` smallest entries of ``w`` (..., n)."""
    p = _project(w, projection)
    with torch.no_grad():
        order = torch.argsort(p, dim=-1, stable=True)          # ascending costs
        rank = torch.argsort(order, dim=-1)                      # inverse permutation
        y_hard = (rank < k).to(w.dtype)
    return y_hard - (p - p.detach())
