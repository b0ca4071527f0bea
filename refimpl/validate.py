"""Check a foreign implementation's forward and gradients against the reference.

Someone has written a Sinkhorn layer, a soft top-k, a matrix square root or
a DEQ in PyTorch, JAX or NumPy and wants to know whether its gradients are
right.  :func:`validate` runs their function on every curated case of the
operator in :mod:`refimpl.registry` (edge cases included) and compares, per
case, the forward output and the VJP with refimpl's reference.

The candidate follows the calling convention of docs/design.md: the operator's array
inputs positionally, the parameters named in ``OpSpec.candidate_params`` as
keywords (their values per case: :func:`refimpl.vectors.candidate_kwargs`),
the primary output back, in the candidate framework's arrays::

    linear_solve: fn(A, b)                  -> x
    sinkhorn:     fn(C, a, b, *, eps)       -> P
    soft_topk:    fn(x, *, k, eps, largest) -> A
    sqrtm:        fn(A)                     -> S
    tanh_deq:     fn(x, W, U, b)            -> z

Procedure for one case (the numbers are :func:`refimpl.vectors.reference_case`'s,
i.e. the golden vectors ``refimpl export`` writes):

1. the case's float64 inputs become float64 arrays of the framework
   (``torch.float64`` tensors with ``requires_grad``, ``jax`` arrays under
   ``enable_x64``, NumPy arrays); batched cases are passed batched;
2. ``out = fn(*inputs, **candidate_kwargs)``; its type, shape and finiteness are
   checked, then it is compared with the reference output;
3. the candidate's VJP ``J^T out_bar`` for the case's cotangent comes from
   the framework's own autodiff (``torch.autograd.grad``, ``jax.vjp``) or
   from a supplied ``vjp`` function (required for NumPy), with signature::

       vjp(*inputs, out_bar, **params) -> tuple of one cotangent per input

   (inputs and ``out_bar`` positionally, the same keywords as ``fn``; None
   for an input the output does not depend on);
4. both the candidate's and the reference's cotangents go through the
   operator's ``canonicalize`` (gauge fixing, e.g. Sinkhorn's ``(c, -c)``
   freedom in ``(a_bar, b_bar)``; symmetric part for SPD inputs), then are
   compared input by input;
5. the inputs must come back unmodified.

Errors are normwise and relative *per batch member* (leading dimensions
beyond ``core_ndim``), each member against its own size only, so a bug that
only shows on the batch member of size 1e-6 next to one of size 1e3 is not
drowned out::

    error = max_m  max|a_m - e_m| / max(max|e_m|, FLOOR * s_m / tol)

where ``FLOOR = 64 * eps_float64`` and ``s_m`` is the member's natural
size: ``max|e_m|`` for an output; for a gradient at least

    s_m = max( max|out_bar_m| max|out_m| / max(max|x_m|, 1),   (generic)
               max over member m of gradient_scale(x, out, out_bar, params) )

so a gradient that is zero in exact arithmetic (the cost gradient of a
one-column transport plan, a saturated tanh) is compared at round-off of
that size, not of its own.  (So in linear_solve's ``batched_scales``,
whose members' gradients span a factor 4e8, an error of 1e-7 relative to
the smallest member fails; a floor relative to the largest member would
let errors up to 6e-6 through, and a whole-batch normwise comparison
anything below 4.)

The first term of ``s_m`` is the change of ``<out_bar, out>`` per
relative change of the input; the second, declared
per operator in the registry (``OpSpec.gradient_scale``), is the
operator's own sensitivity where the generic term misses it.  SOFT top-k
declares ``max|A_bar_m| / t`` (``t = eps/2``): its threshold solves
``sum(A) = k``, which no floating-point algorithm resolves beyond a
residual ``|F| ~ u k``; a residual ``F`` changes the VJP by up to
``|F| max|A_bar| / t`` however small the gradient itself (``~ S
max|A_bar| / t``, ``S = sum A(1 - A) -> 0`` near the hard limit), so a
backward-stable implementation (e.g. bisection plus one Newton step for the
graph) is only accurate to round-off of ``max|A_bar| / t`` there, 1/t
times more than the generic term allows for scores of size 1.  A member whose
reference is exactly zero, with no natural size, is compared at round-off
of the largest member.  A case passes when the forward
error is at most the case's ``forward`` tolerance and every gradient error
at most its ``fd`` tolerance (the accuracy to which ``refimpl verify``
certifies the reference gradient against finite differences); both can be
overridden, and neither is taken below ``FLOOR`` (a case whose reference is
exact, tolerance 0, still allows a foreign implementation round-off).

What is off.  A failing case's ``verdict`` says whether the forward, the
gradient or both depart from the reference; when the forward does, the
VJP is also compared with finite differences of the candidate's own
forward (below), and the verdict says whether the gradient is consistent
with that forward (an approximate forward with a correct backward: fix
the forward) or not.

Against the candidate's own forward (``against="self"``, CLI ``--against
self``).  Approximate-by-design code (Padé or Taylor forwards, a fixed
number of iterations, unrolled backward) cannot match the reference to
round-off; what can be asked is whether its backward is the derivative of
its own forward.  For random feasible directions ``d`` of all inputs
(``SELF_DIRECTIONS`` over the whole batch and as many per batch member),
float64 central differences at steps ``h, h/2, h/4`` (``h`` the case's
``fd_step`` relative to the perturbed entries) are Richardson-extrapolated
to ``D`` and::

    |<out_bar, D> - <vjp(out_bar), d>|
        <= max(tol * size, 4 E + 2 noise, FLOOR * natural)

with ``size = sum|out_bar * D| + sum|vjp * d|``, ``E`` the larger
difference of the extrapolated value from its two neighbours in the
Richardson table (the differences' own error estimate),
``noise = FLOOR sum|out_bar * out| / (h/4)`` (evaluation round-off) and
``natural = sum s |d|`` (the round-off term above).  ``tol`` is the case's
``fd`` tolerance (``rtol`` overrides it); the report shows it widened to
``(4 E + 2 noise) / size`` where that is larger.  A direction whose ``E``
exceeds 1% of ``size`` (and the round-off terms) resolves nothing: the
case is an ``ERROR`` "inconclusive (forward not smooth enough)" --
tolerance-based stopping or a branch that changes with ``x`` at the scale
of the steps -- rather than a pass.

Bad candidates never end the run with a bare traceback: an import failure
of the target raises :class:`TargetError` (the CLI prints it), and a wrong
signature, a wrong output type or shape, NaN output, an exception inside
the candidate (its first line and place; the full traceback on request) or
``sys.exit()`` is reported as an ``ERROR`` for that case.

Isolation.  A candidate given as a TARGET string (always, on the command
line) runs in a child process (:mod:`refimpl._isolation`): ``os._exit``, a
crash (segfault, ``abort()``), a case exceeding ``timeout`` or writing more
than ``_isolation.OUTPUT_LIMIT`` bytes is an ``ERROR`` of that case naming
the exit status, signal or limit, and the other cases still run; the
candidate's stdout/stderr is captured per case (``CaseReport.output_tail``).
A function object runs in this process (it cannot always be sent to
another): exceptions and ``sys.exit`` are still per-case errors, but a
crash or hang is the caller's.  Ctrl-C raises :class:`Interrupted` (a
``KeyboardInterrupt``) carrying the report of the finished cases.  The
child process guards against accidents, not against a candidate that sets
out to forge its own report (it runs with the user's rights either way).

A case that does not pass carries ``diagnostics``: per failing array the
worst entry (index, both values), ``||candidate|| / ||reference||`` and a
hint when the candidate is the reference negated, transposed, or scaled by
a case parameter (a forgotten ``1/eps``); ``dump_dir`` writes such cases
with their numbers and a command line that reruns them alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import shlex
import sys
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import registry, vectors
from .check import DEFAULT_FD_STEP

__all__ = [
    "AGAINST",
    "FLOOR",
    "FRAMEWORKS",
    "CaseReport",
    "Interrupted",
    "SelfCheck",
    "TargetError",
    "ValidationReport",
    "load_target",
    "parse_gradient",
    "self_consistency",
    "validate",
]

FRAMEWORKS = ("torch", "jax", "numpy")

#: What ``validate`` judges the candidate's gradient against.
AGAINST = ("reference", "self")

#: Round-off floor of the per-member comparison, relative to the largest
#: reference entry of the whole batch (64 units of float64 round-off).
FLOOR = 64.0 * float(np.finfo(np.float64).eps)


class TargetError(ValueError):
    """A TARGET (``module:function`` or ``path.py:function``) cannot be loaded."""


class CandidateError(Exception):
    """The candidate ran but broke the calling convention (type, shape, NaN...)."""


class _Raised(Exception):
    """An exception raised inside the candidate's code (or its framework's autodiff)."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.tb = tb if len(tb) <= _TRACEBACK_CHARS else "...\n" + tb[-_TRACEBACK_CHARS:]


def _call(f: Callable, *args, **kwargs):
    """Call candidate code; whatever it raises becomes a :class:`_Raised`.

    ``SystemExit`` (``sys.exit()`` in the candidate) included: a candidate
    ending the process is an error of that case, never a silent exit with
    status 0.  ``KeyboardInterrupt`` is left to end the run.
    """
    try:
        return f(*args, **kwargs)
    except (Exception, SystemExit) as exc:
        raise _Raised(exc) from exc


#: A candidate's exception message is cut to this many characters in the table.
_MESSAGE_CHARS = 300
#: Characters of a candidate's traceback kept (its last ones) for ``--traceback``.
_TRACEBACK_CHARS = 20000


