"""Symbolic derivations behind refimpl.matsqrt, checked with sympy.

Each ``check_*`` derives or verifies one identity used by the code and
raises AssertionError when it fails (tests/test_derivations.py runs them):

* the 2x2 closed form ``S = (A + sqrt(det A) I) / sqrt(tr A + 2 sqrt(det A))``
  (S^2 = A, S SPD) and its derivative against the eigenbasis VJP;
* the divided differences ``K_ij`` of sqrt and 1/sqrt without a difference
  quotient (exact at repeated eigenvalues);
* the Lyapunov adjoint identity ``<G, dS> = <A_bar, dA>`` for
  ``S dS + dS S = dA``, ``S A_bar + A_bar S = G`` (and the inverse root's
  ``T X + X T = -T^2 G T^2``), plus the missing-transpose bug for a
  non-symmetric B;
* the block sign identity ``sign([[B, C], [0, -B^T]]) = [[I, 2X], [0, -I]]``,
  the structured Newton–Schulz step and its scaled variant, and the
  invariant ``B_k X + X B_k = C_k`` of the steps behind the (shifted) Neumann finish;
* the Taylor and [m/m] Padé coefficients of ``sqrt(1 - z)`` (exact rationals,
  re-derived here from sympy's series) and the closed form
  ``r_m(x) = sqrt x coth((2m+1) artanh sqrt x) = E(x)/O(x)``, with its
  relative error ``2 rho^N / (1 - rho^N)``;
* the scalar Newton–Schulz recursion used by the NS error bound.

Run ``python derivations/matsqrt.py`` to execute them all.

Pattern (see the tooling notes): explicit 2x2 matrices of scalar symbols,
linear systems solved by sympy, ``simplify``/``cancel`` of each identity,
then ``lambdify`` against refimpl's numbers where useful.
"""

from __future__ import annotations

import sympy as sp


def _mat2(name: str, symmetric: bool = False) -> sp.Matrix:
    a, b, c, d = sp.symbols(f"{name}11 {name}12 {name}21 {name}22", real=True)
    return sp.Matrix([[a, b], [b, d]]) if symmetric else sp.Matrix([[a, b], [c, d]])


def _inner(X: sp.Matrix, Y: sp.Matrix):
    return sum(X[i, j] * Y[i, j] for i in range(X.rows) for j in range(X.cols))


def _solve_sylvester(B: sp.Matrix, D: sp.Matrix, C: sp.Matrix) -> sp.Matrix:
    """Symbolic X with B X + X D = C (2x2), by solving the 4 linear equations."""
    xs = sp.symbols("x11 x12 x21 x22")
    X = sp.Matrix(2, 2, xs)
    sol = sp.solve(list(B * X + X * D - C), xs, dict=True)
    assert len(sol) == 1, "the Sylvester equation should have a unique solution"
    return X.subs(sol[0])


# --------------------------------------------------------------------------
# 2x2 closed form
# --------------------------------------------------------------------------

def check_two_by_two_closed_form():
    """2x2 SPD closed form S = (A + sqrt(det A) I)/sqrt(tr A + 2 sqrt(det A)): S^2 = A, S SPD,
    and d<G, S(A)> matches sqrtm_vjp(method='exact').

    S = (A + r I)/sqrt(tr A + 2r), r = sqrt(det A): S^2 = A, tr S > 0, det S = r > 0,
    and d<G, S(A)> matches refimpl's exact VJP (symmetric part) numerically.
    """
    a, d = sp.symbols("a d", positive=True)
    b = sp.symbols("b", real=True)
    r = sp.symbols("r", positive=True)          # stands for sqrt(det A)
    A = sp.Matrix([[a, b], [b, d]])
    tau = a + d
    S = (A + r * sp.eye(2)) / sp.sqrt(tau + 2 * r)
    det_rule = {r ** 2: a * d - b ** 2}
    # S^2 - A vanishes once r^2 = det A (Cayley-Hamilton: A^2 = tau A - det A I)
    resid = (S * S - A).applyfunc(lambda e: sp.simplify(sp.expand(e * (tau + 2 * r)).subs(det_rule)))
    assert resid == sp.zeros(2, 2), resid
    assert sp.simplify(S.trace() - sp.sqrt(tau + 2 * r)) == 0          # tr S = sqrt(tau + 2r) > 0
    assert sp.simplify(sp.expand(S.det() * (tau + 2 * r) - r * (tau + 2 * r)).subs(det_rule)) == 0

    # Gradient of <G, S(A)> in (a, b, d) against refimpl (b appears twice: A_bar_12 + A_bar_21).
    import numpy as np
    from refimpl import matsqrt

    g = sp.symbols("g11 g12 g21 g22", real=True)
    Gs = sp.Matrix(2, 2, g)
    S_true = S.subs(r, sp.sqrt(a * d - b ** 2))
    f = _inner(Gs, S_true)
    grad = sp.lambdify((a, b, d, *g), [sp.diff(f, v) for v in (a, b, d)], "numpy")
    rng = np.random.default_rng(7)
    for _ in range(3):
        X = rng.standard_normal((2, 3))
        An = X @ X.T
        Gn = rng.standard_normal((2, 2))
        res = matsqrt.sqrtm(An, method="eig")
        A_bar = matsqrt.sqrtm_vjp(res, Gn, method="exact")
        ga, gb, gd = grad(An[0, 0], An[0, 1], An[1, 1], *Gn.ravel())
        assert np.allclose([ga, gb, gd], [A_bar[0, 0], A_bar[0, 1] + A_bar[1, 0], A_bar[1, 1]],
                           rtol=1e-11, atol=1e-13)


