r"""SOFT top-k: the sympy derivations behind refimpl/topk.py.

Run ``python derivations/topk.py``; ``tests/test_derivations.py`` runs every
``check_*`` function.  Each one derives an identity symbolically and raises
``AssertionError`` if it does not hold.

1. ``check_cost_difference_and_sigmoid``: with anchors ``y1 < y2`` and
   ``C_ij = (x_i - y_j)^2``, ``C_i1 - C_i2 = (y2 - y1)(2 x_i - y1 - y2)``, so
   the row of the entropic plan ``Gamma_ij = exp((f_i + g_j - C_ij)/eps)``
   normalised to ``1/n`` gives ``n Gamma_i2 = sigmoid((x_i - theta)/t)``
   with ``t = eps / (2 (y2 - y1))`` and
   ``theta = (y1 + y2)/2 - (g2 - g1) / (2 (y2 - y1))``.
2. ``check_closed_form_jacobian``: implicit differentiation of
   ``sum_i sigmoid((x_i - theta)/t) = k`` gives
   ``dA_i/dx_j = (s_i/t)(delta_ij - s_j/S)``; ``J`` is symmetric and
   ``J 1 = 0``.
3. ``check_schur_complement_two_anchors``: for two anchors, the Schur
   complement ``K = diag(nubar) - Gbar^T diag(mu)^{-1} Gbar`` of the KKT
   matrix equals ``S / n`` (n = 2..6).
4. ``check_kkt_route_equals_closed_form``: the general KKT backward
   (linearised marginal constraints, gauge ``g_m = 0``, ``dC_ij = 2 (x_i -
   y_j) dx_i``) solved by the Schur complement gives the same Jacobian as
   the closed form, and the same as solving the full system.
5. ``check_kkt_route_three_anchors``: for m = 3 anchors (the sorted
   variant's structure) the Schur-complement route equals the full KKT
   solve, and ``dGamma`` has zero row and column sums (the marginals stay
   fixed).
6. ``check_error_bound_inequality``: ``sigmoid(-z) <= exp(-z)``, the
   inequality behind ``||A_eps - A_hard||_1 <= 2 max(k, n-k)
   exp(-(y2 - y1) delta / eps)``.
"""

from __future__ import annotations

import sympy as sp


def _sigmoid(u):
    return 1 / (1 + sp.exp(-u))


def _is_zero(expr) -> bool:
    return sp.simplify(expr) == 0


def check_cost_difference_and_sigmoid():
    """Two anchors: n Gamma_i2 = sigmoid((x_i - theta)/t) with t = eps/(2 (y2 - y1)), theta =
    (y1 + y2)/2 - (g2 - g1)/(2 (y2 - y1)) (symbolic).

    Assumptions: anchors y1 < y2, squared cost ``C_ij = (x_i - y_j)^2``, Gibbs
    plan ``Gamma_ij = exp((f_i + g_j - C_ij)/eps)`` with rows summing to 1/n.
    Established: ``C_i1 - C_i2 = (y2 - y1)(2 x_i - y1 - y2)``, the log-odds
    ``log(Gamma_i2/Gamma_i1) = (x_i - theta)/t`` (linear in x_i), hence the
    sigmoid.
    """
    x, y1, y2, f, g1, g2 = sp.symbols("x y1 y2 f g1 g2", real=True)
    eps, n = sp.symbols("epsilon n", positive=True)
    C1, C2 = (x - y1) ** 2, (x - y2) ** 2
    assert sp.expand(C1 - C2 - (y2 - y1) * (2 * x - y1 - y2)) == 0
    G1 = sp.exp((f + g1 - C1) / eps)
    G2 = sp.exp((f + g2 - C2) / eps)
    # Row normalisation Gamma_i1 + Gamma_i2 = 1/n: n Gamma_i2 = G2 / (G1 + G2).
    A = G2 / (G1 + G2)
    t = eps / (2 * (y2 - y1))
    theta = (y1 + y2) / 2 - (g2 - g1) / (2 * (y2 - y1))
    # Compare through the log-odds, log(A / (1 - A)), which is linear in x.
    lhs = sp.expand(sp.expand_log(sp.log(G2) - sp.log(G1), force=True))
    rhs = sp.expand((x - theta) / t)
    assert sp.simplify(lhs - rhs) == 0, (lhs, rhs)
    # Hence A = G2/(G1 + G2) = 1/(1 + exp(-(x - theta)/t)): the numerator of
    # A - sigmoid, G2 exp(-(x - theta)/t) - G1, vanishes.
    ratio = sp.powsimp(G2 * sp.exp(-(x - theta) / t) / G1, combine="exp")
    assert sp.simplify(sp.expand(sp.log(ratio), force=True)) == 0
    # ... and for positive G1, G2: G2/(G1 + G2) = sigmoid(log G2 - log G1).
    p1, p2 = sp.symbols("p1 p2", positive=True)
    assert _is_zero(p2 / (p1 + p2) - _sigmoid(sp.log(p2) - sp.log(p1)))
    assert A == (p2 / (p1 + p2)).subs({p1: G1, p2: G2})