def _exception_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (cut), saying how many lines were left out.

    Framework errors (JAX tracer errors, equinox checks) carry messages of
    dozens of lines; the table gets one, ``--traceback`` all of them.
    """
    if isinstance(exc, SystemExit):
        return f"SystemExit: sys.exit({exc.code!r}) inside the candidate"
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0].strip() if lines else ""
    if len(first) > _MESSAGE_CHARS:
        first = first[:_MESSAGE_CHARS] + "..."
    more = (f" [+{len(lines) - 1} more line(s); --traceback shows them]"
            if len(lines) > 1 else "")
    return f"{type(exc).__name__}: {first}{more}"


# --------------------------------------------------------------------------
# Loading a candidate by name
# --------------------------------------------------------------------------

def _import_file(path: Path):
    """Import a .py file as a fresh module (its directory on sys.path meanwhile)."""
    name = f"refimpl_candidate_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


#: At most this many names are listed when a TARGET's function is not found.
_MAX_LISTED = 12


def _target_parts(target: str, what: str) -> tuple[str, str]:
    """``(where, attr)`` of ``where:attr``, where being a module or a file path."""
    if not isinstance(target, str) or ":" not in target:
        raise TargetError(f"{what} {target!r} must be 'module:function' or "
                          f"'path/to/file.py:function'")
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise TargetError(f"{what} {target!r} must be 'module:function' or "
                          f"'path/to/file.py:function'")
    return where, attr


def _import_where(where: str, target: str, what: str):
    """The module ``where`` names: a file path, or a module name looked up with
    the current directory on ``sys.path``; any failure a :class:`TargetError`."""
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = Path(where)
            if not path.is_file():
                hint = (f" (did you mean {where + '.py'!r}?)"
                        if Path(where + ".py").is_file() else "")
                raise TargetError(f"{what} {target!r}: no such file {where!r}{hint}")
            return _import_file(path)
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            return importlib.import_module(where)
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)
    except TargetError:
        raise
    except ModuleNotFoundError as exc:
        raise TargetError(f"{what} {target!r}: cannot import {where!r} ({exc})") from None
    except BaseException as exc:  # SyntaxError, errors raised at import time, SystemExit
        tb = traceback.extract_tb(exc.__traceback__)
        at = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        if isinstance(exc, SyntaxError) and exc.filename:
            at = f" at {exc.filename}:{exc.lineno}"
        raise TargetError(f"{what} {target!r}: importing {where!r} raised "
                          f"{type(exc).__name__}: {exc}{at}") from None


def _callables_listing(obj, part: str) -> str:
    """What ``obj`` (which has no attribute ``part``) does define: close matches,
    else its public callables (at most :data:`_MAX_LISTED` named)."""
    try:
        members = vars(obj).items()
    except TypeError:               # no __dict__
        members = ((n, getattr(obj, n, None)) for n in dir(obj))
    defined = sorted(n for n, v in members if callable(v) and not n.startswith("_"))
    close = difflib.get_close_matches(part, defined, n=3)
    if close:
        return f"did you mean {' or '.join(map(repr, close))}?"
    if len(defined) > _MAX_LISTED:
        return (f"it defines {len(defined)} callables, e.g. "
                f"{', '.join(defined[:_MAX_LISTED])}, ...")
    return f"callables it defines: {', '.join(defined) or 'none'}"


def _resolve_attribute(module, where: str, attr: str, target: str, what: str) -> Callable:
    """The callable at the dotted path ``attr`` in ``module``."""
    obj = module
    parts = attr.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            owner = f"{where}:{'.'.join(parts[:i])}" if i else where
            raise TargetError(f"{what} {target!r}: {owner!r} has no attribute {part!r}; "
                              f"{_callables_listing(obj, part)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TargetError(f"{what} {target!r}: {attr!r} is not callable "
                          f"(it is a {type(obj).__name__})")
    return obj


def load_target(target: str, *, what: str = "TARGET") -> Callable:
    """The callable named by ``module:function`` or ``path/to/file.py:function``.

    ``function`` may be dotted (``module:Class.method``).  A module name is
    looked up with the current directory on ``sys.path`` (as ``python -m``
    does).  Every failure raises :class:`TargetError` with a message saying
    what was tried and what went wrong (missing module, exception while
    importing, missing attribute with the names the module does define,
    attribute not callable).
    """
    where, attr = _target_parts(target, what)
    module = _import_where(where, target, what)
    return _resolve_attribute(module, where, attr, target, what)


# --------------------------------------------------------------------------
# Frameworks
# --------------------------------------------------------------------------

class _Framework:
    """How to hand arrays to a framework, take them back, and pull back a cotangent."""

    name = ""
    array_type = ""

    def version(self) -> str:
        raise NotImplementedError

    def context(self):
        return contextlib.nullcontext()

    def inputs(self, host: Sequence[np.ndarray], requires_grad: bool) -> list:
        raise NotImplementedError

    def like(self, host: np.ndarray, out) -> Any:
        """A host cotangent as an array of the framework, with ``out``'s dtype."""
        raise NotImplementedError

    def is_array(self, x) -> bool:
        raise NotImplementedError

    def host(self, x) -> np.ndarray:
        raise NotImplementedError

    def forward(self, fn, args, params):
        """``(out, ctx)``; ``ctx`` is what :meth:`pullback` needs."""
        return fn(*args, **params), None

    def pullback(self, ctx, args, out, v_host) -> Sequence:
        raise CandidateError(f"framework {self.name!r} has no autodiff: supply a vjp")

    def stack(self, xs: Sequence, shape: tuple) -> Any:
        """The arrays ``xs`` (one per batch member, in C order) stacked and
        reshaped to ``shape``, differentiably where the framework differentiates."""
        return np.stack([np.asarray(x) for x in xs]).reshape(shape)


class _Torch(_Framework):
    name, array_type = "torch", "torch.Tensor"

    def __init__(self):
        import torch
        self.torch = torch

    def version(self):
        return self.torch.__version__

    def inputs(self, host, requires_grad):
        return [self.torch.tensor(h, dtype=self.torch.float64, requires_grad=requires_grad)
                for h in host]

    def like(self, host, out):
        dtype = out.dtype if out.dtype.is_floating_point else self.torch.float64
        return self.torch.as_tensor(np.array(host), dtype=dtype, device=out.device)

    def is_array(self, x):
        return isinstance(x, self.torch.Tensor)

    def host(self, x):
        if x.is_complex():
            raise CandidateError(f"returned a complex tensor ({x.dtype})")
        return x.detach().cpu().to(self.torch.float64).numpy().copy()

    def pullback(self, ctx, args, out, v_host):
        if not out.requires_grad:
            raise CandidateError(
                "the output is not connected to the inputs' autograd graph (does the "
                "candidate detach, call .numpy()/.item(), or run under torch.no_grad()?)")
        return self.torch.autograd.grad(out, args, grad_outputs=self.like(v_host, out),
                                        allow_unused=True)

    def stack(self, xs, shape):
        if not all(isinstance(x, self.torch.Tensor) for x in xs):
            raise CandidateError("a batch member's output is not a torch.Tensor")
        return self.torch.stack(list(xs)).reshape(shape)


@contextlib.contextmanager
def _jax_x64():
    """float64 in JAX for the duration (the context manager if this JAX has one)."""
    import jax
    if callable(getattr(jax, "enable_x64", None)):
        with jax.enable_x64(True):
            yield
        return
    try:
        from jax.experimental import enable_x64
    except ImportError:
        enable_x64 = None
    if enable_x64 is not None:
        with enable_x64():
            yield
        return
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


class _Jax(_Framework):
    name, array_type = "jax", "jax.Array"

    def __init__(self):
        import jax
        import jax.numpy as jnp
        self.jax, self.jnp = jax, jnp

    def version(self):
        return self.jax.__version__

    def context(self):
        return _jax_x64()

    def inputs(self, host, requires_grad):
        return [self.jnp.asarray(np.array(h), dtype=self.jnp.float64) for h in host]

    def like(self, host, out):
        return self.jnp.asarray(np.array(host), dtype=getattr(out, "dtype", self.jnp.float64))

    def is_array(self, x):
        return isinstance(x, self.jax.Array)

    def host(self, x):
        a = np.asarray(x)
        if np.iscomplexobj(a):
            raise CandidateError(f"returned a complex array ({a.dtype})")
        return np.array(a, dtype=np.float64)

    def forward(self, fn, args, params):
        out, pull = self.jax.vjp(lambda *xs: fn(*xs, **params), *args)
        return out, pull

    def pullback(self, ctx, args, out, v_host):
        return ctx(self.like(v_host, out))

    def stack(self, xs, shape):
        return self.jnp.stack(list(xs)).reshape(shape)


class _NumPy(_Framework):
    name, array_type = "numpy", "numpy.ndarray"

    def version(self):
        return np.__version__

    def inputs(self, host, requires_grad):
        return [np.array(h, dtype=np.float64) for h in host]

    def like(self, host, out):
        return np.array(host, dtype=np.float64)

    def is_array(self, x):
        return isinstance(x, np.ndarray)

    def host(self, x):
        if np.iscomplexobj(x):
            raise CandidateError(f"returned a complex array ({x.dtype})")
        return np.array(x, dtype=np.float64)


def _framework(name: str) -> _Framework:
    if name not in FRAMEWORKS:
        raise ValueError(f"argument 'framework' must be one of {', '.join(FRAMEWORKS)}, "
                         f"got {name!r}")
    try:
        return {"torch": _Torch, "jax": _Jax, "numpy": _NumPy}[name]()
    except ImportError as exc:
        hint = {"torch": "pip install torch", "jax": "pip install jax"}.get(name, "")
        raise ValueError(f"framework {name!r} is not installed ({exc}); {hint}") from None


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseReport:
    """The outcome of one case.

    ``status`` is ``"pass"``, ``"FAIL"`` (ran, numbers outside tolerance) or
    ``"ERROR"`` (could not be compared: exception, wrong type/shape, NaN).
    ``gradient_errors`` maps each input name to its error; ``worst`` names
    the input (and batch member) with the largest one.  ``verdict`` says
    what is off when a case fails (``"forward off"``, ``"gradient off"``,
    ``"forward and gradient off"``), and, when the forward is off, whether
    the gradient is the derivative of the candidate's own forward
    (:func:`self_consistency`); with ``against="self"`` it is the outcome of
    that comparison.  ``diagnostics``

    holds one dict per failing comparison (:func:`_diagnose`: the worst
    entry with both values, the norm ratio, a hint).  ``output_bytes`` and
    ``output_tail`` are what the candidate wrote to stdout/stderr during the
    case (its count and last bytes; isolated runs only).
    """

    case: str
    description: str
    flags: tuple[str, ...]
    status: str
    forward_error: float | None
    gradient_error: float | None
    forward_tol: float
    gradient_tol: float
    gradient_errors: Mapping[str, float] = field(default_factory=dict)
    worst: str = ""
    message: str = ""
    traceback: str = ""
    verdict: str = ""
    diagnostics: tuple = ()
    output_bytes: int = 0
    output_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass(frozen=True)
class ValidationReport:
    """Per-case results of :func:`validate`; ``passed`` when every case passed.

    ``command`` is the ``refimpl validate`` command line of the run (TARGET
    strings only; a case is reproduced by adding ``--case ID``);
    ``interrupted`` says Ctrl-C ended the run.
    """

    op: str
    framework: str
    framework_version: str
    candidate: str
    gradient_source: str
    cases: tuple[CaseReport, ...]
    notes: tuple[str, ...] = ()
    command: str = ""
    interrupted: bool = False

    @property
    def passed(self) -> bool:
        return (bool(self.cases) and not self.interrupted
                and all(c.passed for c in self.cases))

    @property
    def n_passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def n_failed(self) -> int:
        return len(self.cases) - self.n_passed

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        bad = [c.case for c in self.cases if not c.passed]
        tail = f" (failed: {', '.join(bad)})" if bad else ""
        stop = " [interrupted]" if self.interrupted else ""
        return (f"{self.op}: {self.n_passed} of {len(self.cases)} cases passed{tail}{stop} "
                f"-> {verdict}")

    def table(self, *, show_tracebacks: bool = False) -> str:
        """The human-readable report the CLI prints."""
        def fmt(x):
            return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.1e}")

        lines = [(f"refimpl validate {self.op}: {self.candidate} "
                  f"[{self.framework} {self.framework_version}, float64, "
                  f"gradients by {self.gradient_source}]")]
        lines += [f"note: {n}" for n in self.notes]
        headers: tuple[str, ...] = ("case", "flags", "forward", "tol", "gradient", "tol",
                                    "worst", "result")
        rows: list[tuple[str, ...]] = [(c.case, ",".join(c.flags) or "-", fmt(c.forward_error), fmt(c.forward_tol),
                 fmt(c.gradient_error), fmt(c.gradient_tol), c.worst or "-", c.status)
                for c in self.cases]
        if any(c.verdict for c in self.cases):
            headers += ("verdict",)
            rows = [r + (c.verdict or "-",) for r, c in zip(rows, self.cases)]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(headers)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += [line.format(*headers), line.format(*("-" * w for w in widths))]
        for c, r in zip(self.cases, rows):
            lines.append(line.format(*r).rstrip())
            if c.message:
                lines.extend(f"    {m}" for m in c.message.splitlines())
            if not c.passed:
                lines.extend(f"    {m}" for m in _failure_lines(c, self.command))
            if show_tracebacks and c.traceback:
                lines.extend(f"    | {t}" for t in c.traceback.rstrip().splitlines())
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def _member_max(a: np.ndarray, core_ndim: int) -> np.ndarray:
    """max|a| over each batch member's core dimensions (shape: the batch dimensions)."""
    lead = max(a.ndim - core_ndim, 0)
    return np.max(np.abs(a), axis=tuple(range(lead, a.ndim))) if a.ndim > lead else np.abs(a)


