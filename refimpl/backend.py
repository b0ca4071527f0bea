"""Array namespace, device and dtype helpers on top of array-api-compat.

Every operator in refimpl is written against the Python array API standard:
``xp = namespace(A=A, b=b)`` gives the namespace of its inputs (NumPy, CuPy or
``array_api_strict``) and all arithmetic goes through ``xp``.  This module
holds the few pieces the standard lacks (``logsumexp``, batched ``diag``,
``sum_to_shape``, vector right-hand sides for ``solve``), written once from
standard functions, plus input validation and host <-> device transfer.

Conventions
-----------
* float64 is the reference dtype; float32 is supported.  No other dtype is
  accepted by an operator (``TypeError`` naming the argument).
* Mixed precision: the float arrays of one call share one dtype; float32
  beside float64 is a ``TypeError`` naming both arguments (no silent
  promotion), raised by :func:`namespace` (:func:`check_same_dtype`).
* Empty input: an array with a zero-length axis -- a batch of size 0
  included -- is a ``ValueError`` naming the argument (:func:`check_array`);
  no operator returns an empty result.
* Scalar and option arguments go through one vocabulary:
  :func:`check_int`, :func:`check_choice`, :func:`check_flag`,
  :func:`check_positive`, :func:`check_result`.
* Outputs live in the namespace and on the device of the inputs.
* Nothing here mutates its arguments.
* Host-side work (SciPy, random numbers for tests) uses NumPy explicitly via
  :func:`to_host` / :func:`from_host`.
* Whatever differs between array libraries beyond the standard (when an
  iteration reads its convergence test back to the host, whether
  ``linalg.solve`` broadcasts, whether ``linalg`` failures raise, whether
  host-NumPy fast paths apply) is decided in one place,
  :func:`device_policy`; operator modules never test for a library.

Backends
--------
``numpy``, ``array_api_strict`` (on its non-default device), ``torch``
(CUDA tensors when ``torch.cuda.is_available()``, CPU tensors otherwise),
``cupy`` (needs CuPy, a CUDA driver and a device; :func:`gpu_status` says
which is missing) and ``cupy_semantics`` (:mod:`refimpl._cupy_semantics`: a
CPU double of CuPy that takes CuPy's branches and enforces CuPy's
semantics, so the GPU code paths are tested without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import operator
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from . import _cupy_semantics

__all__ = [
    "ConditioningWarning",
    "ConvergenceWarning",
    "SUPPORTED_DTYPES",
    "BACKEND_NAMES",
    "Backend",
    "DevicePolicy",
    "available_backends",
    "backend_status",
    "broadcast_shapes",
    "check_array",
    "check_choice",
    "check_flag",
    "check_int",
    "check_positive",
    "check_result",
    "check_same_dtype",
    "device",
    "device_policy",
    "diag_embed",
    "diagonal",
    "dtype_name",
    "eye_like",
    "serial_dense",
    "single_threaded_blas",
    "frobenius",
    "from_host",
    "get_backend",
    "policy_of",
    "required_backends",
    "skipped_backends",
    "gpu_available",
    "gpu_status",
    "inner",
    "logsumexp",
    "matvec",
    "matvec_maps",
    "divide_map",
    "work_like",
    "rmatvec",
    "count_true",
    "any_true",
    "all_true",
    "reduce_min",
    "reduce_sum",
    "cache_aligned",
    "mT",
    "namespace",
    "solve",
    "solve_vec",
    "sum_to_shape",
    "to_float",
    "to_host",
    "unit_roundoff",
]

SUPPORTED_DTYPES = ("float64", "float32")


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance.

    The result still carries ``converged=False`` and the error reached; a VJP
    of such a result warns again because implicit gradients assume the
    optimality conditions hold.
    """


class ConditioningWarning(UserWarning):
    """A backward solve is ill-conditioned; the gradient may be inaccurate."""


# --------------------------------------------------------------------------
# Namespaces, devices, dtypes
# --------------------------------------------------------------------------

def _is_array(x: Any) -> bool:
    """True for an array of a supported library (not a list, not a scalar)."""
    if isinstance(x, (list, tuple, int, float, complex, bool)) or np.isscalar(x):
        return False
    return array_api_compat.is_array_api_obj(x)


