"""Sympy derivations for the Sinkhorn operator (refimpl.sinkhorn).

Each ``check_*`` derives or verifies one identity and raises AssertionError
if it fails; ``tests/test_derivations.py`` runs them all, and
``python derivations/sinkhorn.py`` prints them.

1. ``check_2x2_closed_form``: for n = m = 2 the plan is
   ``P = [[p, a1 - p], [b1 - p, a2 - b1 + p]]``; optimality
   ``P11 P22 / (P12 P21) = kappa = exp(-(C11 + C22 - C12 - C21) / eps)`` makes
   ``p`` the admissible root of a quadratic.  Compared with refimpl's forward.
2. ``check_2x2_adjoint``: implicit differentiation of that scalar equation
   gives dL/dC, dL/d(a, b) and dL/deps for any cotangent G; they equal the
   Schur/KKT formulas ``C_bar = -(1/eps) P * (G - u 1^T - 1 v^T)``,
   ``a_bar = u``, ``b_bar = v`` with ``[[D_r, P], [P^T, D_c]] [u; v] = [t_a; t_b]``
   (reduced: ``v_2 = 0``), and ``dL/deps = -<C_bar, C> / eps``.
3. ``check_adjoint_identity``: for a 2 x 3 plan the forward-mode formula
   ``dP = P * (df 1^T + 1 dg^T - dC) / eps``, ``M [df; dg] = [(P*dC)1 + eps da;
   (P*dC)^T 1 + eps db]``, and the reverse-mode formulas satisfy
   ``<G, dP> = <C_bar, dC> + <a_bar, da> + <b_bar, db>`` exactly along every
   feasible direction (exact rational arithmetic, symbolic G and tangents).
4. ``check_unbalanced_system``: the Jacobian of the unbalanced stationarity
   conditions ``log r - log a + f / rho_a = 0`` (and columns) is
   ``D^{-1} M_rho / eps`` with ``M_rho = [[D_r (1 + eps/rho_a), P],
   [P^T, D_c (1 + eps/rho_b)]]``, and the implicit-function gradient equals
   ``C_bar = -(1/eps)(T - P * (x 1^T + 1 y^T))``, ``a_bar = x r / a``.
5. ``check_envelope_2x2``: the entropic value's derivatives are P, f, g and
   ``-h(P)`` (the implicit part vanishes by optimality).
6. ``check_kappa``: the eigenvalues of ``E~^T E~`` behind Theorem 5's
   ``kappa = ||E~^+||_2``.
7. ``check_unrolled_one_step``: the hand-written reverse pass of one
   log-domain row update equals sympy's derivative.
"""

from __future__ import annotations

import sympy as sp

# ---------------------------------------------------------------------------
# Shared 2 x 2 objects
# ---------------------------------------------------------------------------

p, a1, a2, b1, eps = sp.symbols("p a1 a2 b1 epsilon", positive=True)
c11, c12, c21, c22 = sp.symbols("c11 c12 c21 c22", real=True)
G = sp.Matrix(2, 2, sp.symbols("g11 g12 g21 g22", real=True))
C2 = sp.Matrix([[c11, c12], [c21, c22]])
P2 = sp.Matrix([[p, a1 - p], [b1 - p, a2 - b1 + p]])          # marginals (a1, a2), (b1, a1 + a2 - b1)
# Optimality: log P11 + log P22 - log P12 - log P21 = -(C11 + C22 - C12 - C21) / eps
F2 = (sp.log(P2[0, 0]) + sp.log(P2[1, 1]) - sp.log(P2[0, 1]) - sp.log(P2[1, 0])
      + (c11 + c22 - c12 - c21) / eps)


def _is_zero(expr) -> bool:
    return sp.simplify(sp.together(expr)) == 0


def _schur_vjp(P, Gm, epsilon, drop_last=True):
    """Reduced KKT solve of the balanced backward (the formulas under test)."""
    n, m = P.shape
    r = [sum(P[i, j] for j in range(m)) for i in range(n)]
    c = [sum(P[i, j] for i in range(n)) for j in range(m)]
    T = P.multiply_elementwise(Gm)
    t_a = [sum(T[i, j] for j in range(m)) for i in range(n)]
    t_b = [sum(T[i, j] for i in range(n)) for j in range(m)]
    mm = m - 1 if drop_last else m
    M = sp.zeros(n + mm, n + mm)
    for i in range(n):
        M[i, i] = r[i]
        for j in range(mm):
            M[i, n + j] = P[i, j]
            M[n + j, i] = P[i, j]
    for j in range(mm):
        M[n + j, n + j] = c[j]
    z = M.LUsolve(sp.Matrix(t_a + t_b[:mm]))
    u = [z[i] for i in range(n)]
    v = [z[n + j] for j in range(mm)] + [sp.Integer(0)] * (m - mm)
    C_bar = sp.Matrix(n, m, lambda i, j: -(P[i, j] * (Gm[i, j] - u[i] - v[j])) / epsilon)
    return C_bar, u, v