def member_error(actual: np.ndarray, expected: np.ndarray, core_ndim: int,
                 tol: float, scale: float | np.ndarray = 0.0) -> tuple[float, tuple | None]:
    """Worst per-batch-member normwise relative error and that member's index.

    With ``e_m`` the member's reference, ``s_m`` its natural size
    ``max(max|e_m|, scale_m)`` (``scale`` a number or one per member)::

        error_m = max|a_m - e_m| / max(max|e_m|, FLOOR * s_m / tol)

    so ``error_m <= tol`` exactly when the difference is within ``tol`` of
    the member's own size or within ``FLOOR`` of its natural size
    (round-off; ``scale`` is the natural size of a member whose reference is
    itself zero up to round-off).  Each member is measured against its own
    sizes only: a bug in a member 1e-9 times smaller than its batch-mates
    counts as much as one in the largest.  A member with no size at all
    (reference exactly zero, no ``scale``) is compared at round-off of the
    largest natural size in the array, and absolutely if that is zero too.
    The index is None for an unbatched array.  NaN/Inf in ``actual`` gives
    inf.
    """
    if tol <= 0:
        raise ValueError(f"argument 'tol' must be > 0, got {tol!r}")
    if not np.all(np.isfinite(actual)):
        return math.inf, None
    lead = max(expected.ndim - core_ndim, 0)
    if expected.size == 0:
        return 0.0, None
    diff = _member_max(actual - expected, core_ndim)
    ref = _member_max(expected, core_ndim)
    size = np.maximum(ref, scale)
    largest = float(np.max(size))
    size = np.where(size > 0, size, largest) if largest > 0 else np.ones_like(size)
    err = np.ravel(diff / np.maximum(ref, FLOOR * size / tol))
    i = int(np.argmax(err))
    idx = np.unravel_index(i, np.shape(diff)) if lead else None
    return float(err[i]), (tuple(int(j) for j in idx) if idx is not None else None)


def _where(name: str, member: tuple | None) -> str:
    if member is None:
        return name
    return f"{name}[{', '.join(map(str, member))}]"


# --------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------

def _gradient_scale(gc: vectors.GoldenCase, spec: registry.OpSpec, k: str) -> np.ndarray:
    """Natural size of each batch member of input ``k``'s gradient:
    ``max|out_bar_m| max|out_m| / max(max|x_m|, 1)``, or the operator's own
    ``spec.gradient_scale`` where that is larger (:func:`_declared_scale`).

    A relative change ``dx/|x|`` of the input moves ``<out_bar, out>`` by at
    most about this times ``|dx|``; a gradient that is zero in exact
    arithmetic (e.g. the cost gradient of a one-column transport plan)
    comes out of any algorithm as round-off of this size, not of its own
    (zero) size.  Dividing by at least 1 keeps the floor conservative for
    small inputs.  Output members are reduced (max) onto the input's own
    batch shape, so a broadcast input's gradient, a sum over the members it
    was broadcast to, gets the largest of their sizes.
    """
    x, core = gc.inputs[k], spec.core_ndim[spec.inputs.index(k)]
    xm = _member_max(x, core)
    if gc.cotangent.size == 0 or gc.output.size == 0:
        return np.zeros(np.shape(xm))
    oc = spec.output_core_ndim
    p = _member_max(gc.cotangent, oc) * _member_max(gc.output, oc)   # output batch shape
    p = np.max(p, axis=tuple(range(np.ndim(p) - np.ndim(xm)))) if np.ndim(p) > np.ndim(xm) else p
    ones = tuple(i for i, n in enumerate(np.shape(xm)) if n == 1 and np.shape(p)[i] != 1)
    p = np.max(p, axis=ones, keepdims=True) if ones else p
    generic = np.broadcast_to(p, np.shape(xm)) / np.maximum(xm, 1.0)
    return np.maximum(generic, _declared_scale(gc, spec, k))


def _declared_scale(gc: vectors.GoldenCase, spec: registry.OpSpec, k: str) -> np.ndarray | float:
    """The operator's own natural size of input ``k``'s gradient per batch member:
    ``spec.gradient_scale`` broadcast to ``x``'s shape, max over each member's
    core dimensions; 0 where the spec declares none."""
    if spec.gradient_scale is None or gc.cotangent.size == 0:
        return 0.0
    i = spec.inputs.index(k)
    x = gc.inputs[k]
    sizes = spec.gradient_scale(dict(gc.inputs), gc.output, gc.cotangent, dict(gc.params))
    size = np.broadcast_to(np.abs(np.asarray(sizes[i], dtype=np.float64)), np.shape(x))
    return _member_max(size, spec.core_ndim[i])


def _signature_text(spec: registry.OpSpec) -> str:
    params = (", *, " + ", ".join(spec.candidate_params)) if spec.candidate_params else ""
    return f"fn({', '.join(spec.inputs)}{params}) -> {spec.output}"


def _vjp_signature_text(spec: registry.OpSpec) -> str:
    params = (", *, " + ", ".join(spec.candidate_params)) if spec.candidate_params else ""
    bars = ", ".join(f"{k}_bar" for k in spec.inputs)
    return f"vjp({', '.join(spec.inputs)}, {spec.output}_bar{params}) -> ({bars})"


def _check_signature(fn: Callable, n_args: int, params: Mapping, expected: str,
                     role: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):   # builtins without a signature: just call it
        return
    try:
        sig.bind(*([None] * n_args), **params)
    except TypeError as exc:
        raise CandidateError(f"the {role}'s signature {getattr(fn, '__name__', 'fn')}{sig} "
                             f"cannot be called as {expected}: {exc}") from None


def _to_host(fw: _Framework, x, what: str, shape: tuple) -> np.ndarray:
    if isinstance(x, (tuple, list)):
        raise CandidateError(f"{what} is a {type(x).__name__} of {len(x)}; expected a single "
                             f"{fw.array_type} (the convention returns the primary output only)")
    if not fw.is_array(x):
        raise CandidateError(f"{what} is a {type(x).__module__}.{type(x).__name__}; "
                             f"expected a {fw.array_type}")
    h = fw.host(x)
    if tuple(h.shape) != tuple(shape):
        raise CandidateError(f"{what} has shape {tuple(h.shape)}, expected {tuple(shape)}")
    if not np.all(np.isfinite(h)):
        bad = int(np.sum(~np.isfinite(h)))
        raise CandidateError(f"{what} contains NaN or Inf ({bad} of {h.size} entries)")
    return h


def _cotangents(fw: _Framework, bars, spec: registry.OpSpec, host_inputs) -> list[np.ndarray]:
    n = len(spec.inputs)
    if fw.is_array(bars) and n == 1:
        bars = (bars,)
    if not isinstance(bars, (tuple, list)):
        raise CandidateError(f"the VJP returned a {type(bars).__name__}; expected a tuple of "
                             f"{n} cotangents ({', '.join(spec.inputs)})")
    if len(bars) != n:
        raise CandidateError(f"the VJP returned {len(bars)} cotangent(s); expected {n} "
                             f"({', '.join(spec.inputs)})")
    out = []
    for k, b, h in zip(spec.inputs, bars, host_inputs):
        if b is None:
            out.append(np.zeros(h.shape))
        else:
            out.append(_to_host(fw, b, f"the cotangent of {k!r}", h.shape))
    return out


def _error_report(gc, ftol, gtol, message: str, tb: str = "", forward=None) -> CaseReport:
    return CaseReport(gc.id, gc.description, tuple(gc.flags), "ERROR", forward, None,
                      ftol, gtol, {}, "", message, tb)


def _candidate_frame(exc: BaseException) -> str:
    """'file:line in function' of the deepest frame in the user's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.abspath(__file__)
    user = [f for f in frames if os.path.abspath(f.filename) != here
            and "site-packages" not in f.filename and "dist-packages" not in f.filename
            and not f.filename.startswith("<")]
    outside = user or [f for f in frames if os.path.abspath(f.filename) != here]
    if not outside:
        return ""
    f = outside[-1]
    return f" (at {f.filename}:{f.lineno} in {f.name})"


def _call_forward(spec: registry.OpSpec, gc: vectors.GoldenCase, fn: Callable,
                  fw: _Framework, vjp: Callable | None, host_in: Sequence[np.ndarray]):
    """The candidate's forward on the case's inputs, after checking both
    signatures: ``(params, args, out, ctx, out_h)`` with the keyword
    parameters and inputs in the framework's arrays, its output, the
    framework's autodiff context and the output on the host.  Exceptions
    of the candidate propagate (:func:`_call`)."""
    params = {k: fw.inputs([v], requires_grad=False)[0] if isinstance(v, np.ndarray) else v
              for k, v in dict(gc.candidate_kwargs).items()}
    _check_signature(fn, len(host_in), params, _signature_text(spec), "candidate")
    if vjp is not None:
        _check_signature(vjp, len(host_in) + 1, params, _vjp_signature_text(spec), "vjp")
    args = fw.inputs(host_in, requires_grad=vjp is None)
    out, ctx = _call(fw.forward, fn, args, params)
    out_h = _to_host(fw, out, f"the output {spec.output!r}", gc.output.shape)
    return params, args, out, ctx, out_h


# --------------------------------------------------------------------------
# Unbatched candidates (``unbatched=True``, CLI ``--unbatched``)
# --------------------------------------------------------------------------

def _batch_shape(shapes: Sequence[tuple], core: Sequence[int]) -> tuple:
    """The broadcast batch shape of inputs with these shapes and core ranks."""
    return tuple(np.broadcast_shapes(*[tuple(s)[:len(s) - c] for s, c in zip(shapes, core)]))


def _member_index(shape: tuple, core: int, batch: tuple, m: tuple) -> tuple:
    """The index of batch member ``m`` (an index into ``batch``) in an array of
    ``shape`` whose leading dimensions broadcast against ``batch``: its batch
    dimensions align with ``batch``'s trailing ones, and a dimension of size
    1 is shared (index 0) by every member."""
    lead = len(shape) - core
    m = m[len(batch) - lead:]
    return tuple(0 if shape[j] == 1 else m[j] for j in range(lead))


def _unbatched_forward(spec: registry.OpSpec, fw: _Framework, fn: Callable) -> Callable:
    """``fn`` applied per batch member: ``out[m] = fn(x_1[m], ..., x_n[m], **params)``
    for every member ``m`` of the inputs' broadcast batch, stacked with the
    framework's own ``stack`` (so its autodiff differentiates through the
    loop and sums the cotangents of a broadcast input over the members that
    share it).  Parameters are passed unchanged."""
    @functools.wraps(fn)
    def per_member(*xs, **params):
        batch = _batch_shape([tuple(x.shape) for x in xs], spec.core_ndim)
        outs = [fn(*[x[_member_index(tuple(x.shape), c, batch, m)]
                     for x, c in zip(xs, spec.core_ndim)], **params)
                for m in np.ndindex(*batch)]
        if not batch:
            return outs[0]
        for o in outs:
            if isinstance(o, (tuple, list)) or not hasattr(o, "shape"):
                return o            # _to_host names the convention that was broken
        core = tuple(outs[0].shape)
        if any(tuple(o.shape) != core for o in outs):
            raise CandidateError("the batch members' outputs differ in shape: "
                                 + ", ".join(str(tuple(o.shape)) for o in outs[:4]))
        return fw.stack(outs, batch + core)
    return per_member


def _unbatched_vjp(spec: registry.OpSpec, fw: _Framework, vjp: Callable) -> Callable:
    """``vjp`` applied per batch member, the cotangents of each input summed
    over the members that share its entries (a broadcast input's cotangent
    is the sum of its members' cotangents, ``x_bar[i] = sum_{m -> i}
    vjp_m(...)_x``); returned as the framework's arrays."""
    @functools.wraps(vjp)
    def per_member(*xs_and_bar, **params):
        xs, out_bar = xs_and_bar[:-1], xs_and_bar[-1]
        shapes = [tuple(x.shape) for x in xs]
        batch = _batch_shape(shapes, spec.core_ndim)
        totals = [np.zeros(s) for s in shapes]
        for m in np.ndindex(*batch):
            idx = [_member_index(s, c, batch, m) for s, c in zip(shapes, spec.core_ndim)]
            bars = vjp(*[x[i] for x, i in zip(xs, idx)], out_bar[m], **params)
            if fw.is_array(bars) and len(xs) == 1:
                bars = (bars,)
            if not isinstance(bars, (tuple, list)) or len(bars) != len(xs):
                return bars         # _cotangents names the convention that was broken
            for t, b, i, k, s in zip(totals, bars, idx, spec.inputs, shapes):
                if b is not None:
                    what = f"the cotangent of {k!r} of batch member {m}"
                    t[i] += _to_host(fw, b, what, s[len(i):])
        return tuple(fw.inputs(totals, requires_grad=False))
    return per_member


