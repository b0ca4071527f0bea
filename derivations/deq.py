"""Symbolic derivations behind refimpl.deq (implicit layers, phantom gradients).

Each ``check_*`` function derives or verifies one identity with sympy (and,
where a number is involved, compares with refimpl) and raises AssertionError
when it does not hold.  Run ``python derivations/deq.py`` to run them all.

Conventions as in refimpl/deq.py: numerator layout, ``J = df/dz``,
``F = df/dtheta``, ``B = lam J + (1 - lam) I``, exact ``theta_bar = F^T u``
with ``(I - J^T) u = g``, NPG ``u_k = lam sum_{i<k} (B^T)^i g``.
"""

from __future__ import annotations

import numpy as np
import sympy as sp


def _zero(expr) -> bool:
    return sp.simplify(expr) == 0


def _mzero(M) -> bool:
    return all(_zero(e) for e in sp.Matrix(M))


# --------------------------------------------------------------------------
# Scalar DEQ z = tanh(w z + u x + b)
# --------------------------------------------------------------------------

def check_scalar_deq_gradient():
    """Scalar DEQ z = tanh(w z + u x + b): the IFT gradient D dpre/dtheta/(1 - w D) matches
    mpmath's derivative of the root (30 digits) and deq_vjp.

    Implicit function theorem on F(z, theta) = z - tanh(w z + u x + b) = 0:
    dz/dtheta = -F_theta / F_z = D dpre/dtheta / (1 - w D), D = 1 - tanh(pre)^2,
    i.e. theta_bar = g D dpre/dtheta / (1 - w D); checked symbolically, against
    mpmath differentiation of the root at 30 digits, and against refimpl.
    """
    z, w, u, b, x, g = sp.symbols("z w u b x g", real=True)
    pre = w * z + u * x + b
    F = z - sp.tanh(pre)
    D = 1 - sp.tanh(pre) ** 2
    for theta, dpre in ((w, z), (u, x), (b, 1), (x, u)):
        ift = -sp.diff(F, theta) / sp.diff(F, z)
        assert _zero(ift - D * dpre / (1 - w * D)), theta

    # Numbers: differentiate the fixed point itself at high precision.
    import mpmath

    mpmath.mp.dps = 30
    vals = {w: mpmath.mpf("0.6"), u: mpmath.mpf("1.3"), b: mpmath.mpf("-0.2"), x: mpmath.mpf("0.8")}

    def zstar(wv, uv, bv, xv):
        return mpmath.findroot(lambda zz: zz - mpmath.tanh(wv * zz + uv * xv + bv), 0.3)

    z0 = zstar(*vals.values())
    D0 = 1 - mpmath.tanh(vals[w] * z0 + vals[u] * vals[x] + vals[b]) ** 2
    numeric = mpmath.diff(lambda wv: zstar(wv, vals[u], vals[b], vals[x]), vals[w])
    assert abs(numeric - D0 * z0 / (1 - vals[w] * D0)) < mpmath.mpf("1e-20")

    from refimpl import deq

    res = deq.tanh_deq(np.array([0.8]), np.array([[0.6]]), np.array([[1.3]]), np.array([-0.2]))
    x_bar, W_bar, U_bar, b_bar = deq.deq_vjp(res, np.array([1.0]))
    s = float(D0 / (1 - vals[w] * D0))
    assert np.allclose([W_bar[0, 0], U_bar[0, 0], b_bar[0], x_bar[0]],
                       [s * float(z0), s * 0.8, s, s * 1.3], rtol=1e-13, atol=0)


# --------------------------------------------------------------------------
# Linear DEQ z = W z + U x + b: implicit adjoint == differentiating the closed form
# --------------------------------------------------------------------------

def check_linear_deq_gradient():
    """Linear DEQ z = W z + U x + b: differentiating (I - W)^{-1}(U x + b) gives W_bar = u z^T,
    U_bar = u x^T, b_bar = u, x_bar = U^T u with (I - W^T) u = c (2x2 symbolic).

    For z = W z + U x + b (2x2 W, 2x2 U) and L = c^T z, differentiating the
    closed form z = (I - W)^{-1} (U x + b) entry by entry gives the implicit
    adjoint: W_bar = u z^T, U_bar = u x^T, b_bar = u, x_bar = U^T u with
    (I - W^T) u = c.
    """
    W = sp.Matrix(2, 2, sp.symbols("w11 w12 w21 w22", real=True))
    U = sp.Matrix(2, 2, sp.symbols("u11 u12 u21 u22", real=True))
    b = sp.Matrix(sp.symbols("b1 b2", real=True))
    x = sp.Matrix(sp.symbols("x1 x2", real=True))
    c = sp.Matrix(sp.symbols("c1 c2", real=True))
    I2 = sp.eye(2)
    z = (I2 - W).inv() * (U * x + b)
    L = (c.T * z)[0, 0]
    u = (I2 - W.T).inv() * c
    expected = {"W": u * z.T, "U": u * x.T, "b": u, "x": U.T * u}
    direct = {"W": sp.Matrix(2, 2, lambda i, j: sp.diff(L, W[i, j])),
              "U": sp.Matrix(2, 2, lambda i, j: sp.diff(L, U[i, j])),
              "b": sp.Matrix(2, 1, lambda i, _: sp.diff(L, b[i])),
              "x": sp.Matrix(2, 1, lambda i, _: sp.diff(L, x[i]))}
    for name in expected:
        assert _mzero(direct[name] - expected[name]), name


