"""Shared pieces of the Numba CPU kernels.

* Lazy compilation. Importing a kernel module imports neither numba nor compiles anything:
  kernels are plain Python functions marked with :func:`kernel` (entry points called from
  Python) or :func:`jitable` (helpers called from kernels). The first call of any kernel
  imports numba, registers the helpers and intrinsics, and jits the kernel with
  ``cache=True`` (compiled code is cached on disk per dtype signature, so later processes
  load instead of compiling).
* Vectorisable math. ``fexp`` / ``ferfc`` are scalar functions the kernels call inside their
  inner loops. For float32 they are branch-free polynomial versions (Cephes ``expf`` with a
  bit-cast ``2**n``; a Chebyshev-fitted ``erfc`` on top of it) that LLVM vectorises into AVX
  lanes; for float64 they are ``math.exp`` / ``math.erfc`` (libm, full double accuracy). numba has no vector math
  library here (no SVML), so ``math.exp`` on float32 would stay scalar and dominate softmax.
* Threads: kernels run ``prange`` over independent rows / tiles (static split over numba's
  threads); BLAS called from inside them is held to one thread (:func:`blas_single_thread`).
* Plumbing shared by the three kernel modules: dtype / device checks (:func:`check_floats`),
  tensor <-> numpy views and row flattening (:func:`np_view`, :func:`as_rows`), output
  allocation (:func:`empty`), and autograd wrappers for one-input ops
  (:func:`unary_autograd`).

Only numpy, torch and math are imported at module import; numba on first kernel call.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading

import numpy as np
import torch

from .._alloc import empty as _poisonable_empty
from .._alloc import poison_enabled

__all__ = [
    "kernel", "jitable", "prange", "row_max", "fexp", "ferfc", "thread_id", "atomic_next", "num_threads",
    "task_counter",
    "check_floats", "np_view", "empty", "as_rows", "FLOAT_DTYPES", "blas_single_thread",
    "unary_autograd",
]

FLOAT_DTYPES = (torch.float32, torch.float64)

_lock = threading.RLock()
_numba = None
_JITABLE: list = []
_JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")


# ----------------------------------------------------------------------------------------------
# lazy numba
# ----------------------------------------------------------------------------------------------
def _get_numba():
    """Import numba and register helpers/intrinsics, once."""
    global _numba
    if _numba is not None:
        return _numba
    with _lock:
        if _numba is None:
            import numba
            _drop_stale_cache()
            _register(numba)
            _numba = numba
    return _numba


def _drop_stale_cache():
    """numba keys a kernel's on-disk cache on the kernel's own source file only, but the
    kernels inline helpers from this file: when this file changes, delete the cached kernels
    in ``kernels/numba/__pycache__`` so that none keeps a stale inlined copy. (Caches that
    numba puts elsewhere, e.g. under NUMBA_CACHE_DIR, are not touched.)"""
    import hashlib
    import pathlib
    try:
        here = pathlib.Path(__file__).resolve().parent
        stamp = hashlib.sha256((here / "_common.py").read_bytes()).hexdigest()
        cache = here / "__pycache__"
        mark = cache / "_common.numba-stamp"
        if mark.is_file() and mark.read_text() == stamp:
            return
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        mark.write_text(stamp)
    except OSError:  # read-only install: numba caches elsewhere
        pass


def num_threads() -> int:
    """numba's current thread count (imports numba)."""
    return int(_get_numba().get_num_threads())


def task_counter() -> np.ndarray:
    """A fresh shared task counter for :func:`atomic_next` (dynamic scheduling).

    Kernels whose tasks differ in cost (causal attention) run ``for w in prange(workers)``
    with ``workers = num_threads()`` and let each worker take the next task from the counter
    until none is left: heavy tasks first, idle threads keep taking work, and a thread slowed
    by another process on its core does not hold the others back (numba's own prange splits
    the iterations statically)."""
    return np.zeros(1, dtype=np.int64)


