r"""Combinatorial solvers and backpropagation through them: identity with
projection, blackbox backprop, perturbed optimizers, straight-through.

Definition
----------
A combinatorial solver maps a cost ``w`` to a solution of a linear program
over a finite set ``Y`` of feasible points,

    y(w) = argmin_{y in Y} <w, y>          (min-form, sense "min")
    y(w) = argmax_{y in Y} <w, y>          (max-form, sense "max").

``y`` is piecewise constant in ``w``: its Jacobian is zero almost everywhere
and undefined on the boundaries between solution cones, so a learning
signal ``y_bar = dL/dy`` has to be turned into a useful ``w_bar`` by a
*surrogate* rule.  Every solver here is min-form except ``hard_threshold``.

Symbols: ``w`` the cost (..., *core) with ``core`` the solver's core
dimensions (1 for vectors, 2 for matrices and grids); ``y`` the solution,
same shape; ``y_bar`` the incoming cotangent; ``w_bar`` the outgoing one;
``s = -1`` for min-form and ``+1`` for max-form; ``1`` the all-ones array
over the core dimensions; ``<a, b>`` the inner product over the core
dimensions (batch members never mix); ``n`` the number of core entries.

Solvers (batched over leading dimensions)
-----------------------------------------
``argmin_onehot(w)``   Y = {e_i}; ties: the lowest index.
``top_k(w, k)``        Y = {k-hot vectors}: the k smallest costs; ties: a
                       stable ascending sort, so among equal costs the lower
                       index is taken first.
``ranking(w)``         Y = permutations of (1, ..., n): the largest cost gets
                       rank 1 (that minimises <w, y>); ties: the lower index
                       gets the lower rank.
``assignment(W)``      Y = (partial) permutation matrices, n x m: each row of
                       the smaller side assigned once (SciPy
                       ``linear_sum_assignment`` on the host).
``shortest_path(W)``   Y = indicators of the vertices of a path on an H x W
                       grid from the top-left to the bottom-right vertex
                       (8- or 4-neighbourhood), cost of a path = sum of its
                       vertex costs, which must be non-negative (SciPy
                       Dijkstra on the host).
``hard_threshold(x)``  Y = {0, 1}^n, max-form: y = 1[x > 0] (the
                       straight-through estimator's forward).

The sort-based solvers run natively in the array namespace (NumPy, CuPy,
array_api_strict); assignment and shortest path go to the host explicitly
and return on the input's namespace and device.

Projections (forward maps with exact Jacobians)
-----------------------------------------------
A projection ``P`` with ``y(P(w)) = y(w)`` is applied on the forward pass:

    P_mean(w) = w - mean(w) 1
                valid iff every y in Y has the same <1, y> (one-hot, k-hot,
                rankings, assignments), since <w + c 1, y> = <w, y> + c <1, y>;
                invalid for shortest paths (paths differ in length).
    P_norm(w) = w / r,   r = ||w||           valid for every solver.
    P_std(w)  = P_norm(P_mean(w)) = v / r,   v = w - mean(w) 1,  r = ||v||.

Their Jacobians are symmetric (``u_hat = v / r``, ``M = I - 1 1^T / n``):

    P_mean'(w) = M
    P_norm'(w) = (I - u_hat u_hat^T) / r        (u_hat = w / ||w||)
    P_std'(w)  = (I - u_hat u_hat^T) M / r      (= M (I - u_hat u_hat^T) / r)

so the JVP is ``du = (M dw - u_hat <u_hat, M dw>) / r`` and the VJP is
``w_bar = (M g - u_hat <u_hat, g>) / r`` (``M u_hat = u_hat``).

Identity with projection (Sahoo et al. 2023)
--------------------------------------------
The solver is treated as a negative identity (min-form) or identity
(max-form) on the backward pass, after the projection:

    w_bar = s P'(w)^T y_bar     (s = -1 for min, +1 for max; P' = I if none).

Zero extra solver calls.  Properties of ``r = -P_std'(w)^T g``: r is
orthogonal to 1 and to w; r(w + t 1) = r(w); r(c w) = r(w) / c for c > 0;
hence a plain step ``w - eta r`` never shrinks ||w|| ("no cost collapse").
The *noise margin* adds ``xi ~ Uniform{-alpha/2, +alpha/2}^n`` (seeded) to
the cost the solver sees, either after the projection (``u = P(w) + xi``,
backward at ``w``) or before it (``u = P(w + xi)``, backward at ``w + xi``).

Relaxation view: with the solver relaxed to R^n (quadratic regulariser), to
the hyperplane <1, y> = const, to a sphere, or to their intersection, the
exact Jacobian of the relaxed solver is ``-I``, ``-P_mean'``, ``-rho
P_norm'``, ``-R P_std'`` (``derivations/identity.py``).

Baselines
---------
Blackbox backprop (Vlastelica et al. 2020), one extra solver call:

    w' = w - s lam y_bar,     w_bar = -s (y(w') - y(w)) / lam
    (min-form: w' = w + lam y_bar, w_bar = (y(w') - y(w)) / lam).

Perturbed optimizer (Berthet et al. 2020), noise Z_m ~ mu with density
``exp(-nu(z))`` (Gaussian: grad nu(z) = z; Gumbel: grad nu(z) = 1 - e^{-z}),
M samples solved in one batched call:

    u_m = w + s sigma Z_m,    y_m = y(u_m),      y_sigma = (1/M) sum_m y_m,
    w_bar = s / (sigma M) sum_m <y_m, y_bar> grad nu(Z_m).

(The perturbation acts on the max-form score ``s w``; for symmetric noise the
sign is immaterial, for Gumbel it is what makes argmin_onehot's y_sigma equal
softmax(-w / sigma).)  Note the ``1/sigma``.

Random draws and batches: the noise margin ``xi`` and the perturbations
``Z`` are drawn from ``rng`` for the whole batch at once, in C order over
``w.shape`` (``Z``: over ``(M,) + w.shape``).  So a batched call with
``rng=0`` and a loop calling each member with ``rng=0`` draw *different*
numbers (only the first member's coincide, for the noise margin), and
their results differ.  A batch equals a loop when each member is given its
slice of the batch's draws: ``xi=res.xi[b]`` for :func:`identity_layer`,
``Z=res.Z[:, b]`` for :func:`perturbed`.

Straight-through estimator: the forward is ``hard_threshold`` (max-form), the
backward the identity ``x_bar = y_bar`` (optionally zeroed where
``|x| > clip``).  It is the identity method for a max-form solver.

Counting solver calls: wrap a solver in :class:`CountingSolver` (explicit
state: ``calls`` and ``instances`` solved); results also carry ``n_solves``.
Per backward: identity 0, straight-through 0, perturbed 0 (it reuses the
forward's samples), blackbox 1.

References
----------
S. S. Sahoo, A. Paulus, M. Vlastelica, V. Musil, V. Kuleshov, G. Martius,
"Backpropagation through Combinatorial Algorithms: Identity with Projection
Works", ICLR 2023.
M. Vlastelica, A. Paulus, V. Musil, G. Martius, M. Rolinek,
"Differentiation of Blackbox Combinatorial Solvers", ICLR 2020.
Q. Berthet, M. Blondel, O. Teboul, M. Cuturi, J.-P. Vert, F. Bach,
"Learning with Differentiable Perturbed Optimizers", NeurIPS 2020.
Y. Bengio, N. Leonard, A. Courville, "Estimating or Propagating Gradients
Through Stochastic Neurons for Conditional Computation", 2013.

Examples
--------
>>> import numpy as np
>>> w = np.array([0.3, -1.0, 2.0, 0.5])
>>> y = top_k(w, 2)
>>> bool(np.sum(w * y) == np.sort(w)[:2].sum())          # <w, y> is minimal
True
>>> w_bar = identity_vjp(w, np.array([1.0, 0.0, 0.0, 0.0]), projection="std")
>>> bool(abs(w_bar.sum()) < 1e-15 and abs(w_bar @ w) < 1e-15)   # r _|_ 1, r _|_ w
True
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import backend
from .backend import ConditioningWarning

__all__ = [
    "PROJECTIONS",
    "CountingSolver",
    "IdentityResult",
    "PerturbedResult",
    "ProjectionResult",
    "SolverSpec",
    "argmin_onehot",
    "assignment",
    "blackbox_vjp",
    "check_projection",
    "declare",
    "hard_threshold",
    "identity_layer",
    "identity_layer_vjp",
    "identity_vjp",
    "noise_margin",
    "perturbed",
    "perturbed_vjp",
    "project",
    "project_jvp",
    "project_vjp",
    "ranking",
    "shortest_path",
    "solver_spec",
    "straight_through",
    "straight_through_vjp",
    "top_k",
]

#: Projection names, in order of composition complexity.
PROJECTIONS = ("none", "mean", "norm", "std")
_SENSES = ("min", "max")
_NOISES = ("gaussian", "gumbel")


# --------------------------------------------------------------------------
# Solver declarations: sense, core dimensions, valid projections
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SolverSpec:
    """What the backward rules need to know about a solver.

    Attributes
    ----------
    name : the solver's name (error messages).
    core_ndim : number of trailing dimensions forming one instance.
    sense : ``"min"`` (minimise <w, y>) or ``"max"``.
    projections : the projections ``P`` with ``y(P(w)) = y(w)``.
    host : True if the solver runs on the host (SciPy) and copies back.
    why : why the missing projections are invalid (for the error message).
    """

    name: str
    core_ndim: int
    sense: str
    projections: tuple[str, ...]
    host: bool = False
    why: str = ""


def declare(*, core_ndim: int, sense: str, projections, host: bool = False,
            why: str = "", name: str | None = None) -> Callable:
    """Decorator attaching a :class:`SolverSpec` to a solver function.

    A solver is ``fn(w, *params) -> y`` with ``y`` shaped like ``w``, batched
    over the dimensions before the last ``core_ndim``.  The backward rules
    read the spec (``fn.spec``); ``functools.partial`` of a declared solver
    and :class:`CountingSolver` keep it.

    Examples
    --------
    >>> import numpy as np
    >>> @declare(core_ndim=1, sense="max", projections=("none", "mean", "norm", "std"))
    ... def argmax_onehot(w):
    ...     return (np.arange(w.shape[-1]) == np.argmax(w, -1)[..., None]) * 1.0
    >>> argmax_onehot.spec.sense
    'max'
    """
    core_ndim = backend.check_int(core_ndim, "core_ndim", min=0)
    host = backend.check_flag(host, "host")
    sense = backend.check_choice(sense, "sense", _SENSES)
    projections = tuple(backend.check_choice(p, "projections", PROJECTIONS) for p in projections)
    if "none" not in projections:
        projections = ("none",) + projections

    def wrap(fn):
        fn.spec = SolverSpec(name or fn.__name__, int(core_ndim), sense, projections, host, why)
        return fn

    return wrap


def solver_spec(solver) -> SolverSpec:
    """The :class:`SolverSpec` of a declared solver (or a partial of one).

    Raises ``TypeError`` for a callable that was never declared: its sense
    and valid projections are unknown, so no backward rule can be applied
    safely.
    """
    probe = solver
    for _ in range(8):  # unwrap nested functools.partial objects
        spec = getattr(probe, "spec", None)
        if isinstance(spec, SolverSpec):
            return spec
        probe = getattr(probe, "func", None)
        if probe is None:
            break
    raise TypeError(
        f"argument 'solver' ({getattr(solver, '__name__', type(solver).__name__)}) is not a "
        "declared solver; wrap it with refimpl.combinatorial.declare(core_ndim=..., sense=..., "
        "projections=...) so its sense and valid projections are known"
    )


def check_projection(solver, projection) -> str:
    """The canonical projection name, or ``ValueError`` if ``solver`` is not
    invariant under it (``y(P(w)) != y(w)`` in general)."""
    spec = solver_spec(solver)
    name = _projection_name(projection)
    if name not in spec.projections:
        raise ValueError(
            f"argument 'projection' = {name!r} is not valid for solver {spec.name!r}: "
            f"y(P(w)) != y(w) in general ({spec.why or 'not declared valid'}); "
            f"valid projections: {', '.join(spec.projections)}"
        )
    return name


class CountingSolver:
    """A solver wrapped with explicit counters of its use.

    ``calls`` counts invocations; ``instances`` counts problem instances
    solved (a batched call of shape (B, *core) solves B).  The spec of the
    wrapped solver is kept, so a CountingSolver goes wherever the solver
    goes.  The state is the object's own: read it, :meth:`reset` it.

    Examples
    --------
    >>> import numpy as np
    >>> counted = CountingSolver(argmin_onehot)
    >>> w = np.array([[0.3, -1.0], [2.0, 0.5]])
    >>> _ = blackbox_vjp(counted, w, np.ones((2, 2)), lam=1.0)
    >>> (counted.calls, counted.instances)      # y(w) and y(w + lam y_bar)
    (2, 4)
    """

    def __init__(self, solver):
        self.solver = solver
        self.spec = solver_spec(solver)
        self.calls = 0
        self.instances = 0

    def __call__(self, w, *args, **kwargs):
        self.calls += 1
        self.instances += _n_instances(w, self.spec.core_ndim)
        return self.solver(w, *args, **kwargs)

    def reset(self) -> None:
        """Set both counters to zero."""
        self.calls = 0
        self.instances = 0

    def __repr__(self) -> str:
        return f"CountingSolver({self.spec.name}, calls={self.calls}, instances={self.instances})"


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------

def _projection_name(projection) -> str:
    return backend.check_choice("none" if projection is None else projection, "projection", PROJECTIONS)


def _check_cost(w, name: str, core_ndim: int):
    """A finite float array with at least ``core_ndim`` non-empty core axes."""
    xp = backend.namespace(**{name: w})
    backend.check_array(w, name, min_ndim=core_ndim)
    if any(n == 0 for n in w.shape[w.ndim - core_ndim:]):
        raise ValueError(f"argument {name!r} has an empty core dimension, shape {tuple(w.shape)}")
    return xp


def _check_like(g, name: str, like, like_name: str):
    backend.namespace(**{like_name: like, name: g})
    backend.check_array(g, name)
    if tuple(g.shape) != tuple(like.shape):
        raise ValueError(f"argument {name!r} has shape {tuple(g.shape)}, expected "
                         f"{tuple(like.shape)} like {like_name!r}")
    return g


def _n_instances(w, core_ndim: int) -> int:
    return math.prod(tuple(w.shape)[: max(w.ndim - core_ndim, 0)])


def _axes(core_ndim: int) -> tuple[int, ...]:
    return tuple(range(-core_ndim, 0))


def _rng(rng, name: str = "rng") -> np.random.Generator:
    """A NumPy generator from a Generator or an integer seed (host-side noise)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"argument {name!r} must be a numpy.random.Generator or an integer seed, "
                    f"got {type(rng).__name__}")