def check_tanh_layer_vjps():
    """tanh layer f = tanh(W h + U x + b): J^T v = W^T (D v) and F^T v = ((D v) h^T, (D v) x^T,
    D v, U^T (D v)), D = 1 - f^2 (symbolic).

    At any point h, with f = tanh(W h + U x + b) and D = 1 - f^2:
    J^T v = W^T (D v) and F^T v = ((D v) h^T, (D v) x^T, D v, U^T (D v)) for
    (W, U, b, x): the gradients of <v, f> by derive_by_array.
    """
    W = sp.Matrix(2, 2, sp.symbols("w11 w12 w21 w22", real=True))
    U = sp.Matrix(2, 3, sp.symbols("u11:14 u21:24", real=True))
    b = sp.Matrix(sp.symbols("b1 b2", real=True))
    x = sp.Matrix(sp.symbols("x1:4", real=True))
    h = sp.Matrix(sp.symbols("h1 h2", real=True))
    v = sp.Matrix(sp.symbols("v1 v2", real=True))
    pre = W * h + U * x + b
    f = pre.applyfunc(sp.tanh)
    Dv = sp.Matrix([(1 - f[i] ** 2) * v[i] for i in range(2)])
    vf = (v.T * f)[0, 0]
    grad = lambda M: sp.Matrix(M.shape[0], M.shape[1],  # noqa: E731
                               lambda i, j: sp.diff(vf, M[i, j]))
    assert _mzero(grad(h) - W.T * Dv)
    assert _mzero(grad(W) - Dv * h.T)
    assert _mzero(grad(U) - Dv * x.T)
    assert _mzero(grad(b) - Dv)
    assert _mzero(grad(x) - U.T * Dv)


# --------------------------------------------------------------------------
# Neumann identity, error identity, k -> infinity
# --------------------------------------------------------------------------

def check_neumann_identity():
    """lam sum_{i<k} B^i (I - J) = I - B^k, so the NPG error is B^k (I - J)^{-1} and k = 1
    gives lam JFB (2x2 symbolic, k = 1..4).

    With B = lam J + (1 - lam) I (so I - J = (I - B)/lam), for k = 1..4:
    lam sum_{i<k} B^i (I - J) = I - B^k, hence the NPG error identity
    (I - J)^{-1} - lam sum_{i<k} B^i = B^k (I - J)^{-1}; and k = 1 gives lam I
    (NPG with one term is lam times JFB).
    """
    J = sp.Matrix(2, 2, sp.symbols("j11 j12 j21 j22", real=True))
    lam = sp.symbols("lam", positive=True)
    I2 = sp.eye(2)
    Bm = lam * J + (1 - lam) * I2
    assert _mzero(I2 - J - (I2 - Bm) / lam)
    S = sp.zeros(2, 2)
    P = I2
    inv = (I2 - J).inv()
    for k in range(1, 5):
        S = S + P                      # sum_{i<k} B^i
        P = P * Bm                     # B^k
        assert _mzero(lam * S * (I2 - J) - (I2 - P)), k
        assert _mzero(inv - lam * S - P * inv), k
        if k == 1:
            assert _mzero(lam * S - lam * I2)


def check_neumann_limit():
    """Scalar Neumann series: lam sum b^i = 1/(1 - mu) iff |1 - lam (1 - mu)| < 1, i.e. 0 < lam
    < 2 Re(1 - mu)/|1 - mu|^2 (damping_threshold).

    Scalar k -> infinity: lam sum_i b^i with b = 1 - lam (1 - mu) sums to
    1 / (1 - mu) exactly when |b| < 1; |1 - lam w|^2 - 1 = lam (lam |w|^2 -
    2 Re w) for w = 1 - mu, so |b| < 1 iff 0 < lam < 2 Re(w) / |w|^2 (the
    damping threshold of refimpl.deq.damping_threshold).
    """
    lam, mu, i = sp.symbols("lam mu i", real=True)
    bb = 1 - lam * (1 - mu)
    series = sp.summation(bb ** i, (i, 0, sp.oo))
    assert isinstance(series, sp.Piecewise)
    (limit, condition), _ = series.args
    assert _zero(lam * limit - 1 / (1 - mu))
    assert _zero(condition.lhs - sp.Abs(bb)) and condition.rhs == 1    # converges iff |b| < 1
    a, c = sp.symbols("a c", real=True)                 # w = a + i c
    wc = a + sp.I * c
    mod2 = sp.expand((1 - lam * wc) * (1 - lam * sp.conjugate(wc)))
    assert _zero(mod2 - 1 - lam * (lam * (a ** 2 + c ** 2) - 2 * a))

    from refimpl import deq

    J = np.diag([-2.0, -0.5, 0.3])
    assert np.isclose(deq.damping_threshold(J), min(2 / (1 - m) for m in (-2.0, -0.5, 0.3)))