def check_divided_differences():
    """Divided differences without a quotient: K = 1/(s_i + s_j) for sqrt and -1/(s_i s_j (s_i
    + s_j)) for 1/sqrt, exact at repeated eigenvalues.

    (s_i - s_j)/(l_i - l_j) = 1/(s_i + s_j) and (1/s_i - 1/s_j)/(l_i - l_j) =
    -1/(s_i s_j (s_i + s_j)) with l = s^2: both finite at s_i = s_j, where they
    equal the derivatives 1/(2 s) and -1/(2 s^3).
    """
    si, sj = sp.symbols("s_i s_j", positive=True)
    dd_sqrt = (si - sj) / (si ** 2 - sj ** 2)
    dd_inv = (1 / si - 1 / sj) / (si ** 2 - sj ** 2)
    assert sp.simplify(dd_sqrt - 1 / (si + sj)) == 0
    assert sp.simplify(dd_inv + 1 / (si * sj * (si + sj))) == 0
    l = sp.symbols("l", positive=True)
    assert sp.simplify((1 / (si + sj)).subs({si: sp.sqrt(l), sj: sp.sqrt(l)})
                       - sp.diff(sp.sqrt(l), l)) == 0
    assert sp.simplify((-1 / (si * sj * (si + sj))).subs({si: sp.sqrt(l), sj: sp.sqrt(l)})
                       - sp.diff(1 / sp.sqrt(l), l)) == 0


# --------------------------------------------------------------------------
# Lyapunov adjoints
# --------------------------------------------------------------------------

def check_lyapunov_adjoint_identity():
    """<G, dS> = <A_bar, dA> for S dS + dS S = dA and S A_bar + A_bar S = G (Lyapunov adjoint,
    2x2 symbolic, non-symmetric G and dA); inverse-root form too.

    dS = L_S^{-1}(dA), A_bar = L_S^{-1}(G) with L_S(X) = S X + X S, S symmetric:
    <G, dS> - <A_bar, dA> = 0 for non-symmetric G and dA.  Inverse root:
    dT = -T dS T and A_bar = L_T^{-1}(-T^2 G T^2) satisfy the same identity.
    """
    S = _mat2("s", symmetric=True)
    dA, G = _mat2("e"), _mat2("g")
    dS = _solve_sylvester(S, S, dA)
    A_bar = _solve_sylvester(S, S, G)
    assert sp.simplify(_inner(G, dS) - _inner(A_bar, dA)) == 0

    # Inverse root, with T symbolic and S = T^{-1}; dT = -T dS T where L_S(dS) = dA.
    T = _mat2("t", symmetric=True)
    S_of_T = T.inv()
    dS_T = _solve_sylvester(S_of_T, S_of_T, dA)
    dT = -T * dS_T * T
    A_bar_T = _solve_sylvester(T, T, -(T * T) * G * (T * T))
    assert sp.simplify(_inner(G, dT) - _inner(A_bar_T, dA)) == 0
    # ... and the T-form of the JVP agrees with the S-form: dT = L_T^{-1}(-T^2 dA T^2).
    assert sp.simplify(dT - _solve_sylvester(T, T, -(T * T) * dA * (T * T))) == sp.zeros(2, 2)


