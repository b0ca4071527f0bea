"""A correct PyTorch linear solve ``x = A^{-1} b`` with a hand-written backward.

This is what a user brings to ``refimpl validate``: a ``torch.autograd.Function``
whose backward was derived by hand.  From ``A x = b``:

    b_bar = A^{-T} x_bar          (solve with the transpose)
    A_bar = -b_bar x^T

and, where ``A`` or ``b`` was broadcast against the other's batch
dimensions, the cotangent is summed back to that input's shape.

Check it against the reference (calling convention ``fn(A, b) -> x``)::

    refimpl validate linear_solve examples/torch_linear_solve.py:linear_solve --framework torch
"""

import torch


def sum_to_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Adjoint of broadcasting: sum ``t`` over the dimensions ``shape`` was stretched along."""
    shape = tuple(shape)
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


class LinearSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, b):
        x = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(A, x)
        ctx.b_shape = b.shape
        return x

    @staticmethod
    def backward(ctx, x_bar):
        A, x = ctx.saved_tensors
        # A^T b_bar = x_bar
        b_bar = torch.linalg.solve(A.mT, x_bar.unsqueeze(-1)).squeeze(-1)
        # A_bar = -b_bar x^T
        A_bar = -b_bar.unsqueeze(-1) * x.unsqueeze(-2)
        return sum_to_shape(A_bar, A.shape), sum_to_shape(b_bar, ctx.b_shape)


def linear_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x`` with ``A x = b``; batched, broadcasting the batch dimensions of A and b."""
    return LinearSolve.apply(A, b)