# --------------------------------------------------------------------------
# UPG == NPG at an exact fixed point (scalar tanh layer)
# --------------------------------------------------------------------------

def check_upg_equals_npg_at_fixed_point():
    """UPG = NPG at an exact fixed point: differentiating k damped steps from z* gives lam
    sum_{i<k} beta^i D z (k = 1, 2 symbolic; k = 3, 4 to 40 digits).

    Differentiate k damped steps h_{t+1} = lam tanh(w h_t + u x + c) +
    (1 - lam) h_t from h_0 = z (held constant) with respect to w, at a c for
    which z is an exact fixed point (c = atanh(z) - w z - u x): the result is
    the NPG formula lam sum_{i<k} beta^i D z with beta = lam w D + 1 - lam,
    D = 1 - z^2 (symbolically for k = 1, 2; to 40 digits for k = 3, 4).
    """
    w, u, x, z, lam = sp.symbols("w u x z lam", real=True)
    c = sp.atanh(z) - w * z - u * x
    D = 1 - z ** 2
    beta = lam * w * D + 1 - lam
    ws = sp.Symbol("ws", real=True)                    # w as the variable of differentiation
    nums = {ws: sp.Rational(3, 5), w: sp.Rational(3, 5), u: sp.Rational(13, 10),
            x: sp.Rational(4, 5), z: sp.Rational(1, 3), lam: sp.Rational(7, 10)}
    h = z
    for k in range(1, 5):
        h = lam * sp.tanh(ws * h + u * x + c) + (1 - lam) * h
        upg = sp.diff(h, ws).subs(ws, w)
        npg = lam * sum(beta ** i for i in range(k)) * D * z
        if k <= 2:
            assert _zero(upg - npg), k
        diff = sp.N((upg - npg).subs(nums), 40)
        assert abs(diff) < sp.Float("1e-35"), (k, diff)


def check_cosine_bound():
    """Theorem 1: cos(phantom, exact) >= (sigma_min - ||E||)/(sigma_min + ||E||) (monotone in
    r); valid but not tight: the worst case is sqrt(1 - t^2).

    cos >= (r - e)/(r + e) with r = ||F^T w|| / ||w|| >= sigma_min is
    increasing in r (derivative 2 e / (r + e)^2 > 0), so r = sigma_min gives
    the bound; and sigma_min^2 / sigma_max <= sigma_min (the paper's Theorem 1
    hypothesis implies the sharper one).  The worst case over ``E`` of a given
    norm is larger, ``sqrt(1 - (||E|| / sigma_min)^2)``: the bound is valid, not
    tight.
    """
    r, e = sp.symbols("r e", positive=True)
    bound = (r - e) / (r + e)
    assert _zero(sp.diff(bound, r) - 2 * e / (r + e) ** 2)
    smin, smax = sp.symbols("sigma_min sigma_max", positive=True)
    # sigma_min - sigma_min^2/sigma_max = sigma_min (sigma_max - sigma_min)/sigma_max >= 0
    assert _zero(smin - smin ** 2 / smax - smin * (smax - smin) / smax)

    # The bound is not tight.  With ||E w|| = rho = t ||e|| (t < 1), p = e + E w lies in
    # the ball of radius rho around e; at the tangent point E w = rho (-t u + sqrt(1 - t^2) q)
    # (u = e / ||e||, q a unit vector orthogonal to u) the cosine is sqrt(1 - t^2), the sine
    # of the half-angle the ball subtends; and it is never below the bound:
    # (1 - t^2)(1 + t)^2 - (1 - t)^2 = (1 - t) t (t^2 + 3 t + 4) >= 0 on [0, 1).
    t, n = sp.symbols("t n", positive=True)                        # n = ||e||
    p_u, p_q = n - t * n * t, t * n * sp.sqrt(1 - t ** 2)          # p in the (u, q) basis
    assert _zero(sp.simplify((p_u * n) ** 2 / ((p_u ** 2 + p_q ** 2) * n ** 2)) - (1 - t ** 2))
    assert _zero(sp.expand((1 - t ** 2) * (1 + t) ** 2 - (1 - t) ** 2
                           - (1 - t) * t * (t ** 2 + 3 * t + 4)))

    from refimpl import deq

    assert deq.cosine_lower_bound(1.0, 3.0) == float(bound.subs({r: 3, e: 1}))


if __name__ == "__main__":
    import sys

    from _run import run_checks  # derivations/ is on sys.path when run as a script

    sys.exit(run_checks(globals()))