def check_nonsymmetric_transpose():
    """For non-symmetric B the adjoint of B X + X B^T = C solves B^T Y + Y B = G; omitting the
    transpose breaks the adjoint identity (2x2).

    For a general B, X = L^{-1}(C) with B X + X B^T = C has the adjoint
    Y: B^T Y + Y B = G.  Solving with B in place of B^T (the common bug) breaks
    the adjoint identity unless B is symmetric.
    """
    B = _mat2("b")
    C, G = _mat2("c"), _mat2("g")
    X = _solve_sylvester(B, B.T, C)
    Y = _solve_sylvester(B.T, B, G)
    assert sp.simplify(_inner(G, X) - _inner(Y, C)) == 0
    Y_bug = _solve_sylvester(B, B.T, G)
    gap = (_inner(G, X) - _inner(Y_bug, C))
    vals = {s: v for s, v in zip(sorted(gap.free_symbols, key=str),
                                 [2, 1, -1, 3, 1, 0, 2, -1, 0.5, 1, 0, 2])}
    assert abs(float(gap.subs(vals))) > 1e-3, "the untransposed solve should be wrong here"


# --------------------------------------------------------------------------
# Block sign identity and the structured Newton–Schulz step
# --------------------------------------------------------------------------

def check_block_sign_identity():
    """sign([[B, C], [0, -B^T]]) = [[I, 2X], [0, -I]] with B X + X B^T = C (2x2 symbolic;
    matrix_sign and lyapunov(method='sign') agree, 3x3).

    Sigma = [[I, 2X], [0, -I]] with B X + X B^T = C is an involution commuting
    with M = [[B, C], [0, -B^T]], and M Sigma = [[B, ...], [0, B^T]] has B's spectrum
    (in the right half-plane when B's is): these characterise sign(M).
    """
    B, C = _mat2("b"), _mat2("c")
    X = _solve_sylvester(B, B.T, C)
    I2, Z2 = sp.eye(2), sp.zeros(2, 2)
    M = sp.BlockMatrix([[B, C], [Z2, -B.T]]).as_explicit()
    Sig = sp.BlockMatrix([[I2, 2 * X], [Z2, -I2]]).as_explicit()
    assert sp.simplify(Sig * Sig - sp.eye(4)) == sp.zeros(4, 4)
    assert sp.simplify(M * Sig - Sig * M) == sp.zeros(4, 4)
    MS = (M * Sig).applyfunc(sp.simplify)
    assert MS[:2, :2] == B and MS[2:, 2:] == B.T and MS[2:, :2] == Z2
    # Numerically: refimpl.matrix_sign of the block reproduces it.
    import numpy as np
    from refimpl import matsqrt

    rng = np.random.default_rng(3)
    Bn = rng.standard_normal((3, 3)) + 4 * np.eye(3)
    Cn = rng.standard_normal((3, 3))
    Mn = np.block([[Bn, Cn], [np.zeros((3, 3)), -Bn.T]])
    sgn = matsqrt.matrix_sign(Mn).sign
    Xn = matsqrt.lyapunov(Bn, Cn, method="sign").X
    assert np.allclose(sgn[:3, :3], np.eye(3), atol=1e-12)
    assert np.allclose(sgn[3:, 3:], -np.eye(3), atol=1e-12)
    assert np.allclose(sgn[:3, 3:], 2 * Xn, atol=1e-11)


