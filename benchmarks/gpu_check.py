"""One command that checks refimpl on an NVIDIA GPU and writes a markdown report.

Run from a source checkout on a machine with an NVIDIA driver and Python 3.10+
(nothing else needed)::

    python benchmarks/gpu_check.py            # report: bench-results/gpu-check/report.md
    python benchmarks/gpu_check.py --quick    # smaller benchmarks
    python benchmarks/gpu_check.py --dry-run  # print the plan, run nothing

Steps, each run to the end whatever the others did (the exit status is 1 if
any failed):

1. ``nvidia-smi``: the driver's CUDA version picks the CuPy wheel
   (``cupy-cuda11x`` / ``cupy-cuda12x`` / ``cupy-cuda13x``; ``--cuda-major``
   overrides).
2. A virtual environment (``--venv``, default
   ``bench-results/gpu-check/venv``) with that CuPy, array-api-compat, the
   test requirements and this project (editable).  ``--pip-args`` is passed
   to every ``pip install`` (e.g. ``"--no-index --find-links /wheels"`` on a
   machine without network); ``--no-venv`` uses the running interpreter as
   it is.
3. ``refimpl verify --backend cupy`` (every registered case, both dtypes).
4. ``REFIMPL_REQUIRE_GPU=1 pytest -m gpu tests``: every GPU-marked test; with
   the variable set a test that cannot reach the device fails instead of
   skipping, so this step cannot pass without testing anything.
5. ``bench_matsqrt.py --cupy on --cpu off``: the matrix square root table on
   CuPy (device synchronised around every timed region; a failing method is
   reported under the table, the other rows kept).
6. ``bench_sinkhorn.py --backend cupy``: Sinkhorn forward and implicit
   backward on CuPy.

The report (``--out``, default ``bench-results/gpu-check/report.md``) holds the
environment, each step's command, exit status, duration and output (the
benchmark tables in full), and the JSON results next to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUPY_WHEELS = {11: "cupy-cuda11x", 12: "cupy-cuda12x", 13: "cupy-cuda13x"}
TEST_REQUIREMENTS = ("pytest>=7", "array-api-strict>=2.2", "hypothesis>=6", "sympy>=1.12",
                     "mpmath>=1.3")


def cuda_major_from_smi(text: str) -> int | None:
    """The CUDA major version in ``nvidia-smi``'s header ("CUDA Version: 12.4")."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return int(m.group(1)) if m else None


def cupy_wheel(major: int) -> str:
    """The CuPy wheel for a CUDA major version (``ValueError`` if none exists)."""
    if major not in CUPY_WHEELS:
        raise ValueError(f"no CuPy wheel for CUDA {major}; known: "
                         f"{', '.join(f'{k} -> {v}' for k, v in CUPY_WHEELS.items())}")
    return CUPY_WHEELS[major]