# ---------------------------------------------------------------------------
# 1. Closed form of the 2 x 2 plan
# ---------------------------------------------------------------------------

def check_2x2_closed_form():
    """2x2 plan: P11 is the admissible root of a quadratic in kappa = exp(-(C11 + C22 - C12 -
    C21)/eps); equals sinkhorn() to 1e-13.

    Assumptions: n = m = 2, a, b > 0 with a1 + a2 = b1 + b2, eps > 0.  The
    marginal constraints leave one free entry, ``P = [[p, a1 - p], [b1 - p,
    a2 - b1 + p]]``; optimality of the Gibbs form ``P_ij = exp((f_i + g_j -
    C_ij)/eps)`` fixes the cross ratio ``P11 P22 / (P12 P21) = kappa``, i.e.
    ``(1 - kappa) p^2 + (a2 - b1 + kappa (a1 + b1)) p - kappa a1 b1 = 0``
    (symbolic).  For a numeric instance exactly one root lies in the feasible
    interval ``max(0, b1 - a2) < p < min(a1, b1)``, and refimpl's converged plan
    has that P11.
    """
    kappa = sp.Symbol("kappa", positive=True)
    quadratic = sp.expand(P2[0, 0] * P2[1, 1] - kappa * P2[0, 1] * P2[1, 0])
    # (1 - kappa) p^2 + (a2 - b1 + kappa (a1 + b1)) p - kappa a1 b1 = 0
    expected = (1 - kappa) * p ** 2 + (a2 - b1 + kappa * (a1 + b1)) * p - kappa * a1 * b1
    assert _is_zero(quadratic - expected)
    # marginals hold identically
    assert _is_zero(P2[0, 0] + P2[0, 1] - a1) and _is_zero(P2[1, 0] + P2[1, 1] - a2)
    assert _is_zero(P2[0, 0] + P2[1, 0] - b1) and _is_zero(P2[0, 1] + P2[1, 1] - (a1 + a2 - b1))
    roots = sp.solve(quadratic, p)
    assert len(roots) == 2
    # numeric instance: exactly one root is admissible and it is refimpl's plan
    import numpy as np

    from refimpl import sinkhorn as sk

    vals = {a1: sp.Rational(7, 20), a2: sp.Rational(13, 20), b1: sp.Rational(11, 20)}
    C_num = np.array([[0.3, 1.1], [0.7, 0.2]])
    e_num = 0.4
    k_num = float(np.exp(-(C_num[0, 0] + C_num[1, 1] - C_num[0, 1] - C_num[1, 0]) / e_num))
    cand = [complex(r.subs(vals).subs(kappa, k_num).evalf(30)) for r in roots]
    lo, hi = max(0.0, 0.55 - 0.65), min(0.35, 0.55)
    admissible = [z.real for z in cand if abs(z.imag) < 1e-14 and lo < z.real < hi]
    assert len(admissible) == 1
    res = sk.sinkhorn(C_num, np.array([0.35, 0.65]), np.array([0.55, 0.45]), eps=e_num, tol=1e-14)
    assert abs(res.P[0, 0] - admissible[0]) < 1e-13


# ---------------------------------------------------------------------------
# 2. The 2 x 2 adjoint from implicit differentiation of the scalar equation
# ---------------------------------------------------------------------------

