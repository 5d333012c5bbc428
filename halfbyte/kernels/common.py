"""CUDA fast-math building blocks shared by the kernels, and their bit-exact emulation for the interpreter (plus
the row bookkeeping the GEMV kernels share).

bitsandbytes' kernels round with ``rcp.approx.ftz.f32`` (``1.0f / a`` and ``__fdividef`` under fast math) and
``cvt.rni`` (``__float2int_rn``). On the GPU the kernels run those very instructions (inline PTX, libdevice). Under
``TRITON_INTERPRET=1`` (the CPU test tier) neither inline assembly nor libdevice exists, so the same functions
compute the hardware result from ``formats.fastmath``'s ulp table instead; both paths are tested against it.
"""

import functools
import os
import threading

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..formats import fastmath

#: True when triton runs kernels through its numpy interpreter (decided at import, as ``triton.jit`` does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Selects the hardware instructions (GPU) or their emulation (interpreter) inside the kernels.
USE_PTX = not INTERPRET

_LOCKS: dict = {}
_LOCKS_GUARD = threading.Lock()


def compile_lock(key) -> threading.Lock:
    """The lock of one kernel specialization (``key``: anything hashable that names it). Threads that would compile
    the same one (``halfbyte.precompile``'s workers) take turns, so that the second finds it in triton's cache
    instead of compiling it again; taken only where a launch or bind misses its own cache."""
    lock = _LOCKS.get(key)
    if lock is None:
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(key, threading.Lock())
    return lock


# PyTorch's caching allocator without a tensor around the block: ``torch.empty`` builds a tensor (~5 us of host
# time a call on an H200's host) where a launch only needs the address of a temporary.
_RAW_ALLOC = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", None)
_RAW_DELETE = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete", None)


def scratch_alloc(nbytes: int, stream: int) -> int:
    """The device address of ``nbytes`` from PyTorch's caching allocator, ordered on the raw CUDA ``stream``
    as a temporary tensor's storage is (from the graph's private pool while that stream captures a CUDA graph).
    Give it back with ``scratch_free`` once every kernel that uses it is enqueued on ``stream``: the allocator
    reuses it only for work ordered after them. Counted in ``torch.cuda.memory_allocated`` like any tensor. 0 for
    0 bytes."""
    return _RAW_ALLOC(nbytes, stream) if nbytes else 0


def scratch_free(ptr: int) -> None:
    """Returns a ``scratch_alloc`` block to the caching allocator (0: nothing)."""
    if ptr:
        _RAW_DELETE(ptr)


_TINY = tl.constexpr(2.0**-126)
_HUGE = tl.constexpr(2.0**126)


@functools.lru_cache(maxsize=None)
def rcp_table(device: torch.device) -> torch.Tensor:
    """The (2**23,) int8 ulp-correction table the interpreter path reads; on the GPU a 1-element placeholder
    (the PTX path never touches it, and the 8 MB table should not be copied to the device). One per device,
    read-only: a kernel launch must not allocate."""
    if USE_PTX:
        return torch.zeros(1, dtype=torch.int8, device=device)
    return fastmath._delta_table().to(device)


@triton.jit
def rcp_approx(a, delta_ptr, USE_PTX: tl.constexpr):
    """float32 -> ``rcp.approx.ftz.f32(a)``, bit for bit (``fastmath.rcp_approx``)."""
    if USE_PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [a], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        exact = 1.0 / a
        bits = a.to(tl.int32, bitcast=True)
        delta = tl.load(delta_ptr + (bits & 0x7FFFFF)).to(tl.int32)
        approx = (exact.to(tl.int32, bitcast=True) + delta).to(tl.float32, bitcast=True)
        mag = tl.abs(a)
        sign = bits & -2147483648  # 0x80000000 as int32
        out = tl.where((mag >= _TINY) & (mag < _HUGE), approx, exact)  # NaN and inf keep 1/a (NaN, +-0)
        inf = (sign | 0x7F800000).to(tl.float32, bitcast=True)
        out = tl.where(mag < _TINY, inf, out)  # ftz: a subnormal divisor reads as +-0
        zero = sign.to(tl.float32, bitcast=True)
        finite = (bits & 0x7FFFFFFF) < 0x7F800000
        # A subnormal result flushes to +-0; 1/2**126 = 2**-126 is still normal (the H100 returns it).
        return tl.where((mag > _HUGE) & finite, zero, out)