def _sign(sense: str) -> float:
    """s = -1 for min-form, +1 for max-form."""
    return -1.0 if sense == "min" else 1.0


# --------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------

_MEAN_OK = ("none", "mean", "norm", "std")
_SCALE_ONLY = ("none", "norm")


@declare(core_ndim=1, sense="min", projections=_MEAN_OK)
def argmin_onehot(w):
    """One-hot indicator of the smallest cost: ``argmin_{y in {e_i}} <w, y>``.

    Parameters
    ----------
    w : (..., n) costs, finite.

    Returns
    -------
    y : (..., n) in w's dtype, namespace and device; ties go to the lowest
        index (the array API's ``argmin`` returns the first occurrence).

    Examples
    --------
    >>> import numpy as np
    >>> argmin_onehot(np.array([2.0, -1.0, -1.0]))
    array([0., 1., 0.])
    """
    xp = _check_cost(w, "w", 1)
    i_star = xp.argmin(w, axis=-1, keepdims=True)
    return xp.astype(xp.arange(w.shape[-1], device=backend.device(w)) == i_star, w.dtype)


@declare(core_ndim=1, sense="min", projections=_MEAN_OK)
def top_k(w, k):
    """k-hot indicator of the k smallest costs: ``argmin_{y k-hot} <w, y>``.

    Parameters
    ----------
    w : (..., n) costs, finite.
    k : int, ``1 <= k <= n``.

    Returns
    -------
    y : (..., n) in w's dtype.  Ties: a stable ascending sort orders equal
        costs by index, so the lower index is selected first.

    Examples
    --------
    >>> import numpy as np
    >>> top_k(np.array([1.0, 0.0, 0.0, 0.0]), 2)      # tie among three zeros
    array([0., 1., 1., 0.])
    """
    xp = _check_cost(w, "w", 1)
    n = w.shape[-1]
    k = backend.check_int(k, "k", min=1, max=n)
    order = xp.argsort(w, axis=-1, stable=True)       # w[order] ascending
    position = xp.argsort(order, axis=-1)             # inverse permutation
    return xp.astype(position < int(k), w.dtype)