def check_closed_form_jacobian(n: int = 3):
    """IFT on sum_i sigmoid((x_i - theta)/t) = k: dA_i/dx_j = (s_i/t)(delta_ij - s_j/S), s =
    A(1 - A); J symmetric, J 1 = 0 (n = 3 symbolic).

    ``dtheta/dx_j = -G_{x_j}/G_theta`` for ``G(x, theta) = sum_i A_i - k``;
    the total derivative ``dA_i/dx_j`` equals the closed form exactly.
    """
    xs = sp.symbols(f"x1:{n + 1}", real=True)
    theta, k = sp.symbols("theta k", real=True)
    t = sp.symbols("t", positive=True)
    A = [_sigmoid((xi - theta) / t) for xi in xs]
    G = sum(A) - k
    # Implicit function theorem: dtheta/dx_j = -G_{x_j} / G_theta.
    dtheta = [-sp.diff(G, xj) / sp.diff(G, theta) for xj in xs]
    s = [a * (1 - a) for a in A]
    S = sum(s)
    for i in range(n):
        assert _is_zero(sp.diff(A[i], xs[i]) - s[i] / t)       # sigmoid' = A (1 - A)
        for j in range(n):
            J_ij = sp.diff(A[i], xs[j]) + sp.diff(A[i], theta) * dtheta[j]
            formula = s[i] / t * ((1 if i == j else 0) - s[j] / S)
            assert _is_zero(J_ij - formula), (i, j)
    # Structure, in terms of free symbols s_i: symmetric, J 1 = 0.
    sv = sp.symbols(f"s1:{n + 1}", positive=True)
    Sv = sum(sv)
    J = sp.Matrix(n, n, lambda i, j: sv[i] / t * ((1 if i == j else 0) - sv[j] / Sv))
    assert sp.simplify(J - J.T) == sp.zeros(n, n)
    assert sp.simplify(J * sp.ones(n, 1)) == sp.zeros(n, 1)


def check_schur_complement_two_anchors():
    """Two anchors: the Schur complement K = diag(nubar) - Gbar^T diag(mu)^{-1} Gbar of the KKT
    matrix equals S/n (n = 2..6 symbolic).

    ``mu_i = 1/n``, kept column ``Gbar_i = (1 - A_i)/n`` (gauge g_2 = 0),
    ``S = sum_i A_i (1 - A_i)``.
    """
    for n in range(2, 7):
        A = sp.symbols(f"A1:{n + 1}", positive=True)
        mu = sp.Rational(1, n)
        Gbar = sp.Matrix(n, 1, lambda i, _: (1 - A[i]) / n)   # lower-anchor column, g_2 = 0
        nubar = sum(Gbar)                                      # column marginal of the kept anchor
        K = sp.Matrix([[nubar]]) - Gbar.T * sp.diag(*([1 / mu] * n)) * Gbar
        S = sum(a * (1 - a) for a in A)
        assert sp.expand(K[0, 0] - S / n) == 0, n


def _kkt_jacobian(n: int, m: int, Gamma, x, y, *, schur: bool):
    """d Gamma / d x from the linearised marginal constraints (gauge g_m = 0).

    With dC_ij = 2 (x_i - y_j) dx_i, r_i = sum_j Gamma_ij dC_ij and
    c_j = sum_i Gamma_ij dC_ij (j < m), solve
    [[diag(mu), Gbar], [Gbar^T, diag(nubar)]] [df; dg] = [r; c] and
    d Gamma_ij = Gamma_ij (df_i + dg_j - dC_ij) / eps; returns
    eps * dGamma/dx as a list over i, j of gradients w.r.t. x (eps factors
    out).
    """
    dx = sp.symbols(f"dx1:{n + 1}", real=True)
    dC = sp.Matrix(n, m, lambda i, j: 2 * (x[i] - y[j]) * dx[i])
    mu = [sum(Gamma[i, j] for j in range(m)) for i in range(n)]
    nubar = [sum(Gamma[i, j] for i in range(n)) for j in range(m - 1)]
    Gbar = Gamma[:, : m - 1]
    r = sp.Matrix(n, 1, lambda i, _: sum(Gamma[i, j] * dC[i, j] for j in range(m)))
    c = sp.Matrix(m - 1, 1, lambda j, _: sum(Gamma[i, j] * dC[i, j] for i in range(n)))
    Dmu = sp.diag(*mu)
    if schur:
        K = sp.diag(*nubar) - Gbar.T * Dmu.inv() * Gbar          # (m-1) x (m-1)
        dg = K.LUsolve(c - Gbar.T * Dmu.inv() * r)
        df = Dmu.inv() * (r - Gbar * dg)
    else:
        H = sp.BlockMatrix([[Dmu, Gbar], [Gbar.T, sp.diag(*nubar)]]).as_explicit()
        sol = H.LUsolve(r.col_join(c))
        df, dg = sol[:n, :], sol[n:, :]
    dgf = list(dg) + [0]
    dGamma = sp.Matrix(n, m, lambda i, j: Gamma[i, j] * (df[i] + dgf[j] - dC[i, j]))
    return dGamma, dx


