"""Command line: ``refimpl verify | list | export | validate | bench``.

``refimpl verify`` runs the registered operators' curated cases through the
checks of :func:`refimpl.registry.verify_case` (forward against an
independent oracle, adjoint test, finite differences, batch == loop, no
mutation, operator-specific closed forms).  It prints the failing checks,
each with its detail line (a failure is never summarised away), then one
summary row per operator and a verdict line; ``--verbose`` prints every
check's row.  Progress lines go to stderr (``--quiet`` silences them).

``refimpl list [OP]`` shows what the registry holds: without OP one row per
operator (number of cases, dtypes, whether a VJP/JVP exists, the calling
convention a candidate follows in ``validate``); with OP that operator's
named gradients (what ``validate --gradient NAME[:key=value,...]`` accepts,
with each option's type) and its cases (id, dtypes, flags, parameters,
description).  ``--json`` prints the
same facts as JSON.

``refimpl export DIR`` writes the golden test vectors of every registered
case (:mod:`refimpl.vectors`; format in docs/vectors.md).

``refimpl validate OP TARGET --framework torch|jax|numpy`` runs a foreign
implementation on the operator's cases and compares its forward and its
gradients with the reference (:mod:`refimpl.validate`).

``refimpl bench NAME`` runs ``benchmarks/bench_NAME.py`` from a source
checkout (benchmarks are not part of the installed package).

Exit status, every command: 0 success, 1 a check or case failed, 2 a usage
error.  An unknown operator (``--op``, ``OP``) or case id (``--case``) is a
usage error reported on one stderr line naming the value and the valid ones
(or the ``refimpl list`` command showing them), before anything runs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import math
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
    return "\n".join(o.rstrip() for o in out)


def _usage_error(command: str, message: str) -> int:
    """Report a usage error on one stderr line; the exit status is 2 (as argparse's)."""
    print(f"refimpl {command}: {message}", file=sys.stderr)
    return 2


def _select(op_names: list[str] | None, case_ids: list[str] | None) -> dict:
    """The registered cases that ``--op``/``--case`` select, ``{operator name: [Case]}``.

    No ``--op`` selects every operator; no ``--case`` every case of the
    selected operators; a case id selects that case in each selected
    operator that has one (ids are unique within an operator, not across
    operators).  Operators without a selected case are left out.

    Raises
    ------
    ValueError : an unknown operator, or a case id no selected operator has
        (one line naming the value and the valid ones).
    """
    from . import registry

    specs = ([registry.get_spec(n) for n in dict.fromkeys(op_names)] if op_names
             else registry.all_specs())
    wanted = list(dict.fromkeys(case_ids)) if case_ids else None
    for cid in wanted or ():
        if any(c.id == cid for s in specs for c in s.cases):
            continue
        if len(specs) == 1:
            (spec,) = specs
            raise ValueError(f"operator {spec.name!r} has no case {cid!r}; its cases: "
                             + ", ".join(c.id for c in spec.cases))
        owners = (f"the selected operators ({', '.join(s.name for s in specs)})" if op_names
                  else "the registered operators")
        close = difflib.get_close_matches(cid, {c.id for s in specs for c in s.cases}, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"no case {cid!r} in {owners}; {hint}"
                         "'refimpl list OP' lists the cases of OP")
    return {s.name: [c for c in s.cases if wanted is None or c.id in wanted]
            for s in specs if any(wanted is None or c.id in wanted for c in s.cases)}


def _dtypes_of(cases) -> list[str]:
    """The dtypes any of ``cases`` is defined for, in SUPPORTED_DTYPES order."""
    return [d for d in SUPPORTED_DTYPES if any(d in c.dtypes for c in cases)]


def _jsonable(value):
    """``value`` as JSON (numbers, strings, booleans, None, lists); anything else as repr."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():   # NumPy scalar
        return value.item()
    return repr(value)


def _operator_facts(spec) -> dict:
    """What the registry says about one operator, as JSON-able data (``refimpl list``)."""
    from . import validate as _validate
    from . import vectors

    def case_facts(c) -> dict:
        return {
            "id": c.id,
            "description": c.description,
            "flags": list(c.flags),
            "dtypes": list(c.dtypes),
            "params": {k: _jsonable(v) for k, v in c.params.items()},
            "vjp_params": {k: _jsonable(v) for k, v in c.vjp_params.items()},
            "jvp_params": {k: _jsonable(v) for k, v in c.jvp_params.items()},
            "for_validate": c.for_candidates,
            # the keywords a candidate receives for this case in validate
            "candidate_kwargs": ({k: _jsonable(v) for k, v in vectors.candidate_kwargs(
                spec, c.params, c.vjp_params, c.jvp_params).items()}
                if c.for_candidates else None),
        }

    return {
        "name": spec.name,
        "description": spec.description,
        "gradients": _gradient_facts(spec),
        "inputs": [{"name": k, "core_ndim": n} for k, n in zip(spec.inputs, spec.core_ndim)],
        "output": spec.output,
        "output_core_ndim": spec.output_core_ndim,
        "vjp": "surrogate" if spec.surrogate else "exact",
        "jvp": spec.jvp is not None,
        "dtypes": _dtypes_of(spec.cases),
        "candidate_params": list(spec.candidate_params),
        "validate_signature": _validate._signature_text(spec),
        "validate_vjp_signature": _validate._vjp_signature_text(spec),
        "n_cases": len(spec.cases),
        "n_validate_cases": sum(c.for_candidates for c in spec.cases),
        "cases": [case_facts(c) for c in spec.cases],
    }


def _gradient_facts(spec) -> list[dict]:
    """The operator's named gradients (``OpSpec.gradients``), which
    ``validate --gradient NAME[:key=value,...]`` accepts: name, description,
    options ``{key: type name}`` and the accepted form, e.g.
    ``neumann[:k=<int>,lam=<float>]``."""
    out = []
    for name, ng in spec.gradients.items():
        options = {k: t.__name__ for k, t in ng.options.items()}
        form = ",".join(f"{k}=<{t}>" for k, t in options.items())
        out.append({"name": name, "description": ng.description, "options": options,
                    "usage": f"{name}[:{form}]" if form else name})
    return out


def _params_text(case: dict) -> str:
    """A case's keyword parameters on one line: ``eps=0.2 tol=1e-13; vjp: method=cg``."""
    def kv(d):
        return " ".join(f"{k}={v}" for k, v in d.items())

    parts = [kv(case["params"])] if case["params"] else []
    if case["vjp_params"] and case["vjp_params"] == case["jvp_params"]:
        parts.append("vjp/jvp: " + kv(case["vjp_params"]))
    else:
        parts += [f"{w}: " + kv(case[f"{w}_params"]) for w in ("vjp", "jvp")
                  if case[f"{w}_params"]]
    return "; ".join(parts) or "-"


def cmd_list(args) -> int:
    from . import registry

    try:
        specs = [registry.get_spec(args.op)] if args.op else registry.all_specs()
    except ValueError as exc:
        return _usage_error("list", str(exc))
    facts = [_operator_facts(s) for s in specs]
    if args.json:
        print(json.dumps(facts[0] if args.op else {"operators": facts}, indent=2))
        return 0
    if not args.op:
        print(_format_table(
            [(f["name"], f["n_cases"], f["n_validate_cases"], ",".join(f["dtypes"]), f["vjp"],
              "yes" if f["jvp"] else "-", f["validate_signature"]) for f in facts],
            ("operator", "cases", "in validate", "dtypes", "VJP", "JVP",
             "candidate in 'refimpl validate'")))
        print(f"\n{len(facts)} operators, {sum(f['n_cases'] for f in facts)} cases; "
              "'refimpl list OP' shows the cases of OP")
        return 0
    (f,) = facts
    inputs = ", ".join(f"{i['name']} ({i['core_ndim']}-d core)" for i in f["inputs"])
    print(f"{f['name']}: {f['description']}\n"
          f"inputs:    {inputs}\n"
          f"output:    {f['output']} ({f['output_core_ndim']}-d core)\n"
          f"VJP:       {f['vjp']}; JVP: {'yes' if f['jvp'] else 'none'}\n"
          f"validate:  {f['validate_signature']}\n"
          f"   --vjp:  {f['validate_vjp_signature']}\n")
    if f["gradients"]:
        print("gradients: the reference gradient 'refimpl validate --gradient' takes:\n"
              + _format_table([(g["usage"], g["description"]) for g in f["gradients"]],
                              ("--gradient", "description")) + "\n")
    print(_format_table(
        [(c["id"], ",".join(c["dtypes"]), ",".join(c["flags"]) or "-",
          "yes" if c["for_validate"] else "no", _params_text(c), c["description"])
         for c in f["cases"]],
        ("case", "dtypes", "flags", "validate", "params", "description")))
    return 0


def _verify_jobs(specs, selected: dict, backends, dtypes) -> list[tuple]:
    """The (spec, case, backend, dtype) runs of ``refimpl verify``, in table order."""
    jobs: list[tuple] = []
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:                      # an --op given twice runs once
            continue
        seen.add(spec.name)
        for case in selected.get(spec.name, ()):
            for be in backends:
                for dt in dtypes:
                    if dt in case.dtypes:
                        jobs.append((spec, case, be, dt))
    return jobs


def _run_verify_jobs(jobs: list[tuple], *, verbose: bool, quiet: bool,
                     start: float) -> tuple[list[tuple], dict[str, list], int, int]:
    """Run ``jobs``; return the check rows to print, the per-operator tally
    ``{operator: [case runs, checks, failed, worst error/tol]}``, and the numbers
    of failed and of all checks.

    Failing checks are always printed, with their detail line; passing ones
    only with ``verbose``.
    """
    from . import registry
    rows, n_fail, n_checks = [], 0, 0
    summary: dict[str, list] = {}       # operator -> [case runs, checks, failed, worst error/tol]
    for i, (spec, case, be, dt) in enumerate(jobs, 1):
        if not quiet:
            print(f"[{i}/{len(jobs)}] {spec.name} / {case.id} ({be.name}, {dt}) "
                  f"{time.perf_counter() - start:6.1f}s", file=sys.stderr, flush=True)
        tally = summary.setdefault(spec.name, [0, 0, 0, 0.0])
        tally[0] += 1
        for r in registry.verify_case(spec, case, backend=be, dtype=dt):
            n_fail += not r.passed
            n_checks += 1
            tally[1] += 1
            tally[2] += not r.passed
            if r.tol > 0:
                tally[3] = max(tally[3], r.error / r.tol)
            if r.passed and not verbose:
                continue
            rows.append((spec.name, case.id, be.name, dt, r.check, f"{r.error:.2e}",
                         f"{r.tol:.1e}", "pass" if r.passed else "FAIL"))
            if not r.passed and r.detail:
                rows.append(("", "", "", "", "", "", "", f"  {r.detail}"))
    return rows, summary, n_fail, n_checks


def _print_verify_report(rows: list[tuple], summary: dict[str, list], *, n_jobs: int,
                         n_fail: int, n_checks: int, verbose: bool, start: float) -> None:
    """The check rows, one summary row per operator, and the verdict line."""
    headers = ("operator", "case", "backend", "dtype", "check", "error", "tol", "result")
    if rows:
        print(("" if verbose else "failing checks:\n") + _format_table(rows, headers) + "\n")
    print(_format_table(
        [(name, runs, checks, failed, f"{worst:.1e}", "pass" if not failed else "FAIL")
         for name, (runs, checks, failed, worst) in summary.items()],
        ("operator", "case runs", "checks", "failed", "worst error/tol", "result")))
    elapsed = time.perf_counter() - start
    verdict = ("all checks passed" if n_fail == 0
               else f"{n_fail} check(s) FAILED, listed above")
    print(f"\n{n_jobs} case runs, {n_checks} checks, {verdict} ({elapsed:.1f}s)"
          + ("" if verbose else "; --verbose prints every check"))


def cmd_verify(args) -> int:
    from . import registry
    try:
        selected = _select(args.op, [args.case] if args.case else None)
        if args.exclude_case:
            _select(args.op, args.exclude_case)
    except ValueError as exc:
        return _usage_error("verify", str(exc))
    excluded = set(args.exclude_case or ())
    selected = {op: [c for c in cs if c.id not in excluded] for op, cs in selected.items()}

    try:
        specs = [registry.get_spec(n) for n in args.op] if args.op else registry.all_specs()
        backends = [get_backend(b) for b in _expand(args.backend, BACKENDS, available_backends())]
        if args.backend == "all":
            for name, reason in skipped_backends():
                print(f"refimpl verify: skipping backend {name}: {reason}", flush=True)
    except ValueError as exc:
        print(f"refimpl verify: {exc}", file=sys.stderr)
        return 2
    jobs = _verify_jobs(specs, selected, backends, _expand(args.dtype, SUPPORTED_DTYPES))
    if not jobs:
        why = (f"no selected case is defined for dtype {args.dtype!r} ('refimpl list OP' "
               "shows dtypes)" if backends else "no backend to run on")
        return _usage_error("verify", f"nothing to run: {why}")

    start = time.perf_counter()
    rows, summary, n_fail, n_checks = _run_verify_jobs(jobs, verbose=args.verbose,
                                                       quiet=args.quiet, start=start)
    _print_verify_report(rows, summary, n_jobs=len(jobs), n_fail=n_fail, n_checks=n_checks,
                         verbose=args.verbose, start=start)
    return 1 if n_fail else 0


def cmd_export(args) -> int:
    from . import vectors

    try:
        selected = _select(args.op, args.case)
        if args.exclude_case:
            _select(args.op, args.exclude_case)
    except ValueError as exc:
        return _usage_error("export", str(exc))
    if args.exclude_case:    # the selected ids without the excluded ones (in every operator)
        args.case = sorted({c.id for cs in selected.values() for c in cs
                            if c.id not in set(args.exclude_case)})
        if not args.case:
            return _usage_error("export", "nothing to export: every selected case is excluded")
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
        _select([args.op], args.case)
        if args.exclude_case:
            _select([args.op], args.exclude_case)
    except ValueError as exc:
        return _usage_error("validate", str(exc))
    interrupted = False
    try:
        report = _validate.validate(
            args.op, args.target, framework=args.framework, vjp=args.vjp,
            cases=args.case, rtol=args.rtol, forward_rtol=args.forward_rtol,
            vectors_dir=args.vectors, exclude=args.exclude_case, isolate=True,
            timeout=args.timeout, dump_dir=args.dump, against=args.against,
            unbatched=args.unbatched, gradient=args.gradient)
    except _validate.Interrupted as stop:
        report, interrupted = stop.report, True
    except KeyboardInterrupt:
        print("refimpl validate: interrupted (Ctrl-C) before any case ran", file=sys.stderr)
        return 130
    except (ValueError, KeyError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"refimpl validate: {msg}", file=sys.stderr)
        return 2
    print(report.table(show_tracebacks=args.traceback))
    if interrupted:
        print("refimpl validate: interrupted (Ctrl-C); the cases not finished are ERRORs",
              file=sys.stderr)
    if args.json:
        try:
            Path(args.json).write_text(_validate.report_json(report) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"refimpl validate: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 2
    if interrupted:
        return 130
    return 0 if report.passed else 1


def _relative_tolerance(text: str) -> float:
    """argparse type of --rtol/--forward-rtol: a finite number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a relative tolerance must be finite with 0 < TOL < 1")
    return value


def _seconds(text: str) -> float:
    """argparse type of --timeout: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be finite and > 0")
    return value


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
    if spec is None or spec.loader is None:
        print(f"refimpl bench: cannot load {path}", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.bench_args) or 0)


def _add_verify_parser(sub: argparse._SubParsersAction) -> None:
    """The ``verify`` subcommand's parser."""
    v = sub.add_parser(
        "verify",
        help="run every operator's cases through forward, adjoint, finite-difference, "
             "batch and operator-specific checks; exit 1 on any failure",
        description="Run the registered operators' curated cases through the forward "
                    "oracle, the adjoint (dot-product) test, finite differences, batch == "
                    "loop, a no-mutation check and the operator's own closed-form checks. "
                    "Prints every failing check with its detail line, one summary row per "
                    "operator and a verdict; --verbose prints every check's row. Progress "
                    "lines go to stderr. Exit status: 0 all checks passed, 1 a check "
                    "failed, 2 usage error (unknown operator or case id, nothing to run). "
                    "--case ID runs that case of every selected operator that has one "
                    "('refimpl list' names operators, 'refimpl list OP' their cases).",
    )
    v.add_argument("--op", action="append", metavar="NAME",
                   help="operator to verify (repeatable; default: all; 'refimpl list' "
                        "names them)")
    v.add_argument("--case", metavar="ID", help="only this case id")
    v.add_argument("--exclude-case", action="append", metavar="ID",
                   help="leave out this case id (repeatable)")
    v.add_argument("--backend", default="numpy", choices=BACKENDS + ("all",),
                   help="array backend (default numpy; 'all' = every one usable here, "
                        "the others are listed with the reason; cupy_semantics = "
                        "CuPy's code paths and semantics on the CPU)")
    v.add_argument("--dtype", default="all", choices=SUPPORTED_DTYPES + ("all",),
                   help="dtype (default all: float64, the reference, and float32)")
    shown = v.add_mutually_exclusive_group()
    shown.add_argument("-v", "--verbose", action="store_true",
                       help="print every check's row, passing ones too")
    shown.add_argument("--failures-only", action="store_true",
                       help="print only the failing checks' rows (the default; failing "
                            "checks are always printed)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    v.set_defaults(func=cmd_verify)


def _add_list_parser(sub: argparse._SubParsersAction) -> None:
    """The ``list`` subcommand's parser."""
    ls = sub.add_parser(
        "list",
        help="list the registered operators, or the cases of one operator",
        description="Without OP: one row per registered operator with its number of "
                    "cases (and of those validate uses), dtypes, VJP (exact or surrogate), "
                    "whether it has a JVP, and the calling convention of a candidate in "
                    "'refimpl validate'. With OP: the operator's inputs, output and "
                    "candidate signatures, then one row per case with its id, dtypes, "
                    "flags, whether validate uses it, its parameters and description. "
                    "Exit status 2 for an unknown OP.",
    )
    ls.add_argument("op", nargs="?", metavar="OP", help="a registered operator")
    ls.add_argument("--json", action="store_true",
                    help="print the same facts (and each case's candidate keywords) as JSON")
    ls.set_defaults(func=cmd_list)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` subcommand's parser."""
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
                   help="operator to export (repeatable; default: all; 'refimpl list' "
                        "names them)")
    e.add_argument("--case", action="append", metavar="ID",
                   help="only this case id (repeatable), in every selected operator that "
                        "has it ('refimpl list OP' names them)")
    e.add_argument("--exclude-case", action="append", metavar="ID",
                   help="leave out this case id (repeatable), in every selected operator")
    e.add_argument("--dtype", default="float64", choices=SUPPORTED_DTYPES + ("all",),
                   help="input precision of the vectors (default float64, the reference; "
                        "float32 rounds inputs to float32 and uses float32 tolerances)")
    e.set_defaults(func=cmd_export)


def _add_validate_candidate_args(va: argparse.ArgumentParser) -> None:
    """``validate``'s OP, TARGET and how the candidate is differentiated."""
    va.add_argument("op", metavar="OP", help="registered operator (see 'refimpl list')")
    va.add_argument("target", metavar="TARGET",
                    help="the candidate: module:function or path/to/file.py:function")
    va.add_argument("--framework", required=True, choices=("torch", "jax", "numpy"),
                    help="the candidate's array library (and autodiff)")
    va.add_argument("--vjp", metavar="TARGET",
                    help="the candidate's VJP, vjp(*inputs, out_bar, **params) -> "
                         "(input cotangents...); required for numpy, replaces autodiff "
                         "for torch/jax")


def _add_validate_case_args(va: argparse.ArgumentParser) -> None:
    """``validate``'s case selection, tolerances, timeout and failure dumps."""
    va.add_argument("--case", action="append", metavar="ID",
                    help="only this case id of OP (repeatable; 'refimpl list OP' names them)")
    va.add_argument("--exclude-case", action="append", metavar="ID",
                    help="leave out this case id of OP (repeatable)")
    va.add_argument("--rtol", type=_relative_tolerance, metavar="TOL",
                    help="gradient tolerance, 0 < TOL < 1 (default: each case's 'fd' "
                         "tolerance)")
    va.add_argument("--forward-rtol", type=_relative_tolerance, metavar="TOL",
                    help="forward tolerance, 0 < TOL < 1 (default: each case's 'forward' "
                         "tolerance)")
    va.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=None,
                    help="stop a case (and the import of TARGET) after this many seconds "
                         "and report it as an ERROR (default 300)")
    va.add_argument("--dump", metavar="DIR",
                    help="write each case that did not pass to DIR as <op>.<case>.npz "
                         "(inputs, parameters, reference and candidate output and VJPs) "
                         "and <op>.<case>.json (errors, diagnostics, a command reproducing "
                         "it)")


def _add_validate_reference_args(va: argparse.ArgumentParser) -> None:
    """``validate``'s reference (vectors, self, named gradient) and calling mode."""
    va.add_argument("--vectors", metavar="DIR",
                    help="take the reference from golden vectors written by "
                         "'refimpl export' instead of computing it")
    va.add_argument("--against", choices=("reference", "self"), default="reference",
                    help="judge the gradient against the reference (default) or, with "
                         "'self', against finite differences of TARGET's own forward "
                         "(for approximate-by-design forwards; the forward is not compared)")
    va.add_argument("--unbatched", action="store_true",
                    help="call TARGET (and --vjp) once per batch member, inputs sliced "
                         "along their batch dimensions, and stack the outputs (for code "
                         "written for one problem at a time)")
    va.add_argument("--gradient", metavar="NAME[:k=v,...]",
                    help="compare with one of the operator's named gradients instead of "
                         "its default (tanh_deq: exact, jfb, unroll[:k=..,lam=..], "
                         "neumann[:k=..,lam=..])")


def _add_validate_report_args(va: argparse.ArgumentParser) -> None:
    """``validate``'s report options."""
    va.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    va.add_argument("--traceback", action="store_true",
                    help="print the full traceback of exceptions raised by the candidate")


def _add_validate_parser(sub: argparse._SubParsersAction) -> None:
    """The ``validate`` subcommand's parser."""
    va = sub.add_parser(
        "validate",
        help="check a PyTorch/JAX/NumPy implementation's forward and gradients against "
             "the reference; exit 1 on any failure",
        description="Run TARGET, a function following the calling convention "
                    "fn(*inputs, **params) -> output (e.g. sinkhorn: fn(C, a, b, *, eps) "
                    "-> P), on every case of operator OP with float64 arrays of the "
                    "framework ('refimpl list' shows each operator's convention, "
                    "'refimpl list OP' its cases); take its VJP from the framework's autodiff "
                    "(torch.autograd.grad, jax.vjp) or from --vjp; canonicalise gauges; "
                    "compare forward and gradients with the reference per batch member. "
                    "Prints per case the forward error, gradient error, tolerances and "
                    "pass/fail, then a verdict; under a case that did not pass, its "
                    "description, the worst entry of each failing array with both values "
                    "and the norm ratio, the candidate's last output lines and a command "
                    "reproducing it. The candidate runs in a child process: its exit, "
                    "crash, hang (--timeout) or output flood is an ERROR of that case and "
                    "the other cases still run; its stdout/stderr is captured. Exit "
                    "status: 0 all passed, 1 a case failed or errored, 2 usage error "
                    "(unknown OP or case id, TARGET not importable, framework missing, "
                    "bad option value, golden vectors failing their checks), 130 "
                    "interrupted (Ctrl-C; the finished cases are reported).",
    )
    _add_validate_candidate_args(va)
    _add_validate_case_args(va)
    _add_validate_reference_args(va)
    _add_validate_report_args(va)
    va.set_defaults(func=cmd_validate)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand's parser."""
    b = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ (source checkout); no NAME lists them",
        description="Run benchmarks/bench_NAME.py (side-by-side timings against "
                    "baselines). Arguments after NAME are passed to the benchmark.",
    )
    b.add_argument("name", nargs="?", metavar="NAME")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS")
    b.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refimpl",
        description="Reference gradients for differentiable operators: check them, "
                    "and check yours against them.",
    )
    p.add_argument("--version", action="version", version=f"refimpl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _add_verify_parser(sub)
    _add_list_parser(sub)
    _add_export_parser(sub)
    _add_validate_parser(sub)
    _add_bench_parser(sub)
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