def check_2x2_adjoint():
    """2x2 adjoint: implicit differentiation of the optimality equation gives the Schur/KKT
    formulas for C_bar, a_bar, b_bar, and dL/deps = -<C_bar, C>/eps (symbolic).

    With ``F(p, C, a, b, eps) = log P11 + log P22 - log P12 - log P21 +
    (C11 + C22 - C12 - C21)/eps = 0``, the implicit function theorem gives
    ``dp/dtheta = -F_theta / F_p``.  For any cotangent ``G``, ``dL/dC_kl =
    <G, dP/dp> dp/dC_kl`` equals ``C_bar = -(1/eps) P * (G - u 1^T - 1 v^T)``
    with ``[[D_r, P], [P^T, D_c]] [u; v] = [t_a; t_b]`` (reduced, ``v_2 = 0``);
    along the feasible directions (da1, db1) = (1, 1) and (da2, db2) = (1, 1)
    the derivative is ``u_1 + v_1`` and ``u_2 + v_2``; the temperature
    derivative is ``-<C_bar, C>/eps``; ``C_bar`` has zero row and column sums.
    Fully symbolic in (p, a1, a2, b1, eps, C, G).
    """
    dF_dp = sp.diff(F2, p)
    dP_dp = sp.Matrix([[1, -1], [-1, 1]])
    gdp = sum(G[i, j] * dP_dp[i, j] for i in range(2) for j in range(2))   # <G, dP/dp>
    C_bar, u, v = _schur_vjp(P2, G, eps)
    # dL/dC_kl = <G, dP/dp> dp/dC_kl with dp/dC_kl = -(dF/dC_kl) / (dF/dp)
    for k in range(2):
        for l in range(2):
            dp = -sp.diff(F2, C2[k, l]) / dF_dp
            assert _is_zero(gdp * dp - C_bar[k, l]), (k, l)
    # feasible direction (da1, da2, db1, db2) = (1, 0, 1, 0): P depends on a1, b1
    # directly and through p.
    dp_dir = -(sp.diff(F2, a1) + sp.diff(F2, b1)) / dF_dp
    dP_dir = P2.diff(a1) + P2.diff(b1) + dP_dp * dp_dir
    dL_dir = sum(G[i, j] * dP_dir[i, j] for i in range(2) for j in range(2))
    assert _is_zero(dL_dir - (u[0] + v[0]))
    # and (0, 1, 0, 1): d/dt P(a1, a2 + t, b1) with b2 = a1 + a2 - b1 growing
    dp_dir2 = -sp.diff(F2, a2) / dF_dp
    dP_dir2 = P2.diff(a2) + dP_dp * dp_dir2
    assert _is_zero(sum(G[i, j] * dP_dir2[i, j] for i in range(2) for j in range(2)) - (u[1] + v[1]))
    # temperature: dL/deps = <G, dP/dp> dp/deps = -<C_bar, C> / eps
    dp_eps = -sp.diff(F2, eps) / dF_dp
    assert _is_zero(gdp * dp_eps + sum(C_bar[i, j] * C2[i, j] for i in range(2) for j in range(2)) / eps)
    # zero row and column sums of C_bar
    for i in range(2):
        assert _is_zero(C_bar[i, 0] + C_bar[i, 1]) and _is_zero(C_bar[0, i] + C_bar[1, i])


# ---------------------------------------------------------------------------
# 3. Adjoint identity for a 2 x 3 plan (exact rationals, symbolic G, tangents)
# ---------------------------------------------------------------------------

