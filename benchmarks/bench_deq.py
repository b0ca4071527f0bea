"""Backward cost of the tanh DEQ layer: exact implicit gradient vs phantom gradients.

For d in {64, 256, 1024} and a batch of 64 inputs on a contractive layer
(``||W||_2 = 0.9`` by default), time ``refimpl.deq.deq_backward`` for

* ``exact``: the implicit gradient, ``u = J^T u + g`` solved iteratively to
  a relative residual of 1e-10 by Anderson acceleration (the reference
  baseline) and, for comparison, by plain Picard iteration;
* ``jfb``: Jacobian-free backprop;
* ``unroll`` (UPG) and ``neumann`` (NPG) with k in {1, 5, 10} and
  lam in {0.5, 1.0};

and report per method the best and median backward time over the
repetitions, the speed-up (ratio of best times) over the faster of the two
exact backwards measured side by side in the same run (methods are
interleaved within every repetition), the number of VJP products
(``J^T v`` plus ``F^T v``) and f evaluations, and the cosine and norm ratio
of the parameter gradient ``(W_bar, U_bar, b_bar)`` to the exact one.

The target (from Geng et al., 2021): at k = 5, lam in [0.5, 1] on a
contractive layer, cosine >= 0.99 and backward >= 1.7x faster than the
exact implicit backward.  The script prints a PASS/MISS line per (d, method,
lam) and exits 0 either way (a missed target is a finding, not a crash).

Run: ``refimpl bench deq`` or ``python benchmarks/bench_deq.py [--quick]``.
Timings on a shared machine are noisy; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from refimpl import backend as B
from refimpl import deq


def _layer(rng, d, p, batch, norm):
    W = rng.standard_normal((d, d))
    W *= norm / np.linalg.norm(W, 2)
    return {"x": rng.standard_normal((batch, p)), "W": W,
            "U": rng.standard_normal((d, p)) / np.sqrt(p), "b": 0.1 * rng.standard_normal(d)}


def _sync(be, arrays):
    """Wait for the device so that timings include the work
    (:meth:`refimpl.backend.Backend.synchronize`; a no-op on the host)."""
    be.synchronize()
    return arrays


def _methods(ks, lams, tol):
    out = [("exact", "anderson", {"solver": "anderson", "tol": tol}),
           ("exact", "picard", {"solver": "picard", "tol": tol}),
           ("jfb", "", {})]
    for method in ("unroll", "neumann"):
        for k in ks:
            for lam in lams:
                out.append((method, f"k={k} lam={lam}", {"k": k, "lam": lam}))
    return out


def run(d_list, *, batch, p, ks, lams, norm, tol, repeat, backend_name, dtype, seed):
    be = B.get_backend(backend_name)
    rows = []
    for d in d_list:
        rng = np.random.default_rng(seed + d)
        h = _layer(rng, d, p, batch, norm)
        x, W, U, b = (be.asarray(h[k], dtype) for k in ("x", "W", "U", "b"))
        res = deq.tanh_deq(x, W, U, b)
        g = be.asarray(rng.standard_normal((batch, d)), dtype)
        methods = _methods(ks, lams, tol)
        outs, times = {}, {i: [] for i in range(len(methods))}
        for rep in range(repeat + 1):                  # repetition 0 warms up
            for i, (method, _, kw) in enumerate(methods):
                _sync(be, None)
                t0 = time.perf_counter()
                out = deq.deq_backward(res, g, method=method, **kw)
                _sync(be, out.theta_bar)
                if rep:
                    times[i].append(time.perf_counter() - t0)
                outs[i] = out
        exact = outs[0]
        # Baseline: the faster of the two exact iterative backwards in this run.
        # Best-of-n times (timeit's convention): on a shared machine the minimum
        # is the least noisy estimate of the work itself; medians are kept too.
        t_exact = min(min(times[0]), min(times[1]))
        for i, (method, label, kw) in enumerate(methods):
            out = outs[i]
            agree = deq.gradient_agreement(out.theta_bar[1:], exact.theta_bar[1:])
            t = min(times[i])
            rows.append({
                "d": d, "batch": batch, "method": method, "setting": label,
                "k": kw.get("k"), "lam": kw.get("lam"),
                "time_ms": 1e3 * t, "median_ms": 1e3 * statistics.median(times[i]),
                "speedup": t_exact / t,
                "n_vjp": out.n_vjp, "n_vjp_z": out.n_vjp_z, "n_vjp_theta": out.n_vjp_theta,
                "n_f_evals": out.n_f_evals, "cosine": agree.cosine,
                "norm_ratio": agree.norm_ratio, "converged": out.all_converged,
                "forward_iters": res.max_n_iter,
            })
    return rows


def _table(rows) -> str:
    head = ("d", "method", "setting", "best ms", "median ms", "speedup", "VJPs (J^T+F^T)",
            "f evals", "cosine", "norm ratio")
    lines = []
    for r in rows:
        lines.append((str(r["d"]), r["method"], r["setting"], f"{r['time_ms']:.2f}",
                      f"{r['median_ms']:.2f}", f"{r['speedup']:.2f}x",
                      f"{r['n_vjp']} ({r['n_vjp_z']}+{r['n_vjp_theta']})",
                      str(r["n_f_evals"]), f"{r['cosine']:.6f}", f"{r['norm_ratio']:.4f}"))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*line) for line in lines])


def _targets(rows, k_target=5, cos_target=0.99, speed_target=1.7) -> list[str]:
    out = []
    for r in rows:
        if r["k"] == k_target and r["method"] in ("unroll", "neumann"):
            ok_cos, ok_speed = r["cosine"] >= cos_target, r["speedup"] >= speed_target
            verdict = "PASS" if ok_cos and ok_speed else "MISS"
            out.append(f"{verdict}  d={r['d']:<5} {r['method']:<8} lam={r['lam']:<4} "
                       f"cosine {r['cosine']:.4f} ({'>=' if ok_cos else '<'} {cos_target}), "
                       f"speedup {r['speedup']:.2f}x ({'>=' if ok_speed else '<'} {speed_target}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_deq", description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--p", type=int, default=64, help="input dimension (default 64)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], dest="ks")
    ap.add_argument("--lam", type=float, nargs="+", default=[0.5, 1.0], dest="lams")
    ap.add_argument("--norm", type=float, default=0.9, help="||W||_2 of the layer (default 0.9)")
    ap.add_argument("--tol", type=float, default=1e-10, help="exact backward tolerance")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--backend", default="numpy", choices=("numpy", "cupy", "cupy_semantics"))
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: d=32, batch 8, 1 repeat")
    ap.add_argument("--no-save", action="store_true", help="do not write bench-results/deq.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.batch, args.p, args.repeat = [32], 8, 16, 1

    print(f"bench_deq: backend {args.backend}, {args.dtype}, batch {args.batch}, p {args.p}, "
          f"||W||_2 = {args.norm}, exact tol {args.tol:g}, {args.repeat} repetitions; "
          f"numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    rows = run(args.d, batch=args.batch, p=args.p, ks=args.ks, lams=args.lams, norm=args.norm,
               tol=args.tol, repeat=args.repeat, backend_name=args.backend, dtype=args.dtype,
               seed=args.seed)
    for d in args.d:
        fi = next(r["forward_iters"] for r in rows if r["d"] == d)
        print(f"d={d}: forward Anderson iterations {fi}")
    print(_table(rows))
    print("cosine and norm ratio: parameter gradient (W_bar, U_bar, b_bar) vs exact (Anderson); "
          "speedup: best time of the faster exact backward (Anderson or Picard) / best "
          "method time, same run, methods interleaved.")
    print("\ntarget (k=5, lam in [0.5, 1], contractive layer): cosine >= 0.99 and >= 1.7x faster")
    for line in _targets(rows):
        print("  " + line)
    if not args.no_save:
        out = Path("bench-results")
        out.mkdir(exist_ok=True)
        path = out / "deq.json"
        path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
