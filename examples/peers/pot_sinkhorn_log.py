"""POT's log-domain Sinkhorn (``ot.sinkhorn(..., method='sinkhorn_log')``), torch autodiff.

Peer: POT (Python Optimal Transport), tested with 0.9.7.post1, torch backend.

Mapping of conventions.  refimpl's ``sinkhorn: fn(C, a, b, *, eps) -> P`` is
the plan of ``min <P, C> - eps H(P)`` subject to ``P 1 = a``, ``P^T 1 = b``,
``P = diag(u) exp(-C/eps) diag(v)``.  POT's ``ot.sinkhorn(a, b, M, reg)``
solves the same problem with ``M = C`` and ``reg = eps``, so the call is
``ot.sinkhorn(a, b, C, eps)`` unchanged.  POT takes one problem at a time;
leading batch dimensions (of ``C``, ``a``, ``b``, broadcast against each
other) are looped over and the plans stacked.  The gradient is torch's
autodiff through POT's unrolled iterations.  Check it with::

    refimpl validate sinkhorn examples/peers/pot_sinkhorn_log.py:sinkhorn --framework torch
"""

import ot
import torch

#: POT's stopping rule (marginal violation) and its iteration cap.
STOP_THR = 1e-13
MAX_ITER = 50000
METHOD = "sinkhorn_log"


def _loop(solve, C, a, b):
    """Apply ``solve(C_m, a_m, b_m)`` to every batch member and stack the plans."""
    batch = torch.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    if not batch:
        return solve(C, a, b)
    n, m = C.shape[-2:]
    C = C.expand(batch + (n, m)).reshape(-1, n, m)
    a = a.expand(batch + (n,)).reshape(-1, n)
    b = b.expand(batch + (m,)).reshape(-1, m)
    plans = [solve(C[i], a[i], b[i]) for i in range(C.shape[0])]
    return torch.stack(plans).reshape(batch + (n, m))


def sinkhorn(C, a, b, *, eps):
    """Entropic plan ``P(C, a, b)`` by POT's log-domain Sinkhorn."""
    return _loop(lambda Cm, am, bm: ot.sinkhorn(am, bm, Cm, eps, method=METHOD,
                                                  numItermax=MAX_ITER, stopThr=STOP_THR),
                 C, a, b)