def check_kkt_route_equals_closed_form(n: int = 3):
    """The general KKT backward (Schur route and full solve) gives the closed-form Jacobian
    (s_i/t)(delta_ij - s_j/S) for two anchors (n = 3 symbolic).

    Linearised marginal constraints with ``dC_ij = 2 (x_i - y_j) dx_i`` and
    gauge ``g_m = 0``, solved symbolically both ways; ``A = n Gamma[:, 2]``.
    """
    A = sp.symbols(f"A1:{n + 1}", positive=True)
    x = sp.symbols(f"x1:{n + 1}", real=True)
    y1, y2 = sp.symbols("y1 y2", real=True)
    eps = sp.symbols("epsilon", positive=True)
    Gamma = sp.Matrix(n, 2, lambda i, j: (1 - A[i]) / n if j == 0 else A[i] / n)
    t = eps / (2 * (y2 - y1))
    s = [a * (1 - a) for a in A]
    S = sum(s)
    for schur in (True, False):
        dGamma, dx = _kkt_jacobian(n, 2, Gamma, x, (y1, y2), schur=schur)
        for i in range(n):
            dA_i = n * dGamma[i, 1] / eps                        # A = n Gamma[:, upper]
            for j in range(n):
                J_ij = sp.diff(dA_i, dx[j])
                formula = s[i] / t * ((1 if i == j else 0) - s[j] / S)
                assert _is_zero(J_ij - formula), (schur, i, j)


def check_kkt_route_three_anchors(n: int = 3):
    """Three anchors (sorted variant): Schur-complement and full KKT solves give the same
    dGamma, which has zero row and column sums (n = 3).

    Equality of the two routes is symbolic in the plan entries; the marginal
    conservation (``sum_j dGamma_ij = 0 = sum_i dGamma_ij``) is checked in exact
    rational arithmetic at three positive plans.
    """
    m = 3
    P = sp.Matrix(n, m, lambda i, j: sp.Symbol(f"G{i + 1}{j + 1}", positive=True))
    x = sp.symbols(f"x1:{n + 1}", real=True)
    y = (0, 1, 2)
    d_schur, dx = _kkt_jacobian(n, m, P, x, y, schur=True)
    d_full, _ = _kkt_jacobian(n, m, P, x, y, schur=False)
    for i in range(n):
        for j in range(m):
            assert _is_zero(sp.cancel(sp.together(d_schur[i, j] - d_full[i, j]))), (i, j)
    # The marginals stay fixed (sum_j dGamma_ij = 0 = sum_i dGamma_ij), checked
    # in exact rational arithmetic at a few positive plans (fully symbolic
    # cancellation of these sums takes minutes).
    for seed in range(3):
        vals = {P[i, j]: sp.Rational(1 + (7 * i + 3 * j + 5 * seed) % 11, 13)
                for i in range(n) for j in range(m)}
        D = d_schur.subs(vals)
        for i in range(n):
            assert sp.expand(sum(D[i, j] for j in range(m))) == 0, (seed, i)
        for j in range(m):
            assert sp.expand(sum(D[i, j] for i in range(n))) == 0, (seed, j)


def check_error_bound_inequality():
    """sigmoid(-z) <= exp(-z), and the balanced split gives exp(-(y2 - y1) delta/eps): the
    ingredients of the L1 error bound (symbolic).

    ``exp(-z) - sigmoid(-z) = exp(-z)/(1 + exp(z)) > 0`` for real z; at the
    split ``a = b = delta/2`` of the boundary gap, ``exp(-delta/(2 t)) =
    exp(-(y2 - y1) delta/eps)``.
    """
    z = sp.symbols("z", real=True)
    gap = sp.exp(-z) - _sigmoid(-z)
    # exp(-z) - 1/(1 + exp(z)) = exp(-z) / (1 + exp(z)) > 0 for every real z.
    assert _is_zero(gap - sp.exp(-z) / (1 + sp.exp(z)))
    # ... and the minimum over the split a + b = delta of max(e^{-a/t}, e^{-b/t})
    # is at a = b = delta/2, i.e. exp(-delta/(2t)) = exp(-(y2 - y1) delta / eps).
    delta, eps, y1, y2 = sp.symbols("delta epsilon y1 y2", positive=True)
    t = eps / (2 * (y2 - y1))
    assert _is_zero(sp.exp(-(delta / 2) / t) - sp.exp(-(y2 - y1) * delta / eps))


if __name__ == "__main__":
    import sys

    from _run import run_checks  # derivations/ is on sys.path when run as a script

    sys.exit(run_checks(globals()))