class _LazyKernel:
    """A kernel compiled by numba on its first call (cache=True)."""

    def __init__(self, py_func, options, uses_blas=False):
        self.uses_blas = uses_blas
        self.py_func = py_func
        self.options = options
        self._dispatcher = None
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__doc__ = py_func.__doc__
        self.__module__ = py_func.__module__

    @property
    def dispatcher(self):
        if self._dispatcher is None:
            numba = _get_numba()
            with _lock:
                if self._dispatcher is None:
                    # kernels say ``prange`` (imported from here as ``range``); numba must see
                    # its own prange when it compiles them
                    self.py_func.__globals__["prange"] = numba.prange
                    self._dispatcher = numba.njit(**self.options)(self.py_func)
        return self._dispatcher

    def __call__(self, *args):
        disp = self.dispatcher
        if self.uses_blas:
            with blas_single_thread():
                return disp(*args)
        return disp(*args)

    def __repr__(self):
        state = "compiled" if self._dispatcher is not None else "lazy"
        return f"<numba kernel {self.__qualname__} ({state})>"


prange = range  # replaced by numba.prange in a kernel module's globals when it compiles


def kernel(parallel: bool = True, fastmath=True, blas: bool = False):
    """Mark a Python function as a numba kernel, jitted lazily with cache=True.

    ``fastmath=True`` allows reassociation (vectorised reductions) and FMA contraction;
    no-NaN/no-Inf assumptions are NOT enabled: kernels rely on -inf for masked attention rows.
    A set of LLVM flags may be given instead (e.g. without "contract" where exact
    cancellation matters), or False for strict IEEE arithmetic.
    """
    if fastmath is True:
        fm = {"reassoc", "contract", "arcp", "nsz"}
    else:
        fm = set(fastmath) if fastmath else False

    def wrap(fn):
        opts = dict(_JIT_OPTIONS, parallel=parallel, fastmath=fm)
        return _LazyKernel(fn, opts, uses_blas=blas)

    return wrap


def jitable(fn=None, *, finite: bool = False):
    """Mark a helper called from kernels (registered with numba.extending.register_jitable
    when numba is first imported). The function stays a plain Python function otherwise.
    Compiled with the kernels' fastmath flags and numpy's error model (no ZeroDivisionError
    branch in divisions, which would stop vectorisation).

    ``finite=True`` compiles it with full fastmath (no-NaN / no-Inf assumptions too), which
    lets LLVM vectorise max/min reductions; only for helpers whose inputs are finite."""
    def wrap(fn):
        flags = {"reassoc", "contract", "arcp", "nsz"}
        if finite:
            flags |= {"nnan", "ninf"}
        opts = {"fastmath": flags, "error_model": "numpy"}
        _JITABLE.append((fn, opts))
        if _numba is not None:  # registered after numba was loaded
            _numba.extending.register_jitable(**opts)(fn)
        return fn

    return wrap(fn) if fn is not None else wrap


@jitable(finite=True)
def row_max(row, n):
    """max(row[:n]) for n >= 1 finite values (vectorised)."""
    mx = row[0]
    for c in range(n):  # from 0, not 1: a loop index numba knows is >= 0 has no wraparound
        v = row[c]      # code, and this loop vectorises
        mx = v if v > mx else mx
    return mx


# ----------------------------------------------------------------------------------------------
# BLAS threads
# ----------------------------------------------------------------------------------------------
# numba's np.dot calls the BLAS that scipy.linalg.cython_blas links (OpenBLAS in scipy's wheels).
# Called from inside a numba prange loop, a multi-threaded OpenBLAS gemm (it threads once
# m*n*k > 262144) serialises the workers on its own thread pool (10x slower) and prints
# "Detect OpenMP Loop and this application may hang". The kernels already use every core, so
# BLAS must run single-threaded inside them: we set its thread count to 1 for the duration of
# a kernel call and restore it afterwards (reference-counted across Python threads).
_BLAS_THREAD_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("bli_thread_get_num_threads", "bli_thread_set_num_threads"),
    ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
)
_blas_fns = None  # (get, set) or () when not found
_blas_depth = 0
_blas_saved = None