def namespace(**named: Any):
    """Array namespace shared by the named arrays.

    Parameters
    ----------
    **named
        ``name=array`` pairs; ``None`` values are skipped.  The names only
        serve error messages.

    Raises
    ------
    TypeError
        If an argument is not an array (a list, a Python or NumPy scalar) or
        the arrays come from different libraries.
    ValueError
        If the arrays live on different devices.
    TypeError
        If two of the float arrays have different dtypes (float32 beside
        float64): :func:`check_same_dtype`, the one mixed-precision rule.
    """
    arrays = {k: v for k, v in named.items() if v is not None}
    if not arrays:
        raise TypeError("namespace() needs at least one array")
    for name, x in arrays.items():
        if not _is_array(x):
            raise TypeError(
                f"argument {name!r} must be an array (numpy, cupy or "
                f"array_api_strict), got {type(x).__name__}"
            )
    try:
        xp = array_api_compat.array_namespace(*arrays.values())
    except TypeError as exc:
        kinds = ", ".join(f"{k}: {type(v).__module__}.{type(v).__name__}"
                          for k, v in arrays.items())
        raise TypeError(f"arrays from different libraries ({kinds})") from exc
    devices = {name: array_api_compat.device(x) for name, x in arrays.items()}
    first_name, first_dev = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first_dev:
            raise ValueError(
                f"argument {name!r} is on device {dev!r} but {first_name!r} "
                f"is on {first_dev!r}"
            )
    check_same_dtype(**arrays)
    return xp


def device(x):
    """Device of an array (``array_api_compat.device``)."""
    return array_api_compat.device(x)


