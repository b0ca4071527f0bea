"""A CPU array namespace with CuPy's semantics, for testing the CuPy code paths.

Backend name ``"cupy_semantics"`` (:func:`refimpl.backend.get_backend`).
Its arrays hold NumPy arrays and compute with NumPy, but behave the way CuPy
arrays behave where CuPy and NumPy differ in ways that matter to refimpl,
and :func:`refimpl.backend.device_policy` gives its namespace the same
:class:`~refimpl.backend.DevicePolicy` as CuPy's (deferred host syncs, no
batch broadcasting in ``linalg.solve``, non-raising ``linalg``).  So every
branch refimpl takes on a GPU runs, and is tested, on a machine without one.
It is a test double, not a CuPy replacement: it does not model speed,
streams, memory limits or kernel numerics.

Design
------
A thin wrapper, not a ``numpy.ndarray`` subclass: NumPy converts an
ndarray subclass to a base-class array without asking the object
(``np.asarray(sub)`` never calls ``__array__``), and array-api-compat would
classify a subclass as NumPy and route it to NumPy's host fast paths; both
would hide exactly the bugs this backend exists to catch.  So
:class:`ndarray` holds a NumPy array, forwards the array API's operators,
attributes and the few methods refimpl uses, and reports this module's
namespace (:data:`xp`) through ``__array_namespace__``; the namespace
forwards to ``array_api_compat.numpy``, unwrapping arguments and wrapping
results.  The rules enforced (sources: the CuPy user guide "Differences
between CuPy and NumPy", the ``cupy.ndarray`` and ``cupy.linalg``
reference pages):

1. **No implicit host conversion.**  ``numpy.asarray(a)``/``a.__array__()``
   raise ``TypeError`` (CuPy: "Implicit conversion to a NumPy array is not
   allowed. Please use `.get()` ..."); DLPack export to the host raises
   ``BufferError`` (the data claim to be on a CUDA device).  The explicit
   transfers are ``a.get()`` (used by :func:`refimpl.backend.to_host`) and
   ``xp.asarray(host_array)``.  ``float(a)``, ``int(a)``, ``bool(a)`` and
   ``a.item()`` are explicit, synchronising reads of a 0-d array and are
   allowed, as on CuPy.
2. **No host arrays in device arithmetic.**  A ``numpy.ndarray`` operand
   of an operator or of a namespace function (other than ``asarray``)
   raises ``TypeError`` (CuPy: "Unsupported type <class
   'numpy.ndarray'>").  Python and NumPy scalars are accepted, as on CuPy.
   NumPy ufuncs applied to these arrays run and return these arrays
   (CuPy implements ``__array_ufunc__``); other NumPy functions are not
   dispatched (stricter than CuPy's ``__array_function__``: refimpl's
   operators call ``xp`` functions only, so such a call is a defect).
3. **Reductions and scalar indexing return 0-d arrays**, never NumPy
   scalars (user guide, "Zero-dimensional array").
4. **``linalg.solve`` does not broadcast batch dimensions**: ``b`` must be
   ``(M,)``, or share ``a``'s batch shape exactly as ``(..., M)`` or
   ``(..., M, K)``; anything else is a ``ValueError`` (``cupy.linalg.solve``
   reference; array-api-compat passes CuPy's function through).
5. **``linalg`` failures are silent by default**: ``solve``, ``inv`` and
   ``cholesky`` of a singular / non-positive-definite member return
   non-finite values for that member instead of raising ``LinAlgError``,
   unless inside :func:`errstate` ``(linalg="raise")`` (``cupy.linalg``
   reference: cuSOLVER results "may be invalid ... set the linalg
   configuration ... in cupyx.errstate()").
6. **No floating-point warnings**: divisions by zero, overflow and invalid
   operations give ``inf``/``nan`` silently (CuPy kernels do not report
   floating-point exceptions; ``numpy.seterr``/``errstate`` have no CuPy
   counterpart that affects them).
7. **Arrays live on a device** (:data:`DEVICE`, ``id`` 0, like
   ``cupy.cuda.Device(0)``); creation functions accept ``device=DEVICE`` or
   ``None`` and reject anything else (``"cpu"`` included).
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import types

import array_api_compat.numpy as _np_xp
import numpy as np

__all__ = ["DEVICE", "Device", "errstate", "is_array", "ndarray", "xp"]

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")

#: "raise" inside ``errstate(linalg="raise")``, else "ignore" (CuPy's default)
_LINALG_MODE = contextvars.ContextVar("cupy_semantics_linalg", default="ignore")


class Device:
    """The emulated device (the counterpart of ``cupy.cuda.Device(0)``)."""

    __slots__ = ("id",)

    def __init__(self, id: int = 0):
        self.id = id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(("cupy_semantics", self.id))

    def __repr__(self):
        return f"<CuPy-semantics Device {self.id}>"

    def synchronize(self) -> None:
        """Wait for the device (a no-op: NumPy computes eagerly)."""


DEVICE = Device(0)


@contextlib.contextmanager
def errstate(*, linalg: str = "ignore"):
    """The counterpart of ``cupyx.errstate(linalg=...)``: ``"raise"`` makes
    failed factorisations raise ``numpy.linalg.LinAlgError``."""
    if linalg not in ("ignore", "raise"):
        raise ValueError(f"argument 'linalg' must be 'ignore' or 'raise', got {linalg!r}")
    token = _LINALG_MODE.set(linalg)
    try:
        yield
    finally:
        _LINALG_MODE.reset(token)


# --------------------------------------------------------------------------
# Wrapping and unwrapping
# --------------------------------------------------------------------------

def _host_array_error(where: str) -> TypeError:
    return TypeError(f"{where}: unsupported type <class 'numpy.ndarray'> (a host array "
                     "cannot enter device arithmetic; move it with xp.asarray first)")


def _unwrap(obj, where: str):
    """Device arrays -> their NumPy data; host arrays are refused (rule 2)."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise _host_array_error(where)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_unwrap(o, where) for o in obj)
    return obj