@declare(core_ndim=1, sense="min", projections=_MEAN_OK)
def ranking(w):
    """Ranks minimising <w, y> over permutations y of (1, ..., n).

    The largest cost gets rank 1 and the smallest rank n (pairing large
    costs with small ranks minimises the inner product).

    Parameters
    ----------
    w : (..., n) costs, finite.

    Returns
    -------
    y : (..., n) ranks as floats in w's dtype.  Ties: a stable sort of
        ``-w`` orders equal costs by index, so the lower index gets the lower
        rank.

    Examples
    --------
    >>> import numpy as np
    >>> ranking(np.array([0.5, 2.0, 0.5, -1.0]))
    array([2., 1., 3., 4.])
    """
    xp = _check_cost(w, "w", 1)
    order = xp.argsort(-w, axis=-1, stable=True)      # w[order] descending
    return xp.astype(xp.argsort(order, axis=-1) + 1, w.dtype)


@declare(core_ndim=2, sense="min", projections=_MEAN_OK, host=True)
def assignment(W):
    """Minimum-cost (partial) permutation matrix: ``argmin_{y} <W, y>``.

    ``y`` is n x m with entries in {0, 1}, every row and column summing to at
    most 1 and ``sum(y) = min(n, m)`` (so P_mean is valid).  Solved per batch
    member on the host by ``scipy.optimize.linear_sum_assignment``; ties are
    broken as SciPy breaks them (deterministic for a given input).

    Parameters
    ----------
    W : (..., n, m) costs, finite.

    Returns
    -------
    y : (..., n, m) in W's dtype, namespace and device.

    Examples
    --------
    >>> import numpy as np
    >>> assignment(np.array([[4.0, 1.0], [2.0, 0.0]]))      # 1 + 2 < 4 + 0
    array([[0., 1.],
           [1., 0.]])
    """
    from scipy.optimize import linear_sum_assignment

    xp = _check_cost(W, "W", 2)
    host = backend.to_host(W)
    y = np.zeros(host.shape, dtype=host.dtype)
    for idx in np.ndindex(*host.shape[:-2]):
        rows, cols = linear_sum_assignment(host[idx])
        y[idx + (rows, cols)] = 1.0
    return backend.from_host(y, xp, device=backend.device(W), dtype=W.dtype)


