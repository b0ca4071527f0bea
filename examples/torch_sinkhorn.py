"""A correct PyTorch Sinkhorn layer: log-domain iterations, autodiff through them.

The entropic transport plan between marginals ``a`` (n,) and ``b`` (m,) for
cost ``C`` (n, m) and regularisation ``eps``:

    P = exp((f 1^T + 1 g^T - C) / eps),   P 1 = a,   P^T 1 = b,

found by the log-domain updates

    f = eps log a - eps LSE_j((g_j - C_ij) / eps)
    g = eps log b - eps LSE_i((f_i - C_ij) / eps)

run until the row marginals match to ``tol`` (relative L1 error, checked
every ``check_every`` iterations, per batch member).  The gradient is
PyTorch's own autodiff through all the iterations; run to convergence it
agrees with the implicit (exact) gradient.  The gradients of ``a`` and ``b``
are defined up to ``(a_bar + c, b_bar - c)`` (only perturbations keeping
``sum a = sum b`` are meaningful); ``refimpl validate`` fixes that gauge on
both sides before comparing.

Calling convention (docs/design.md): ``sinkhorn(C, a, b, *, eps) -> P``, batched
over leading dimensions::

    refimpl validate sinkhorn examples/torch_sinkhorn.py:sinkhorn --framework torch
"""

import warnings

import torch


def sinkhorn(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, eps: float,
             tol: float = 1e-14, max_iter: int = 20000, check_every: int = 10) -> torch.Tensor:
    """The entropic OT plan ``P`` (..., n, m); differentiable in C, a and b."""
    log_a, log_b = torch.log(a), torch.log(b)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for it in range(1, max_iter + 1):
        f = eps * log_a - eps * torch.logsumexp((g.unsqueeze(-2) - C) / eps, dim=-1)
        g = eps * log_b - eps * torch.logsumexp((f.unsqueeze(-1) - C) / eps, dim=-2)
        if it % check_every == 0:
            with torch.no_grad():
                P = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps)
                err = ((P.sum(-1) - a).abs().sum(-1) / a.sum(-1)).max()
            if err <= tol:
                break
    else:
        warnings.warn(f"sinkhorn: no convergence in {max_iter} iterations "
                      f"(marginal error {float(err):.1e})")
    return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps)
