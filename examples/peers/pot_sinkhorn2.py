"""POT's ``ot.sinkhorn2`` (log domain), torch autodiff: the value ``<C, P>``.

Peer: POT (Python Optimal Transport), tested with 0.9.7.post1, torch backend.

Mapping of conventions.  ``ot.sinkhorn2(a, b, M, reg)`` solves the problem
of ``ot.sinkhorn`` (``M = C``, ``reg = eps``: the plan of
``min <P, C> + eps sum P log P``, the same plan as refimpl's) and, for a
single target histogram, returns ``nx.sum(M * P)``
(``ot/bregman/_sinkhorn.py``): the linear part ``<C, P>`` without the
entropic term, refimpl's operator ``sinkhorn_linear``, with no offset or
scaling.  The gradient is torch's autodiff through POT's iterations.
POT takes one problem at a time; leading batch dimensions (of ``C``, ``a``,
``b``, broadcast against each other) are looped over and the values stacked.
Check it with::

    refimpl validate sinkhorn_linear examples/peers/pot_sinkhorn2.py:sinkhorn_linear --framework torch
"""

import ot
import torch

from pot_sinkhorn_log import MAX_ITER, METHOD, STOP_THR


def loop_values(solve, C, a, b):
    """Apply ``solve(C_m, a_m, b_m) -> scalar`` to every batch member; the values
    shaped like the batch (a 0-d tensor unbatched)."""
    batch = torch.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    if not batch:
        return solve(C, a, b)
    n, m = C.shape[-2:]
    C = C.expand(batch + (n, m)).reshape(-1, n, m)
    a = a.expand(batch + (n,)).reshape(-1, n)
    b = b.expand(batch + (m,)).reshape(-1, m)
    return torch.stack([solve(C[i], a[i], b[i]) for i in range(C.shape[0])]).reshape(batch)


def sinkhorn_linear(C, a, b, *, eps):
    """``<C, P>`` by ``ot.sinkhorn2`` (log-domain iterations)."""
    return loop_values(lambda Cm, am, bm: ot.sinkhorn2(am, bm, Cm, eps, method=METHOD,
                                                       numItermax=MAX_ITER, stopThr=STOP_THR),
                       C, a, b)