def _unbatch(spec: registry.OpSpec, fw: _Framework, fn: Callable,
             vjp: Callable | None) -> tuple[Callable, Callable | None]:
    """The candidate (and its VJP) called once per batch member."""
    return (_unbatched_forward(spec, fw, fn),
            None if vjp is None else _unbatched_vjp(spec, fw, vjp))


@dataclass
class _CandidateRun:
    """What the candidate's forward and VJP gave on one case (host arrays)."""

    params: dict                  # the keyword parameters, as passed to the candidate
    out: Any                      # its output, in its framework (for the dtype note)
    out_h: np.ndarray             # that output on the host
    fwd_err: float                # the forward's worst per-member error ...
    fwd_member: tuple | None      # ... and that member
    moved: list[str]              # what it modified in place


def _moved_inputs(spec: registry.OpSpec, gc: vectors.GoldenCase, fw: _Framework, args,
                  vargs, out_bar, host_in: Sequence[np.ndarray]) -> list[str]:
    """What the candidate modified in place: its forward's inputs, its VJP's
    inputs and output cotangent."""
    moved = [k for k, a, h in zip(spec.inputs, args, host_in)
             if not np.array_equal(fw.host(a), h)]
    moved += [f"{k} (in the vjp)" for k, a, h in zip(spec.inputs, vargs, host_in)
              if not np.array_equal(fw.host(a), h)]
    if out_bar is not None and not np.array_equal(fw.host(out_bar), gc.cotangent):
        moved.append(f"{spec.output}_bar (in the vjp)")
    return moved


def _candidate_error(exc: Exception, stage: str, gc: vectors.GoldenCase, ftol: float,
                     gtol: float, fwd_err: float | None) -> CaseReport:
    """The ERROR report of ``exc``, raised while the candidate's ``stage`` ran or
    its result was checked (call it while handling ``exc``: it may take the
    traceback)."""
    if isinstance(exc, CandidateError):
        return _error_report(gc, ftol, gtol, f"{stage}: {exc}", forward=fwd_err)
    if isinstance(exc, _Raised):
        inner = exc.exc
        if isinstance(inner, CandidateError):   # raised by pullback's own checks
            return _error_report(gc, ftol, gtol, f"{stage}: {inner}", forward=fwd_err)
        return _error_report(gc, ftol, gtol,
                             f"{stage}: the candidate raised {_exception_text(inner)}"
                             f"{_candidate_frame(inner)}", exc.tb, forward=fwd_err)
    # e.g. converting an exotic output object
    return _error_report(gc, ftol, gtol,
                         f"{stage}: checking the candidate's result failed: "
                         f"{_exception_text(exc)}", traceback.format_exc(),
                         forward=fwd_err)


