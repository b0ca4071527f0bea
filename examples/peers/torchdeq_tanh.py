"""TorchDEQ's implicit layer with implicit (IFT) gradients as a ``tanh_deq``.

Peer: TorchDEQ 0.1.0 (``torchdeq.get_deq(core='indexing', ift=True)``), torch autodiff.

Mapping of conventions.  refimpl's ``tanh_deq: fn(x, W, U, b) -> z`` returns the
fixed point ``z = tanh(W z + U x + b)`` (``x`` (..., p), ``W`` (..., d, d),
``U`` (..., d, p), ``b`` (..., d), leading dimensions broadcast) and its
implicit gradient ``z_bar -> (I - J)^{-T} z_bar`` pulled back through
``f(z) = tanh(W z + U x + b)``, ``J = df/dz``.  TorchDEQ's module takes the
map ``f`` and an initial state with a leading batch dimension; its
``fixed_point_iter`` solver iterates ``z <- f(z)`` to the absolute tolerance
``f_tol``, and with ``ift=True`` its backward solves the adjoint fixed point
``g = J^T g + z_bar`` by the same iteration to ``b_tol``.  The batch
dimensions are flattened into TorchDEQ's one batch dimension (a single
problem gets batch size 1) and restored afterwards.  Check it with::

    refimpl validate tanh_deq examples/peers/torchdeq_tanh.py:tanh_deq --framework torch
"""

import torch
from torchdeq import get_deq

TOL = 1e-14
MAX_ITER = 5000


def solve(x, W, U, b, solver):
    """Fixed point of ``z = tanh(W z + U x + b)`` by TorchDEQ's ``solver``, IFT backward."""
    batch = torch.broadcast_shapes(x.shape[:-1], W.shape[:-2], U.shape[:-2], b.shape[:-1])
    d = W.shape[-1]
    # the constant part U x + b, flattened to TorchDEQ's single batch dimension
    inj = ((U @ x.unsqueeze(-1)).squeeze(-1) + b).expand(batch + (d,)).reshape(-1, d)
    Wf = W.expand(batch + (d, d)).reshape(-1, d, d)

    def f(z):
        return torch.tanh((Wf @ z.unsqueeze(-1)).squeeze(-1) + inj)

    deq = get_deq(core="indexing", ift=True, f_solver=solver,
                  b_solver=solver, f_max_iter=MAX_ITER, b_max_iter=MAX_ITER,
                  f_tol=TOL, b_tol=TOL)
    z_out, _ = deq(f, torch.zeros_like(inj))
    return z_out[-1].reshape(batch + (d,))


def tanh_deq(x, W, U, b):
    """Fixed point of ``z = tanh(W z + U x + b)`` by plain iteration, IFT backward."""
    return solve(x, W, U, b, "fixed_point_iter")
