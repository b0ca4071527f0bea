"""A subtly wrong PyTorch linear solve: the backward forgets a transpose.

The forward is exact.  The backward solves ``A b_bar = x_bar`` instead of
``A^T b_bar = x_bar`` -- an easy slip when transcribing ``b_bar = A^{-T} x_bar``,
and one that ordinary testing misses: it is right for every symmetric ``A``,
and training with it still "works", only along a wrong direction.

``refimpl validate`` flags it on every case with a non-symmetric matrix::

    refimpl validate linear_solve examples/torch_linear_solve_wrong.py:linear_solve --framework torch
"""

import torch

from torch_linear_solve import sum_to_shape


class LinearSolveMissingTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, b):
        x = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(A, x)
        ctx.b_shape = b.shape
        return x

    @staticmethod
    def backward(ctx, x_bar):
        A, x = ctx.saved_tensors
        b_bar = torch.linalg.solve(A, x_bar.unsqueeze(-1)).squeeze(-1)   # BUG: A, not A.mT
        A_bar = -b_bar.unsqueeze(-1) * x.unsqueeze(-2)
        return sum_to_shape(A_bar, A.shape), sum_to_shape(b_bar, ctx.b_shape)


def linear_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return LinearSolveMissingTranspose.apply(A, b)
