"""Kernel launches that skip part of triton's per-call Python.

``JITFunction.run`` (triton 3.6) binds every argument, computes the specialization key, looks up the compiled
kernel, reads several runtime knobs, builds a launch-metadata dict and only then calls the launcher. On a FLUX
step (~500 quantized layers, each with one or more launches) the host outran the GPU. ``launch`` keeps a cache
from a key that is at least as fine as triton's own specialization (argument dtypes, 16-byte alignment of
pointers, integers' value classes, constexpr and option values) to the compiled kernel and calls its launcher
directly: 21 us per launch against triton's 25 on an H200's host, the compiled launcher itself taking 9
(BENCHMARKS.md, "Host cost per call"). A miss compiles (or finds) the specialization through ``fn.warmup`` and
loads it under ``loaded``'s lock, then launches as a hit; the interpreter, a non-CUDA tensor or an installed launch
hook (profilers) go through triton's normal path.
"""

import inspect
import threading
import time

import torch
import triton
from triton import knobs

from .common import INTERPRET, compile_lock

_CACHE: dict[tuple, tuple] = {}

#: Whether bound launches call triton's C launcher directly, with the argument layout of triton 3.6 (the version on
#: the machines this was measured and tested on). Elsewhere (triton 3.7+ passes the kernel's arguments as one tuple
#: with C-side annotations) they call the compiled kernel's ``run``, as triton's own JIT does: the same layout in
#: 3.6 and 3.9, ~1 us more per launch.
DIRECT = tuple(int(v) for v in triton.__version__.split(".")[:2]) == (3, 6)
_CONSTEXPR_POSITIONS: dict[triton.JITFunction, tuple[int, ...]] = {}
_LOAD_LOCK = threading.Lock()


def loaded(kernel):
    """``kernel.run`` (a compiled kernel's launcher) once ``kernel.function`` (its CUDA function) is set.

    Triton 3.6's ``CompiledKernel._init_handles`` stores the launcher before it loads the module, with no lock, and
    ``run`` loads only where no launcher is stored yet: a thread that reads ``run`` while another thread loads the
    same kernel gets the launcher and ``function`` None, and its launch fails ("argument 5 must be int, not None";
    ``halfbyte.precompile``'s threads replay plans that share the split-K sum kernel). Loads through here take one
    lock; where another thread is loading on triton's own path, this one loads the module too (a second handle to
    the same code, which either thread may keep), and where a load failed it raises that load's error."""
    with _LOAD_LOCK:
        run = kernel.run
        if kernel.module is None:  # loading elsewhere, or its load raised (OutOfResources): load (or raise) here
            kernel._init_handles()
            run = kernel.run
    for _ in range(100_000):  # the other thread between its two stores (module, then function): a few instructions
        if kernel.function is not None:
            return run
        time.sleep(0)
    raise RuntimeError(f"launch: kernel {getattr(kernel, 'name', kernel)!r} has a module but no function")