def dtype_name(dtype) -> str:
    """The plain dtype name ('float64', 'int64', ...) in any supported namespace.

    NumPy/CuPy dtypes and scalar types (``np.float64``) through
    ``numpy.dtype``; ``array_api_strict.float64`` and ``torch.float64`` by
    their printed name, the part after the library's prefix.
    """
    text = str(dtype)
    for prefix in ("array_api_strict.", "torch."):
        if text.startswith(prefix):
            return text[len(prefix):]
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def check_array(x: Any, name: str, *, ndim: int | None = None,
                min_ndim: int | None = None, finite: bool = True,
                allow_empty: bool = False):
    """Validate an operator input and return it unchanged.

    Checks, in this order: it is an array (``TypeError``), its dtype is
    float32 or float64 (``TypeError``), its number of dimensions
    (``ValueError``), that it is not empty (``ValueError``; a leading batch
    dimension of size 0 included, unless ``allow_empty``) and that it holds
    no NaN/Inf (``ValueError``).  Every message names ``name``.

    The empty-batch rule: operators refuse an input with a zero-length axis
    rather than return an empty result, so that every result carries
    meaningful diagnostics (iterations, errors, conditioning).
    """
    if not _is_array(x):
        raise TypeError(
            f"argument {name!r} must be an array (numpy, cupy or "
            f"array_api_strict), got {type(x).__name__}"
        )
    xp = array_api_compat.array_namespace(x)
    if not xp.isdtype(x.dtype, "real floating") or dtype_name(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(
            f"argument {name!r} has dtype {dtype_name(x.dtype)}; refimpl "
            f"operators take float64 (reference) or float32 arrays"
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"argument {name!r} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"argument {name!r} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if not allow_empty and math.prod(tuple(x.shape)) == 0:
        raise ValueError(f"argument {name!r} is empty (shape {tuple(x.shape)}); refimpl operators "
                         "refuse a zero-length axis, a batch of size 0 included")
    if finite and x.size != 0 and not all_true(xp.isfinite(x)):
        raise ValueError(f"argument {name!r} contains NaN or Inf")
    return x


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A finite positive Python float (``eps``, ``tol``, ...) or an error.

    Accepts Python and NumPy real numbers and 0-d real arrays; a string, a
    bool or anything else is a ``TypeError`` (``eps="0.1"`` is a mistake, not
    a number); zero (unless ``allow_zero``), negative, NaN and Inf values are
    a ``ValueError``.
    """
    is_real = (isinstance(value, (int, float, np.integer, np.floating))
               or (_is_array(value) and getattr(value, "ndim", None) == 0))
    if isinstance(value, (bool, np.bool_)) or not is_real:
        raise TypeError(f"argument {name!r} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"argument {name!r} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"argument {name!r} must be finite and {bound}, got {value!r}")
    return v


# --------------------------------------------------------------------------
# Argument vocabulary: integers, choices, flags, result objects, dtypes
# --------------------------------------------------------------------------
#
# One rule per kind of argument, shared by every operator module:
#
# * a count or an order (``max_iter``, ``k``, ``degree``) is a Python or
#   NumPy integer -- bool, float and str are a ``TypeError`` -- within its
#   range (``ValueError``): :func:`check_int`;
# * a mode (``method``, ``sense``) is one of a listed set of strings
#   (``ValueError``): :func:`check_choice`;
# * a switch (``largest``) is a bool (``TypeError``): :func:`check_flag`;
# * a positive scalar (``eps``, ``tol``, ``lam``, ``reg``) goes through
#   :func:`check_positive`;
# * the result handed to a JVP/VJP is the forward's result class
#   (``TypeError``): :func:`check_result`;
# * the float arrays of one call share one dtype: float32 and float64 are
#   never mixed silently (``TypeError`` naming both arguments, raised by
#   :func:`namespace` through :func:`check_same_dtype`);
# * an empty array -- a batch of size 0 included -- is refused
#   (``ValueError`` naming the argument, raised by :func:`check_array`):
#   there is no iteration, conditioning or error estimate to report for it.

def check_int(value: Any, name: str, *, min: int | None = None, max: int | None = None) -> int:
    """A Python or NumPy integer within ``[min, max]``, returned as a Python int.

    ``bool`` (``True`` is not a count), ``float`` (``2.5`` or ``2.0``), ``str``
    and anything else without ``__index__`` are a ``TypeError`` naming the
    argument; an integer outside the range is a ``ValueError``.
    """
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (float, np.floating, str)):
        raise TypeError(f"argument {name!r} must be an integer, got {type(value).__name__} {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"argument {name!r} must be an integer, got {type(value).__name__}") from None
    if (min is not None and v < min) or (max is not None and v > max):
        if max is None:
            bound = f">= {min}"
        elif min is None:
            bound = f"<= {max}"
        else:
            bound = f"satisfy {min} <= {name} <= {max}"
        raise ValueError(f"argument {name!r} must {'be ' if max is None or min is None else ''}{bound}, "
                         f"got {v}")
    return v


def check_choice(value: Any, name: str, choices) -> str:
    """``value`` if it is one of the strings ``choices``; else a ``ValueError``
    naming the argument and listing the choices."""
    if not isinstance(value, str) or value not in tuple(choices):
        raise ValueError(f"argument {name!r} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")
    return value


def check_flag(value: Any, name: str) -> bool:
    """A Python bool (or NumPy ``bool_``) as a bool; anything else is a
    ``TypeError`` naming the argument (``bool("False")`` is True, so a silent
    conversion would do the opposite of what was asked)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"argument {name!r} must be a bool, got {type(value).__name__} {value!r}")


def check_result(res: Any, name: str, cls: type, *, producer: str | None = None) -> Any:
    """``res`` if it is an instance of ``cls`` (the forward's result class);
    else a ``TypeError`` naming the argument and the expected type, rather
    than an ``AttributeError`` from deep inside the derivative."""
    if not isinstance(res, cls):
        source = f" (the result of {producer})" if producer else ""
        raise TypeError(f"argument {name!r} must be a {cls.__name__}{source}, "
                        f"got {type(res).__name__}")
    return res


def check_same_dtype(**named: Any) -> None:
    """Refuse float arrays of different dtypes among ``name=array`` pairs.

    The rule for mixed precision: operators never promote.  A float32 array
    beside a float64 one is a ``TypeError`` naming both arguments -- promoting
    would silently compute a float64 answer for a caller who asked for float32
    (or the reverse).  ``None`` values and non-float arrays are skipped (the
    latter are refused by :func:`check_array` with their own message).
    """
    first: tuple[str, str] | None = None
    for name, x in named.items():
        dt = getattr(x, "dtype", None)
        if x is None or dt is None:
            continue
        dname = dtype_name(dt)
        if dname not in SUPPORTED_DTYPES:
            continue
        if first is None:
            first = (name, dname)
        elif dname != first[1]:
            raise TypeError(f"argument {name!r} has dtype {dname} but {first[0]!r} has {first[1]}; "
                            "refimpl does not mix float32 and float64 -- convert one of them")


# --------------------------------------------------------------------------
# Host <-> device
# --------------------------------------------------------------------------

def to_host(x) -> np.ndarray:
    """A NumPy copy of any supported array: CuPy (and its CPU double) via
    ``.get()``, torch via ``.detach().cpu().numpy()``, others via DLPack."""
    if isinstance(x, np.ndarray):
        return np.array(x, copy=True)
    if array_api_compat.is_cupy_array(x) or _cupy_semantics.is_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return np.array(x.detach().cpu().numpy(), copy=True)
    if np.isscalar(x):
        return np.asarray(x)
    # array_api_strict (any of its devices) and other DLPack producers.
    return np.array(np.from_dlpack(x), copy=True)


def from_host(a, xp, *, device=None, dtype=None):
    """Copy a host (NumPy) array into namespace ``xp`` on ``device``.

    ``dtype`` may be a dtype of ``xp`` or one of the names in
    :data:`SUPPORTED_DTYPES`.  The result never shares memory with ``a``.
    """
    a = np.asarray(a)
    if isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    elif dtype is None and a.dtype.kind == "f":
        dtype = getattr(xp, a.dtype.name)
    if array_api_compat.is_cupy_namespace(xp):
        import cupy
        with cupy.cuda.Device(device.id if device is not None else None):
            return xp.asarray(a, dtype=dtype)
    if array_api_compat.is_torch_namespace(xp):       # torch copies from NumPy itself
        return xp.asarray(np.array(a, copy=True), dtype=dtype, device=device)
    return xp.asarray(a, dtype=dtype, device=device, copy=True)


def unit_roundoff(dtype) -> float:
    """Unit round-off ``u = 2^-53`` (float64) or ``2^-24`` (float32) of a floating dtype."""
    name = dtype_name(dtype)
    if name not in SUPPORTED_DTYPES:
        raise TypeError(f"unit_roundoff: unsupported dtype {name}")
    return 2.0 ** -53 if name == "float64" else 2.0 ** -24


def to_float(x) -> float:
    """A Python float from a 0-d array (forces a device sync on GPU)."""
    return float(x)


# The reads and reductions of convergence checks.  An iteration loop makes a
# few of them per check on arrays of a few hundred entries, where the Python
# wrappers of ``np.any``/``np.min``/``np.sum`` cost as much as the reduction;
# on NumPy arrays they call the ufunc's ``reduce`` directly (the function
# NumPy's wrappers end in: the same result) and read a 0-d array or a NumPy
# scalar (what NumPy's reductions to 0-d return) as it is.

def count_true(x) -> int:
    """The number of true entries of a bool array ``x``: a host read (a sync
    on a device)."""
    if type(x) is np.ndarray:                          # fast paths, see above
        return int(np.count_nonzero(x)) if x.ndim else int(bool(x))
    if isinstance(x, np.generic):
        return int(bool(x))
    xp = array_api_compat.array_namespace(x)
    return int(xp.sum(xp.astype(x, xp.int64)))


def any_true(x) -> bool:
    """``bool(xp.any(x))`` for a bool array ``x`` (one host read)."""
    return count_true(x) > 0


def all_true(x) -> bool:
    """``bool(xp.all(x))`` for a bool array ``x`` (one host read)."""
    return count_true(x) == math.prod(tuple(x.shape))


def reduce_min(x, axis: int = -1):
    """``xp.min(x, axis=axis)`` (NaN propagates)."""
    if type(x) is np.ndarray:                          # fast path, see above
        return np.minimum.reduce(x, axis=axis)
    return array_api_compat.array_namespace(x).min(x, axis=axis)


def reduce_sum(x, axis: int = -1):
    """``xp.sum(x, axis=axis)``."""
    if type(x) is np.ndarray:                          # fast path, see above
        return np.add.reduce(x, axis=axis)
    return array_api_compat.array_namespace(x).sum(x, axis=axis)


# --------------------------------------------------------------------------
# The device policy: every per-library decision, in one place
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DevicePolicy:
    """What an array library's execution model asks of refimpl's algorithms.

    Operators never test which library they run on; they ask the policy of
    their namespace (:func:`device_policy`) and take its decisions.

    Attributes
    ----------
    deferred_sync : reading a value on the host (``bool(xp.all(done))``,
        ``float(err)``) waits until the device has finished all queued work
        (CuPy, torch on CUDA).  Iterations then test convergence only every
        few steps (:meth:`sync_cadence`) and hold finished batch members with
        masks, so a step may run after all members have stopped and must
        tolerate that.  On the host a test costs nothing and is made every
        step.
    solve_broadcasts : ``xp.linalg.solve(A, B)`` broadcasts the batch
        dimensions of ``A`` and ``B`` against each other (NumPy, torch,
        array_api_strict).  CuPy's requires equal batch shapes;
        :func:`solve` broadcasts explicitly there.
    linalg_raises : ``cholesky``/``inv``/``solve`` raise ``LinAlgError`` on
        a singular or indefinite input.  CuPy returns non-finite values
        unless inside :meth:`raising_linalg`.
    host_numpy : the arrays are NumPy arrays in host memory: an operator's
        host-NumPy fast paths apply (SciPy's per-member LAPACK loops,
        cache-sized batch blocks, ``out=`` into work arrays; e.g.
        ``refimpl.matsqrt._kernels``).
    library : the library's name, for messages (not part of equality: two
        libraries with equal decisions have equal policies).
    """

    def __eq__(self, other):
        if not isinstance(other, DevicePolicy):
            return NotImplemented
        return ((self.deferred_sync, self.solve_broadcasts, self.linalg_raises,
                 self.host_numpy)
                == (other.deferred_sync, other.solve_broadcasts, other.linalg_raises,
                    other.host_numpy))

    def __hash__(self):
        return hash((self.deferred_sync, self.solve_broadcasts, self.linalg_raises,
                     self.host_numpy))

    deferred_sync: bool = False
    solve_broadcasts: bool = True
    linalg_raises: bool = True
    host_numpy: bool = False
    library: str = ""

    def sync_cadence(self, on_device: int) -> int:
        """Steps between host reads of a convergence test: ``on_device`` when
        syncs are deferred (each read stalls the device), else 1."""
        return on_device if self.deferred_sync else 1

    def raising_linalg(self):
        """A context in which failed factorisations raise (``cupyx.errstate(
        linalg="raise")`` on CuPy; a no-op where they always raise)."""
        if self.linalg_raises:
            return contextlib.nullcontext()
        if self.library == "cupy_semantics":
            return _cupy_semantics.errstate(linalg="raise")
        import cupyx
        return cupyx.errstate(linalg="raise")


def _cupy_module():
    import cupy
    return cupy


def device_policy(xp, device=None) -> DevicePolicy:
    """The :class:`DevicePolicy` of namespace ``xp`` (``device``: where the
    arrays live, which decides for torch: CUDA tensors defer syncs).

    ``cupy_semantics`` gets exactly CuPy's decisions (equal policies).
    """
    if array_api_compat.is_cupy_namespace(xp):
        return DevicePolicy(deferred_sync=True, solve_broadcasts=False, linalg_raises=False,
                            library="cupy")
    if xp is _cupy_semantics.xp:
        return DevicePolicy(deferred_sync=True, solve_broadcasts=False, linalg_raises=False,
                            library="cupy_semantics")
    if array_api_compat.is_numpy_namespace(xp):
        return DevicePolicy(host_numpy=True, library="numpy")
    if array_api_compat.is_torch_namespace(xp):
        cuda = getattr(device, "type", None) == "cuda"
        return DevicePolicy(deferred_sync=cuda, library="torch")
    return DevicePolicy(library=getattr(xp, "__name__", type(xp).__name__))


def ignoring_floating_errors():
    """A context in which overflow, division by zero and invalid operations
    give ``inf``/``nan`` without a warning.

    For computations whose results are tested afterwards (an unchecked block
    of iterations whose end state is range-tested and redone when it fails):
    NumPy, and the libraries computing with it (``array_api_strict``), warn
    otherwise; CuPy and torch never warn.
    """
    return np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore")


def policy_of(x) -> DevicePolicy:
    """:func:`device_policy` of an array's namespace and device."""
    return device_policy(array_api_compat.array_namespace(x), array_api_compat.device(x))


# --------------------------------------------------------------------------
# Backends used by tests and the CLI
# --------------------------------------------------------------------------

#: Every backend name :func:`get_backend` knows.
BACKEND_NAMES = ("numpy", "array_api_strict", "torch", "cupy", "cupy_semantics")


@dataclass(frozen=True)
class Backend:
    """An array library plus the device test inputs are placed on.

    ``array_api_strict`` is placed on its non-default ``device1`` so that any
    array an operator creates without ``device=`` (which lands on the default
    device) fails loudly when combined with the inputs.
    """

    name: str
    xp: Any
    device: Any

    def asarray(self, a, dtype: str | None = None):
        """Host array -> this backend, cast to ``dtype`` ('float64'/'float32')."""
        return from_host(a, self.xp, device=self.device, dtype=dtype)

    @property
    def member_exact_batches(self) -> bool:
        """Whether a batched call computes each member with the same kernels
        (so the same rounding) as that member alone, a 2-D array.  NumPy
        loops its kernels over a stack (so do array_api_strict and the
        CuPy-semantics double, which compute with NumPy); torch (``bmm``
        versus ``mm``) and CuPy (batched cuBLAS/cuSOLVER) choose other
        kernels for a stack, so a member agrees with itself alone only to
        round-off, amplified by the algorithm."""
        return self.name in ("numpy", "array_api_strict", "cupy_semantics")

    @property
    def policy(self) -> DevicePolicy:
        """The :class:`DevicePolicy` of this backend."""
        return device_policy(self.xp, self.device)

    def synchronize(self) -> None:
        """Wait until the device has finished all queued work (a no-op on the
        host); benchmarks call it before every clock reading."""
        if self.name == "cupy":
            _cupy_module().cuda.Device(self.device.id).synchronize()
        elif self.name == "torch" and getattr(self.device, "type", None) == "cuda":
            import torch
            torch.cuda.synchronize(self.device)
        elif self.name == "cupy_semantics":
            self.device.synchronize()


def gpu_status() -> tuple[bool, str]:
    """Whether the ``cupy`` backend is usable, and why not.

    Returns ``(True, description)`` or ``(False, reason)`` with the reason
    naming the first missing piece: CuPy not installed (or failing to
    import), CuPy installed but no CUDA driver / runtime, or a driver but no
    device.
    """
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}; pip install cupy-cuda12x or cupy-cuda13x)"
    except Exception as exc:                  # a broken install: import-time CUDA errors
        return False, f"CuPy is installed but failed to import: {type(exc).__name__}: {exc}"
    try:
        version = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:                  # CUDARuntimeError, missing libcuda
        return False, (f"CuPy {cupy.__version__} is installed but no CUDA driver is usable "
                       f"({type(exc).__name__}: {exc})")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, (f"CuPy {cupy.__version__} and CUDA driver {version} found but no CUDA "
                       f"device ({type(exc).__name__}: {exc})")
    if count < 1:
        return False, f"CuPy {cupy.__version__} and CUDA driver {version} found but no CUDA device"
    return True, f"CuPy {cupy.__version__}, CUDA driver {version}, {count} device(s)"


