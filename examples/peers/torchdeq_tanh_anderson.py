"""TorchDEQ's implicit layer solved by Anderson acceleration, IFT gradients.

Peer: TorchDEQ 0.1.0 (``torchdeq.get_deq(core='indexing', ift=True)`` with
``f_solver = b_solver = 'anderson'``), torch autodiff.

Mapping of conventions: as in ``torchdeq_tanh.py``; only the solver of the
forward fixed point and of the adjoint fixed point differs (Anderson
mixing instead of plain iteration ``z <- f(z)``).  Check it with::

    refimpl validate tanh_deq examples/peers/torchdeq_tanh_anderson.py:tanh_deq --framework torch
"""

from torchdeq_tanh import solve


def tanh_deq(x, W, U, b):
    """Fixed point of ``z = tanh(W z + U x + b)`` by TorchDEQ's Anderson solver."""
    return solve(x, W, U, b, "anderson")