@triton.jit
def rint(x, USE_PTX: tl.constexpr):
    """float32 round half to even (``cvt.rni``); the emulation adds and removes 2**23, exact for |x| < 2**23."""
    if USE_PTX:
        return libdevice.rint(x)
    else:
        mag = tl.abs(x)
        r = (mag + 8388608.0) - 8388608.0
        r = tl.where(x < 0, -r, r)
        return tl.where(mag < 8388608.0, r, x)


@triton.jit
def rint_s32(x, USE_PTX: tl.constexpr):
    """float32 -> int32 rounded half to even in one conversion (``cvt.rni.s32.f32``): NaN -> 0, values past the
    int32 range saturate. The emulation rounds with ``rint`` and maps NaN and the range the same way."""
    if USE_PTX:
        return tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,f", [x], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        r = rint(x, USE_PTX)
        r = tl.where(r == r, r, 0.0)
        q = tl.minimum(tl.maximum(r, -2147483648.0), 2147483520.0).to(tl.int32)  # the largest float32 < 2**31
        return tl.where(r >= 2147483648.0, 2147483647, q)


@triton.jit
def mul_rn(a, b, USE_PTX: tl.constexpr):
    """float32 ``a * b`` rounded on its own: a following add must not fuse into an FMA (the reference rounds
    twice). PTX ``mul.rn`` with an explicit rounding mode is never contracted; the interpreter never contracts."""
    if USE_PTX:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def load_absmax(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr,
                USE_PTX: tl.constexpr):
    """float32 absmax of 4-bit blocks ``blk`` (any shape, int), decoding double quantization when NESTED:
    ``ncode[q[blk]] * nested[blk // 256] + offset`` with two roundings, as ``ops.decode_absmax`` computes it."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0)
        scale = tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)
        return mul_rn(tl.load(ncode_ptr + q), scale, USE_PTX) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def f32_ptr(p):
    """A pointer to float32 statistics, or to their int32 bits, as a float32 pointer (a no-op for the former)."""
    return p.to(tl.pointer_type(tl.float32), bitcast=True)


@triton.jit
def load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk, NESTED: tl.constexpr,
                         USE_PTX: tl.constexpr):
    """``load_absmax`` for block indices known to be in range (no mask to compute)."""
    if NESTED:
        scale = tl.load(nested_ptr + blk // 256)
        return mul_rn(tl.load(ncode_ptr + tl.load(absmax_ptr + blk)), scale, USE_PTX) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk)


@triton.jit
def round_to(x, dtype: tl.constexpr, USE_PTX: tl.constexpr):
    """float32 -> ``dtype`` rounded to nearest even. The interpreter's own float32 -> bfloat16 cast does not round
    ties to even, so there the rounding is done on the bits (NaN kept as the canonical NaN)."""
    if USE_PTX or dtype != tl.bfloat16:
        return x.to(dtype)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs exercise the split-K path without slowing the CPU tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_split(tiles: int, k_steps: int, device: torch.device) -> int:
    """K splits of a GEMV launch so that tiles x splits covers the SMs about twice (a divisor of k_steps); 1 when
    the N tiles do."""
    sms = _num_sms(device)
    if tiles >= sms:
        return 1
    split = max(1, min(triton.cdiv(2 * sms, tiles), k_steps // 4 if k_steps >= 8 else 1))
    while k_steps % split:  # every program gets the same whole number of K steps
        split -= 1
    return split


@triton.jit
def gemv_rows(BLOCK_N: tl.constexpr, N, I64: tl.constexpr):
    """(rows, clamped rows) of a GEMV program's BLOCK_N output rows: rows past N are clamped to row 0, so that
    they load valid data; their results are dropped by ``gemv_store``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.where(rows < N, rows, 0)
    if I64:
        rows_c = rows_c.to(tl.int64)
    return rows, rows_c


@triton.jit
def gemv_store(res, rows, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
               USE_PTX: tl.constexpr):
    """A GEMV program's float32 row sums ``res``: added atomically into a float32 workspace when K is split
    (the caller adds the bias), else bias added and rounded to the output's dtype."""
    mask = rows < N
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, res, mask=mask)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, round_to(res, out_ptr.dtype.element_ty, USE_PTX), mask=mask)


@triton.jit
def _zero_kernel(ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + i, tl.zeros((BLOCK,), ptr.dtype.element_ty), mask=i < n)


def zero_launch(t: torch.Tensor):
    """(fn, grid, args, kwargs) of a kernel that zeroes contiguous ``t`` (for bound launches, where
    ``torch.zero_`` would be one more dispatcher call)."""
    n = t.numel()
    return _zero_kernel, (triton.cdiv(n, 1024),), (t, n), dict(BLOCK=1024, num_warps=4)