def _wrap(obj):
    """NumPy results -> device arrays; NumPy scalars -> 0-d arrays (rule 3)."""
    if isinstance(obj, np.ndarray):
        return ndarray(obj)
    if isinstance(obj, np.generic):
        return ndarray(np.asarray(obj))
    if isinstance(obj, tuple):
        items = [_wrap(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


def _check_device(dev, where: str):
    if dev is not None and dev != DEVICE:
        raise ValueError(f"{where}: device must be {DEVICE!r} or None, got {dev!r}")
    return None


def _call(fn, args, kwargs, where: str):
    out = kwargs.get("out")
    args = _unwrap(args, where)
    kwargs = {k: _unwrap(v, where) for k, v in kwargs.items()}
    if "device" in kwargs:
        kwargs["device"] = _check_device(kwargs["device"], where)
    with np.errstate(all="ignore"):                  # rule 6
        result = fn(*args, **kwargs)
    if isinstance(out, ndarray) and result is out._a:
        return out                                   # like CuPy: the out array itself
    return _wrap(result)


def _forward(fn, name: str):
    def f(*args, **kwargs):
        return _call(fn, args, kwargs, name)
    f.__name__ = name
    f.__doc__ = f"``{name}`` of array_api_compat.numpy on CuPy-semantics arrays."
    return f


# --------------------------------------------------------------------------
# The array
# --------------------------------------------------------------------------

def _binary(name: str, fn):
    def method(self, other):
        if isinstance(other, np.ndarray):
            raise _host_array_error(name)
        if not isinstance(other, (ndarray, bool, int, float, complex, np.generic)):
            return NotImplemented
        other = other._a if isinstance(other, ndarray) else other
        with np.errstate(all="ignore"):
            return _wrap(fn(self._a, other))
    method.__name__ = name
    return method


def _inplace(name: str, fn):
    def method(self, other):
        if isinstance(other, np.ndarray):
            raise _host_array_error(name)
        other = other._a if isinstance(other, ndarray) else other
        with np.errstate(all="ignore"):
            self._a = fn(self._a, other)     # NumPy's in-place operator: same buffer
        return self
    method.__name__ = name
    return method


def _unary(name: str, fn):
    def method(self):
        with np.errstate(all="ignore"):
            return _wrap(fn(self._a))
    method.__name__ = name
    return method


def _array_method(name: str):
    def method(self, *args, **kwargs):
        return _call(getattr(self._a, name), args, kwargs, f"ndarray.{name}")
    method.__name__ = name
    return method


class ndarray:
    """A device array of the CuPy-semantics backend (see the module docstring)."""

    __slots__ = ("_a",)
    __hash__ = None  # type: ignore[assignment]  # mutable, like cupy.ndarray

    def __init__(self, data: np.ndarray):
        if not isinstance(data, np.ndarray):
            raise TypeError("ndarray wraps a numpy.ndarray; use xp.asarray to create arrays")
        self._a = data

    # -- the array API object -------------------------------------------
    def __array_namespace__(self, api_version=None):
        return xp

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def shape(self):
        return self._a.shape

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def device(self):
        return DEVICE

    @property
    def T(self):
        return ndarray(self._a.T)

    @property
    def mT(self):
        return ndarray(np.swapaxes(self._a, -1, -2))

    @property
    def flags(self):
        return self._a.flags

    @property
    def nbytes(self):
        return self._a.nbytes

    @property
    def itemsize(self):
        return self._a.itemsize

    def to_device(self, device, /, *, stream=None):
        _check_device(device, "to_device")
        return self

    # -- rule 1: explicit transfers only --------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __dlpack_device__(self):
        return (2, DEVICE.id)                        # kDLCUDA: not host-readable

    def __dlpack__(self, **kwargs):
        raise BufferError("a CuPy-semantics array is on a (emulated) CUDA device; "
                          "copy it to the host with .get()")

    def get(self) -> np.ndarray:
        """Copy to the host (``cupy.ndarray.get``)."""
        return self._a.copy()

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return operator.index(self._a)

    def __complex__(self):
        return complex(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"cupy_semantics.{np.array_repr(self._a)}"

    # -- NumPy ufuncs dispatch to this array (CuPy's __array_ufunc__) ----
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = _unwrap(inputs, f"numpy.{ufunc.__name__}")
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], f"numpy.{ufunc.__name__}")
        with np.errstate(all="ignore"):
            return _wrap(getattr(ufunc, method)(*inputs, **kwargs))

    # -- indexing --------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "__getitem__")])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            raise _host_array_error("__setitem__")
        self._a[_unwrap(key, "__setitem__")] = value._a if isinstance(value, ndarray) else value


for _name, _fn in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv),
                   ("mod", operator.mod), ("pow", operator.pow), ("matmul", operator.matmul),
                   ("and", operator.and_), ("or", operator.or_), ("xor", operator.xor),
                   ("lshift", operator.lshift), ("rshift", operator.rshift)]:
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__", _fn))
    setattr(ndarray, f"__r{_name}__",
            _binary(f"__r{_name}__", lambda a, b, _f=_fn: _f(b, a)))
    setattr(ndarray, f"__i{_name}__", _inplace(f"__i{_name}__", getattr(operator, f"i{_name}")))