def check_structured_newton_schulz_step():
    """One Newton-Schulz step on [[B, C], [0, -B^T]] keeps the block form: B' = B (3I - B^2)/2
    and the 6-matmul C' (5 for symmetric B, C).

    One Newton–Schulz step M' = M (3I - M^2)/2 on M = [[B, C], [0, -B^T]] keeps the
    block form with B' = B (3I - B^2)/2 and
    C' = (3C - B^2 C + B C B^T - C (B^T)^2)/2 — the 6-matmul update in refimpl.
    """
    B, C = _mat2("b"), _mat2("c")
    Z2 = sp.zeros(2, 2)
    M = sp.BlockMatrix([[B, C], [Z2, -B.T]]).as_explicit()
    Mn = (M * (3 * sp.eye(4) - M * M) / 2).applyfunc(sp.expand)
    Bn = (B * (3 * sp.eye(2) - B * B) / 2).applyfunc(sp.expand)
    Cn = ((3 * C - B * B * C + B * C * B.T - C * B.T * B.T) / 2).applyfunc(sp.expand)
    assert Mn[:2, :2] == Bn
    assert Mn[:2, 2:] == Cn
    assert Mn[2:, :2] == Z2
    assert Mn[2:, 2:] == (-Bn.T).applyfunc(sp.expand)
    # Symmetric B and C (the VJP's case), plain step (c2 = 1/2, g = c1/c2 = 2):
    # with R = I - B^2, B' = c2 B (R + g I) and C' = c2 sym(B C B + (2R + (g - 1) I) C)
    # -- 5 matmuls a step instead of 6 (sym(2 R C) = R C + C R for symmetric C).
    Bs, Cs = _mat2("p", symmetric=True), _mat2("q", symmetric=True)
    I2 = sp.eye(2)
    R = I2 - Bs * Bs
    M = Bs * Cs * Bs + (2 * R + I2) * Cs
    C_sym = ((M + M.T) / 4).applyfunc(sp.expand)
    C_gen = ((3 * Cs - Bs * Bs * Cs + Bs * Cs * Bs.T - Cs * Bs.T * Bs.T) / 2).applyfunc(sp.expand)
    assert C_sym == C_gen
    assert (Bs * (R + 2 * I2) / 2).applyfunc(sp.expand) == \
        (Bs * (3 * I2 - Bs * Bs) / 2).applyfunc(sp.expand)
    assert (M - M.T).applyfunc(sp.expand) != sp.zeros(2, 2)   # the sym() is part of the formula


def check_scaled_newton_schulz_step():
    """Scaled Newton-Schulz step: p(l) = p(u), max p = 1 at x = 1/a, and on the block it is
    refimpl's scaled update (2x2 symbolic).

    The scaled step of the Lyapunov sign iteration (refimpl's default).

    p(x) = a x (3 - a^2 x^2)/2 with a^2 = 3/(u^2 + u l + l^2): p(l) = p(u) (both
    ends of [l, u] meet), p <= 1 with its maximum 1 at x = 1/a, p > 0 on
    (0, sqrt(u^2 + u l + l^2)), and a >= 1 for l, u <= 1.  On the block
    M = [[B, C], [0, -B]] (B, C symmetric), p(M) = [[p(B), C'], [0, -p(B)]] with
    C' = c2 sym(B C B + (2R + (g - 1) I) C), R = I - B^2, c2 = a^3/2, g = (3 - a^2)/a^2,
    and p(B) = c2 B (R + g I), as coded: the iterate is still an odd polynomial in M.
    """
    x, l, u = sp.symbols("x l u", positive=True)
    a = sp.sqrt(3 / (u ** 2 + u * l + l ** 2))
    p = a * x * (3 - a ** 2 * x ** 2) / 2
    assert sp.simplify(p.subs(x, l) - p.subs(x, u)) == 0
    assert sp.simplify(sp.diff(p, x).subs(x, 1 / a)) == 0 and sp.simplify(p.subs(x, 1 / a) - 1) == 0
    assert sp.simplify(1 - p - (1 - a * x) ** 2 * (2 + a * x) / 2) == 0         # 1 - p >= 0
    assert sp.simplify(p.subs(x, sp.sqrt(u ** 2 + u * l + l ** 2))) == 0        # first zero
    assert sp.simplify(a.subs({u: 1, l: 1}) - 1) == 0
    assert sp.diff(3 / (u ** 2 + u * l + l ** 2), l).subs(u, 1).is_negative   # a falls as l grows

    Bs, Cs = _mat2("p", symmetric=True), _mat2("q", symmetric=True)
    al = sp.symbols("alpha", positive=True)
    I2, Z2 = sp.eye(2), sp.zeros(2, 2)
    M = sp.BlockMatrix([[Bs, Cs], [Z2, -Bs]]).as_explicit()
    pM = (al * M * (3 * sp.eye(4) - al ** 2 * M * M) / 2).applyfunc(sp.expand)
    c2, g = al ** 3 / 2, (3 - al ** 2) / al ** 2
    R = I2 - Bs * Bs
    M = Bs * Cs * Bs + (2 * R + (g - 1) * I2) * Cs
    C_new = (c2 * (M + M.T) / 2).applyfunc(sp.expand)
    B_new = (c2 * Bs * (R + g * I2)).applyfunc(sp.expand)
    assert (pM[:2, 2:] - C_new).applyfunc(sp.simplify) == Z2
    assert (pM[:2, :2] - B_new).applyfunc(sp.simplify) == Z2
    assert (pM[2:, 2:] + B_new).applyfunc(sp.simplify) == Z2 and pM[2:, :2] == Z2