def gpu_available() -> bool:
    """True when the ``cupy`` backend is usable (:func:`gpu_status`)."""
    return gpu_status()[0]


def backend_status(name: str) -> tuple[bool, str]:
    """``(usable, reason)`` for a backend name on this machine."""
    if name in ("numpy", "cupy_semantics"):
        return True, "always available"
    if name == "array_api_strict":
        if importlib.util.find_spec("array_api_strict") is None:
            return False, "array-api-strict is not installed (pip install array-api-strict)"
        return True, "installed"
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            return False, "PyTorch is not installed (pip install torch)"
        return True, "installed"
    if name == "cupy":
        return gpu_status()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def required_backends(env: str | None) -> set[str]:
    """The backend names in a comma-separated list (the value of the
    environment variable ``REFIMPL_REQUIRE_BACKENDS``; ``cupy`` is also
    required by ``REFIMPL_REQUIRE_GPU=1``).  ``ValueError`` on an unknown name."""
    names = {n.strip() for n in (env or "").split(",") if n.strip()}
    unknown = names - set(BACKEND_NAMES)
    if unknown:
        raise ValueError(f"unknown backend(s) {sorted(unknown)} in REFIMPL_REQUIRE_BACKENDS; "
                         f"choose from {', '.join(BACKEND_NAMES)}")
    return names