for _name, _fn in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt),
                   ("ge", operator.ge), ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__", _fn))
for _name, _op1 in [("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs),
                    ("invert", operator.invert)]:
    setattr(ndarray, f"__{_name}__", _unary(f"__{_name}__", _op1))
for _name in ("reshape", "astype", "copy", "item", "tolist", "sum", "max", "min", "mean",
              "any", "all", "argmax", "argmin", "argsort", "sort", "clip", "swapaxes",
              "squeeze", "ravel", "flatten", "transpose", "fill", "conj"):
    setattr(ndarray, _name, _array_method(_name))


def is_array(x) -> bool:
    """Whether ``x`` is an array of this backend."""
    return isinstance(x, ndarray)


# --------------------------------------------------------------------------
# linalg (rules 4 and 5)
# --------------------------------------------------------------------------

def _per_member(fn, a, *rest):
    """``fn`` member by member over the batch of ``a`` (``rest`` with the same
    batch shape, or a single vector); a member that raises LinAlgError gets
    NaN (rule 5)."""
    batch = a.shape[:-2]
    pick = [(lambda x, idx: x) if x.ndim == 1 else (lambda x, idx: x[idx]) for x in rest]
    results = {}
    for idx in np.ndindex(*batch):
        try:
            results[idx] = fn(a[idx], *(p(x, idx) for p, x in zip(pick, rest)))
        except np.linalg.LinAlgError:
            results[idx] = None
    probe = fn(np.eye(a.shape[-1], dtype=a.dtype),
               *(p(x, next(np.ndindex(*batch))) for p, x in zip(pick, rest)))
    out = np.empty(batch + probe.shape, dtype=probe.dtype)
    for idx, r in results.items():
        out[idx] = np.nan if r is None else r
    return out


def _silent_linalg(fn, name: str):
    def f(a, *rest):
        a = _unwrap(a, f"linalg.{name}")
        rest = _unwrap(rest, f"linalg.{name}")
        with np.errstate(all="ignore"):
            try:
                return _wrap(fn(a, *rest))
            except np.linalg.LinAlgError:
                if _LINALG_MODE.get() == "raise":
                    raise
            return _wrap(_per_member(fn, a, *rest))
    f.__name__ = name
    return f


def _solve_shapes(a, b):
    """Rule 4: CuPy's ``linalg.solve`` shape contract (no broadcasting)."""
    ok = a.ndim >= 2 and a.shape[-1] == a.shape[-2] and (
        (b.ndim == 1 and b.shape[0] == a.shape[-1])
        or (b.ndim in (a.ndim, a.ndim - 1) and b.ndim >= 1
            and tuple(b.shape[:a.ndim - 1]) == tuple(a.shape[:-1])))
    if not ok:
        raise ValueError(f"linalg.solve: a must have (..., M, M) shape and b must have "
                         f"(M,), (..., M) or (..., M, K) with the same batch shape; "
                         f"got a {tuple(a.shape)}, b {tuple(b.shape)}")


def _solve_numpy(a, b):
    """NumPy's solve with CuPy's reading of ``b``: (..., M) is a stack of vectors."""
    if b.ndim == a.ndim - 1 and b.ndim > 1:
        return np.linalg.solve(a, b[..., None])[..., 0]
    return np.linalg.solve(a, b)


def _solve(a, b, /):
    """``linalg.solve`` with rules 4 and 5."""
    _solve_shapes(_unwrap(a, "linalg.solve"), _unwrap(b, "linalg.solve"))
    return _silent_linalg(_solve_numpy, "solve")(a, b)


class _Namespace(types.ModuleType):
    """A namespace forwarding to ``array_api_compat.numpy`` (see module docstring)."""

    def __init__(self, name: str, base, overrides: dict):
        super().__init__(name)
        self._base = base
        self._overrides = overrides

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._overrides:
            return self._overrides[name]
        attr = getattr(self._base, name)
        if callable(attr) and not isinstance(attr, type):
            attr = _forward(attr, name)
        setattr(self, name, attr)                 # cache
        return attr


def _asarray(obj, /, *, dtype=None, device=None, copy=None):
    """Create a device array; a host ``numpy.ndarray`` is copied over (the
    explicit host -> device transfer of ``cupy.asarray``, never aliasing)."""
    _check_device(device, "asarray")
    if isinstance(obj, ndarray):
        return ndarray(np.asarray(_np_xp.asarray(obj._a, dtype=dtype, copy=copy)))
    if isinstance(obj, np.ndarray):
        return ndarray(np.array(obj, dtype=dtype, copy=True))
    return ndarray(np.asarray(_np_xp.asarray(_unwrap(obj, "asarray"), dtype=dtype, copy=copy)))


linalg = _Namespace(__name__ + ".linalg", _np_xp.linalg, {
    "solve": _solve,
    "inv": _silent_linalg(np.linalg.inv, "inv"),
    "cholesky": _silent_linalg(_np_xp.linalg.cholesky, "cholesky"),
    "LinAlgError": np.linalg.LinAlgError,
})

#: The namespace (``array_namespace`` of this backend's arrays).
xp = _Namespace(__name__ + ".xp", _np_xp, {
    "asarray": _asarray,
    "linalg": linalg,
    "errstate": errstate,
    "ndarray": ndarray,
})
