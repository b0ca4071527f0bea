"""Matrix square root through ``torch.linalg.eigh``, torch autodiff.

Peer: PyTorch 2.13.0 (``torch.linalg.eigh`` and its built-in backward).

Mapping of conventions.  refimpl's ``sqrtm: fn(A) -> S`` returns the SPD root
``S = A^{1/2}`` of SPD ``A`` (..., n, n).  Here
``A = V diag(lambda) V^T`` (``torch.linalg.eigh``, batched natively) and
``S = V diag(sqrt(lambda)) V^T``; the gradient is torch's autodiff through
``eigh``, whose backward divides by eigenvalue gaps ``lambda_i - lambda_j``.
Check it with::

    refimpl validate sqrtm examples/peers/torch_eigh_sqrtm.py:sqrtm --framework torch
"""

import torch


def sqrtm(A):
    """``S = V diag(sqrt(lambda)) V^T`` from ``A = V diag(lambda) V^T``."""
    lam, V = torch.linalg.eigh(A)
    return (V * lam.sqrt().unsqueeze(-2)) @ V.mT