def check_adjoint_identity():
    """<G, dP> = <C_bar, dC> + <a_bar, da> + <b_bar, db> along every feasible direction
    (adjoint identity, 2x3 plan, exact rationals, symbolic G and tangents).

    Forward mode: ``dP = P * (df 1^T + 1 dg^T - dC)/eps`` with
    ``M [df; dg] = [(P*dC) 1 + eps da; (P*dC)^T 1 + eps db]`` (gauge
    ``dg_m = 0``); reverse mode: the Schur/KKT formulas of ``_schur_vjp``.
    Assumptions: P is any positive plan (it is the exact optimum for its own
    marginals), ``1^T da = 1^T db`` (balanced problem).  Also established: the
    dropped column constraint holds for the reduced solution, and the gauge
    shift ``(a_bar + k 1, b_bar - k 1)`` pairs identically with every feasible
    direction.
    """
    n, m = 2, 3
    P = sp.Matrix([[sp.Rational(1, 7), sp.Rational(2, 9), sp.Rational(1, 11)],
                   [sp.Rational(3, 13), sp.Rational(1, 17), sp.Rational(5, 19)]])
    e = sp.Rational(3, 10)
    Gm = sp.Matrix(n, m, sp.symbols("G0:6", real=True))
    dC = sp.Matrix(n, m, sp.symbols("dC0:6", real=True))
    da = sp.Matrix(sp.symbols("da0:2", real=True))
    db_free = list(sp.symbols("db0:2", real=True))
    db = sp.Matrix(db_free + [da[0] + da[1] - db_free[0] - db_free[1]])      # 1^T da = 1^T db
    # forward mode: M [df; dg] = [(P*dC) 1 + eps da; (P*dC)^T 1 + eps db], dg_m = 0
    PdC = P.multiply_elementwise(dC)
    rhs_a = [sum(PdC[i, j] for j in range(m)) + e * da[i] for i in range(n)]
    rhs_b = [sum(PdC[i, j] for i in range(n)) + e * db[j] for j in range(m)]
    r = [sum(P[i, :]) for i in range(n)]
    c = [sum(P[:, j]) for j in range(m)]
    M = sp.zeros(n + m - 1, n + m - 1)
    for i in range(n):
        M[i, i] = r[i]
        for j in range(m - 1):
            M[i, n + j] = M[n + j, i] = P[i, j]
    for j in range(m - 1):
        M[n + j, n + j] = c[j]
    z = M.LUsolve(sp.Matrix(rhs_a + rhs_b[:m - 1]))
    df = [z[i] for i in range(n)]
    dg = [z[n + j] for j in range(m - 1)] + [0]
    dP = sp.Matrix(n, m, lambda i, j: P[i, j] * (df[i] + dg[j] - dC[i, j]) / e)
    # the dropped column constraint holds too (consistency of the reduced system)
    assert _is_zero(sum(dP[:, m - 1]) - db[m - 1])
    C_bar, u, v = _schur_vjp(P, Gm, e)
    lhs = sum(Gm[i, j] * dP[i, j] for i in range(n) for j in range(m))
    rhs = (sum(C_bar[i, j] * dC[i, j] for i in range(n) for j in range(m))
           + sum(u[i] * da[i] for i in range(n)) + sum(v[j] * db[j] for j in range(m)))
    assert sp.expand(lhs - rhs) == 0
    # gauge: (u + k, v - k) pairs identically with feasible directions
    k = sp.Symbol("k")
    shifted = sum((u[i] + k) * da[i] for i in range(n)) + sum((v[j] - k) * db[j] for j in range(m))
    assert sp.expand(shifted - sum(u[i] * da[i] for i in range(n)) - sum(v[j] * db[j] for j in range(m))) == 0


# ---------------------------------------------------------------------------
# 4. Unbalanced: the linear system and the gradient formulas
# ---------------------------------------------------------------------------