def get_backend(name: str) -> Backend:
    """A :class:`Backend` by name (:data:`BACKEND_NAMES`).

    ``torch`` places tensors on CUDA when ``torch.cuda.is_available()``,
    else on the CPU.  ``ValueError`` when the backend is unknown or not
    usable here, with the reason (:func:`backend_status`).
    """
    ok, reason = backend_status(name)
    if not ok:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    if name == "numpy":
        import array_api_compat.numpy as np_xp
        return Backend("numpy", np_xp, "cpu")
    if name == "array_api_strict":
        import array_api_strict as strict_xp
        return Backend("array_api_strict", strict_xp, strict_xp.Device("device1"))
    if name == "torch":
        import array_api_compat.torch as torch_xp
        import torch
        return Backend("torch", torch_xp, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "cupy_semantics":
        return Backend("cupy_semantics", _cupy_semantics.xp, _cupy_semantics.DEVICE)
    import array_api_compat.cupy as cupy_xp
    return Backend("cupy", cupy_xp, _cupy_module().cuda.Device(0))


def available_backends() -> list[str]:
    """Backends usable on this machine, in :data:`BACKEND_NAMES` order."""
    return [n for n in BACKEND_NAMES if backend_status(n)[0]]


def skipped_backends() -> list[tuple[str, str]]:
    """``(name, reason)`` for each backend :func:`available_backends` leaves out."""
    return [(n, r) for n in BACKEND_NAMES for ok, r in [backend_status(n)] if not ok]


# --------------------------------------------------------------------------
# Pieces the standard lacks, written from standard functions
# --------------------------------------------------------------------------

def mT(A):
    """Transpose of the last two axes (``xp.matrix_transpose``)."""
    if type(A) is np.ndarray:                          # fast path: iterations call this per step
        return A.swapaxes(-1, -2)
    return array_api_compat.array_namespace(A).matrix_transpose(A)


# One matrix and one vector: on NumPy arrays the ``dot`` method (BLAS
# ``gemv`` called directly) rather than ``@``, whose ufunc dispatch costs a
# few tenths of a microsecond per product, as much as 10% of the product
# itself at n = 200, where the Sinkhorn forward makes two per iteration.
# For contiguous operands both call the same BLAS routine and agree bit for
# bit.

def matvec(A, x):
    """Batched matrix-vector product: ``(A @ x[..., None])[..., 0]`` (one
    matrix and one vector: ``A @ x``, the same products)."""
    if A.ndim == 2 and x.ndim == 1:
        if type(A) is np.ndarray and type(x) is np.ndarray:     # fast path, see above
            return A.dot(x)
        return A @ x
    return (A @ x[..., None])[..., 0]


def rmatvec(A, y):
    """Batched ``A^T y`` for a vector ``y`` (..., n): ``(y^T A)^T`` (one
    matrix and one vector: ``y @ A``)."""
    if A.ndim == 2 and y.ndim == 1:
        if type(A) is np.ndarray and type(y) is np.ndarray:     # fast path, see above
            return y.dot(A)
        return y @ A
    return (y[..., None, :] @ A)[..., 0, :]


def matvec_maps(A, like):
    """``(mv, rmv)`` with ``mv(x, out) = matvec(A, x)`` and ``rmv(y, out) =
    rmatvec(A, y)`` for a fixed ``A`` and vectors shaped like ``like`` (``x``;
    ``y`` has ``A.shape[-2]`` entries in its last axis), bound once for a loop
    that applies them many times.

    ``out`` is a work array of the result's shape and dtype
    (:func:`work_like`) that the product may be written into and returned (a
    loop allocates its work arrays once):
    for one NumPy matrix and one vector the maps are the bound methods
    ``A.dot`` and ``A.T.dot`` (the products of :func:`matvec` and
    :func:`rmatvec`, with no Python call around them and no allocation);
    otherwise they return a new array and leave ``out`` alone.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.arange(6.0).reshape(2, 3)
    >>> mv, rmv = matvec_maps(A, np.ones(3))
    >>> mv(np.ones(3), np.empty(2)).tolist(), rmv(np.ones(2), np.empty(3)).tolist()
    ([3.0, 12.0], [3.0, 5.0, 7.0])
    """
    if type(A) is np.ndarray and type(like) is np.ndarray and A.ndim == 2 and like.ndim == 1:
        return A.dot, A.T.dot
    return (lambda x, out: matvec(A, x)), (lambda y, out: rmatvec(A, y))


def work_like(x):
    """A work array for the maps of :func:`matvec_maps` and :func:`divide_map`:
    an uninitialised array like ``x`` on NumPy (``np.empty_like``), ``None``
    elsewhere, where those maps return new arrays."""
    return np.empty_like(x) if type(x) is np.ndarray else None


def divide_map(c):
    """``d(x, out) = c / x`` for a fixed ``c`` (``x`` from the same library),
    written into the work array ``out`` and returned on NumPy (``np.divide``
    with ``c`` bound), a new array elsewhere (see :func:`matvec_maps`).

    Examples
    --------
    >>> import numpy as np
    >>> d = divide_map(np.array([1.0, 2.0]))
    >>> d(np.array([4.0, 4.0]), np.empty(2)).tolist()
    [0.25, 0.5]
    """
    if type(c) is np.ndarray:
        return functools.partial(np.divide, c)
    return lambda x, out: c / x


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    """The broadcast of shape tuples (``ValueError`` if they do not
    broadcast; shape arithmetic on the host, whatever the library)."""
    return tuple(np.broadcast_shapes(*(tuple(s) for s in shapes)))


def solve(A, B):
    """Batched ``A^{-1} B`` for ``A`` (..., n, n) and a matrix right-hand side
    ``B`` (..., n, k), the batch dimensions broadcast against each other.

    Where the library's ``linalg.solve`` does not broadcast (CuPy,
    :attr:`DevicePolicy.solve_broadcasts`), both are first broadcast to the
    common batch shape (``broadcast_to`` makes views, no copies of ``A``).
    """
    xp = array_api_compat.array_namespace(A, B)
    if not device_policy(xp, device(A)).solve_broadcasts:
        batch = broadcast_shapes(A.shape[:-2], B.shape[:-2])
        if tuple(A.shape[:-2]) != batch:
            A = xp.broadcast_to(A, batch + tuple(A.shape[-2:]))
        if tuple(B.shape[:-2]) != batch:
            B = xp.broadcast_to(B, batch + tuple(B.shape[-2:]))
    return xp.linalg.solve(A, B)


def solve_vec(A, b):
    """Batched ``A^{-1} b`` for a vector right-hand side ``b`` (..., n), the
    batch dimensions of ``A`` (..., n, n) and ``b`` broadcast.

    The standard's ``linalg.solve`` treats a non-1-D second argument as a
    stack of matrices, so the vector is lifted to a column and back
    (:func:`solve` broadcasts where the library does not).
    """
    return solve(A, b[..., None])[..., 0]


#: Largest dense system (order k) whose NumPy factorizations :func:`serial_dense`
#: holds to one BLAS/LAPACK thread.  Threaded ``syevd``/``getrf`` gain at most
#: the core count at these sizes, but on a loaded machine their threads wait
#: for each other and the median call becomes several times slower than on
#: one thread (measurements in docs/performance.md).  Above this size the
#: library's own threading is kept.
SERIAL_DENSE_N = 1024

#: Largest matrix (entries) whose NumPy matrix-vector products
#: :func:`serial_dense` callers such as the Sinkhorn forward keep on one
#: thread (32 MiB in float64).  The products are bound by memory traffic,
#: and a second thread slowed them down on a loaded machine
#: (docs/performance.md).
SERIAL_MATVEC_ENTRIES = 1 << 22

#: The boundary, in bytes, on which :func:`cache_aligned` starts an array (a
#: cache line).
CACHE_LINE = 64


def cache_aligned(x):
    """``x`` with its data starting on a cache-line boundary.

    A NumPy array that does not start on one (or is not C-contiguous) is
    copied into one that does; other arrays are returned as they are.
    Matrix-vector products read the matrix in whole cache lines with vector
    loads; a matrix whose data starts inside a line makes loads straddle two
    lines, which slows the products of matrices that stay in cache (a few
    hundred rows) measurably.  NumPy only promises 16-byte alignment, and a
    large array usually starts 16 bytes into a page.  A broadcast array is
    materialised: align before broadcasting.
    """
    if type(x) is not np.ndarray or (x.ctypes.data % CACHE_LINE == 0 and x.flags.c_contiguous):
        return x
    buf = np.empty(x.size + CACHE_LINE // x.itemsize, dtype=x.dtype)
    start = (-buf.ctypes.data % CACHE_LINE) // x.itemsize
    out = buf[start:start + x.size].reshape(x.shape)
    out[...] = x
    return out


@contextlib.contextmanager
def single_threaded_blas(like, when: bool = True):
    """Context in which NumPy's BLAS/LAPACK run on one thread.

    A no-op when ``when`` is False, for namespaces other than NumPy (CuPy,
    ``array_api_strict``), and when ``threadpoolctl`` (an optional
    dependency) is not installed.  The limit is process-wide while the
    context is open and the previous thread counts are restored on exit;
    results do not depend on it.
    """
    controller = _blas_controller() if when and array_api_compat.is_numpy_array(like) else None
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (NumPy's and SciPy's),
    made once: building it scans the process's shared libraries, which costs
    more than a small Sinkhorn solve, while entering a limit on it is cheap.
    None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    import scipy.linalg  # noqa: F401  (load SciPy's BLAS too, so the limit covers it)
    return ThreadpoolController()


def serial_dense(like, k: int):
    """:func:`single_threaded_blas` for dense factorizations of order
    ``k <= SERIAL_DENSE_N`` of arrays like ``like``."""
    return single_threaded_blas(like, k <= SERIAL_DENSE_N)


def diagonal(A):
    """Batched main diagonal (..., n)."""
    return array_api_compat.array_namespace(A).linalg.diagonal(A)


def eye_like(A, n: int | None = None):
    """Identity of size ``n`` (default: A's last axis) with A's dtype and device."""
    xp = array_api_compat.array_namespace(A)
    n = A.shape[-1] if n is None else n
    return xp.eye(n, dtype=A.dtype, device=device(A))


def diag_embed(v):
    """Batched diagonal matrix: ``diag_embed(v)[..., i, j] = v[..., i] delta_ij``."""
    return v[..., :, None] * eye_like(v, v.shape[-1])


def inner(a, b):
    """Frobenius inner product <a, b> = sum(a * b) over all axes (0-d array)."""
    xp = array_api_compat.array_namespace(a, b)
    return xp.sum(a * b)


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    """Stable ``log(sum(exp(x), axis))``.

    Uses ``m + log(sum(exp(x - m)))`` with ``m`` the maximum along ``axis``;
    a slice that is entirely ``-inf`` gives ``-inf`` (no NaN, no warning).
    """
    xp = array_api_compat.array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    s = xp.sum(xp.exp(x - m), axis=axis, keepdims=True)
    positive = s > 0
    out = xp.where(positive, xp.log(xp.where(positive, s, xp.ones_like(s))),
                   xp.full_like(s, -math.inf)) + m
    if not keepdims:
        out = xp.squeeze(out, axis=axis)
    return out


def sum_to_shape(x, shape: tuple[int, ...]):
    """Sum ``x`` over the axes that broadcasting added or stretched to reach
    ``x.shape`` from ``shape`` (the adjoint of ``broadcast_to``)."""
    xp = array_api_compat.array_namespace(x)
    shape = tuple(shape)
    if tuple(x.shape) == shape:
        return x
    lead = x.ndim - len(shape)
    if lead < 0:
        raise ValueError(f"cannot reduce shape {tuple(x.shape)} to {shape}")
    if lead:
        x = xp.sum(x, axis=tuple(range(lead)))
    axes = tuple(i for i, (n, s) in enumerate(zip(shape, x.shape)) if n == 1 and s != 1)
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    if tuple(x.shape) != shape:
        raise ValueError(f"cannot reduce shape {tuple(x.shape)} to {shape}")
    return x


def frobenius(X):
    """Per-member Frobenius norm ``||X||_F`` (shape ``X.shape[:-2]``), by one
    dot product per member (no squared temporary)."""
    xp = array_api_compat.array_namespace(X)
    flat = xp.reshape(X, tuple(X.shape[:-2]) + (X.shape[-2] * X.shape[-1],))
    return xp.sqrt(xp.vecdot(flat, flat))
