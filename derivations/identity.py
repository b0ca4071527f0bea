"""Identity with projection: the projection Jacobians and the relaxation view.

Derived with sympy on explicit 3-vectors of scalar symbols (the reliable
pattern: no MatrixSymbol calculus).  Each ``check_*`` raises AssertionError
when an identity fails; ``tests/test_derivations.py`` runs them all, and
``python derivations/identity.py`` prints what each one established.

What is derived
---------------
1. P_mean(w) = w - mean(w) 1 has Jacobian M = I - 1 1^T / n (symmetric).
2. P_norm(w) = w / ||w|| has Jacobian (I - u u^T) / ||w||, u = w / ||w||;
   its VJP is (g - <u, g> u) / ||w||.
3. P_std = P_norm o P_mean has Jacobian (I - u u^T) M / ||v|| with v = M w,
   u = v / ||v||, and VJP (M g - <u, g> u) / ||v|| (because M u = u); the
   JVP (M dw - u <u, M dw>) / ||v||.
4. r = -P_std'(w)^T g is orthogonal to 1 and to w, r(w + t 1) = r(w),
   r(c w) = r(w) / c, and ||w - eta r||^2 = ||w||^2 + eta^2 ||r||^2.
5. Relaxation view: the exact Jacobian of the linear program relaxed to
   R^n (with a quadratic regulariser), to the hyperplane <1, y> = k, to the
   sphere ||y|| = rho, and to the intersection of <1, y> = k with the sphere
   of radius R = sqrt(k (n - k) / n) around (k / n) 1 (which holds every
   k-hot vector) is -I, -P_mean', -rho P_norm', -R P_std': the identity
   with the corresponding projection, up to a positive scale.
6. The Gumbel-perturbed argmin, E[y] = softmax(-w / sigma), has
   sigma * Jacobian -> -M / n as sigma -> infinity: the identity with
   P_mean is its (scaled) large-noise limit.
7. For two items and Gaussian noise the perturbed estimator
   -(1/sigma) E[y_1 Z_1] equals the exact derivative of
   E[y_1] = Phi((w_2 - w_1) / (sigma sqrt 2)) (Stein's lemma; the 1/sigma
   factor is needed).
"""

import sympy as sp

N = 3
w = sp.Matrix(sp.symbols("w1:4", real=True))
g = sp.Matrix(sp.symbols("g1:4", real=True))
ONE = sp.ones(N, 1)
EYE = sp.eye(N)
M = EYE - ONE * ONE.T / N                      # centring matrix


def _zero(expr) -> bool:
    """True if a scalar or matrix expression simplifies to 0."""
    if isinstance(expr, sp.MatrixBase):
        return all(_zero(e) for e in expr)
    return sp.simplify(expr) == 0


def _norm(v):
    return sp.sqrt((v.T * v)[0, 0])


def _p_mean(x):
    return M * x


def _p_norm(x):
    return x / _norm(x)


def _p_std(x):
    return _p_norm(M * x)


def check_mean_jacobian():
    """P_mean'(w) = I - 1 1^T/n, symmetric; its VJP is g - mean(g) 1 (n = 3 symbolic).
    """
    J = _p_mean(w).jacobian(w)
    assert _zero(J - M)
    assert _zero(J - J.T)
    assert _zero(J.T * g - (g - ONE * sum(g) / N))


def check_norm_jacobian():
    """P_norm'(w) = I/r - w w^T/r^3 with r = ||w||; its VJP is (g - <u, g> u)/r, u = w/r (n = 3
    symbolic).

    Assumption: w != 0.
    """
    r = _norm(w)
    u = w / r
    J = _p_norm(w).jacobian(w)
    assert _zero(J - (EYE / r - w * w.T / r**3))
    assert _zero(J.T * g - (g - u * (u.T * g)[0, 0]) / r)


def check_std_jacobian():
    """P_std'(w) = (I - u u^T) M/||v|| with v = M w, u = v/||v||: symmetric, VJP (M g - <u, g>
    u)/||v||, JVP (M dw - u <u, M dw>)/||v|| (n = 3 symbolic).

    Assumption: w not a multiple of 1 (v != 0).  Uses M u = u (u has zero
    mean).
    """
    v = M * w
    r = _norm(v)
    u = v / r
    J = _p_std(w).jacobian(w)
    assert _zero(J - (EYE - u * u.T) * M / r)
    assert _zero(M * u - u)                                     # u has zero mean
    assert _zero(J.T * g - (M * g - u * (u.T * g)[0, 0]) / r)
    dw = sp.Matrix(sp.symbols("d1:4", real=True))
    assert _zero(J * dw - (M * dw - u * (u.T * M * dw)[0, 0]) / r)
    assert _zero(J - J.T)


