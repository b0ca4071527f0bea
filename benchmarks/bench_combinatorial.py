"""Backward cost of the gradients through combinatorial solvers, side by side.

For linear assignment (100 x 100, SciPy's linear_sum_assignment) and grid
shortest path (30 x 30, 8-neighbourhood, SciPy's Dijkstra) this times, in
one run and on the same inputs:

* identity with each valid projection (none, mean, norm, std),
* blackbox backprop (one extra solve in the backward),
* the perturbed optimizer (M solves in the forward, none in the backward),

and counts the problem instances solved in the forward and in the backward
with ``CountingSolver``.  Times are medians over ``--repeats`` runs (the JSON
also holds the best times); the ratio columns divide by the plain
identity's backward / forward+backward time measured in the same run.

Run: ``refimpl bench combinatorial [--quick] [--repeats R] [--samples M]
[--backend numpy|array_api_strict|cupy|cupy_semantics] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from refimpl import combinatorial as comb
from refimpl.backend import get_backend


def _timings(fn, repeats: int, sync=lambda: None) -> tuple[float, float]:
    """(median, best) wall time of ``fn()`` over ``repeats`` runs; ``sync`` (the
    backend's device synchronisation) runs before every clock reading."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _problems(quick: bool, rng):
    n, grid = (20, 8) if quick else (100, 30)
    W_assign = rng.uniform(0.0, 1.0, (n, n))
    target_assign = rng.uniform(0.0, 1.0, (n, n))
    W_path = rng.uniform(0.0, 1.0, (grid, grid))
    target_path = rng.uniform(0.0, 1.0, (grid, grid))
    # Blackbox and perturbed costs may dip below 0: the solver clips them.
    path_solver = functools.partial(comb.shortest_path, negative="clip")
    return [
        (f"assignment {n}x{n}", comb.assignment, W_assign, target_assign),
        (f"shortest path {grid}x{grid}", path_solver, W_path, target_path),
    ]


def _methods(solver, samples: int, lam: float, sigma: float, seed: int):
    """(name, forward(counted, w) -> state, backward(counted, state, y_bar) -> w_bar)."""
    spec = comb.solver_spec(solver)
    out = []
    for p in spec.projections:
        out.append((f"identity{'' if p == 'none' else ' + ' + p}",
                    functools.partial(lambda c, w, p: comb.identity_layer(c, w, projection=p), p=p),
                    lambda c, res, g: comb.identity_layer_vjp(res, g)))
    out.append((f"blackbox (lam={lam:.3g})",
                lambda c, w: comb.identity_layer(c, w),
                lambda c, res, g: comb.blackbox_vjp(c, res.w, g, lam=lam, y=res.y)))
    out.append((f"perturbed (M={samples}, sigma={sigma:.3g})",
                lambda c, w: comb.perturbed(c, w, sigma=sigma, n_samples=samples, rng=seed),
                lambda c, res, g: comb.perturbed_vjp(res, g)))
    return out


def run(quick: bool = False, repeats: int = 20, samples: int = 10, backend: str = "numpy",
        seed: int = 0) -> list[dict]:
    be = get_backend(backend)
    rng = np.random.default_rng(seed)
    rows = []
    for problem, solver, W_host, target_host in _problems(quick, rng):
        W = be.asarray(W_host, "float64")
        y_target = solver(be.asarray(target_host, "float64"))
        scale = float(np.mean(W_host))
        for name, forward, backward in _methods(solver, samples, lam=10.0 * scale, sigma=scale,
                                               seed=seed):
            counted = comb.CountingSolver(solver)
            state = forward(counted, W)
            fwd_solves = counted.instances
            y = state.y
            y_bar = y - y_target                          # gradient of 0.5 ||y - y*||^2
            counted.reset()
            backward(counted, state, y_bar)
            bwd_solves = counted.instances
            plain = comb.CountingSolver(solver)          # timing runs, uncounted in the table
            t_fwd, best_fwd = _timings(lambda: forward(plain, W), repeats, be.synchronize)
            t_bwd, best_bwd = _timings(lambda: backward(plain, state, y_bar), repeats, be.synchronize)
            rows.append(dict(problem=problem, method=name, forward_solves=fwd_solves,
                             backward_solves=bwd_solves, forward_s=t_fwd, backward_s=t_bwd,
                             forward_best_s=best_fwd, backward_best_s=best_bwd))
        base = next(r for r in rows if r["problem"] == problem and r["method"] == "identity")
        for r in rows:
            if r["problem"] == problem:
                r["backward_ratio"] = r["backward_s"] / base["backward_s"]
                r["total_ratio"] = (r["forward_s"] + r["backward_s"]) / (base["forward_s"] + base["backward_s"])
    return rows


def format_table(rows: list[dict]) -> str:
    headers = ("problem", "method", "fwd solves", "bwd solves", "forward", "backward",
               "bwd / identity", "fwd+bwd / identity")
    body = [(r["problem"], r["method"], str(r["forward_solves"]), str(r["backward_solves"]),
             f"{1e3 * r['forward_s']:.3f} ms", f"{1e3 * r['backward_s']:.3f} ms",
             f"{r['backward_ratio']:.1f}x", f"{r['total_ratio']:.1f}x") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*headers), line.format(*("-" * w for w in widths))]
                     + [line.format(*b) for b in body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="refimpl bench combinatorial", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problems, 2 repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median; default 20)")
    parser.add_argument("--samples", type=int, default=10, help="perturbed optimizer samples M (default 10)")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "array_api_strict", "cupy", "cupy_semantics"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write results here (default bench-results/combinatorial.json; "
                                                     "'-' for none)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 20)
    rows = run(quick=args.quick, repeats=repeats, samples=args.samples, backend=args.backend, seed=args.seed)
    print(f"backward cost per method ({args.backend}, float64, median of {repeats}; solves = problem "
          f"instances solved)\n")
    print(format_table(rows))
    if args.json != "-":
        path = Path(args.json or "bench-results/combinatorial.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"backend": args.backend, "repeats": repeats, "quick": args.quick,
                                    "rows": rows}, indent=2))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