@dataclass
class Step:
    """One command of the check and, once run, its outcome."""

    title: str
    argv: list[str]
    env: dict = field(default_factory=dict)
    timeout: float = 1800.0
    full_output: bool = False          # benchmarks: their tables go to the report whole
    rc: int | None = None
    seconds: float = 0.0
    output: str = ""

    def shell(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + " ".join(shlex.quote(a) for a in self.argv)

    def run(self, cwd: Path) -> None:
        start = time.perf_counter()
        try:
            proc = subprocess.run(self.argv, cwd=cwd, env={**os.environ, **self.env},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=self.timeout)
            self.rc, self.output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            self.rc, self.output = 124, out + f"\n[timed out after {self.timeout:.0f} s]"
        except OSError as exc:
            self.rc, self.output = 127, f"[could not start: {exc}]"
        self.seconds = time.perf_counter() - start


def plan(args, python: str, wheel: str | None) -> list[Step]:
    """The steps, in order, for the interpreter ``python`` (the venv's)."""
    out = Path(args.out).resolve().parent
    pip = [python, "-m", "pip", "install", *shlex.split(args.pip_args)]
    steps = []
    if not args.no_venv:
        steps.append(Step("create the virtual environment",
                          [sys.executable, "-m", "venv", str(args.venv)]))
        steps.append(Step("install CuPy, array-api-compat, test requirements and refimpl",
                          pip + ([wheel] if wheel else []) + ["array-api-compat>=1.9",
                                                              *TEST_REQUIREMENTS, "-e", str(ROOT)],
                          timeout=1800.0))
    steps.append(Step("CuPy sees the device",
                      [python, "-c", ("from refimpl.backend import gpu_status; ok, why = "
                                     "gpu_status(); print(why); raise SystemExit(0 if ok else 1)")]))
    steps.append(Step("refimpl verify --backend cupy",
                      [python, "-m", "refimpl.cli", "verify", "--backend", "cupy", "-q",
                       "--failures-only"], timeout=args.step_timeout))
    steps.append(Step("pytest -m gpu (REFIMPL_REQUIRE_GPU=1)",
                      [python, "-m", "pytest", "-m", "gpu", "-q", "-o", "addopts=",
                       "-p", "no:cacheprovider", "-rfE", "tests"],
                      env={"REFIMPL_REQUIRE_GPU": "1"}, timeout=args.step_timeout))
    quick = ["--quick"] if args.quick else []
    steps.append(Step("matrix square root benchmark on CuPy",
                      [python, "benchmarks/bench_matsqrt.py", "--cupy", "on", "--cpu", "off",
                       "--json", str(out / "matsqrt.json"), *quick],
                      timeout=args.step_timeout, full_output=True))
    steps.append(Step("Sinkhorn benchmark on CuPy",
                      [python, "benchmarks/bench_sinkhorn.py", "--backend", "cupy",
                       "--out", str(out / "sinkhorn.json"), *quick],
                      timeout=args.step_timeout, full_output=True))
    return steps


def report(steps: list[Step], header: list[str], tail_lines: int = 60) -> str:
    """The markdown report of the steps that ran."""
    lines = ["# refimpl GPU check", "", *header, "", "| step | exit | seconds |", "|---|---|---|"]
    for s in steps:
        verdict = "not run" if s.rc is None else ("ok" if s.rc == 0 else f"FAILED ({s.rc})")
        lines.append(f"| {s.title} | {verdict} | {s.seconds:.1f} |")
    for s in steps:
        if s.rc is None:
            continue
        text = s.output.rstrip().splitlines()
        if not s.full_output and len(text) > tail_lines:
            text = [f"... ({len(text) - tail_lines} lines above left out)"] + text[-tail_lines:]
        lines += ["", f"## {s.title}", "", f"`{s.shell()}` -> exit {s.rc} in {s.seconds:.1f} s",
                  "", "```", *text, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results/gpu-check/report.md", help="the markdown report")
    p.add_argument("--venv", default="bench-results/gpu-check/venv", type=Path,
                   help="virtual environment to create")
    p.add_argument("--no-venv", action="store_true",
                   help="use the running interpreter (CuPy etc. already installed)")
    p.add_argument("--cuda-major", type=int, default=None,
                   help="CUDA major version for the CuPy wheel (default: from nvidia-smi)")
    p.add_argument("--pip-args", default="", help="extra arguments for pip install")
    p.add_argument("--quick", action="store_true", help="smaller benchmarks")
    p.add_argument("--step-timeout", type=float, default=1800.0, help="seconds per step")
    p.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    args = p.parse_args(argv)

    smi = shutil.which("nvidia-smi")
    smi_text = ""
    if smi:
        try:
            smi_text = subprocess.run([smi], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            smi_text = f"[nvidia-smi failed: {exc}]"
    major = args.cuda_major if args.cuda_major is not None else cuda_major_from_smi(smi_text)
    wheel = None
    if not args.no_venv:
        if major is None:
            print("gpu_check: cannot tell the CUDA version (nvidia-smi "
                  + ("printed no 'CUDA Version'" if smi else "not found")
                  + "); pass --cuda-major, or --no-venv with CuPy installed", file=sys.stderr)
            if not args.dry_run:
                return 2
        else:
            try:
                wheel = cupy_wheel(major)
            except ValueError as exc:
                print(f"gpu_check: {exc}", file=sys.stderr)
                return 2
    if not args.venv.is_absolute():
        args.venv = ROOT / args.venv
    if not Path(args.out).is_absolute():
        args.out = str(ROOT / args.out)
    python = sys.executable if args.no_venv else str(
        args.venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    steps = plan(args, python, wheel)

    header = [(f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cpus), "
               f"Python {platform.python_version()}"),
              f"- CUDA major version: {major if major is not None else 'unknown'}"
              + (f" -> {wheel}" if wheel else ""),
              f"- started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    if args.dry_run:
        print("\n".join(header))
        for i, s in enumerate(steps, 1):
            print(f"{i}. {s.title}: {s.shell()}")
        print(f"report: {args.out}")
        return 0

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    smi_step = Step("nvidia-smi", [smi or "nvidia-smi"])
    smi_step.rc, smi_step.output = (0 if smi else 127), smi_text or "[nvidia-smi not found]"
    done = [smi_step]
    for s in steps:
        setup = s.title.startswith(("create", "install"))
        if setup and any(d.rc for d in done[1:]):
            continue                        # nothing to install into
        print(f"[gpu_check] {s.title} ...", flush=True)
        s.run(ROOT)
        done.append(s)
        print(f"[gpu_check]   exit {s.rc} in {s.seconds:.1f} s", flush=True)
        out_path.write_text(report(done + [t for t in steps if t not in done], header))
    failed = [s.title for s in done[1:] if s.rc]
    print(f"report: {out_path}" + (f"; FAILED: {', '.join(failed)}" if failed else "; all steps ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