def check_identity_direction_properties():
    """r = -P_std'(w)^T g is orthogonal to 1 and to w, r(w + t 1) = r(w), r(c w) = r(w)/c, and
    ||w - eta r||^2 = ||w||^2 + eta^2 ||r||^2 (n = 3 symbolic).

    So a plain gradient step with the std projection never shrinks ||w|| (no
    cost collapse).  With the norm projection alone r is orthogonal to w but not
    to 1.
    """
    t, c, eta = sp.symbols("t c eta", positive=True)

    def r_at(x):
        return -_p_std(x).jacobian(x).T * g

    r = r_at(w)
    assert _zero((ONE.T * r)[0, 0])
    assert _zero((w.T * r)[0, 0])
    shifted = r_at(sp.Matrix(sp.symbols("x1:4", real=True))).subs(
        {sp.Symbol(f"x{i + 1}", real=True): w[i] + t for i in range(N)})
    assert _zero(shifted - r)
    scaled = r_at(sp.Matrix(sp.symbols("x1:4", real=True))).subs(
        {sp.Symbol(f"x{i + 1}", real=True): c * w[i] for i in range(N)})
    assert _zero(scaled - r / c)
    step = w - eta * r
    assert _zero((step.T * step)[0, 0] - (w.T * w)[0, 0] - eta**2 * (r.T * r)[0, 0])
    # norm alone: r _|_ w but not _|_ 1
    r_norm = -_p_norm(w).jacobian(w).T * g
    assert _zero((w.T * r_norm)[0, 0])
    assert not _zero((ONE.T * r_norm)[0, 0])


def check_relaxation_free_space():
    """argmin_y <w, y> + ||y||^2/2 = -w: the plain identity is the exact Jacobian -I of the
    relaxed LP (n = 3 symbolic).
    """
    y = sp.Matrix(sp.symbols("y1:4", real=True))
    obj = (w.T * y)[0, 0] + (y.T * y)[0, 0] / 2
    sol = sp.solve([sp.diff(obj, yi) for yi in y], list(y), dict=True)[0]
    y_star = y.subs(sol)
    assert _zero(y_star.jacobian(w) + EYE)


def check_relaxation_hyperplane():
    """argmin over <1, y> = k of <w, y> + ||y||^2/2 is -P_mean(w) + (k/n) 1: Jacobian -P_mean'
    (n = 3 symbolic, Lagrangian solved).
    """
    y = sp.Matrix(sp.symbols("y1:4", real=True))
    k, mu = sp.symbols("k mu", real=True)
    lag = (w.T * y)[0, 0] + (y.T * y)[0, 0] / 2 + mu * ((ONE.T * y)[0, 0] - k)
    eqs = [sp.diff(lag, yi) for yi in y] + [sp.diff(lag, mu)]
    sol = sp.solve(eqs, list(y) + [mu], dict=True)[0]
    y_star = y.subs(sol)
    assert _zero(y_star - (-_p_mean(w) + ONE * k / N))
    assert _zero(y_star.jacobian(w) + M)


def check_relaxation_sphere():
    """argmin over ||y|| = rho of <w, y> is -rho w/||w||: Jacobian -rho P_norm' (n = 3
    symbolic).

    Both stationary points ``-+ rho w/||w||`` satisfy the Lagrange condition
    ``w + 2 lam y = 0``; the minus one has the smaller objective.
    """
    rho = sp.Symbol("rho", positive=True)
    lam = sp.Symbol("lam", real=True)
    r = _norm(w)
    # stationarity of <w, y> + lam (||y||^2 - rho^2): w + 2 lam y = 0, so the
    # two stationary points on the sphere are -+ rho w / ||w||.
    candidates = [-rho * w / r, rho * w / r]
    for y_c, lam_c in zip(candidates, (r / (2 * rho), -r / (2 * rho))):
        assert _zero(w + 2 * lam_c * y_c)
        assert _zero((y_c.T * y_c)[0, 0] - rho**2)
    values = [sp.simplify((w.T * y_c)[0, 0]) for y_c in candidates]
    assert _zero(values[0] + rho * r) and _zero(values[1] - rho * r)   # the minus one is the minimum
    assert lam not in values[0].free_symbols
    assert _zero(candidates[0].jacobian(w) + rho * _p_norm(w).jacobian(w))