def _gradient_errors(spec: registry.OpSpec, gc: vectors.GoldenCase, mine: Sequence,
                     ref: Sequence, gtol: float) -> tuple[dict[str, float], dict[str, str]]:
    """Each input's worst per-member gradient error, and where (``A[0]``) it is."""
    errors, where = {}, {}
    for k, c, a, e in zip(spec.inputs, spec.core_ndim, mine, ref):
        a = np.asarray(a, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        errors[k], member = member_error(a, e, c, gtol, _gradient_scale(gc, spec, k))
        where[k] = _where(k, member)
    return errors, where


def _case_problems(spec: registry.OpSpec, run: _CandidateRun, errors: dict[str, float],
                   where: dict[str, str], bad: list[str], ftol: float,
                   gtol: float) -> list[str]:
    """The report's lines on what is wrong with the case (and a dtype note)."""
    problems = []
    if not run.fwd_err <= ftol:
        problems.append(f"forward error {run.fwd_err:.1e} > {ftol:.1e} at "
                        f"{_where(spec.output, run.fwd_member)}")
    if bad:
        problems.append("gradient errors: " + ", ".join(
            f"{where[k]} {errors[k]:.1e}" for k in spec.inputs) + f" (tol {gtol:.1e})")
    if run.moved:
        problems.append(f"the candidate modified its input(s) {', '.join(run.moved)} in place")
    out = run.out
    if getattr(out, "dtype", None) is not None and "float64" not in str(out.dtype):
        problems.append(f"note: the output has dtype {out.dtype}; the inputs were float64")
    return problems


def _case_diagnostics(spec: registry.OpSpec, gc: vectors.GoldenCase, run: _CandidateRun,
                      mine: Sequence, ref: Sequence, bad: list[str], ftol: float) -> list:
    """The worst entries of the failing output and gradients (:func:`_diagnose`)."""
    diagnostics = []
    if not run.fwd_err <= ftol:
        diagnostics.append(_diagnose(f"output {spec.output}", run.out_h, gc.output,
                                     spec.output_core_ndim, gc))
    for k, c, a, e in zip(spec.inputs, spec.core_ndim, mine, ref):
        if k in bad:
            diagnostics.append(_diagnose(f"gradient {k}", np.asarray(a, dtype=np.float64),
                                         np.asarray(e, dtype=np.float64), c, gc))
    return diagnostics


def _run_case(spec: registry.OpSpec, gc: vectors.GoldenCase, fn: Callable,
              fw: _Framework, vjp: Callable | None, ftol: float, gtol: float,
              keep: dict | None = None) -> CaseReport:
    """Run and compare one case.  ``keep``, when a dict, receives the candidate's
    host output (``candidate.output.<out>``) and canonicalised cotangents
    (``candidate.vjp.<input>``), for ``--dump``.

    The candidate is called from here (through :func:`_call_forward` and
    :func:`_call`), so the stack a crash inside it leaves in the captured
    output is as shallow as it can be."""
    host_in = [gc.inputs[k] for k in spec.inputs]
    stage, fwd_err = "forward", None
    try:
        params, args, out, ctx, out_h = _call_forward(spec, gc, fn, fw, vjp, host_in)
        if keep is not None:
            keep[f"candidate.output.{spec.output}"] = out_h
        fwd_err, fwd_member = member_error(out_h, gc.output, spec.output_core_ndim, ftol)

        stage = "vjp" if vjp is not None else f"{fw.name} autodiff"
        vargs = fw.inputs(host_in, requires_grad=False) if vjp is not None else []
        out_bar = fw.like(gc.cotangent, out) if vjp is not None else None
        bars = (_call(vjp, *vargs, out_bar, **params) if vjp is not None
                else _call(fw.pullback, ctx, args, out, gc.cotangent))
        mine: Sequence[np.ndarray] = _cotangents(fw, bars, spec, host_in)
        moved = _moved_inputs(spec, gc, fw, args, vargs, out_bar, host_in)
    except Exception as exc:
        return _candidate_error(exc, stage, gc, ftol, gtol, fwd_err)
    run = _CandidateRun(params, out, out_h, fwd_err, fwd_member, moved)

    try:
        mine = registry._canon(spec, mine)
        ref = registry._canon(spec, [gc.vjp[k] for k in spec.inputs])
    except Exception as exc:
        return _error_report(gc, ftol, gtol, f"canonicalising the gradients failed: "
                             f"{type(exc).__name__}: {exc}", traceback.format_exc(), fwd_err)
    if keep is not None:
        keep.update({f"candidate.vjp.{k}": np.asarray(a, dtype=np.float64)
                     for k, a in zip(spec.inputs, mine)})
    errors, where = _gradient_errors(spec, gc, mine, ref, gtol)
    worst_input = max(errors, key=lambda k: errors[k])
    bad = [k for k in spec.inputs if not errors[k] <= gtol]
    problems = _case_problems(spec, run, errors, where, bad, ftol, gtol)
    failed = bool(bad or moved or not fwd_err <= ftol)
    verdict, note = _reference_verdict(spec, gc, fn, fw, params, out_h, mine,
                                       not fwd_err <= ftol, bool(bad), gtol)
    problems += [note] if note else []
    diagnostics = _case_diagnostics(spec, gc, run, mine, ref, bad, ftol)
    return CaseReport(gc.id, gc.description, tuple(gc.flags), "FAIL" if failed else "pass",
                      fwd_err, errors[worst_input],
                      ftol, gtol, errors, where[worst_input], "\n".join(problems),
                      verdict=verdict, diagnostics=tuple(diagnostics))


# --------------------------------------------------------------------------
# Against the candidate's own forward (``against="self"``)
# --------------------------------------------------------------------------

#: Richardson levels of the directional differences (steps h, h/2, h/4).
SELF_LEVELS = 3
#: Random joint directions per case (and per batch member of a batched case).
SELF_DIRECTIONS = 3
#: A difference whose finite-difference error estimate exceeds this fraction
#: of the derivative's size cannot certify the gradient: "inconclusive".
SELF_INCONCLUSIVE = 1e-2
#: Batches with at most this many members are also checked member by member.
SELF_MAX_MEMBERS = 8


@dataclass(frozen=True)
class SelfCheck:
    """One directional comparison of a VJP with differences of its own forward.

    ``fd = <out_bar, D>`` (``D`` the Richardson-extrapolated central
    difference of the forward along ``d``), ``vjp = <x_bar, d>``;
    ``error = |fd - vjp| / max(size, FLOOR * natural / tol)`` with ``size =
    sum|out_bar * D| + sum|x_bar * d|``; ``tol`` is the requested tolerance
    widened to the difference's own error estimate, ``fd_error`` (Richardson
    difference plus evaluation noise, 4 and 2 times, relative to the same
    denominator).
    """

    where: str
    fd: float
    vjp: float
    error: float
    tol: float
    fd_error: float
    inconclusive: bool

    @property
    def passed(self) -> bool:
        return self.error <= self.tol


def _richardson(central: Callable[[float], np.ndarray], h: float,
                levels: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Richardson table ``R[j][i]`` of ``central(h / 2^j)``, ``j < levels``: the
    extrapolated value ``R[L-1][L-1]`` (error ``O(h^(2L))`` for a smooth
    function) and the two values it is compared with to estimate its error,
    ``R[L-1][L-2]`` (same step, one extrapolation less) and ``R[L-2][L-2]``
    (the previous step's best); for a forward that is not smooth at the
    scale of the steps these disagree, where a single comparison may agree
    by chance."""
    table: list[list[np.ndarray]] = []
    for j in range(levels):
        row = [central(h / 2.0 ** j)]
        for i in range(1, j + 1):
            c = 4.0 ** i - 1.0                   # central differences: error in h^2, h^4, ...
            row.append(row[i - 1] + (row[i - 1] - table[j - 1][i - 1]) / c)
        table.append(row)
    best = table[-1][-1]
    return best, ([table[-1][-2], table[-2][-1]] if levels > 1 else [best])


def _own_forward(fw: _Framework, fn: Callable, params: Mapping,
                 shape: tuple) -> Callable[..., np.ndarray]:
    """The candidate's forward as a host float64 function (for finite differences)."""
    def f(*host):
        out = _call(fn, *fw.inputs(list(host), requires_grad=False), **params)
        return _to_host(fw, out, "the output at a perturbed input", shape)
    return f


def _self_directions(spec: registry.OpSpec, gc: vectors.GoldenCase, rng: np.random.Generator
                     ) -> list[tuple[str, list[np.ndarray], tuple | None]]:
    """``(label, one direction per input, batch member or None)``:
    ``SELF_DIRECTIONS`` joint draws of
    the spec's feasible directions (symmetric for SPD inputs, mass-balanced for
    Sinkhorn's marginals) over the whole batch, then, when every input carries
    the full batch shape (no broadcasting) and there are at most
    ``SELF_MAX_MEMBERS`` members, the same number per member (zero elsewhere),
    so a wrong gradient in a member 1e-9 times smaller than its batch-mates is
    not drowned out."""
    host = {k: gc.inputs[k] for k in spec.inputs}
    out: list[tuple[str, list[np.ndarray], tuple | None]] = []

    def draw():
        u = (spec.tangents(rng, host) if spec.tangents is not None
             else tuple(registry.scaled_normal(rng, host[k], c)
                        for k, c in zip(spec.inputs, spec.core_ndim)))
        return [np.zeros(host[k].shape) if t is None else np.asarray(t, dtype=np.float64)
                for k, t in zip(spec.inputs, u)]

    for j in range(SELF_DIRECTIONS):
        out.append((f"direction {j}", draw(), None))
    batch = registry._batch_shape(spec, host)
    full = all(host[k].shape[: host[k].ndim - c] == batch
               for k, c in zip(spec.inputs, spec.core_ndim))
    if batch and full and math.prod(batch) <= SELF_MAX_MEMBERS:
        for m in np.ndindex(*batch):
            for j in range(SELF_DIRECTIONS):
                d = []
                for t in draw():
                    masked = np.zeros_like(t)
                    masked[m] = t[m]
                    d.append(masked)
                out.append((f"member [{', '.join(map(str, m))}] direction {j}", d, m))
    return out


def _self_step(host: Sequence[np.ndarray], d: Sequence[np.ndarray], rel_step: float) -> float:
    """``h`` such that no input moves by more than ``rel_step`` times the size of
    the entries it perturbs (of the member, for a member's direction)."""
    h = math.inf
    for x, t in zip(host, d):
        dmax = float(np.max(np.abs(t))) if t.size else 0.0
        if dmax == 0.0:
            continue
        xmax = float(np.max(np.abs(np.where(t != 0, x, 0.0))))
        h = min(h, rel_step * (xmax if xmax > 0 else 1.0) / dmax)
    return h if math.isfinite(h) else rel_step


def self_consistency(f: Callable[..., np.ndarray], spec: registry.OpSpec,
                     gc: vectors.GoldenCase, out: np.ndarray, bars: Sequence[np.ndarray],
                     tol: float, *, rel_step: float | None = None,
                     levels: int = SELF_LEVELS) -> list[SelfCheck]:
    """Compare a candidate's VJP ``bars`` with finite differences of its own forward.

    For each direction ``d`` of :func:`_self_directions` (one per input),
    the cotangent-weighted directional derivative of the forward ``f``,

        fd  = <out_bar, (f(x + h d) - f(x - h d)) / 2h>   (Richardson, h, h/2, h/4)

    is compared with ``vjp = <x_bar, d>`` (summed over the inputs).  The
    finite difference carries its own error: ``E = max(|R[L-1][L-1] -
    R[L-1][L-2]|, |R[L-1][L-1] - R[L-2][L-2]|)`` from the Richardson table
    (truncation, and any
    non-smoothness of the forward: iteration counts that change with
    ``x``, tolerance-based stopping) plus the evaluation noise ``FLOOR
    sum|out_bar * out| / h_min`` of a forward accurate to ``FLOOR``.  The
    check passes when::

        |fd - vjp| <= max(tol * size, 4 E + 2 noise, FLOOR * natural)

    with ``size = sum|out_bar * D| + sum|x_bar * d|`` and ``natural =
    sum_i nat_i |d_i|`` (the round-off scale of ``validate``'s gradient
    comparison, computed with the candidate's own output).  A direction
    whose ``4 E + 2 noise`` exceeds ``SELF_INCONCLUSIVE * size`` (and the
    round-off term) is inconclusive if it passes: the differences resolve
    the derivative to less than 1% there, so they certify nothing.  (Only
    when the Richardson disagreement ``E`` also exceeds twice the noise
    term: a derivative far below the round-off of the output, such as a
    near-hard SOFT top-k row's, is limited by round-off like every other
    comparison of ``validate``, not by a non-smooth forward.)

    ``f`` maps host float64 inputs to the host output; ``out`` is ``f`` at
    the case's inputs; ``bars`` are the candidate's cotangents for the case's
    cotangent ``gc.cotangent``.  The directions come from a generator seeded
    by the case, so a report is reproducible.
    """
    host = [np.asarray(gc.inputs[k], dtype=np.float64) for k in spec.inputs]
    v = np.asarray(gc.cotangent, dtype=np.float64)
    if rel_step is None:
        try:
            rel_step = spec.case(gc.id).fd_step
        except KeyError:
            rel_step = DEFAULT_FD_STEP
    own = dataclasses.replace(gc, output=np.asarray(out, dtype=np.float64))
    natural = [np.asarray(_gradient_scale(own, spec, k)) for k in spec.inputs]
    rng = np.random.default_rng([int(gc.seed), 0x5E1F])
    checks = []
    for label, d, member in _self_directions(spec, gc, rng):
        h = _self_step(host, d, rel_step)
        # the output entries a direction moves: its member's, or all of them
        moved = np.abs(v * out) if member is None else np.abs(v[member] * out[member])

        def central(hk, d=d):
            fp = f(*(x + hk * t for x, t in zip(host, d)))
            fm = f(*(x - hk * t for x, t in zip(host, d)))
            return v * (fp - fm) / (2.0 * hk)

        best, others = _richardson(central, h, levels)
        fd = float(np.sum(best))
        est = max(abs(fd - float(np.sum(o))) for o in others)
        noise = FLOOR * float(np.sum(moved)) / (h / 2.0 ** (levels - 1))
        vjp = float(sum(np.sum(b * t) for b, t in zip(bars, d)))
        size = float(np.sum(np.abs(best))) + float(sum(np.sum(np.abs(b * t))
                                                        for b, t in zip(bars, d)))
        nat = 0.0
        for n, t, c in zip(natural, d, spec.core_ndim):
            lead = t.ndim - c
            per = np.sum(np.abs(t), axis=tuple(range(lead, t.ndim))) if t.ndim else np.abs(t)
            nat += float(np.sum(np.broadcast_to(n, np.shape(per)) * per))
        denom = max(size, FLOOR * nat / tol)
        fd_err = 4.0 * est + 2.0 * noise
        error = abs(fd - vjp) / denom if denom > 0 else 0.0
        eff = max(tol, fd_err / denom) if denom > 0 else tol
        # the differences do not settle, and not for round-off: a forward that is
        # not smooth in x at the scale of the steps
        inconclusive = (4.0 * est > SELF_INCONCLUSIVE * size and 4.0 * est > FLOOR * nat
                        and est > 2.0 * noise)
        checks.append(SelfCheck(label, fd, vjp, error, eff,
                                fd_err / denom if denom > 0 else 0.0, inconclusive))
    return checks


def _self_verdict(checks: Sequence[SelfCheck]) -> tuple[str, SelfCheck, str]:
    """``("consistent" | "inconsistent" | "inconclusive", worst check, message)``."""
    worst = max(checks, key=lambda c: c.error / c.tol)
    bad = sorted((c for c in checks if not c.passed), key=lambda c: -c.error / c.tol)
    if bad:                                   # the worst three first
        lines = [f"{c.where}: <out_bar, FD> = {c.fd:.9e} but <vjp, d> = {c.vjp:.9e} "
                 f"(relative difference {c.error:.1e} > tol {c.tol:.1e}; FD error estimate "
                 f"{c.fd_error:.1e})" for c in bad[:3]]
        if len(bad) > 3:
            lines.append(f"... and {len(bad) - 3} more")
        return "inconsistent", worst, (f"the VJP is not the derivative of the candidate's own "
                                       f"forward in {len(bad)} of {len(checks)} directions:\n"
                                       + "\n".join(lines))
    vague = [c for c in checks if c.inconclusive]
    if vague:
        c = max(vague, key=lambda c: c.fd_error)
        return "inconclusive", worst, (
            f"finite differences of the candidate's own forward resolve the derivative only "
            f"to {c.fd_error:.1e} ({c.where}): is the forward smooth (no tolerance-based "
            f"stopping, no branch that changes with x)?")
    return "consistent", worst, ""


def _reference_verdict(spec: registry.OpSpec, gc: vectors.GoldenCase, fn: Callable,
                       fw: _Framework, params: Mapping, out: np.ndarray,
                       bars: Sequence[np.ndarray], forward_off: bool, gradient_off: bool,
                       gtol: float) -> tuple[str, str]:
    """What is off in a case compared with the reference, and, when the forward
    is, whether the gradient is the derivative of the candidate's own forward
    (an approximate forward with a consistent backward, versus a wrong
    backward): ``(verdict, message line)``."""
    if not forward_off:
        return ("gradient off" if gradient_off else ""), ""
    what = "forward and gradient off" if gradient_off else "forward off"
    if spec.surrogate:
        return what, ""
    try:
        checks = self_consistency(_own_forward(fw, fn, params, gc.output.shape), spec, gc,
                                  out, bars, gtol)
    except Exception as exc:    # reported, never raised: the comparison itself stands
        raw = exc.exc if isinstance(exc, _Raised) else exc
        return what, (f"finite differences of the candidate's own forward failed: "
                      f"{type(raw).__name__}: {raw}")
    verdict, worst, message = _self_verdict(checks)
    if verdict == "consistent":
        note = (f"the gradient is the derivative of the candidate's own forward (worst of "
                f"{len(checks)} directions: {worst.error:.1e}, tol {worst.tol:.1e}): the "
                f"forward, not the backward, departs from the reference")
        return f"{what}; gradient consistent with own forward", note
    if verdict == "inconsistent":
        return f"{what}; gradient not the derivative of own forward", message
    return f"{what}; own-forward check inconclusive", message


def _run_case_self(spec: registry.OpSpec, gc: vectors.GoldenCase, fn: Callable,
                   fw: _Framework, vjp: Callable | None, gtol: float,
                   ftol: float) -> CaseReport:
    """One case of ``against="self"``: the candidate's VJP against finite
    differences of its own forward (:func:`self_consistency`); no reference
    number is used except the case's inputs and cotangent."""
    host_in = [gc.inputs[k] for k in spec.inputs]
    stage = "forward"
    try:
        params, args, out, ctx, out_h = _call_forward(spec, gc, fn, fw, vjp, host_in)
        stage = "vjp" if vjp is not None else f"{fw.name} autodiff"
        vargs = fw.inputs(host_in, requires_grad=False) if vjp is not None else []
        if vjp is not None:
            bars = _call(vjp, *vargs, fw.like(gc.cotangent, out), **params)
        else:
            bars = _call(fw.pullback, ctx, args, out, gc.cotangent)
        mine = _cotangents(fw, bars, spec, host_in)
        moved = [k for k, a, h in zip(spec.inputs, [*args, *vargs], host_in * 2)
                 if not np.array_equal(fw.host(a), h)]
        stage = "finite differences of the candidate's forward"
        checks = self_consistency(_own_forward(fw, fn, params, gc.output.shape), spec, gc,
                                  out_h, mine, gtol)
    except CandidateError as exc:
        return _error_report(gc, ftol, gtol, f"{stage}: {exc}")
    except _Raised as raised:
        err = raised.exc
        if isinstance(err, CandidateError):
            return _error_report(gc, ftol, gtol, f"{stage}: {err}")
        return _error_report(gc, ftol, gtol, f"{stage}: the candidate raised "
                             f"{_exception_text(err)}{_candidate_frame(err)}", raised.tb)
    except Exception as exc:
        return _error_report(gc, ftol, gtol, f"{stage}: {type(exc).__name__}: {exc}",
                             traceback.format_exc())
    verdict, worst, message = _self_verdict(checks)
    status = {"consistent": "pass", "inconsistent": "FAIL", "inconclusive": "ERROR"}[verdict]
    if moved:
        status = "FAIL"
        changed = f"the candidate modified its input(s) {', '.join(sorted(set(moved)))} in place"
        message = "\n".join(filter(None, [message, changed]))
    verdict_text = {"consistent": "gradient consistent with own forward",
                    "inconsistent": "gradient not the derivative of own forward",
                    "inconclusive": "inconclusive (forward not smooth enough)"}[verdict]
    return CaseReport(gc.id, gc.description, tuple(gc.flags), status, None, worst.error,
                      ftol, worst.tol, {}, worst.where, message, verdict=verdict_text)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------

def _name_of(obj) -> str:
    if isinstance(obj, str):
        return obj
    mod = getattr(obj, "__module__", None) or ""
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{mod}:{qual}" if mod else qual


def _check_arguments(spec: registry.OpSpec, *, against: str, rtol, forward_rtol,
                     gradient: str | None, vectors_dir, unbatched) -> tuple[registry.OpSpec,
                                                                            str | None]:
    """Check the arguments that need no candidate; return the spec whose
    ``vjp`` is the reference gradient (``spec``, or the one ``gradient`` names)
    and that gradient's name."""
    op_name = spec.name
    if against not in AGAINST:
        raise ValueError(f"argument 'against' must be one of {', '.join(AGAINST)}, "
                         f"got {against!r}")
    if against == "self" and spec.surrogate:
        raise ValueError(f"argument 'against': {op_name} has a surrogate backward, not the "
                         f"derivative of its forward, so it cannot be judged against finite "
                         f"differences of its own forward; use against='reference'")
    _check_tolerance("rtol", rtol)
    _check_tolerance("forward_rtol", forward_rtol)
    ref_spec, gname = spec, None
    if gradient is not None:
        gname, goptions = parse_gradient(spec, gradient)
        if vectors_dir is not None:
            raise ValueError("argument 'gradient' cannot be combined with 'vectors_dir': golden "
                             "vectors hold the operator's default gradient")
        if against == "self":
            raise ValueError("argument 'gradient' selects a reference gradient; against='self' "
                             "uses none")
        ref_spec = _gradient_spec(spec, gname, goptions)
    if not isinstance(unbatched, bool):
        raise TypeError(f"argument 'unbatched' must be a bool, got {type(unbatched).__name__}")
    return ref_spec, gname


def _load_candidate(spec: registry.OpSpec, candidate: Callable | str,
                    vjp: Callable | str | None, framework: str, isolate: bool):
    """``(fw, fn, vjp_fn)``: the framework, candidate and VJP to call in process,
    or ``(None, None, vjp)`` for an isolated run (TARGETs checked, not imported)."""
    fw: _Framework | None
    fn: Callable | None
    vjp_fn: Callable | str | None
    if isolate:
        fw, fn, vjp_fn = None, None, vjp
        _check_isolatable(spec, candidate, vjp, framework)
    else:
        fw = _framework(framework)
        fn = load_target(candidate) if isinstance(candidate, str) else candidate
        if not callable(fn):
            raise TypeError(f"argument 'candidate' must be callable, got {type(fn).__name__}")
        vjp_fn = load_target(vjp, what="--vjp TARGET") if isinstance(vjp, str) else vjp
        if vjp_fn is not None and not callable(vjp_fn):
            raise TypeError(f"argument 'vjp' must be callable, got {type(vjp_fn).__name__}")
    if framework == "numpy" and vjp_fn is None:
        raise ValueError("framework 'numpy' has no autodiff: pass the candidate's VJP as "
                         f"vjp= (--vjp TARGET), called as {_vjp_signature_text(spec)}")
    return fw, fn, vjp_fn


def _wanted_ids(spec: registry.OpSpec, cases: Iterable[str] | None,
                exclude: Iterable[str] | None) -> list[str] | None:
    """The case ids to run (None: all), after checking every given id exists."""
    wanted = list(cases) if cases is not None else None
    if wanted is not None:
        for cid in wanted:
            spec.case(cid)  # KeyError listing the known ids
    excluded = set(exclude) if exclude is not None else set()
    for cid in excluded:
        spec.case(cid)      # KeyError listing the known ids
    if excluded:
        wanted = [c.id for c in spec.cases
                  if c.id not in excluded and (wanted is None or c.id in wanted)]
    return wanted


def _golden_cases(spec: registry.OpSpec, ref_spec: registry.OpSpec,
                  wanted: list[str] | None, vectors_dir) -> list[Any]:
    """The wanted float64 cases with their reference numbers, from golden
    vectors or computed with ``ref_spec`` (a case not meant for candidates
    stays a registry Case, to be dropped)."""
    op_name = spec.name
    if vectors_dir is not None:
        gv = vectors.load(vectors_dir)
        entry = gv.operator(op_name)
        names = [i["name"] for i in entry["inputs"]]
        if names != list(spec.inputs):
            raise ValueError(f"{vectors_dir}: operator {op_name!r} has inputs {names} there "
                             f"but {list(spec.inputs)} in this refimpl")
        golden = gv.cases_of(op_name, "float64")
        if wanted is not None:
            golden = [g for g in golden if g.id in wanted]
        return golden
    selected = [c for c in spec.cases
                if "float64" in c.dtypes and (wanted is None or c.id in wanted)]
    return [vectors.reference_case(ref_spec, c, "float64") if c.for_candidates else c
            for c in selected]


def _candidate_cases(golden: list[Any], op_name: str) -> tuple[list[Any], list[str]]:
    """``golden`` without the cases not meant for candidates, and a note naming them;
    ValueError when none is left."""
    notes = []
    skipped = [g.id for g in golden if not g.for_candidates]
    if skipped:
        notes.append(f"skipped {len(skipped)} case(s) not meant for candidates (an "
                     f"approximant reference, or a variant selected by a parameter "
                     f"candidates do not receive): {', '.join(skipped)}")
        golden = [g for g in golden if g.for_candidates]
    if not golden:
        raise ValueError(f"no case of {op_name!r} to validate against"
                         + (f" ({notes[0]})" if notes else ""))
    return golden, notes


def _operator_notes(spec: registry.OpSpec, framework: str) -> list[str]:
    """Notes on how to read the report for this operator and framework."""
    notes = []
    if spec.surrogate:
        notes.append(f"{spec.name} has a surrogate backward, not the derivative of its "
                     "forward: the gradient column compares your VJP with refimpl's "
                     "surrogate gradient (its defining formula, see the registry entry), so "
                     "the candidate must implement that surrogate (e.g. a custom backward); "
                     "plain autodiff through a piecewise-constant forward gives zero "
                     "gradients and fails")
    if framework == "jax":
        notes.append("JAX runs with jax_enable_x64 switched on for the validation")
    return notes


def _case_jobs(golden: list[Any], rtol: float | None,
               forward_rtol: float | None) -> list[tuple]:
    """``(case, forward tolerance, gradient tolerance)`` of each case."""
    jobs = []
    for gc in golden:
        # An exact reference (tolerance 0, e.g. a surrogate gradient's defining
        # formula) still allows a foreign implementation FLOOR of round-off.
        ftol = max(forward_rtol if forward_rtol is not None
                   else float(gc.tolerance["forward"]), FLOOR)
        gtol = max(rtol if rtol is not None else float(gc.tolerance["fd"]), FLOOR)
        jobs.append((gc, ftol, gtol))
    return jobs


def _gradient_source(spec: registry.OpSpec, vjp, vjp_fn, framework: str, against: str,
                     gradient: str | None, gname: str | None,
                     unbatched: bool) -> tuple[str, list[str]]:
    """Where the candidate's gradient came from and what it was compared with
    (the report's header), and the notes explaining that choice."""
    notes = []
    source = f"vjp {_name_of(vjp)}" if vjp_fn is not None else {
        "torch": "torch.autograd.grad", "jax": "jax.vjp"}[framework]
    if against == "self":
        source += " against finite differences of the candidate's own forward"
        notes.append("against self: the forward is not compared with the reference; the "
                     "gradient column is |<out_bar, FD> - <vjp, d>| relative to the size of "
                     "the terms, over random feasible directions d (whole batch and per "
                     "member), and its tol is widened to the differences' own error estimate")
    if gradient is not None:
        assert gname is not None
        source += f", compared with the {gradient!r} gradient"
        notes.append(f"gradient {gradient!r}: the reference gradient is "
                     f"{spec.gradients[gname].description}")
    if unbatched:
        source += ", called once per batch member"
        notes.append("unbatched: the candidate was called once per batch member and its "
                     "outputs stacked; a broadcast input's cotangent is the sum over the "
                     "members sharing it")
    return source, notes


def validate(op_name: str | registry.OpSpec, candidate: Callable | str, *, framework: str,
             vjp: Callable | str | None = None, cases: Iterable[str] | None = None,
             rtol: float | None = None, forward_rtol: float | None = None,
             vectors_dir: str | os.PathLike | None = None,
             against: str = "reference", unbatched: bool = False,
             gradient: str | None = None,
             exclude: Iterable[str] | None = None, isolate: bool | None = None,
             timeout: float | None = None,
             dump_dir: str | os.PathLike | None = None) -> ValidationReport:
    """Run ``candidate`` on every case of ``op_name`` and compare with the reference.

    Parameters
    ----------
    op_name : a registered operator (``refimpl.registry.all_specs()``), or an
        :class:`~refimpl.registry.OpSpec` (e.g. one under development).
    candidate : the function under test, or a TARGET string
        (``module:function`` / ``path.py:function``), following the calling
        convention ``fn(*inputs, **candidate_params) -> output``.
    framework : ``"torch"``, ``"jax"`` or ``"numpy"``: the arrays the
        candidate receives and returns, and whose autodiff gives its VJP.
    vjp : the candidate's own VJP (or a TARGET),
        ``vjp(*inputs, out_bar, **params) -> tuple of cotangents``; required
        for NumPy, optional for torch/jax (it replaces their autodiff).
    cases : only these case ids (default: all).
    rtol, forward_rtol : override the per-case gradient (``fd``) and
        forward tolerances; finite, in ``(0, 1)``.
    vectors_dir : take the reference numbers from a golden-vector export
        (``refimpl export``) instead of computing them.
    against : ``"reference"`` (default): compare the forward and the VJP
        with refimpl's reference.  ``"self"``: judge the VJP against finite
        differences of the candidate's *own* forward
        (:func:`self_consistency`), for approximate-by-design code (Padé or
        Taylor forwards, fixed iteration counts) whose forward is not meant
        to match the reference; only the cases' inputs and cotangents are
        used, the forward is not compared, and ``rtol`` (default: the case's
        ``fd`` tolerance) is widened per direction to the differences' own
        error estimate.  Not for surrogate gradients (not derivatives).
    unbatched : call the candidate once per batch member, for code written
        for one problem at a time: each input is sliced along its leading
        (batch) dimensions, a broadcast input (size-1 or missing batch
        dimensions) giving every member the same slice, the parameters are
        passed unchanged, and the outputs are stacked to the batch's shape.
        The VJP is the framework's autodiff through that loop, or ``vjp``
        called per member with the member's ``out_bar``, the cotangents of a
        broadcast input summed over the members sharing it.
    gradient : ``"NAME[:key=value,...]"``, one of the operator's named
        gradients (``OpSpec.gradients``, e.g. ``"jfb"`` or
        ``"neumann:k=5,lam=0.5"`` for ``tanh_deq``): the reference gradient
        the candidate's VJP is compared with (default: the operator's own
        ``vjp``).  Not with ``vectors_dir`` (golden vectors hold the default
        gradient) nor ``against="self"``.
    exclude : leave out these case ids.
    isolate : run the candidate in a child process (:mod:`refimpl._isolation`):
        an ``os._exit``, a crash, a hang past ``timeout`` or an output flood
        of the candidate becomes an ``ERROR`` of that case, and the
        candidate's stdout/stderr is captured (``CaseReport.output_tail``).
        Needs TARGET strings (a function object cannot always be sent to
        another process) and a registered operator.  Default: True when
        ``candidate`` (and ``vjp``) are TARGET strings, else False
        (in-process: ``sys.exit`` and exceptions are still per-case
        errors, but a crash or hang of the candidate is the caller's).
    timeout : seconds one case (and importing the TARGETs) may take in an
        isolated run (default 300); finite and > 0.
    dump_dir : write each case that did not pass as
        ``<op>.<case>.npz`` (inputs, array parameters, reference output and
        VJPs, cotangent, the candidate's output and canonicalised VJPs
        where it produced them) and ``<op>.<case>.json`` (parameters,
        tolerances, errors, diagnostics, and a command line reproducing
        the case) into this directory.

    Returns
    -------
    ValidationReport
        ``report.passed``, ``report.cases`` (one :class:`CaseReport` each),
        ``print(report)`` gives the table.

    Raises
    ------
    ValueError : unknown operator or case, framework not installed, NumPy
        without ``vjp``, a TARGET that cannot be loaded (:class:`TargetError`),
        a tolerance or timeout out of range, golden vectors that fail their
        checks (:class:`refimpl.vectors.VectorsError`).
        Problems *inside* a case never raise; they are reported per case.
    Interrupted : (a ``KeyboardInterrupt``) Ctrl-C during the run; its
        ``report`` holds the finished cases and an ``ERROR`` for the others.

    Examples
    --------
    >>> import numpy as np
    >>> def solve(A, b):
    ...     return np.linalg.solve(A, b[..., None])[..., 0]
    >>> def solve_vjp(A, b, x_bar):
    ...     x = solve(A, b)
    ...     b_bar = np.linalg.solve(np.swapaxes(A, -1, -2), x_bar[..., None])[..., 0]
    ...     A_bar = -b_bar[..., :, None] * x[..., None, :]
    ...     return A_bar.sum(axis=tuple(range(A_bar.ndim - A.ndim))), b_bar
    >>> validate("linear_solve", solve, framework="numpy", vjp=solve_vjp).passed
    True
    """
    spec = op_name if isinstance(op_name, registry.OpSpec) else registry.get_spec(op_name)
    op_name = spec.name
    ref_spec, gname = _check_arguments(spec, against=against, rtol=rtol,
                                       forward_rtol=forward_rtol, gradient=gradient,
                                       vectors_dir=vectors_dir, unbatched=unbatched)
    if isolate is None:
        isolate = isinstance(candidate, str) and (vjp is None or isinstance(vjp, str))
    timeout = _check_timeout(timeout, isolate)
    fw, fn, vjp_fn = _load_candidate(spec, candidate, vjp, framework, isolate)
    wanted = _wanted_ids(spec, cases, exclude)
    golden, notes = _candidate_cases(_golden_cases(spec, ref_spec, wanted, vectors_dir),
                                     op_name)
    notes += _operator_notes(spec, framework)
    jobs = _case_jobs(golden, rtol, forward_rtol)
    keep = dump_dir is not None
    if fw is None:      # isolated: TARGET strings (checked by _check_isolatable)
        assert isinstance(candidate, str) and (vjp is None or isinstance(vjp, str))
        reports, kept, version, interrupted = _run_isolated(
            spec, jobs, candidate, vjp, framework, timeout, keep, against, unbatched)
    else:
        reports, kept, interrupted = _run_in_process(spec, jobs, fn, fw, vjp_fn, keep, against,
                                                     unbatched)
        version = fw.version()
    source, source_notes = _gradient_source(spec, vjp, vjp_fn, framework, against, gradient,
                                            gname, unbatched)
    notes += source_notes
    command = _command(op_name, candidate, vjp, framework, vectors_dir, rtol, forward_rtol,
                       timeout if isolate else None, against, unbatched, gradient)
    if dump_dir is not None:
        notes.extend(_dump(dump_dir, spec, jobs, reports, kept, command))
    report = ValidationReport(op=op_name, framework=framework, framework_version=version,
                              candidate=_name_of(candidate), gradient_source=source,
                              cases=tuple(reports), notes=tuple(notes), command=command,
                              interrupted=interrupted)
    if interrupted:
        raise Interrupted(report)
    return report


def report_json(report: ValidationReport) -> str:
    """The report as JSON (inf written as null)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(report.to_dict()), indent=1)


# --------------------------------------------------------------------------
# Options, runners, failure diagnostics, dumps
# --------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended :func:`validate`; ``report`` has the finished cases and an
    ``ERROR`` ("interrupted") for the others."""

    def __init__(self, report: ValidationReport):
        super().__init__("interrupted")
        self.report = report


def _check_tolerance(name: str, value) -> None:
    """A tolerance override must be a finite number in (0, 1)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"argument '{name}' must be a number, got {type(value).__name__}")
    if not (math.isfinite(float(value)) and 0.0 < float(value) < 1.0):
        raise ValueError(f"argument '{name}' must be a finite number with 0 < {name} < 1 "
                         f"(a relative error), got {value!r}")


def _check_timeout(timeout, isolate: bool) -> float:
    """The per-case deadline of an isolated run (seconds, finite, > 0)."""
    from . import _isolation
    if timeout is None:
        return _isolation.DEFAULT_TIMEOUT
    if not isolate:
        raise ValueError("argument 'timeout' needs an isolated run (isolate=True, TARGET "
                         "strings): an in-process candidate cannot be stopped")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.floating,
                                                             np.integer)):
        raise TypeError(f"argument 'timeout' must be a number, got {type(timeout).__name__}")
    if not (math.isfinite(float(timeout)) and float(timeout) > 0):
        raise ValueError(f"argument 'timeout' must be a finite number of seconds > 0, "
                         f"got {timeout!r}")
    return float(timeout)


def _check_isolatable(spec: registry.OpSpec, candidate, vjp, framework: str) -> None:
    """An isolated run needs TARGET strings, a registered operator, an installed framework."""
    if not isinstance(candidate, str) or (vjp is not None and not isinstance(vjp, str)):
        raise TypeError("isolate=True needs the candidate (and vjp) as TARGET strings "
                        "('module:function' or 'path.py:function'); pass isolate=False to "
                        "run function objects in this process")
    try:
        registered = registry.get_spec(spec.name)
    except (KeyError, ValueError):
        registered = None
    if registered is not spec:
        raise ValueError(f"isolate=True needs a registered operator; {spec.name!r} is an "
                         "OpSpec the child process cannot look up (pass isolate=False)")
    if framework not in FRAMEWORKS:
        raise ValueError(f"argument 'framework' must be one of {', '.join(FRAMEWORKS)}, "
                         f"got {framework!r}")
    if importlib.util.find_spec(framework) is None:
        hint = {"torch": "pip install torch", "jax": "pip install jax"}.get(framework, "")
        raise ValueError(f"framework {framework!r} is not installed; {hint}")
    load_target_syntax = [("TARGET", candidate)] + ([("--vjp TARGET", vjp)] if vjp else [])
    for what, target in load_target_syntax:
        where, _, attr = target.rpartition(":")
        if not where or not attr:
            raise TargetError(f"{what} {target!r} must be 'module:function' or "
                              f"'path/to/file.py:function'")


def parse_gradient(spec: registry.OpSpec, text: str) -> tuple[str, dict]:
    """``"NAME[:key=value,...]"`` -> ``(NAME, {key: value})`` for one of the
    operator's named gradients (:attr:`refimpl.registry.OpSpec.gradients`);
    ValueError naming the valid names or keys otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"argument 'gradient' must be a str 'NAME[:key=value,...]', got "
                        f"{type(text).__name__}")
    named = dict(spec.gradients)
    if not named:
        raise ValueError(f"argument 'gradient': {spec.name} has no named gradients (only its "
                         f"default one); operators that have: "
                         + ", ".join(s.name for s in registry.all_specs() if s.gradients))
    name, colon, rest = text.strip().partition(":")
    if name not in named:
        raise ValueError(f"argument 'gradient': unknown gradient {name!r} of {spec.name}; "
                         "valid: " + "; ".join(f"{n} ({g.description})"
                                               for n, g in named.items()))
    ng = named[name]
    options: dict[str, Any] = {}
    for item in (rest.split(",") if colon and rest.strip() else []):
        key, eq, value = (w.strip() for w in item.partition("="))
        if not ng.options:
            raise ValueError(f"argument 'gradient': {name} takes no options, got {item!r}")
        if not eq or key not in ng.options or key in options:
            raise ValueError(f"argument 'gradient': bad option {item!r} of {name}; valid keys: "
                             + ", ".join(f"{k}=<{t.__name__}>" for k, t in ng.options.items())
                             + " (each at most once)")
        try:
            options[key] = ng.options[key](value)
        except ValueError:
            raise ValueError(f"argument 'gradient': option {key} of {name} must be "
                             f"{'an' if ng.options[key] is int else 'a'} "
                             f"{ng.options[key].__name__}, got {value!r}") from None
    if ng.check is not None:
        try:
            ng.check(**options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"argument 'gradient' {text!r}: {exc}") from None
    return name, options


def _gradient_spec(spec: registry.OpSpec, name: str, options: Mapping) -> registry.OpSpec:
    """``spec`` whose ``vjp`` is the named gradient with ``options`` (for the
    reference numbers only; the candidate still sees ``spec``)."""
    ng = spec.gradients[name]
    return replace(spec, vjp=lambda res, out_bar, **vjp_params: ng.vjp(
        res, out_bar, **vjp_params, **options))


def _run_one(spec, gc, fn, fw, vjp_fn, ftol: float, gtol: float, against: str,
             keep: dict | None, unbatched: bool = False):
    """One case, against the reference (:func:`_run_case`) or the candidate's own
    forward (:func:`_run_case_self`, which keeps no arrays for ``dump_dir``);
    ``unbatched``: the candidate is called once per batch member
    (:func:`_unbatch`)."""
    if unbatched:
        fn, vjp_fn = _unbatch(spec, fw, fn, vjp_fn)
    if against == "self":
        return _run_case_self(spec, gc, fn, fw, vjp_fn, gtol, ftol)
    return _run_case(spec, gc, fn, fw, vjp_fn, ftol, gtol, keep=keep)


def _run_in_process(spec, jobs, fn, fw, vjp_fn, keep: bool, against: str = "reference",
                    unbatched: bool = False):
    """Run every job here; Ctrl-C leaves the rest as ``ERROR``s (``interrupted`` True)."""
    reports: list[CaseReport] = []
    kept: list[dict | None] = []
    try:
        with fw.context():
            for gc, ftol, gtol in jobs:
                arrays: dict | None = {} if keep else None
                reports.append(_run_one(spec, gc, fn, fw, vjp_fn, ftol, gtol, against, arrays,
                                        unbatched))
                kept.append(arrays)
    except KeyboardInterrupt:
        for gc, ftol, gtol in jobs[len(reports):]:
            reports.append(_error_report(gc, ftol, gtol, "not run: interrupted (Ctrl-C)"))
            kept.append(None)
        return reports, kept, True
    return reports, kept, False


def _report_dict(report: CaseReport) -> dict:
    """A :class:`CaseReport` as JSON data (the child process sends it so)."""
    return asdict(report)


def _report_from_dict(d: Mapping) -> CaseReport:
    names = {f.name for f in fields(CaseReport)}
    d = {k: v for k, v in d.items() if k in names}
    d["flags"] = tuple(d.get("flags", ()))
    d["diagnostics"] = tuple(d.get("diagnostics", ()))
    return CaseReport(**d)


def _run_isolated(spec, jobs, candidate: str, vjp: str | None, framework: str,
                  timeout: float, keep: bool, against: str = "reference",
                  unbatched: bool = False):
    """Run every job in child processes (:mod:`refimpl._isolation`)."""
    from . import _isolation
    try:
        result = _isolation.run(
            spec.name, [_isolation.Job(i, gc, ftol, gtol) for i, (gc, ftol, gtol)
                        in enumerate(jobs)],
            candidate=candidate, vjp=vjp, framework=framework, timeout=timeout,
            keep_arrays=keep, against=against, unbatched=unbatched)
    except _isolation.LoadError as exc:
        raise TargetError(f"TARGET {candidate!r}: {exc}") from None
    reports = []
    for (gc, ftol, gtol), o in zip(jobs, result.outcomes):
        try:
            r = (_report_from_dict(o.report) if o.report is not None
                 else _error_report(gc, ftol, gtol, o.error))
        except (TypeError, ValueError):     # not a report _run_case wrote
            r = _error_report(gc, ftol, gtol, "the child process sent an unreadable report")
        reports.append(replace(r, output_bytes=o.output_bytes, output_tail=o.output_tail))
    return (reports, [o.arrays for o in result.outcomes], result.framework_version,
            result.interrupted)


def _command(op: str, candidate, vjp, framework: str, vectors_dir, rtol, forward_rtol,
             timeout, against: str = "reference", unbatched: bool = False,
             gradient: str | None = None) -> str:
    """The ``refimpl validate`` command line of a run with TARGET strings ("" otherwise)."""
    if not isinstance(candidate, str) or (vjp is not None and not isinstance(vjp, str)):
        return ""
    words = ["refimpl", "validate", op, candidate, "--framework", framework]
    if vjp is not None:
        words += ["--vjp", vjp]
    if vectors_dir is not None:
        words += ["--vectors", str(vectors_dir)]
    if rtol is not None:
        words += ["--rtol", repr(float(rtol))]
    if forward_rtol is not None:
        words += ["--forward-rtol", repr(float(forward_rtol))]
    if timeout is not None and timeout != _default_timeout():
        words += ["--timeout", f"{timeout:g}"]
    if against != "reference":
        words += ["--against", against]
    if unbatched:
        words += ["--unbatched"]
    if gradient is not None:
        words += ["--gradient", gradient]
    return " ".join(shlex.quote(w) for w in words)


def _default_timeout() -> float:
    from . import _isolation
    return _isolation.DEFAULT_TIMEOUT


#: Relative agreement at which a norm ratio is said to equal a parameter's value.
_RATIO_MATCH = 1e-3
#: Relative residual below which the candidate is called a multiple of the reference.
_PROPORTIONAL = 1e-6


def _scalar_params(gc: vectors.GoldenCase) -> list[tuple[str, float]]:
    """The case's real scalar parameters (candidate keywords first), without 0 and +-1."""
    out = {}
    for source in (gc.candidate_kwargs, gc.params):
        for k, v in source.items():
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
                continue
            v = abs(float(v))
            if math.isfinite(v) and v not in (0.0, 1.0) and k not in out:
                out[k] = v
    return list(out.items())


def _ratio_hint(a: np.ndarray, e: np.ndarray, core_ndim: int, gc) -> str:
    """What a failing array's relation to the reference suggests, or "".

    Checks, in order: ``a = -e`` (a sign error); ``a = e^T`` over the last two
    axes (a transposed operator); ``a = c e`` for a scalar ``c`` (least
    squares, ``c = <a, e> / <e, e>``) with ``|c|`` equal to 2, 1/2 or, to
    :data:`_RATIO_MATCH`, a scalar parameter ``p`` of the case as ``p``,
    ``1/p``, ``p^2`` or ``1/p^2`` (a forgotten ``1/eps`` is a factor ``eps``).
    """
    ne = float(np.linalg.norm(e))
    if ne == 0.0 or a.shape != e.shape:
        return ""
    if float(np.linalg.norm(a + e)) <= _PROPORTIONAL * ne:
        return "the candidate is -1 times the reference (a sign error?)"
    if core_ndim >= 2 and e.ndim >= 2 and e.shape[-1] == e.shape[-2]:
        et = np.swapaxes(e, -1, -2)
        if (float(np.linalg.norm(e - et)) > _PROPORTIONAL * ne
                and float(np.linalg.norm(a - et)) <= _PROPORTIONAL * ne):
            return "the candidate is the reference transposed"
    c = float(np.vdot(a, e)) / ne ** 2
    if c == 0.0 or float(np.linalg.norm(a - c * e)) > _PROPORTIONAL * max(
            float(np.linalg.norm(a)), ne):
        return ""
    found = [(name, val) for name, val in (("2", 2.0), ("1/2", 0.5))]
    for k, p in _scalar_params(gc):
        found += [(f"{k}", p), (f"1/{k}", 1.0 / p), (f"{k}^2", p * p), (f"1/{k}^2", 1.0 / p ** 2)]
    for name, val in found:
        if abs(abs(c) / val - 1.0) <= _RATIO_MATCH:
            value = next((f" ({k} = {p:g})" for k, p in _scalar_params(gc) if k in name), "")
            return f"the candidate is {c:.6g} times the reference: a factor {name}{value}?"
    return f"the candidate is {c:.6g} times the reference"


def _diagnose(name: str, a: np.ndarray, e: np.ndarray, core_ndim: int,
              gc: vectors.GoldenCase) -> dict:
    """The worst entry of a failing comparison, the norm ratio and a hint.

    The worst entry maximises ``|a - e|`` relative to its batch member's
    ``max|e_m|`` (at least ``FLOOR max|e|``), so it lies in the member the
    normwise error blames.  ``norm_ratio = ||a||_F / ||e||_F`` over the
    whole array (inf for a zero reference and a nonzero candidate).
    """
    a = np.asarray(a, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64)
    info: dict[str, Any] = {"array": name, "index": [], "candidate": None, "reference": None,
            "norm_ratio": None, "hint": ""}
    if e.size == 0 or a.shape != e.shape:
        return info
    lead = max(e.ndim - core_ndim, 0)
    m = _member_max(e, core_ndim)
    m = np.broadcast_to(np.reshape(m, np.shape(m) + (1,) * (e.ndim - lead)), e.shape)
    big = float(np.max(np.abs(e)))
    score = np.abs(a - e) / np.maximum(m, FLOOR * big if big > 0 else 1.0)
    idx = np.unravel_index(int(np.argmax(score)), e.shape) if e.ndim else ()
    na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
    info.update(index=[int(i) for i in idx], candidate=float(a[idx]),
                reference=float(e[idx]),
                norm_ratio=(na / ne if ne > 0 else (math.inf if na > 0 else 1.0)),
                hint=_ratio_hint(a, e, core_ndim, gc))
    return info


#: Lines of a failing case's captured output shown in the table.
_OUTPUT_LINES = 12


def _failure_lines(c: CaseReport, command: str) -> list[str]:
    """The table's lines under a case that did not pass: what it is, where it
    is worst, what the candidate printed, how to rerun it alone."""
    lines = [f"case: {c.description}"] if c.description else []
    for d in c.diagnostics:
        if d.get("candidate") is None:
            continue
        at = f"[{', '.join(map(str, d['index']))}]" if d["index"] else ""
        ratio = d["norm_ratio"]
        ratio_text = "inf" if ratio is None or math.isinf(ratio) else f"{ratio:.6g}"
        lines.append(f"worst {d['array']}{at}: candidate {d['candidate']:.10g}, reference "
                     f"{d['reference']:.10g}; ||candidate||/||reference|| = {ratio_text}"
                     + (f"; {d['hint']}" if d.get("hint") else ""))
    if c.output_bytes:
        tail = c.output_tail.rstrip().splitlines()[-_OUTPUT_LINES:]
        lines.append(f"candidate output: {c.output_bytes} bytes, the last lines:")
        lines.extend(f"> {t[:200]}" for t in tail)
    if command:
        lines.append(f"reproduce: {command} --case {shlex.quote(c.case)}")
    return lines


def _dump_json(value, where: str):
    """Parameters as JSON data; an array becomes ``{"$array": key}`` (the npz holds it)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else repr(float(value))
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        return {"$array": where}
    if isinstance(value, (list, tuple)):
        return [_dump_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _dump_json(v, f"{where}.{k}") for k, v in value.items()}
    return repr(value)


def _dump(dump_dir, spec: registry.OpSpec, jobs, reports, kept, command: str) -> list[str]:
    """Write each case that did not pass (see :func:`validate`'s ``dump_dir``).

    Returns notes for the report (what was written, or why not).
    """
    root = Path(dump_dir)
    written = []
    try:
        root.mkdir(parents=True, exist_ok=True)
        for (gc, ftol, gtol), r, cand in zip(jobs, reports, kept):
            if r.passed:
                continue
            base = (f"{vectors._check_name(spec.name, 'operator')}."
                    f"{vectors._check_name(gc.id, 'case id')}")
            arrays = {f"input.{k}": v for k, v in gc.inputs.items()}
            for kind, params in (("param", gc.params), ("candidate_kwarg", gc.candidate_kwargs)):
                arrays.update({f"{kind}.{k}": np.asarray(v, dtype=np.float64)
                               for k, v in params.items() if isinstance(v, np.ndarray)})
            arrays[f"output.{spec.output}"] = gc.output
            arrays[f"cotangent.{spec.output}"] = gc.cotangent
            arrays.update({f"vjp.{k}": v for k, v in gc.vjp.items()})
            arrays.update(cand or {})
            vectors._write_npz(root / f"{base}.npz", arrays)
            facts = {
                "op": spec.name, "case": gc.id, "description": gc.description,
                "flags": list(gc.flags), "status": r.status, "message": r.message,
                "signature": _signature_text(spec), "vjp_signature": _vjp_signature_text(spec),
                "params": _dump_json(dict(gc.params), "param"),
                "candidate_kwargs": _dump_json(dict(gc.candidate_kwargs), "candidate_kwarg"),
                "tolerance": {"forward": r.forward_tol, "gradient": r.gradient_tol},
                "forward_error": r.forward_error, "gradient_errors": dict(r.gradient_errors),
                "diagnostics": list(r.diagnostics),
                "npz": f"{base}.npz", "arrays": {k: list(np.shape(v)) for k, v in arrays.items()},
                "reproduce": f"{command} --case {shlex.quote(gc.id)}" if command else "",
            }
            text = json.dumps(_dump_json(facts, "facts"), indent=1)
            (root / f"{base}.json").write_text(text + "\n", encoding="utf-8")
            written.append(base)
    except (OSError, ValueError) as exc:
        return [f"--dump {dump_dir}: could not write the failing cases ({exc})"]
    if not written:
        return []
    return [f"wrote {len(written)} failing case(s) to {dump_dir}: "
            + ", ".join(f"{b}.npz/.json" for b in written)]