def check_sign_step_keeps_the_solution():
    """Invariant of the sign iteration: B X + X B = C implies B' X + X B' = C' after a scaled
    step; 2X is the fixed point of the shifted Neumann finish.

    The finish rests on an invariant of the sign iteration: if
    B X + X B = C, the step's (B', C') (any odd p) satisfy B' X + X B' = C',
    because p(M) = V diag(p(B), -p(B)) V^{-1} with V = [[I, -X], [0, I]].
    Checked for the scaled step with symbolic a, B, X (C := B X + X B).
    Then, for any shift w, Z = 2X is the fixed point Z = 2 w C + T(Z) of
    T(Y) = Y - w (B Y + Y B) = M + M^T, M = (I/2 - w B) Y (Y symmetric), which
    the shifted Neumann series sum_t T^t(2 w C) sums.
    """
    Bs, Xs = _mat2("p", symmetric=True), _mat2("x", symmetric=True)
    al = sp.symbols("alpha", positive=True)
    I2 = sp.eye(2)
    Cs = Bs * Xs + Xs * Bs
    c2, g = al ** 3 / 2, (3 - al ** 2) / al ** 2
    R = I2 - Bs * Bs
    M = Bs * Cs * Bs + (2 * R + (g - 1) * I2) * Cs
    C_new = c2 * (M + M.T) / 2
    B_new = c2 * Bs * (R + g * I2)
    assert (B_new * Xs + Xs * B_new - C_new).applyfunc(sp.simplify) == sp.zeros(2, 2)
    w = sp.symbols("w", positive=True)
    Dw = I2 / 2 - w * Bs
    T = lambda Y: Dw * Y + (Dw * Y).T                                            # noqa: E731
    Ys = _mat2("y", symmetric=True)
    assert (T(Ys) - (Ys - w * (Bs * Ys + Ys * Bs))).applyfunc(sp.simplify) == sp.zeros(2, 2)
    assert (2 * w * Cs + T(2 * Xs) - 2 * Xs).applyfunc(sp.simplify) == sp.zeros(2, 2)


# --------------------------------------------------------------------------
# Taylor and Padé coefficients, closed forms
# --------------------------------------------------------------------------

def _pade_sympy(m: int):
    """[m/m] Padé of sqrt(1 - z) at 0, derived from sympy's series (q_0 = 1)."""
    z = sp.symbols("z")
    c = sp.Poly(sp.series(sp.sqrt(1 - z), z, 0, 2 * m + 1).removeO(), z).all_coeffs()[::-1]
    c = c + [0] * (2 * m + 1 - len(c))
    q = sp.symbols(f"q1:{m + 1}")
    qq = (1,) + q
    eqs = [sum(qq[j] * c[k - j] for j in range(m + 1)) for k in range(m + 1, 2 * m + 1)]
    sol = sp.solve(eqs, q, dict=True)[0]
    qv = [sp.Integer(1)] + [sol[v] for v in q]
    pv = [sum(qv[j] * c[k - j] for j in range(k + 1)) for k in range(m + 1)]
    return [sp.Rational(v) for v in pv], [sp.Rational(v) for v in qv]


def check_taylor_coefficients():
    """taylor_coefficients(12) equal the series of (1 - z)^(1/2) and (1 - z)^(-1/2) exactly
    (MTP forward).

    refimpl's t_k equal sympy's series of (1 - z)^{1/2} and (1 - z)^{-1/2}.
    """
    from refimpl import matsqrt

    z = sp.symbols("z")
    for expo, inverse in ((sp.Rational(1, 2), False), (-sp.Rational(1, 2), True)):
        series = sp.series((1 - z) ** expo, z, 0, 13).removeO()
        ref = [series.coeff(z, k) for k in range(13)]
        got = [sp.Rational(v.numerator, v.denominator)
               for v in matsqrt.taylor_coefficients(12, inverse=inverse)]
        assert got == ref, (inverse, got, ref)


