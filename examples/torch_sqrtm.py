"""Correct PyTorch matrix square root and inverse square root of SPD matrices.

Forward through the eigendecomposition ``A = V diag(l) V^T``:

    S     = V diag(sqrt l) V^T
    S_inv = V diag(1 / sqrt l) V^T

Backward by the closed form of the Lyapunov equation ``S X + X S = G``
(``G = S_bar``), written in the eigenbasis, with ``G~ = V^T G V`` and
``s = sqrt l``:

    sqrtm:     A_bar =  V [ G~_ij / (s_i + s_j) ] V^T
    inv_sqrtm: A_bar = -V [ G~_ij / (s_i s_j (s_i + s_j)) ] V^T

The denominators never vanish for SPD input, so this stays exact at
repeated eigenvalues (``A = c I`` gives ``A_bar = G / (2 sqrt c)``), where
autodiff through ``torch.linalg.eigh`` divides by ``l_i - l_j = 0`` and
returns NaN.  ``A_bar`` solves the equation for a general (non-symmetric)
``G``; its symmetric part is what a symmetric perturbation of ``A`` sees.

Calling convention (docs/design.md): ``sqrtm(A) -> S``, ``inv_sqrtm(A) -> S_inv``;
batched over leading dimensions::

    refimpl validate sqrtm examples/torch_sqrtm.py:sqrtm --framework torch
    refimpl validate inv_sqrtm examples/torch_sqrtm.py:inv_sqrtm --framework torch
"""

import torch


def _eig(A):
    """Eigenvalues (clamped at 0 against round-off) and eigenvectors of a symmetric A."""
    lam, V = torch.linalg.eigh(A)
    return lam.clamp_min(0.0), V


def _in_basis(V, D):
    """V D V^T."""
    return V @ D @ V.mT


class Sqrtm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A):
        lam, V = _eig(A)
        s = lam.sqrt()
        ctx.save_for_backward(s, V)
        return _in_basis(V, torch.diag_embed(s))

    @staticmethod
    def backward(ctx, G):
        s, V = ctx.saved_tensors
        Gt = V.mT @ G @ V
        # S X + X S = G  <=>  (s_i + s_j) X~_ij = G~_ij
        return _in_basis(V, Gt / (s.unsqueeze(-1) + s.unsqueeze(-2)))


class InvSqrtm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A):
        lam, V = _eig(A)
        s = lam.sqrt()
        ctx.save_for_backward(s, V)
        return _in_basis(V, torch.diag_embed(1.0 / s))

    @staticmethod
    def backward(ctx, G):
        s, V = ctx.saved_tensors
        Gt = V.mT @ G @ V
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        # d(S^-1) = -S^-1 dS S^-1 composed with the sqrtm adjoint
        return -_in_basis(V, Gt / (si * sj * (si + sj)))


def sqrtm(A: torch.Tensor) -> torch.Tensor:
    """The SPD square root ``S`` with ``S @ S = A`` (batched)."""
    return Sqrtm.apply(A)


def inv_sqrtm(A: torch.Tensor) -> torch.Tensor:
    """``S^{-1}`` with ``S @ S = A`` (batched)."""
    return InvSqrtm.apply(A)