def check_relaxation_sphere_and_hyperplane():
    """argmin over {<1, y> = k} and the sphere of radius R around (k/n) 1 of <w, y> is (k/n) 1
    - R P_std(w): Jacobian -R P_std'; every k-hot vector lies on the sphere R^2 = k (n -
    k)/n.

    KKT multipliers ``mu = -mean(w)``, ``lam = ||M w||/(2R)``; the other
    stationary point has objective larger by ``2 R ||M w||``.  The k-hot
    distance is checked for symbolic n and k.
    """
    k, R = sp.symbols("k R", positive=True)
    centre = ONE * k / N
    v = M * w
    r = _norm(v)
    y_star = centre - R * v / r
    # KKT: w + mu 1 + 2 lam (y - centre) = 0 with mu = -mean(w), lam = ||v|| / (2R)
    mu, lam = -sum(w) / N, r / (2 * R)
    assert _zero(w + mu * ONE + 2 * lam * (y_star - centre))
    assert _zero((ONE.T * y_star)[0, 0] - k)
    assert _zero(((y_star - centre).T * (y_star - centre))[0, 0] - R**2)
    other = centre + R * v / r                               # the other stationary point
    assert _zero((w.T * (other - y_star))[0, 0] - 2 * R * r)  # strictly larger objective
    assert _zero(y_star.jacobian(w) + R * _p_std(w).jacobian(w))
    # k-hot vectors lie on that sphere, for symbolic n and k
    n, kk = sp.symbols("n k", positive=True)
    dist2 = kk * (1 - kk / n) ** 2 + (n - kk) * (kk / n) ** 2
    assert _zero(dist2 - kk * (n - kk) / n)


def check_gumbel_large_noise_limit():
    """sigma * d softmax(-w/sigma)/dw -> -M/n as sigma -> infinity: identity + mean projection
    is the large-noise limit of the Gumbel-perturbed argmin (n = 3).

    Also the closed form of the softmax Jacobian, ``-(diag(p) - p p^T)/sigma``.
    """
    sigma = sp.Symbol("sigma", positive=True)
    e = [sp.exp(-wi / sigma) for wi in w]
    p = sp.Matrix([ei / sum(e) for ei in e])
    J = p.jacobian(w)
    assert _zero(J + (sp.diag(*p) - p * p.T) / sigma)            # the closed form used in tests
    limit = (sigma * J).applyfunc(lambda x: sp.limit(x, sigma, sp.oo))
    assert _zero(limit + M / N)


def check_gaussian_pair_stein():
    """Two items, Gaussian noise: the perturbed estimator -(1/sigma) E[y_1 Z_1] equals d/dw_1
    Phi((w_2 - w_1)/(sigma sqrt 2)) (Stein's lemma; exact integral).

    ``y_1 = 1[Z_1 - Z_2 > a]`` with ``a = (w_1 - w_2)/sigma``; integrating by
    parts (``z phi = -phi'``, boundary terms vanish) gives
    ``E[y_1 Z_1] = exp(-a^2/4)/(2 sqrt(pi))``; the 1/sigma factor is needed.
    """
    z, a = sp.symbols("z a", real=True)
    sigma = sp.Symbol("sigma", positive=True)
    w1, w2 = sp.symbols("w1 w2", real=True)
    phi = sp.exp(-z**2 / 2) / sp.sqrt(2 * sp.pi)
    Phi = (1 + sp.erf((z - a) / sp.sqrt(2))) / 2
    # y_1 = 1[Z_1 - Z_2 > a], a = (w_1 - w_2) / sigma; integrating Z_2 out gives
    # E[y_1 Z_1] = int z phi(z) Phi(z - a) dz.  Since z phi = -phi', integrate by
    # parts: the antiderivative -phi Phi vanishes at +-infinity and
    # d/dz(-phi Phi) = z phi Phi - phi Phi', so E[y_1 Z_1] = int phi(z) phi(z - a) dz.
    assert _zero(sp.diff(-phi * Phi, z) - (z * phi * Phi - phi * sp.diff(Phi, z)))
    assert sp.limit(phi * Phi, z, sp.oo) == 0 and sp.limit(phi * Phi, z, -sp.oo) == 0
    expectation = sp.integrate(phi * sp.diff(Phi, z), (z, -sp.oo, sp.oo))
    assert _zero(expectation - sp.exp(-a**2 / 4) / (2 * sp.sqrt(sp.pi)))
    estimator = -expectation.subs(a, (w1 - w2) / sigma) / sigma
    d = (w2 - w1) / (sigma * sp.sqrt(2))
    exact = sp.diff((1 + sp.erf(d / sp.sqrt(2))) / 2, w1)
    assert _zero(estimator - exact)


if __name__ == "__main__":
    import sys

    from _run import run_checks  # derivations/ is on sys.path when run as a script

    sys.exit(run_checks(globals()))
