"""POT's scaling-domain Sinkhorn (``ot.sinkhorn(..., method='sinkhorn')``), torch autodiff.

Peer: POT (Python Optimal Transport), tested with 0.9.7.post1, torch backend.

Mapping of conventions: as in ``pot_sinkhorn_log.py`` (``M = C``,
``reg = eps``, batch members looped over), with POT's default
scaling-domain iteration ``u = a / (K v)``, ``v = b / (K^T u)``,
``K = exp(-C/eps)``.  Check it with::

    refimpl validate sinkhorn examples/peers/pot_sinkhorn.py:sinkhorn --framework torch
"""

import ot

from pot_sinkhorn_log import MAX_ITER, STOP_THR, _loop


def sinkhorn(C, a, b, *, eps):
    """Entropic plan ``P(C, a, b)`` by POT's scaling-domain Sinkhorn."""
    return _loop(lambda Cm, am, bm: ot.sinkhorn(am, bm, Cm, eps, method="sinkhorn",
                                                  numItermax=MAX_ITER, stopThr=STOP_THR),
                 C, a, b)
