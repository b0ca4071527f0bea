"""A PyTorch matrix square root with a hand-written backward.

For a symmetric positive definite ``A = U diag(lam) U^T`` the root is
``S = U diag(s) U^T`` with ``s = sqrt(lam)``.  Its derivative solves the
Lyapunov equation ``S dS + dS S = dA``; the adjoint of that map gives, for a
cotangent ``G``,

    A_bar = U [ (U^T sym(G) U) / (s_i + s_j) ] U^T,    sym(G) = (G + G^T) / 2.

The divided difference ``1/(s_i + s_j)`` stays finite at repeated
eigenvalues, where autograd through ``torch.linalg.eigh`` divides by
``lam_i - lam_j = 0`` and returns NaN; hence the custom ``backward``.  Check it
with::

    refimpl validate sqrtm examples/candidates/torch_sqrtm.py:sqrtm --framework torch
"""

import torch


class _Sqrtm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, A):
        lam, U = torch.linalg.eigh(0.5 * (A + A.mT))
        s = torch.sqrt(torch.clamp(lam, min=0.0))
        ctx.save_for_backward(s, U)
        return (U * s.unsqueeze(-2)) @ U.mT

    @staticmethod
    def backward(ctx, G):
        s, U = ctx.saved_tensors
        Gs = 0.5 * (G + G.mT)
        inner = (U.mT @ Gs @ U) / (s.unsqueeze(-1) + s.unsqueeze(-2))
        return U @ inner @ U.mT


def sqrtm(A):
    """Principal square root of the SPD matrices ``A`` (..., n, n)."""
    return _Sqrtm.apply(A)
