"""A PyTorch Sinkhorn layer whose gradient comes from autodiff through the iterations.

The entropic transport plan for cost ``C`` (..., n, m), marginals ``a`` (..., n),
``b`` (..., m) and regularisation ``eps`` is

    P = exp((f 1^T + 1 g^T - C) / eps),   P 1 = a,   P^T 1 = b,

where the potentials ``f``, ``g`` are the fixed point of the log-domain updates

    f = eps log a - eps LSE_j((g_j - C_ij) / eps)
    g = eps log b - eps LSE_i((f_i - C_ij) / eps).

Run to convergence, backpropagation through the updates gives the same
gradient as implicit differentiation.  Check it with::

    refimpl validate sinkhorn examples/candidates/torch_sinkhorn.py:sinkhorn --framework torch
"""

import torch


def sinkhorn(C, a, b, *, eps, tol=1e-12, max_iter=50_000):
    """Entropic OT plan ``P`` (..., n, m), differentiable in ``C``, ``a`` and ``b``."""
    log_a, log_b = torch.log(a), torch.log(b)
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for it in range(max_iter):
        # row update makes P 1 = a exactly; column update makes P^T 1 = b
        f = eps * (log_a - torch.logsumexp((g.unsqueeze(-2) - C) / eps, dim=-1))
        g = eps * (log_b - torch.logsumexp((f.unsqueeze(-1) - C) / eps, dim=-2))
        if it % 10 == 9:
            with torch.no_grad():
                P = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps)
                # relative L1 error of the row marginal, worst batch member
                err = ((P.sum(-1) - a).abs().sum(-1) / a.sum(-1)).max()
            if err <= tol:
                break
    return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps)