def _csgraph_index(a: np.ndarray) -> np.ndarray:
    """``a`` (non-negative integers) as int32, the index dtype that
    ``scipy.sparse.csgraph`` requires before SciPy 1.15 (an int64 CSR matrix
    fails there with "Buffer dtype mismatch, expected 'const int'").
    A value beyond int32 is a ``ValueError``, never a silent wrap-around."""
    if a.size and int(a.max()) > np.iinfo(np.int32).max:
        raise ValueError(f"argument 'W': the grid graph needs index {int(a.max())}, beyond the "
                         "32-bit indices of scipy.sparse.csgraph")
    return a.astype(np.int32)


def _grid_graph_structure(H: int, Wd: int, neighbourhood: int):
    """CSR structure (indptr, indices) of the directed grid graph, int32
    (:func:`_csgraph_index`).

    Vertex (i, j) is ``i * Wd + j``; there is an edge u -> v for each
    neighbour v of u.  The edge weight will be the cost of the vertex entered,
    so the cost of a path is ``W[source] + sum of edge weights``.
    """
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbourhood == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    ii, jj = np.meshgrid(np.arange(H), np.arange(Wd), indexing="ij")
    src, dst = [], []
    for di, dj in offsets:
        ok = (ii + di >= 0) & (ii + di < H) & (jj + dj >= 0) & (jj + dj < Wd)
        src.append((ii * Wd + jj)[ok])
        dst.append(((ii + di) * Wd + (jj + dj))[ok])
    src_all, dst_all = np.concatenate(src), np.concatenate(dst)
    order = np.argsort(src_all, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src_all, minlength=H * Wd))])
    return _csgraph_index(indptr), _csgraph_index(dst_all[order])


@declare(core_ndim=2, sense="min", projections=_SCALE_ONLY, host=True,
         why="paths have different numbers of vertices, so adding a constant to every "
             "vertex cost changes which path is shortest")
