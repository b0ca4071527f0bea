"""Command line: ``refimpl verify | export | validate | bench``.

``refimpl verify`` runs every registered operator's curated cases through
the checks of :func:`refimpl.registry.verify_case` (forward against an
independent oracle, adjoint test, finite differences, batch == loop, no
mutation, operator-specific closed forms), prints one table row per check
and exits with status 1 if any check fails.

``refimpl export DIR`` writes the golden test vectors of every registered
case (:mod:`refimpl.vectors`; format in docs/vectors.md).

``refimpl validate OP TARGET --framework torch|jax|numpy`` runs a foreign
implementation on the operator's cases and compares its forward and its
gradients with the reference (:mod:`refimpl.validate`); exit status 1 if any
case fails, 2 on a usage error (unknown operator, TARGET not importable).

``refimpl bench NAME`` runs ``benchmarks/bench_NAME.py`` from a source
checkout (benchmarks are not part of the installed package).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from . import __version__
from .backend import (BACKEND_NAMES, SUPPORTED_DTYPES, available_backends, get_backend,
                      skipped_backends)

BACKENDS = BACKEND_NAMES


def _expand(value: str, choices, available=None) -> list[str]:
    if value == "all":
        return list(available if available is not None else choices)
    return [value]


def _format_table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*headers), line.format(*("-" * w for w in widths))]
    out.extend(line.format(*r) for r in rows)
    return "\n".join(out)


def cmd_verify(args) -> int:
    from . import registry

    try:
        specs = [registry.get_spec(n) for n in args.op] if args.op else registry.all_specs()
        backends = [get_backend(b) for b in _expand(args.backend, BACKENDS, available_backends())]
        if args.backend == "all":
            for name, reason in skipped_backends():
                print(f"refimpl verify: skipping backend {name}: {reason}", flush=True)
    except ValueError as exc:
        print(f"refimpl verify: {exc}", file=sys.stderr)
        return 2
    dtypes = _expand(args.dtype, SUPPORTED_DTYPES)

    jobs = []
    for spec in specs:
        cases = [spec.case(args.case)] if args.case else list(spec.cases)
        for case in cases:
            for be in backends:
                for dt in dtypes:
                    if dt in case.dtypes:
                        jobs.append((spec, case, be, dt))
    if not jobs:
        print("refimpl verify: nothing to run (no matching operator/case/dtype)", file=sys.stderr)
        return 2

    rows, n_fail = [], 0
    summary: dict[str, list] = {}       # operator -> [case runs, checks, failed, worst error/tol]
    start = time.perf_counter()
    for i, (spec, case, be, dt) in enumerate(jobs, 1):
        if not args.quiet:
            print(f"[{i}/{len(jobs)}] {spec.name} / {case.id} ({be.name}, {dt}) "
                  f"{time.perf_counter() - start:6.1f}s", file=sys.stderr, flush=True)
        tally = summary.setdefault(spec.name, [0, 0, 0, 0.0])
        tally[0] += 1
        for r in registry.verify_case(spec, case, backend=be, dtype=dt):
            n_fail += not r.passed
            tally[1] += 1
            tally[2] += not r.passed
            if r.tol > 0:
                tally[3] = max(tally[3], r.error / r.tol)
            if args.failures_only and r.passed:
                continue
            rows.append((spec.name, case.id, be.name, dt, r.check, f"{r.error:.2e}",
                         f"{r.tol:.1e}", "pass" if r.passed else "FAIL"))
            if not r.passed and r.detail:
                rows.append(("", "", "", "", "", "", "", f"  {r.detail}"))
    headers = ("operator", "case", "backend", "dtype", "check", "error", "tol", "result")
    if rows:
        print(_format_table(rows, headers))
    n_checks = sum(1 for r in rows if r[0])
    print("\n" + _format_table(
        [(name, runs, checks, failed, f"{worst:.1e}", "pass" if not failed else "FAIL")
         for name, (runs, checks, failed, worst) in summary.items()],
        ("operator", "case runs", "checks", "failed", "worst error/tol", "result")))
    elapsed = time.perf_counter() - start
    verdict = "all checks passed" if n_fail == 0 else f"{n_fail} check(s) FAILED"
    print(f"\n{len(jobs)} case runs, {verdict} ({elapsed:.1f}s)"
          + ("" if not args.failures_only else f"; {n_checks} failing rows shown"))
    return 1 if n_fail else 0


def cmd_export(args) -> int:
    from . import vectors

    dtypes = _expand(args.dtype, SUPPORTED_DTYPES)
    try:
        manifest = vectors.export(args.dir, ops=args.op, dtypes=dtypes, cases=args.case)
        gv = vectors.load(args.dir)   # read back: what was written is loadable
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"refimpl export: {exc}", file=sys.stderr)
        return 2
    # the files this export wrote (DIR may hold others from earlier exports)
    total = sum(c["size"] for e in gv.manifest["operators"].values() for c in e["cases"])
    for op in gv.ops:
        cases = gv.cases_of(op)
        print(f"{op}: {len(cases)} case file(s) "
              f"({', '.join(sorted({c.dtype for c in cases}))})")
    print(f"wrote {len(gv)} case file(s) and {manifest} ({total / 1024:.0f} KiB of .npz); "
          f"read back and verified")
    return 0


def cmd_validate(args) -> int:
    from . import validate as _validate

    try:
        report = _validate.validate(
            args.op, args.target, framework=args.framework, vjp=args.vjp,
            cases=args.case, rtol=args.rtol, forward_rtol=args.forward_rtol,
            vectors_dir=args.vectors)
    except (ValueError, KeyError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"refimpl validate: {msg}", file=sys.stderr)
        return 2
    print(report.table(show_tracebacks=args.traceback))
    if args.json:
        try:
            Path(args.json).write_text(_validate.report_json(report) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"refimpl validate: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0 if report.passed else 1


def _benchmarks_dir() -> Path | None:
    candidates = []
    if os.environ.get("REFIMPL_BENCHMARKS"):
        candidates.append(Path(os.environ["REFIMPL_BENCHMARKS"]))
    candidates.append(Path.cwd() / "benchmarks")
    candidates.append(Path(__file__).resolve().parent.parent / "benchmarks")
    for c in candidates:
        if c.is_dir() and any(c.glob("bench_*.py")):
            return c
    return None


def cmd_bench(args) -> int:
    bdir = _benchmarks_dir()
    if bdir is None:
        print("refimpl bench: no benchmarks/ directory found; run it from a source "
              "checkout or set REFIMPL_BENCHMARKS", file=sys.stderr)
        return 2
    available = sorted(p.stem[len("bench_"):] for p in bdir.glob("bench_*.py"))
    if args.name is None:
        print("available benchmarks: " + ", ".join(available))
        return 0
    if args.name not in available:
        print(f"refimpl bench: unknown benchmark {args.name!r}; available: "
              + ", ".join(available), file=sys.stderr)
        return 2
    path = bdir / f"bench_{args.name}.py"
    spec = importlib.util.spec_from_file_location(f"refimpl_bench_{args.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.bench_args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refimpl",
        description="Reference gradients for differentiable operators: check them, "
                    "and check yours against them.",
    )
    p.add_argument("--version", action="version", version=f"refimpl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    v = sub.add_parser(
        "verify",
        help="run every operator's cases through forward, adjoint, finite-difference, "
             "batch and operator-specific checks; exit 1 on any failure",
        description="Run every registered operator's curated cases through the forward "
                    "oracle, the adjoint (dot-product) test, finite differences, batch == "
                    "loop, a no-mutation check and the operator's own closed-form checks. "
                    "Prints one row per check; exits 1 if any check fails.",
    )
    v.add_argument("--op", action="append", metavar="NAME",
                   help="operator to verify (repeatable; default: all)")
    v.add_argument("--case", metavar="ID", help="only this case id")
    v.add_argument("--backend", default="numpy", choices=BACKENDS + ("all",),
                   help="array backend (default numpy; 'all' = every one usable here, "
                        "the others are listed with the reason; cupy_semantics = "
                        "CuPy's code paths and semantics on the CPU)")
    v.add_argument("--dtype", default="all", choices=SUPPORTED_DTYPES + ("all",),
                   help="dtype (default all: float64, the reference, and float32)")
    v.add_argument("--failures-only", action="store_true",
                   help="print only failing checks")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser(
        "export",
        help="write golden test vectors (JSON manifest + one .npz per case) into DIR",
        description="Write golden test vectors for every registered operator and case: "
                    "DIR/manifest.json (schema version, library versions, conventions, "
                    "per case id, description, flags, params, tolerance, SHA-256) and "
                    "DIR/<op>/<case>.<dtype>.npz holding inputs, output, cotangent, "
                    "expected VJPs, tangents and expected JVPs (float64). The export is "
                    "read back and verified. Format: docs/vectors.md.",
    )
    e.add_argument("dir", metavar="DIR", help="output directory (created if needed)")
    e.add_argument("--op", action="append", metavar="NAME",
                   help="operator to export (repeatable; default: all)")
    e.add_argument("--case", action="append", metavar="ID",
                   help="only this case id (repeatable)")
    e.add_argument("--dtype", default="float64", choices=SUPPORTED_DTYPES + ("all",),
                   help="input precision of the vectors (default float64, the reference; "
                        "float32 rounds inputs to float32 and uses float32 tolerances)")
    e.set_defaults(func=cmd_export)

    va = sub.add_parser(
        "validate",
        help="check a PyTorch/JAX/NumPy implementation's forward and gradients against "
             "the reference; exit 1 on any failure",
        description="Run TARGET, a function following the calling convention "
                    "fn(*inputs, **params) -> output (e.g. sinkhorn: fn(C, a, b, *, eps) "
                    "-> P), on every case of operator OP with float64 arrays of the "
                    "framework; take its VJP from the framework's autodiff "
                    "(torch.autograd.grad, jax.vjp) or from --vjp; canonicalise gauges; "
                    "compare forward and gradients with the reference per batch member. "
                    "Prints per case the forward error, gradient error, tolerances and "
                    "pass/fail, then a verdict. Exit status: 0 all passed, 1 a case "
                    "failed, 2 usage error (unknown OP, TARGET not importable, framework "
                    "missing).",
    )
    va.add_argument("op", metavar="OP", help="registered operator (see 'refimpl verify')")
    va.add_argument("target", metavar="TARGET",
                    help="the candidate: module:function or path/to/file.py:function")
    va.add_argument("--framework", required=True, choices=("torch", "jax", "numpy"),
                    help="the candidate's array library (and autodiff)")
    va.add_argument("--vjp", metavar="TARGET",
                    help="the candidate's VJP, vjp(*inputs, out_bar, **params) -> "
                         "(input cotangents...); required for numpy, replaces autodiff "
                         "for torch/jax")
    va.add_argument("--case", action="append", metavar="ID",
                    help="only this case id (repeatable)")
    va.add_argument("--rtol", type=float, metavar="TOL",
                    help="gradient tolerance (default: each case's 'fd' tolerance)")
    va.add_argument("--forward-rtol", type=float, metavar="TOL",
                    help="forward tolerance (default: each case's 'forward' tolerance)")
    va.add_argument("--vectors", metavar="DIR",
                    help="take the reference from golden vectors written by "
                         "'refimpl export' instead of computing it")
    va.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    va.add_argument("--traceback", action="store_true",
                    help="print the full traceback of exceptions raised by the candidate")
    va.set_defaults(func=cmd_validate)

    b = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ (source checkout); no NAME lists them",
        description="Run benchmarks/bench_NAME.py (side-by-side timings against "
                    "baselines). Arguments after NAME are passed to the benchmark.",
    )
    b.add_argument("name", nargs="?", metavar="NAME")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