def _blas_thread_fns():
    global _blas_fns
    if _blas_fns is None:
        fns = ()
        try:
            from scipy.linalg import cython_blas
            lib = ctypes.CDLL(cython_blas.__file__)  # dlsym searches its dependencies too
            for get_name, set_name in _BLAS_THREAD_SYMBOLS:
                try:
                    fget, fset = getattr(lib, get_name), getattr(lib, set_name)
                except AttributeError:
                    continue
                fget.restype, fget.argtypes = ctypes.c_int, []
                fset.restype, fset.argtypes = None, [ctypes.c_int]
                fns = (fget, fset)
                break
        except Exception:  # pragma: no cover - no scipy / exotic BLAS: leave it alone
            fns = ()
        _blas_fns = fns
    return _blas_fns


@contextlib.contextmanager
def blas_single_thread():
    """Run the block with the BLAS that numba's np.dot uses limited to one thread."""
    global _blas_depth, _blas_saved
    fns = _blas_thread_fns()
    if not fns:
        yield
        return
    fget, fset = fns
    with _lock:
        if _blas_depth == 0:
            _blas_saved = fget()
            if _blas_saved != 1:
                fset(1)
        _blas_depth += 1
    try:
        yield
    finally:
        with _lock:
            _blas_depth -= 1
            if _blas_depth == 0 and _blas_saved not in (None, 1):
                fset(_blas_saved)


# ----------------------------------------------------------------------------------------------
# vectorisable scalar math (dtype-dispatched through numba overloads)
# ----------------------------------------------------------------------------------------------
def fexp(x):
    """exp(x): branch-free float32 polynomial (<= 2 ulp on [-87, 88], clamped outside), libm
    for float64. Plain Python fallback outside numba."""
    return math.exp(x)


def ferfc(x):
    """erfc(x) for x >= 0: float32 Chebyshev fit (Numerical Recipes ``erfcc``) on ``fexp``,
    relative error <= 4e-7 for x < 1, <= 8e-6 up to x = 9.2 (the float32 rounding of x^2 in
    the exponent); libm for float64. Relative accuracy in the tail is what exact GELU needs
    for negative inputs (1 + erf(x) cancels there)."""
    return math.erfc(x)


def thread_id():
    """Index of the current numba worker thread in [0, get_num_threads())."""
    return 0


def atomic_next(counter):
    """Atomically ``counter[0] += 1`` (int64 array) and return the old value: a shared task
    counter for dynamic scheduling inside a prange over workers (see :func:`task_counter`)."""
    old = int(counter[0])
    counter[0] += 1
    return old


_F32 = np.float32
# Cephes expf
_EXP_HI = _F32(88.0)
_EXP_LO = _F32(-87.33654)
_LOG2E = _F32(1.44269504088896341)
_LN2_HI = _F32(0.693359375)
_LN2_LO = _F32(-2.12194440e-4)
_EP = tuple(_F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                              4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
# Numerical Recipes erfcc: erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2)
_ERFC_C = tuple(_F32(c) for c in (-1.26551223, 1.00002368, 0.37409196, 0.09678418,
                                  -0.18628806, 0.27886807, -1.13520398, 1.48851587,
                                  -0.82215223, 0.17087277))


def _register(numba):
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload, register_jitable

    @intrinsic
    def _i32_as_f32(typingctx, x):
        if x != types.int32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    hi, lo, log2e, c1, c2 = _EXP_HI, _EXP_LO, _LOG2E, _LN2_HI, _LN2_LO
    p0, p1, p2, p3, p4, p5 = _EP
    half, one = _F32(0.5), _F32(1.0)
    i127, i23 = np.int32(127), np.int32(23)

    @overload(fexp, jit_options={"fastmath": False})
    def _ov_fexp(x):
        if x == types.float32:
            def impl(x):
                x = min(max(x, lo), hi)
                n = np.floor(x * log2e + half)
                r = x - n * c1
                r = r - n * c2
                p = p0 * r + p1
                p = p * r + p2
                p = p * r + p3
                p = p * r + p4
                p = p * r + p5
                y = p * (r * r) + r + one
                e = np.int32(np.int32(n) + i127) << i23
                return y * _i32_as_f32(np.int32(e))
            return impl
        if isinstance(x, types.Float):
            return lambda x: math.exp(x)
        return None

    # own names: the closures above read hi, lo, log2e, c1, c2, p0..p5 when they compile
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 = _ERFC_C

    @overload(ferfc, inline="always")
    def _ov_ferfc(x):
        if x == types.float32:
            def impl(x):
                t = one / (one + half * x)
                p = r8 + t * r9
                p = r7 + t * p
                p = r6 + t * p
                p = r5 + t * p
                p = r4 + t * p
                p = r3 + t * p
                p = r2 + t * p
                p = r1 + t * p
                p = r0 + t * p
                return t * fexp(p - x * x)
            return impl
        if isinstance(x, types.Float):
            return lambda x: math.erfc(x)
        return None

    @intrinsic
    def _atomic_fetch_add1(typingctx, arr):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
            return None

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1),
                                      "monotonic")

        return types.int64(arr), codegen

    @overload(atomic_next)
    def _ov_atomic_next(counter):
        return lambda counter: _atomic_fetch_add1(counter)

    get_tid = numba.get_thread_id

    @overload(thread_id)
    def _ov_thread_id():
        return lambda: get_tid()

    for fn, opts in _JITABLE:
        register_jitable(**opts)(fn)