def shortest_path(W, *, neighbourhood: int = 8, negative: str = "raise"):
    """Indicator of the cheapest top-left -> bottom-right path on a grid.

    The cost of a path is the sum of the costs of the vertices it visits
    (both ends included); moves go to the 8 (or 4) neighbouring vertices.
    Dijkstra's algorithm (``scipy.sparse.csgraph.dijkstra``) runs on the
    host, one batch member at a time; the graph is a CSR matrix whose
    explicit zeros are edges of weight 0 (zero-cost vertices are allowed).
    Ties between equally cheap paths are broken as SciPy's Dijkstra breaks
    them (deterministic for a given input).

    Parameters
    ----------
    W : (..., H, W) vertex costs, finite and non-negative.
    neighbourhood : 8 (king moves, the Warcraft benchmark's convention) or 4.
    negative : ``"raise"`` (default): negative costs are a ``ValueError``;
        ``"clip"``: they are replaced by 0 before solving, i.e. ``y`` is the
        shortest path for ``max(W, 0)`` (what blackbox, perturbed and
        noise-margin costs, which may dip below 0, need).

    Returns
    -------
    y : (..., H, W) 0/1 in W's dtype, namespace and device.

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[1.0, 9.0, 9.0], [9.0, 1.0, 9.0], [9.0, 9.0, 1.0]])
    >>> shortest_path(W)                               # the diagonal
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import dijkstra

    xp = _check_cost(W, "W", 2)
    if neighbourhood not in (4, 8):
        raise ValueError(f"argument 'neighbourhood' must be 4 or 8, got {neighbourhood!r}")
    backend.check_choice(negative, "negative", ("raise", "clip"))
    host = backend.to_host(W).astype(np.float64)
    if host.size and host.min() < 0.0:
        if negative == "raise":
            raise ValueError(
                f"argument 'W' has negative vertex costs (min {host.min():.3g}); shortest_path "
                "needs non-negative costs (pass negative='clip' to clip them to 0)")
        host = np.maximum(host, 0.0)
    H, Wd = host.shape[-2:]
    indptr, indices = _grid_graph_structure(H, Wd, neighbourhood)
    target = H * Wd - 1
    y = np.zeros(host.shape)
    for idx in np.ndindex(*host.shape[:-2]):
        cost = host[idx].reshape(-1)
        # Edge u -> v weighs cost[v]; explicit zeros stay edges in CSR input.
        graph = csr_array((cost[indices], indices, indptr), shape=(H * Wd, H * Wd))
        _, pred = dijkstra(graph, directed=True, indices=0, return_predecessors=True)
        path = np.zeros(H * Wd)
        v = target
        while v >= 0:                      # walk the predecessor tree back to 0
            path[v] = 1.0
            v = pred[v] if v != 0 else -1
        y[idx] = path.reshape(H, Wd)
    return backend.from_host(y, xp, device=backend.device(W), dtype=W.dtype)


@declare(core_ndim=1, sense="max", projections=_SCALE_ONLY,
         why="the number of ones in y varies, so adding a constant changes y")
def hard_threshold(x):
    """``y = 1[x > 0]`` = ``argmax_{y in {0,1}^n} <x, y>`` (max-form); ties
    (x = 0) give 0.  The forward of the straight-through estimator.

    Examples
    --------
    >>> import numpy as np
    >>> hard_threshold(np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 1.])
    """
    xp = _check_cost(x, "x", 1)
    return xp.astype(x > 0.0, x.dtype)


# --------------------------------------------------------------------------
# Projections: forward, JVP, VJP
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ProjectionResult:
    """Result of :func:`project`.

    Attributes
    ----------
    u : the projected cost P(w), shape of w.
    w : the input (reference, never modified).
    projection : "none" | "mean" | "norm" | "std".
    core_ndim : the projection acts on the last ``core_ndim`` axes.
    r : (..., 1, ...) the norm divided by (``||w||`` for norm,
        ``||w - mean(w) 1||`` for std), None otherwise.
    u_hat : the unit vector ``v / r`` of the Jacobian (None for none/mean);
        equals ``u``.
    """

    u: Any
    w: Any
    projection: str
    core_ndim: int
    r: Any = None
    u_hat: Any = None


def _centre(xp, a, core_ndim: int):
    """M a = a - mean(a) 1 over the core axes."""
    return a - xp.mean(a, axis=_axes(core_ndim), keepdims=True)


def _core_dot(xp, a, b, core_ndim: int):
    """<a, b> over the core axes, kept as broadcastable (..., 1, ...)."""
    return xp.sum(a * b, axis=_axes(core_ndim), keepdims=True)


def _scaled_norm(xp, v, core_ndim: int):
    """(||v||, max|v|) over the core axes, with ||v|| = m ||v / m||, m = max|v|,
    so that squaring neither overflows (float32 costs above ~1e19 would give
    ||v|| = inf and P(w) = 0) nor underflows (costs below ~1e-19 would give
    ||v|| = 0).  Where m = 0 the norm is returned as 0."""
    m = xp.max(xp.abs(v), axis=_axes(core_ndim), keepdims=True)
    safe_m = xp.where(m > 0.0, m, xp.ones_like(m))
    return m * xp.linalg.vector_norm(v / safe_m, axis=_axes(core_ndim), keepdims=True), m


def _degenerate_radius(xp, w, core_ndim: int):
    """The largest ``||M w||`` that round-off alone can produce from a constant
    core of ``n`` entries: the computed mean carries an error up to
    ``n u max|w|``, so each entry of ``v = w - mean(w) 1`` carries up to
    ``(n + 1) u max|w|`` and ``||v|| <= sqrt(n) (n + 1) u max|w|``.  Twice
    that is the threshold below which ``w`` counts as constant."""
    n = math.prod(tuple(w.shape)[w.ndim - core_ndim:])
    u = float(xp.finfo(w.dtype).eps) / 2.0
    _, wmax = _scaled_norm(xp, w, core_ndim)
    return 2.0 * math.sqrt(n) * (n + 1) * u * wmax


def _safe_norm(xp, v, w, core_ndim: int, what: str):
    """||v|| over the core axes; ValueError where it is 0 (for ``v = M w``:
    at most the round-off of a constant ``w``, :func:`_degenerate_radius`),
    ConditioningWarning where cancellation in v = M w leaves fewer than half
    the digits."""
    r, _ = _scaled_norm(xp, v, core_ndim)
    zero = r == 0.0 if v is w else r <= _degenerate_radius(xp, w, core_ndim)
    if backend.any_true(zero):
        raise ValueError(
            f"argument 'w' has {what} equal to 0 (up to round-off) in some batch member; the "
            "projection is undefined there (v / ||v|| needs v != 0)")
    if v is not w:
        scale, _ = _scaled_norm(xp, w, core_ndim)
        eps = float(xp.finfo(w.dtype).eps)
        if backend.any_true(r < math.sqrt(eps) * scale):
            warnings.warn(
                "w - mean(w) 1 is tiny relative to w (nearly constant costs): the std "
                "projection and its Jacobian (scale 1/||w - mean(w) 1||) lose more than half "
                "the working digits", ConditioningWarning, stacklevel=3)
    return r


def project(w, *, projection, core_ndim: int = 1) -> ProjectionResult:
    """Apply ``P_mean``, ``P_norm``, ``P_std`` (or nothing) to ``w``.

    Parameters
    ----------
    w : (..., *core) costs, finite; batch members are projected separately.
    projection : None/"none", "mean", "norm", "std".
    core_ndim : number of trailing axes of one instance (2 for matrices).

    Raises
    ------
    ValueError : zero norm for "norm", constant ``w`` for "std", a
        single-entry core for "std", or ``core_ndim = 0`` with a projection.

    Examples
    --------
    >>> import numpy as np
    >>> u = project(np.array([1.0, 2.0, 6.0]), projection="std").u
    >>> bool(abs(u.sum()) < 1e-15 and abs(np.linalg.norm(u) - 1.0) < 1e-15)
    True
    """
    name = _projection_name(projection)
    core_ndim = backend.check_int(core_ndim, "core_ndim", min=0)
    if name != "none" and core_ndim < 1:
        raise ValueError(f"argument 'core_ndim' must be >= 1 for the {name!r} projection "
                         "(it acts on the last core_ndim axes), got 0")
    xp = _check_cost(w, "w", core_ndim)
    if name == "none":
        return ProjectionResult(u=w, w=w, projection=name, core_ndim=core_ndim)
    if name == "mean":
        return ProjectionResult(u=_centre(xp, w, core_ndim), w=w, projection=name,
                                core_ndim=core_ndim)
    if name == "norm":
        r = _safe_norm(xp, w, w, core_ndim, "norm ||w||")
        u = w / r
        return ProjectionResult(u=u, w=w, projection=name, core_ndim=core_ndim, r=r, u_hat=u)
    v = _centre(xp, w, core_ndim)
    r = _safe_norm(xp, v, w, core_ndim, "||w - mean(w) 1|| (constant costs)")
    u = v / r
    return ProjectionResult(u=u, w=w, projection=name, core_ndim=core_ndim, r=r, u_hat=u)


def project_jvp(res: ProjectionResult, dw):
    """Forward mode ``du = P'(w) dw``.

    mean: ``M dw``; norm: ``(dw - u_hat <u_hat, dw>) / r``;
    std: ``(M dw - u_hat <u_hat, M dw>) / r`` (differentiate v = M w, then
    u = v / ||v||).
    """
    backend.check_result(res, "res", ProjectionResult, producer="project()")
    _check_like(dw, "dw", res.w, "w")
    xp = backend.namespace(w=res.w, dw=dw)
    c = res.core_ndim
    if res.projection == "none":
        return dw
    if res.projection == "mean":
        return _centre(xp, dw, c)
    dv = _centre(xp, dw, c) if res.projection == "std" else dw
    return (dv - res.u_hat * _core_dot(xp, res.u_hat, dv, c)) / res.r


def project_vjp(res: ProjectionResult, u_bar):
    """Reverse mode ``w_bar = P'(w)^T u_bar``.

    mean: ``M u_bar``; norm: ``(u_bar - u_hat <u_hat, u_bar>) / r``;
    std: ``M^T (u_bar - u_hat <u_hat, u_bar>) / r
    = (M u_bar - u_hat <u_hat, u_bar>) / r`` because ``M u_hat = u_hat``.
    """
    backend.check_result(res, "res", ProjectionResult, producer="project()")
    _check_like(u_bar, "u_bar", res.w, "w")
    xp = backend.namespace(w=res.w, u_bar=u_bar)
    c = res.core_ndim
    if res.projection == "none":
        return u_bar
    if res.projection == "mean":
        return _centre(xp, u_bar, c)
    along = res.u_hat * _core_dot(xp, res.u_hat, u_bar, c)
    if res.projection == "norm":
        return (u_bar - along) / res.r
    return (_centre(xp, u_bar, c) - along) / res.r


# --------------------------------------------------------------------------
# Identity with projection
# --------------------------------------------------------------------------

def identity_vjp(w, y_bar, *, projection=None, sense: str = "min", core_ndim: int = 1):
    """The identity-with-projection surrogate ``w_bar = s P'(w)^T y_bar``.

    ``s = -1`` for a min-form solver (the solver acts like ``y = -P(w)``),
    ``+1`` for max-form.  Zero solver calls.

    Parameters
    ----------
    w : (..., *core) the cost *before* the projection (the point at which
        P' is taken).
    y_bar : dL/dy, shape of w.
    projection : None/"none", "mean", "norm", "std".  This function does not
        know the solver; use :func:`identity_layer` (or
        :func:`check_projection`) to have an invalid one refused.
    sense : "min" or "max".
    core_ndim : trailing axes of one instance.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.array([0.5, -2.0, 1.0])
    >>> identity_vjp(np.array([3.0, 1.0, 2.0]), g)           # min-form: -g
    array([-0.5,  2. , -1. ])
    """
    sense = backend.check_choice(sense, "sense", _SENSES)
    core_ndim = backend.check_int(core_ndim, "core_ndim", min=0)
    _check_cost(w, "w", core_ndim)
    _check_like(y_bar, "y_bar", w, "w")
    return _sign(sense) * project_vjp(project(w, projection=projection, core_ndim=core_ndim),
                                      y_bar)


def noise_margin(w, *, alpha: float, rng):
    """Noise ``xi ~ Uniform{-alpha/2, +alpha/2}`` per entry, shaped like ``w``.

    Drawn on the host from ``rng`` (a Generator or an int seed), so every
    backend sees the same numbers, and placed on w's device in w's dtype.
    """
    alpha = backend.check_positive(alpha, "alpha", allow_zero=True)
    xp = backend.namespace(w=w)
    backend.check_array(w, "w")          # an integer w would round the +-alpha/2 draws to 0
    gen = _rng(rng)
    signs = 2.0 * gen.integers(0, 2, size=tuple(w.shape)) - 1.0
    return backend.from_host(0.5 * alpha * signs, xp, device=backend.device(w), dtype=w.dtype)


@dataclass(frozen=True)
class IdentityResult:
    """Result of :func:`identity_layer`.

    Attributes
    ----------
    y : the solver's solution for the cost ``u`` it was given.
    w : the input cost (reference).
    u : what the solver saw: ``P(w) + xi`` (noise after) or ``P(w + xi)``.
    xi : the noise margin draw (None when ``alpha == 0``).
    proj : the :class:`ProjectionResult` whose Jacobian the backward uses
        (taken at ``w``, or at ``w + xi`` when the noise comes first).
    spec : the solver's :class:`SolverSpec`.
    alpha, noise_order : the noise-margin settings.
    n_solves : problem instances solved by the forward (= batch size).
    """

    y: Any
    w: Any
    u: Any
    xi: Any
    proj: ProjectionResult
    spec: SolverSpec
    alpha: float
    noise_order: str
    n_solves: int


def identity_layer(solver, w, *, projection=None, alpha: float = 0.0,
                   noise_order: str = "after", rng=None, xi=None) -> IdentityResult:
    """Forward of the identity-with-projection layer: ``y = solver(P(w) [+ xi])``.

    Parameters
    ----------
    solver : a declared solver (e.g. ``top_k`` bound with
        ``functools.partial(top_k, k=3)``, or a :class:`CountingSolver`).
    w : (..., *core) costs.
    projection : must be valid for the solver (``ValueError`` otherwise,
        e.g. "mean" with ``shortest_path``).
    alpha : noise margin; 0 (default) for none.
    noise_order : "after" (default): ``u = P(w) + xi``, so ``alpha`` is on
        the projected scale (for norm/std: relative to unit-norm costs);
        "before": ``u = P(w + xi)``.
    rng : Generator or int seed; required when ``alpha > 0`` (and no ``xi``).
        The noise is drawn for the whole batch at once, so a batch equals a
        loop over its members only when each member is given its slice of
        the batch's draws through ``xi``.
    xi : optional explicit noise-margin draws shaped like ``w`` (replaying a
        forward, or batch == loop); used instead of drawing from ``rng``.

    Examples
    --------
    >>> import numpy as np
    >>> res = identity_layer(ranking, np.array([0.2, 1.5, -0.3]), projection="std")
    >>> res.y
    array([2., 1., 3.])
    >>> bool(np.array_equal(res.y, ranking(res.w)))           # y(P(w)) = y(w)
    True
    """
    spec = solver_spec(solver)
    name = check_projection(solver, projection)
    backend.check_choice(noise_order, "noise_order", ("after", "before"))
    alpha = backend.check_positive(alpha, "alpha", allow_zero=True)
    _check_cost(w, "w", spec.core_ndim)
    if xi is not None:
        _check_like(xi, "xi", w, "w")
    elif alpha > 0.0:
        if rng is None:
            raise ValueError("argument 'rng' (a Generator or an int seed) is required when alpha > 0")
        xi = noise_margin(w, alpha=alpha, rng=rng)
    if xi is not None and noise_order == "before":
        proj = project(w + xi, projection=name, core_ndim=spec.core_ndim)
        u = proj.u
    else:
        proj = project(w, projection=name, core_ndim=spec.core_ndim)
        u = proj.u if xi is None else proj.u + xi
    y = solver(u)
    return IdentityResult(y=y, w=w, u=u, xi=xi, proj=proj, spec=spec, alpha=alpha,
                          noise_order=noise_order,
                          n_solves=_n_instances(w, spec.core_ndim))


def identity_layer_vjp(res: IdentityResult, y_bar):
    """Backward of :func:`identity_layer`: ``w_bar = s P'(.)^T y_bar``.

    ``P'`` is taken where the forward applied it (``w``, or ``w + xi`` with
    the noise before the projection); the noise itself passes gradients
    unchanged.  Zero solver calls.
    """
    backend.check_result(res, "res", IdentityResult, producer="identity_layer()")
    _check_like(y_bar, "y_bar", res.w, "w")
    return _sign(res.spec.sense) * project_vjp(res.proj, y_bar)


# --------------------------------------------------------------------------
# Blackbox backprop
# --------------------------------------------------------------------------

def blackbox_vjp(solver, w, y_bar, *, lam: float, y=None):
    """Blackbox-backprop gradient (Vlastelica et al. 2020).

    ``w' = w - s lam y_bar`` (min-form: ``w + lam y_bar``) and
    ``w_bar = -s (y(w') - y(w)) / lam``, the gradient of the piecewise
    linear interpolation of ``L(y(w))``.  One extra solver call when the
    forward's ``y`` is passed, two otherwise.

    Parameters
    ----------
    solver : a declared solver.
    w : the cost the forward solved.
    y_bar : dL/dy.
    lam : interpolation strength, > 0.
    y : the forward's ``solver(w)`` (saves a call).

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([0.0, 1.0, 3.0])                        # y = e_0
    >>> blackbox_vjp(argmin_onehot, w, np.array([1.0, 0.0, 0.0]), lam=2.0)
    array([-0.5,  0.5,  0. ])
    """
    spec = solver_spec(solver)
    lam = backend.check_positive(lam, "lam")
    _check_cost(w, "w", spec.core_ndim)
    _check_like(y_bar, "y_bar", w, "w")
    y = solver(w) if y is None else _check_like(y, "y", w, "w")
    s = _sign(spec.sense)
    try:
        y_shift = solver(w - (s * lam) * y_bar)
    except ValueError as exc:
        # The solver's message names its own arguments, which the caller of
        # blackbox_vjp did not pass: restate it in terms of lam and y_bar.
        raise ValueError(
            f"arguments 'lam' and 'y_bar': solver {spec.name!r} refused the shifted cost "
            f"w {'-' if s > 0 else '+'} lam * y_bar (lam = {lam:g}) that blackbox-backprop solves; "
            f"a smaller lam keeps the shifted cost closer to w (the solver said: {exc})") from exc
    return (-s / lam) * (y_shift - y)


# --------------------------------------------------------------------------
# Perturbed optimizer
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class PerturbedResult:
    """Result of :func:`perturbed`.

    Attributes
    ----------
    y : (..., *core) the mean perturbed solution ``(1/M) sum_m y_m``.
    w : the input cost (reference).
    samples : (M, ..., *core) the solutions ``y_m = y(w + s sigma Z_m)``.
    Z : (M, ..., *core) the noise draws.
    sigma, noise : noise scale and distribution ("gaussian" | "gumbel").
    spec : the solver's :class:`SolverSpec`.
    n_solves : instances solved (M x batch size), in one batched call.
    """

    y: Any
    w: Any
    samples: Any
    Z: Any
    sigma: float
    noise: str
    spec: SolverSpec
    n_solves: int


def perturbed(solver, w, *, sigma: float, n_samples: int, rng=None,
              noise: str = "gaussian", Z=None) -> PerturbedResult:
    """Perturbed optimizer forward: the mean of M perturbed solutions.

    ``u_m = w + s sigma Z_m`` with ``Z_m`` i.i.d. standard Gaussian or
    Gumbel(0, 1) per entry, ``y_m = solver(u_m)``, ``y = mean_m y_m``.  With
    Gumbel noise and ``argmin_onehot``, ``E[y] = softmax(-w / sigma)``.

    Parameters
    ----------
    solver : a declared solver; called once on the stacked (M, ...) batch.
    w : (..., *core) costs.
    sigma : noise scale, > 0.
    n_samples : M >= 1.
    rng : Generator or int seed (noise drawn on the host: every backend sees
        the same numbers); required unless ``Z`` is given.  ``Z`` is drawn
        for the whole batch at once, shape ``(M,) + w.shape``, so a loop over
        the batch members with the same seed draws other numbers; pass each
        member ``Z=res.Z[:, b]`` to reproduce the batch member by member.
    noise : "gaussian" or "gumbel".
    Z : optional explicit draws (M, *w.shape) instead of ``rng``.

    Examples
    --------
    >>> import numpy as np
    >>> res = perturbed(argmin_onehot, np.array([0.0, 1.0]), sigma=0.5, n_samples=4000,
    ...                 rng=0, noise="gumbel")
    >>> p = np.exp(-np.array([0.0, 1.0]) / 0.5); p /= p.sum()     # softmax(-w / sigma)
    >>> bool(np.abs(res.y - p).max() < 0.03)
    True
    """
    spec = solver_spec(solver)
    sigma = backend.check_positive(sigma, "sigma")
    backend.check_choice(noise, "noise", _NOISES)
    n_samples = backend.check_int(n_samples, "n_samples", min=1)
    xp = _check_cost(w, "w", spec.core_ndim)
    shape = (int(n_samples),) + tuple(w.shape)
    if Z is None:
        if rng is None:
            raise ValueError("argument 'rng' (a Generator or an int seed) is required")
        gen = _rng(rng)
        host = gen.standard_normal(shape) if noise == "gaussian" else gen.gumbel(size=shape)
        Z = backend.from_host(host, xp, device=backend.device(w), dtype=w.dtype)
    else:
        backend.namespace(w=w, Z=Z)
        backend.check_array(Z, "Z")
        if tuple(Z.shape) != shape:
            raise ValueError(f"argument 'Z' has shape {tuple(Z.shape)}, expected {shape}")
    s = _sign(spec.sense)
    samples = solver(w + (s * sigma) * Z)      # one batched call over the M samples
    return PerturbedResult(y=xp.mean(samples, axis=0), w=w, samples=samples, Z=Z, sigma=sigma,
                           noise=noise, spec=spec,
                           n_solves=int(n_samples) * _n_instances(w, spec.core_ndim))


def perturbed_vjp(res: PerturbedResult, y_bar):
    """Perturbed optimizer backward (Berthet et al. 2020, Prop. 3.1):

    ``w_bar = s / (sigma M) sum_m <y_m, y_bar> grad nu(Z_m)``

    with ``grad nu(z) = z`` (Gaussian) or ``1 - exp(-z)`` (Gumbel); an
    unbiased Monte-Carlo estimate of the Jacobian-transpose product of the
    smoothed solver ``E[y(w + s sigma Z)]``.  Zero solver calls.
    """
    backend.check_result(res, "res", PerturbedResult, producer="perturbed()")
    _check_like(y_bar, "y_bar", res.w, "w")
    xp = backend.namespace(w=res.w, y_bar=y_bar)
    c = res.spec.core_ndim
    inner = _core_dot(xp, res.samples, y_bar, c)                 # <y_m, y_bar>
    grad_nu = res.Z if res.noise == "gaussian" else 1.0 - xp.exp(-res.Z)
    return (_sign(res.spec.sense) / res.sigma) * xp.mean(inner * grad_nu, axis=0)


# --------------------------------------------------------------------------
# Straight-through estimator
# --------------------------------------------------------------------------

def straight_through(x) -> IdentityResult:
    """Forward of the straight-through estimator: ``y = 1[x > 0]``.

    It is :func:`identity_layer` on the max-form ``hard_threshold`` without
    projection, so its backward is the identity ``x_bar = y_bar``.
    """
    _check_cost(x, "x", 1)                  # errors name this function's argument, not 'w'
    return identity_layer(hard_threshold, x)


def straight_through_vjp(res: IdentityResult, y_bar, *, clip: float | None = None):
    """Straight-through backward: ``x_bar = y_bar``, or, with ``clip``,
    ``x_bar = y_bar * 1[|x| <= clip]`` (the saturating variant)."""
    backend.check_result(res, "res", IdentityResult, producer="straight_through()")
    if res.spec.name != "hard_threshold":
        raise ValueError("argument 'res' must come from straight_through (hard_threshold), "
                         f"got a result of solver {res.spec.name!r}")
    x_bar = identity_layer_vjp(res, y_bar)
    if clip is None:
        return x_bar
    clip = backend.check_positive(clip, "clip")
    xp = backend.namespace(x=res.w, y_bar=y_bar)
    return xp.where(xp.abs(res.w) <= clip, x_bar, xp.zeros_like(x_bar))