def check_pade_coefficients():
    """pade_coefficients(m), m = 1..6, equal the [m/m] Pade approximant of sqrt(1 - z) derived
    here: Q f - P = O(z^(2m+1)) exactly; basis 'x' is the same function.

    refimpl's exact p, q equal the Padé coefficients derived here; Q f - P =
    O(z^{2m+1}); and P(1 - x)/Q(1 - x) = E(x)/O(x) (refimpl's basis "x").
    """
    from refimpl import matsqrt

    z, x = sp.symbols("z x")
    for m in range(1, 7):
        p_ref, q_ref = _pade_sympy(m)
        p, q = matsqrt.pade_coefficients(m)
        assert [sp.Rational(v.numerator, v.denominator) for v in p] == p_ref
        assert [sp.Rational(v.numerator, v.denominator) for v in q] == q_ref
        P = sum(v * z ** k for k, v in enumerate(p_ref))
        Q = sum(v * z ** k for k, v in enumerate(q_ref))
        lead = sp.series(Q * sp.sqrt(1 - z) - P, z, 0, 2 * m + 2).removeO()
        assert all(lead.coeff(z, k) == 0 for k in range(2 * m + 1)), (m, lead)
        assert lead.coeff(z, 2 * m + 1) != 0           # the order is exactly 2m + 1
        e, o = matsqrt.pade_coefficients(m, "x")
        E = sum(sp.Rational(v.numerator, v.denominator) * x ** j for j, v in enumerate(e))
        O = sum(sp.Rational(v.numerator, v.denominator) * x ** j for j, v in enumerate(o))
        assert sp.cancel(P.subs(z, 1 - x) / Q.subs(z, 1 - x) - E / O) == 0, m


def check_pade_closed_form_and_error():
    """MPA closed form r_m(x) = sqrt(x) coth((2m+1) artanh sqrt x) = E(x)/O(x), relative error
    2 rho^N/(1 - rho^N), r_m(0) = 1/N (m = 1..5).

    sqrt(x) coth(N artanh sqrt x) = E(x)/O(x), N = 2m+1, and its relative error
    r/sqrt(x) - 1 = 2 rho^N/(1 - rho^N), rho = (1 - sqrt x)/(1 + sqrt x);
    r_m(0) = 1/N.
    """
    s = sp.symbols("s", positive=True)
    for m in range(1, 6):
        N = 2 * m + 1
        # coth(N a) with tanh a = s: e^{2a} = (1 + s)/(1 - s)
        coth = ((1 + s) ** N + (1 - s) ** N) / ((1 + s) ** N - (1 - s) ** N)
        r = s * coth
        E = sum(sp.binomial(N, 2 * j) * s ** (2 * j) for j in range(m + 1))
        O = sum(sp.binomial(N, 2 * j + 1) * s ** (2 * j) for j in range(m + 1))
        assert sp.cancel(r - E / O) == 0
        rho = (1 - s) / (1 + s)
        assert sp.cancel(r / s - 1 - 2 * rho ** N / (1 - rho ** N)) == 0
        assert sp.cancel(s / r - 1 + 2 * rho ** N / (1 + rho ** N)) == 0   # inverse root
        assert sp.limit(E / O, s, 0) == sp.Rational(1, N)
    # and numerically, against the artanh form itself
    import numpy as np
    from refimpl import matsqrt

    xv = np.linspace(0.01, 1.0, 7)
    for m in (2, 5):
        direct = np.sqrt(xv) / np.tanh((2 * m + 1) * np.arctanh(np.minimum(np.sqrt(xv), 1 - 1e-16)))
        assert np.allclose(matsqrt.scalar_map(xv, method="mpa", order=m), direct, rtol=1e-12)


def check_newton_schulz_scalar_recursion():
    """Coupled Newton-Schulz on one eigenvalue: y/z is invariant and w = y z obeys 1 - w' = (1
    - w)^2 (4 - w)/4 (the NS error bound).

    Coupled NS on an eigenvalue: y/z is invariant (= x), w = y z obeys
    1 - w' = (1 - w)^2 (4 - w)/4 with w' = w (3 - w)^2/4, so y_T = sqrt(x w_T).
    """
    y, zz, x = sp.symbols("y z x", positive=True)
    m = 3 - zz * y
    y1, z1 = y * m / 2, m * zz / 2
    assert sp.simplify(y1 / z1 - y / zz) == 0
    w = sp.symbols("w")
    w1 = sp.expand((y1 * z1).subs(y, w / zz))
    assert sp.simplify(w1 - w * (3 - w) ** 2 / 4) == 0
    assert sp.expand(1 - w * (3 - w) ** 2 / 4 - (1 - w) ** 2 * (4 - w) / 4) == 0


if __name__ == "__main__":
    import sys

    from _run import run_checks  # derivations/ is on sys.path when run as a script

    sys.exit(run_checks(globals()))