# ----------------------------------------------------------------------------------------------
# checks and conversion (autograd plumbing)
# ----------------------------------------------------------------------------------------------
def check_floats(op: str, **tensors):
    """TypeError unless every non-None tensor is a CPU float32/float64 tensor of one dtype."""
    dtype = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise TypeError(f"{op}: the numba backend runs on the CPU; {name} is on {t.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; the numba kernels support "
                            "torch.float32 and torch.float64 only")
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            raise TypeError(f"{op}: all tensors must share one dtype; {name} is {t.dtype}, "
                            f"expected {dtype}")
    return dtype


# ----------------------------------------------------------------------------------------------
# output allocation
# ----------------------------------------------------------------------------------------------
# Large fresh outputs cost more in page faults than in arithmetic for these bandwidth-bound
# kernels (a 64 MiB float32 output: ~70 ms of 4 KiB faults vs ~20 ms of writes on the 2-core
# reference machine). Where Linux transparent huge pages are in "madvise" mode, we advise the
# 2 MiB-aligned interior of large outputs (allocated by torch as usual, still untouched) to use
# huge pages: 512x fewer faults. Set BLOCKZOO_NUMBA_THP=0 to turn this off.
_THP_MIN_BYTES = 8 << 20
_HUGE = 2 << 20
_madvise = None  # callable(addr, length) or False


def _get_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        try:
            import os
            if os.environ.get("BLOCKZOO_NUMBA_THP", "1") != "0":
                with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                    mode = f.read()
                if "[madvise]" in mode:
                    libc = ctypes.CDLL(None, use_errno=True)
                    fn = libc.madvise
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                    fn.restype = ctypes.c_int
                    _madvise = lambda addr, n: fn(addr, n, 14)  # noqa: E731  MADV_HUGEPAGE
        except Exception:  # pragma: no cover - not Linux / no THP: plain allocations
            _madvise = False
    return _madvise


def empty(shape, dtype) -> torch.Tensor:
    """torch.empty on the CPU; large ones advised to use transparent huge pages. Inside
    ``kernels._alloc.poisoned()`` (tests) the buffer comes NaN-filled instead."""
    if poison_enabled():
        return _poisonable_empty(shape, dtype=dtype, device="cpu")
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= _THP_MIN_BYTES:
        adv = _get_madvise()
        if adv:
            addr = t.data_ptr()
            start = (addr + _HUGE - 1) & ~(_HUGE - 1)
            end = (addr + nbytes) & ~(_HUGE - 1)
            if end > start:
                adv(start, end - start)
    return t


def np_view(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view of a CPU tensor (copies only if not contiguous)."""
    return t.detach().contiguous().numpy()


def unary_autograd(name: str, fwd, bwd):
    """A torch.autograd.Function for y = fwd(x) whose backward is dx = bwd(dy, x)."""

    def forward(ctx, x):
        ctx.save_for_backward(x)
        return fwd(x)

    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return bwd(dy, x)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
        "__doc__": f"autograd wrapper: apply(x) -> {fwd.__name__}(x); backward {bwd.__name__}.",
    })


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., W] -> contiguous [N, W] (a view when possible)."""
    t = t.contiguous()
    return t.view(-1, t.shape[-1]) if t.dim() != 2 else t