def _arg_key(a):
    """A hashable class of ``a`` that determines triton's specialization of it (and is finer where unsure)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        # triton specializes ints on == 1 and % 16 == 0, and types them i32 / i64 / u64 by range
        return (a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63)
    if isinstance(a, float):
        return float
    if hasattr(a, "block_shape") and hasattr(a, "base"):  # a TMA descriptor: typed by dtype, block and layout
        return ("desc", a.base.dtype, tuple(a.block_shape), repr(getattr(a, "layout", None)))
    raise TypeError(f"launch: unsupported kernel argument of type {type(a).__name__}")


def cache_key(fn: triton.JITFunction, device: int, args: tuple, kwargs: dict) -> tuple:
    """The launcher cache's key: constexpr parameters passed by position by value, every other positional
    argument by its specialization class (``_arg_key``), keyword arguments (constexprs, options) by value."""
    const = _CONSTEXPR_POSITIONS.get(fn)
    if const is None:
        params = inspect.signature(fn.fn).parameters.values()  # JITFunction and the interpreter's wrapper
        const = _CONSTEXPR_POSITIONS[fn] = tuple(i for i, p in enumerate(params) if "constexpr" in str(p.annotation))
    return (fn, device, tuple(args[i] if i in const else _arg_key(a) for i, a in enumerate(args)),
            tuple(kwargs.items()))


def _compile_lock(key: tuple):
    """The compile lock of the specialization ``cache_key`` named by ``key``: keyword order left out, so that
    keys that differ only there (one triton specialization) take one lock, and the second thread finds the first
    one's compiled kernel in triton's cache instead of compiling and loading a copy of it."""
    return compile_lock(key[:3] + (tuple(sorted(key[3])),))


def _hooks_installed() -> bool:
    rt = knobs.runtime
    return bool(rt.launch_enter_hook.calls or rt.launch_exit_hook.calls)


def launch(fn: triton.JITFunction, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)`` on the current CUDA device, through a cached launcher.

    ``args`` are the kernel's leading parameters in order (tensors, ints, floats, bools or None); ``kwargs``
    name the remaining parameters (usually constexprs) and compile options (``num_warps``...). Same semantics as
    triton's launch, including compilation on the first call of each specialization.
    """
    if INTERPRET or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_cuda or _hooks_installed():
        fn[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    key = cache_key(fn, device, args, kwargs)
    hit = _CACHE.get(key)
    if hit is None:
        names = fn.arg_names[len(args):]
        missing = [n for n in names if n not in kwargs]
        if missing:
            raise TypeError(f"launch: {fn.__name__} needs arguments {missing}")
        with _compile_lock(key):  # another thread compiling this specialization: wait, then find it in triton's cache
            # Compile (or find) without launching, then load under ``loaded``'s lock: triton's own launch path reads
            # the launcher and the function unlocked, and two keys of ours can share one compiled kernel.
            kernel = fn.warmup(*args, grid=grid, **kwargs)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            run = loaded(kernel)
        # The launcher takes every parameter in signature order, constexprs included (it skips them).
        tail = tuple(kwargs[n] for n in names)
        hit = _CACHE[key] = (run, kernel.function, kernel.packed_metadata, tail)
    run, function, packed, tail = hit
    g0 = grid[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    run(g0, g1, g2, stream, function, packed, None, None, None, *args, *tail)


class Bound:
    """One compiled specialization of a kernel with its grid and every argument fixed but ``free`` positions.

    ``bound(stream, *ptrs)`` launches it on the raw CUDA ``stream`` with ``ptrs`` (device addresses as ints) at
    the free positions. The fixed tensors are kept as device addresses, not as tensors: a bound launch must not
    keep a layer's weights alive after they were moved or freed, so its owner checks that the tensors it was bound
    to still sit at those addresses before every call (``halfbyte.nn``'s inference plans). Integer pointers also
    skip the launcher's per-pointer ``data_ptr()`` call and driver query: ~6 us of the 9 us a compiled launch
    costs on an H200's host with nine tensor arguments.
    """

    __slots__ = ("_call",)

    def __init__(self, fn: triton.JITFunction, grid: tuple[int, ...], args: tuple, kwargs: dict,
                 free: tuple[int, ...]):
        if not free or any(not 0 <= i < len(args) for i in free) or list(free) != sorted(set(free)):
            raise ValueError(f"bind: free positions must be increasing argument positions, got {free}")
        try:
            key = cache_key(fn, torch.cuda.current_device(), args, kwargs)
            hash(key)
        except TypeError:  # an argument launch() does not key (or an unhashable option): one lock for the kernel
            key = None
        with compile_lock((fn, "bind")) if key is None else _compile_lock(key):
            kernel = fn.warmup(*args, grid=grid, **kwargs)  # compiles (or finds) this specialization; no launch
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            run = loaded(kernel)
        if getattr(run, "global_scratch_size", 0) or getattr(run, "profile_scratch_size", 0):
            raise NotImplementedError(f"{fn.__name__} needs a scratch buffer; bind() does not provide one")
        names = fn.arg_names[len(args):]
        missing = [n for n in names if n not in kwargs]
        if missing:
            raise TypeError(f"bind: {fn.__name__} needs arguments {missing}")
        fixed = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        g = tuple(grid) + (1,) * (3 - len(grid))
        tail = tuple(kwargs[n] for n in names)
        c_launch, head = launcher_head(kernel)
        if len(free) == 1:  # the common cases without a per-call list
            (i,) = free
            pre, post = tuple(fixed[:i]), tuple(fixed[i + 1:]) + tail

            def call(stream, p):
                c_launch(g[0], g[1], g[2], stream, *head, *pre, p, *post)
        elif len(free) == 2:
            i, j = free
            pre, mid, post = tuple(fixed[:i]), tuple(fixed[i + 1:j]), tuple(fixed[j + 1:]) + tail

            def call(stream, p, q):
                c_launch(g[0], g[1], g[2], stream, *head, *pre, p, *mid, q, *post)
        else:
            full = fixed + list(tail)

            def call(stream, *ptrs):
                a = full.copy()
                for i, p in zip(free, ptrs, strict=True):
                    a[i] = p
                c_launch(g[0], g[1], g[2], stream, *head, *a)
        self._call = call

    def __call__(self, stream: int, *ptrs: int) -> None:
        self._call(stream, *ptrs)


def launcher_head(kernel, direct: bool | None = None) -> tuple:
    """(callable, head) such that ``callable(g0, g1, g2, stream, *head, *params)`` launches the compiled ``kernel``
    with its parameters in signature order (constexprs included, as values; tensors or device addresses).

    Triton 3.6 (``DIRECT``): its C launcher itself, whose layout is grid, stream, function, cooperative, pdl, two
    scratch buffers, packed metadata, launch metadata, the two hooks, then the parameters. Other versions: the
    kernel's ``run`` with triton's JIT layout (function, packed metadata, launch metadata, the two hooks).
    ``direct``: False forces the latter (default: ``DIRECT``)."""
    run = loaded(kernel)
    if DIRECT if direct is None else direct:
        return run.launch, (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                            kernel.packed_metadata, None, None, None)
    return run, (kernel.function, kernel.packed_metadata, None, None, None)


def descriptor_launcher(kernel) -> tuple:
    """For a compiled ``kernel`` with TMA descriptor parameters: (callable, head, expand), as ``launcher_head``,
    where ``expand(desc, i)`` is the list that stands in the parameters for ``desc``, its ``i``-th descriptor.

    Triton's launcher wrapper encodes every descriptor (``cuTensorMapEncodeTiled``, from Python) at every call. With
    triton 3.6 (``DIRECT``) this returns the C launcher under that wrapper, so that the caller encodes a descriptor
    once (``expand``, triton's own encoding) and reuses it while its base, shape and block stay the same. Elsewhere,
    or where the wrapper is not the one this code knows, the kernel's ``run`` and the descriptors themselves."""
    c_launch, head = launcher_head(kernel)
    if DIRECT:
        free = dict(zip(c_launch.__code__.co_freevars, c_launch.__closure__ or ())) if hasattr(
            c_launch, "__code__") else {}
        if "launcher" in free and "tensordesc_meta" in free:
            from triton.backends.nvidia.driver import make_tensordesc_arg

            raw, metas = free["launcher"].cell_contents, free["tensordesc_meta"].cell_contents
            return raw, head, lambda desc, i: list(make_tensordesc_arg(desc, metas[i] if metas else None))
    return (*launcher_head(kernel, direct=False), lambda desc, i: [desc])


def bind(fn: triton.JITFunction, grid: tuple[int, ...], args: tuple, kwargs: dict,
         free: tuple[int, ...]) -> Bound | None:
    """A ``Bound`` launch of ``fn[grid](*args, **kwargs)`` with the arguments at ``free`` left open (increasing
    positions, pointers), or None where launches must take triton's path (interpreter, launch
    hooks installed). ``args`` hold real tensors: they decide the specialization (dtypes, alignment), and their
    addresses are fixed."""
    if INTERPRET or _hooks_installed():
        return None
    return Bound(fn, grid, args, kwargs, free)


def hooks_installed() -> bool:
    """Whether a profiler hooked triton's launches (bound launches then step aside)."""
    return _hooks_installed()


def clear_cache() -> None:
    """Forget the cached launchers (tests; a process that reloads kernels)."""
    _CACHE.clear()


class PlanCache:
    """Prebuilt-launch plans keyed by the calls they serve (addresses, shapes, dtypes: a key names exactly the
    call a plan was built for, so a hit is always right). A key gets a plan the second time it is seen, so that a
    one-off call shape does not pay the build; both the plans and the sightings are forgotten when full."""

    def __init__(self, max_plans: int = 2048):
        self.max_plans = max_plans
        self.plans: dict[tuple, object] = {}
        self.seen: set[tuple] = set()

    def get(self, key: tuple, build):
        """The plan for ``key``, built now by ``build()`` if this is its second sighting; None on the first."""
        plan = self.plans.get(key)
        if plan is not None:
            return plan
        if key not in self.seen:
            if len(self.seen) >= 4 * self.max_plans:
                self.seen.clear()
            self.seen.add(key)
            return None
        if len(self.plans) >= self.max_plans:
            self.plans.clear()
        plan = self.plans[key] = build()
        return plan

    def clear(self) -> None:
        self.plans.clear()
        self.seen.clear()