def check_unbalanced_system():
    """Unbalanced: the stationarity Jacobian is D^{-1} M_rho / eps, and the IFT gradient is
    C_bar = -(T - P*(x 1^T + 1 y^T))/eps, a_bar = x r/a (2x2).

    Stationarity of ``<C, P> - eps h(P) + rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b)``
    in the potentials: ``log r_i - log a_i + f_i/rho_a = 0`` (and columns), with
    ``P_ij = exp((f_i + g_j - C_ij)/eps)``.  Its Jacobian in (f, g) is
    ``D^{-1} M_rho / eps``, ``M_rho = [[D_r (1 + eps/rho_a), P], [P^T, D_c (1 +
    eps/rho_b)]]`` (symbolic).  The implicit-function gradient of ``<G, P>``
    w.r.t. C_00 and a_0 equals the formulas with ``M_rho [x; y] = [T 1; T^T 1]``,
    as exact rational identities at three random rational points.
    """
    n = m = 2
    f = sp.symbols("f0:2", real=True)
    g = sp.symbols("g0:2", real=True)
    a = sp.symbols("A0:2", positive=True)
    b = sp.symbols("B0:2", positive=True)
    ra, rb = sp.symbols("rho_a rho_b", positive=True)
    C = sp.Matrix(n, m, sp.symbols("C0:4", real=True))
    # P_ij = exp((f_i + g_j - C_ij) / eps), kept as symbols with the chain rule
    # dP_ij = P_ij (df_i + dg_j - dC_ij) / eps written out (fast, exact).
    P = sp.Matrix(n, m, sp.symbols("P0:4", positive=True))

    def total(expr, var):
        d = sp.diff(expr, var)
        for i in range(n):
            for j in range(m):
                dPij = P[i, j] / eps * ((var == f[i]) + (var == g[j]) - (var == C[i, j]))
                if dPij != 0:
                    d += sp.diff(expr, P[i, j]) * dPij
        return d

    r = [sum(P[i, :]) for i in range(n)]
    c = [sum(P[:, j]) for j in range(m)]
    # stationarity of  <C,P> - eps h(P) + rho_a KL(P1|a) + rho_b KL(P^T1|b)  in (f, g)
    Fu = [sp.log(r[i]) - sp.log(a[i]) + f[i] / ra for i in range(n)] + \
         [sp.log(c[j]) - sp.log(b[j]) + g[j] / rb for j in range(m)]
    z = list(f) + list(g)
    J = sp.Matrix(4, 4, lambda k, l: total(Fu[k], z[l]))
    Mrho = sp.zeros(4, 4)
    for i in range(n):
        Mrho[i, i] = r[i] * (1 + eps / ra)
        Mrho[n + i, n + i] = c[i] * (1 + eps / rb)
        for j in range(m):
            Mrho[i, n + j] = Mrho[n + j, i] = P[i, j]
    D = sp.diag(*(r + c))
    assert all(_is_zero(x) for x in (eps * D * J - Mrho))
    # Implicit-function gradient of L = <G, P> w.r.t. C_00 and a_0 against the
    # formulas, as exact rational identities at random rational points (a
    # non-zero rational function vanishes at random points with probability 0).
    import random

    rnd = random.Random(3)
    Gm = sp.Matrix(n, m, sp.symbols("G0:4", real=True))
    for _ in range(3):
        point = {s_: sp.Rational(rnd.randint(1, 40), rnd.randint(1, 40))
                 for s_ in list(P) + [eps, ra, rb, a[0], a[1]]}
        point.update({s_: sp.Rational(rnd.randint(-40, 40), rnd.randint(1, 40)) for s_ in Gm})
        Jp, Mp = J.subs(point), Mrho.subs(point)
        Pp = P.subs(point)
        T = Pp.multiply_elementwise(Gm.subs(point))
        t = sp.Matrix([sum(T[i, :]) for i in range(n)] + [sum(T[:, j]) for j in range(m)])
        xy = Mp.LUsolve(t)
        x, y = list(xy[:n]), list(xy[n:])
        rp = [sum(Pp[i, :]) for i in range(n)]
        for theta, formula in ((C[0, 0], -(T[0, 0] - Pp[0, 0] * (x[0] + y[0])) / point[eps]),
                               (a[0], x[0] * rp[0] / point[a[0]])):
            dz = -Jp.LUsolve(sp.Matrix([total(F_k, theta).subs(point) for F_k in Fu]))
            dL = sum(Gm[i, j].subs(point) * (total(P[i, j], theta).subs(point) + sum(
                total(P[i, j], z[k]).subs(point) * dz[k] for k in range(4)))
                for i in range(n) for j in range(m))
            assert sp.nsimplify(dL - formula) == 0, theta


# ---------------------------------------------------------------------------
# 5. Envelope gradients of the entropic value (2 x 2)
# ---------------------------------------------------------------------------

def check_envelope_2x2():
    # W(p) = <C, P> + eps sum P (log P - 1); its p-derivative is eps F2 (zero at the optimum),
    # so dW/dtheta = partial_theta W at fixed p.
    """Envelope theorem: the entropic value W has dW/dC = P, dW/deps = -h(P), and derivative f1
    + g1 along (da1, db1) = (1, 1) (2x2 symbolic).

    ``W(p) = <C, P> + eps sum P (log P - 1)`` has ``dW/dp = eps F`` (zero at the
    optimum), so every total derivative of the optimal value is the partial
    derivative at fixed p: ``P``, ``-h(P)``, and the potentials.
    """
    W = sum(C2[i, j] * P2[i, j] + eps * P2[i, j] * (sp.log(P2[i, j]) - 1) for i in range(2) for j in range(2))
    assert _is_zero(sp.diff(W, p) - eps * F2)
    for k in range(2):
        for l in range(2):
            assert _is_zero(sp.diff(W, C2[k, l]) - P2[k, l])           # dW/dC = P (at fixed p)
    h = -sum(P2[i, j] * (sp.log(P2[i, j]) - 1) for i in range(2) for j in range(2))
    assert _is_zero(sp.diff(W, eps) + h)                                 # dW/deps = -h(P)
    # dW/da1 + dW/db1 at fixed p equals f1 + g1: with log P = (f_i + g_j - C_ij)/eps,
    # f1 + g1 = C11 + eps log P11 + ... ; check through the potentials' definition:
    f1, f2, g1 = sp.symbols("f1 f2 g1", real=True)
    g2 = 0                                                               # gauge
    logP = sp.Matrix(2, 2, lambda i, j: ([f1, f2][i] + [g1, g2][j] - C2[i, j]) / eps)
    Psub = {p: sp.exp(logP[0, 0])}
    dW_dir = (sp.diff(W, a1) + sp.diff(W, b1))
    # at the optimum P = exp(logP) entrywise; substitute the entries that depend on a1, b1
    subs = {sp.log(P2[0, 1]): logP[0, 1], sp.log(P2[1, 0]): logP[1, 0], sp.log(P2[1, 1]): logP[1, 1]}
    dW_dir = sp.expand(dW_dir).subs(subs).subs(Psub)
    assert _is_zero(sp.expand(dW_dir) - (f1 + g1))


# ---------------------------------------------------------------------------
# 6. kappa of Theorem 5
# ---------------------------------------------------------------------------

def check_kappa():
    """kappa = ||E~^+||_2 of Theorem 5: 1/sqrt(lambda_min(E~^T E~)) equals
    constraint_pinv_norm(n, m) (exact eigenvalues, 5 shapes).

    E~ is the (n m) x (n + m - 1) marginal-constraint matrix with the last
    column potential dropped; for m >= 2 the smallest eigenvalue is
    ``(s - sqrt(s^2 - 4 n))/2`` with ``s = n + m`` or one of n, m.
    """
    from refimpl.sinkhorn import constraint_pinv_norm

    for n, m in ((2, 3), (3, 2), (1, 3), (3, 1), (3, 3)):
        E = sp.zeros(n * m, n + m - 1)
        for i in range(n):
            for j in range(m):
                E[i * m + j, i] = 1
                if j < m - 1:
                    E[i * m + j, n + j] = 1
        lam_min = min((E.T * E).eigenvals())
        assert abs(float(1 / sp.sqrt(lam_min)) - constraint_pinv_norm(n, m)) < 1e-12, (n, m)
        if m >= 2:
            s = n + m
            assert _is_zero(lam_min - (s - sp.sqrt(s ** 2 - 4 * n)) / 2) or lam_min in (n, m)


# ---------------------------------------------------------------------------
# 7. One unrolled row update
# ---------------------------------------------------------------------------

def check_unrolled_one_step():
    """One unrolled log-domain row update: sinkhorn_unrolled_vjp equals sympy's derivative of
    <G, P> w.r.t. C and a (2x3, to 1e-13).

    ``phi_i = log a_i - log sum_j exp(-C_ij/eps)``, ``P_ij = exp(-C_ij/eps +
    phi_i)``; the hand-written reverse pass of ``sinkhorn_unrolled(n_iter=1)``
    is compared entry by entry with the symbolic derivative evaluated at a
    numeric point.
    """
    import numpy as np

    from refimpl import sinkhorn as sk

    n, m = 2, 3
    C = sp.Matrix(n, m, sp.symbols("C0:6", real=True))
    a = sp.symbols("A0:2", positive=True)
    Gm = sp.Matrix(n, m, sp.symbols("G0:6", real=True))
    e = sp.Rational(1, 3)
    # phi_i = log a_i - log sum_j exp(-C_ij / eps);  P_ij = exp(-C_ij/eps + phi_i)
    phi = [sp.log(a[i]) - sp.log(sum(sp.exp(-C[i, j] / e) for j in range(m))) for i in range(n)]
    P = sp.Matrix(n, m, lambda i, j: sp.exp(-C[i, j] / e + phi[i]))
    L = sum(Gm[i, j] * P[i, j] for i in range(n) for j in range(m))
    vals = {s: v for s, v in zip(list(C), [0.2, 0.9, 0.4, 0.7, 0.1, 0.5])}
    vals.update({a[0]: 0.4, a[1]: 0.6})
    vals.update({s: v for s, v in zip(list(Gm), [0.3, -1.2, 0.8, 0.5, -0.4, 1.1])})
    C_num = np.array([[0.2, 0.9, 0.4], [0.7, 0.1, 0.5]])
    G_num = np.array([[0.3, -1.2, 0.8], [0.5, -0.4, 1.1]])
    res = sk.sinkhorn_unrolled(C_num, np.array([0.4, 0.6]), np.array([0.25, 0.35, 0.4]), eps=float(e), n_iter=1)
    C_bar, a_bar, _ = sk.sinkhorn_unrolled_vjp(res, G_num)
    for i in range(n):
        assert abs(float(sp.diff(L, a[i]).subs(vals)) - a_bar[i]) < 1e-13
        for j in range(m):
            assert abs(float(sp.diff(L, C[i, j]).subs(vals)) - C_bar[i, j]) < 1e-13


if __name__ == "__main__":
    import sys

    from _run import run_checks  # derivations/ is on sys.path when run as a script

    sys.exit(run_checks(globals()))
