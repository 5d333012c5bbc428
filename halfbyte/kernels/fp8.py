"""Triton kernels of the opt-in fp8 compute mode (``formats.fp8``, bit-exact with it): a 4-bit weight decoded into
float8 e4m3 with one scale per output row, and activations quantized to e4m3 with one scale per token. The matmul
itself is cuBLAS's (``torch._scaled_mm`` with row-wise scales).

Both kernels give a program whole rows, so that a row's scale comes from its own maximum without a second launch:
the weight kernel reads the row's absmax (decoding double quantization as ``fourbit``'s dequantize does), takes
the maximum, then decodes the row in chunks; the activation kernel reads its row twice (maximum, then scaled
values; the second read hits the L2). Values are written as uint8 bits into the float8 tensors.
"""

import torch
import triton
import triton.language as tl

from ..formats import fourbit
from ..formats.fp8 import E4M3, check_weight
from .common import USE_PTX, _num_sms, f32_ptr, load_absmax
from .fourbit import absmax_args, code_table
from .launch import bind, launch

_CHUNK = 4096  # elements per program step: enough bytes in flight, no spills


@triton.jit
def _e4m3_bits(v, USE_PTX: tl.constexpr):
    """float32 -> float8_e4m3fn bits (uint8), nearest even, saturating at +-448 (``formats.fp8.e4m3``). The GPU
    converts with ``cvt.rn.satfinite``; the interpreter's own float8 cast neither rounds ties to even nor saturates,
    so there the rounding is done by hand: to a multiple of the value's e4m3 quantum (2^(e - 3), at least 2^-9),
    exact in float32, then encoded from the rounded value's bits."""
    if USE_PTX:
        c = tl.clamp(v, -448.0, 448.0)
        return c.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    else:
        a = tl.minimum(tl.abs(v), 448.0)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        qe = tl.maximum(e - 3, -9)
        q = ((qe + 127) << 23).to(tl.float32, bitcast=True)
        rq = ((127 - qe) << 23).to(tl.float32, bitcast=True)
        m = a * rq  # a / quantum, exact; < 16 < 2^23, so the add-and-remove rounds half to even
        r = ((m + 8388608.0) - 8388608.0) * q
        rb = r.to(tl.int32, bitcast=True)
        re = ((rb >> 23) & 0xFF) - 127
        normal = ((re + 7) << 3) | ((rb >> 20) & 7)
        sub = (r * 512.0).to(tl.int32)  # 0..8 (8 is the smallest normal's code)
        code = tl.where(re >= -6, normal, sub)
        code = tl.where(r == 0.0, 0, code)
        code = tl.where(v != v, 0x7F, code)  # NaN
        neg = (v.to(tl.int32, bitcast=True) < 0) & (v == v)
        return (code | tl.where(neg, 0x80, 0)).to(tl.uint8)


@triton.jit
def _dequant_fp8_kernel(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr, out_ptr, scale_ptr,
                        K, BLOCKSIZE: tl.constexpr, RB: tl.constexpr, CB: tl.constexpr, NESTED: tl.constexpr,
                        USE_PTX: tl.constexpr):
    """One weight row per program: its K / BLOCKSIZE absmax (RB >= that, a power of 2) give the row's scale, then
    CB blocks at a time are decoded to e4m3 bits. When the row fits one chunk (RB == CB) its bytes are loaded
    with its absmax, before the maximum that the scaling waits for."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    row = tl.program_id(0).to(tl.int64)
    nblk = K // BLOCKSIZE
    b = tl.arange(0, RB)
    if RB == CB:
        j = (row * nblk + b)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        byte = tl.load(packed_ptr + j, mask=(b < nblk)[:, None], other=0)
    am = _absmax(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, row * nblk + b, b < nblk, NESTED, USE_PTX)
    rowmax = tl.max(tl.where(b < nblk, am, 0.0), axis=0)
    inv = tl.where(rowmax > 0, tl.math.div_rn(tl.full([], 448.0, tl.float32), rowmax), 0.0)
    tl.store(scale_ptr + row, tl.math.div_rn(rowmax, tl.full([], 448.0, tl.float32)))
    if RB == CB:
        _decode_store(byte, am * inv, code_ptr, out_ptr, row * nblk + b, b < nblk, BLOCKSIZE, USE_PTX)
    else:
        for c in range(0, nblk, CB):
            cb = c + tl.arange(0, CB)
            blk = row * nblk + cb
            a = _absmax(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk, cb < nblk, NESTED, USE_PTX) * inv
            j = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
            byte = tl.load(packed_ptr + j, mask=(cb < nblk)[:, None], other=0)
            _decode_store(byte, a, code_ptr, out_ptr, blk, cb < nblk, BLOCKSIZE, USE_PTX)


@triton.jit
def _decode_store(byte, a, code_ptr, out_ptr, blk, ok, BLOCKSIZE: tl.constexpr, USE_PTX: tl.constexpr):
    """Blocks ``blk`` (masked by ``ok``) of bytes ``byte`` (CB, BLOCKSIZE / 2) at scales ``a``: e4m3 bits out."""
    hi = tl.load(code_ptr + (byte >> 4)) * a[:, None]  # float32 product, rounded once (as the reference)
    lo = tl.load(code_ptr + (byte & 15)) * a[:, None]
    vals = _e4m3_bits(tl.interleave(hi, lo), USE_PTX)  # (CB, BLOCKSIZE), element 2j first
    e = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + e, vals, mask=ok[:, None])


@triton.jit
def _absmax(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr, USE_PTX: tl.constexpr):
    # float32 statistics may be int32 bits (halfbyte.nn's storage): read through float32 pointers
    if NESTED:
        return load_absmax(absmax_ptr, f32_ptr(nested_ptr), ncode_ptr, f32_ptr(offset_ptr), blk, mask, NESTED,
                           USE_PTX)
    else:
        return load_absmax(f32_ptr(absmax_ptr), nested_ptr, ncode_ptr, offset_ptr, blk, mask, NESTED, USE_PTX)


@triton.jit(do_not_specialize=["M"])
def _quant_rows_fp8_kernel(x_ptr, out_ptr, scale_ptr, M, K, BLOCK: tl.constexpr, USE_PTX: tl.constexpr):
    """Rows pid, pid + grid, ... of the (M, K) activations: each row's maximum magnitude, then its scaled values as
    e4m3 bits (the second read hits the L2). The grid does not depend on M, so a plan binds one launch for every
    token count."""
    for row in range(tl.program_id(0), M, tl.num_programs(0)):
        base = (tl.zeros([], tl.int64) + row) * K  # 64-bit offsets (an int in the interpreter)
        amax = tl.zeros([BLOCK], tl.float32)
        for c in range(0, K, BLOCK):
            k = c + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, axis=0)
        inv = tl.where(m > 0, tl.math.div_rn(tl.full([], 448.0, tl.float32), m), 0.0)
        tl.store(scale_ptr + row, tl.math.div_rn(m, tl.full([], 448.0, tl.float32)))
        for c in range(0, K, BLOCK):
            k = c + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
            tl.store(out_ptr + base + k, _e4m3_bits(x * inv, USE_PTX), mask=k < K)


def dequantize_4bit_fp8(packed, absmax, nested_absmax, nested_code, offset, blocksize: int, quant_type: str,
                        N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight half of ``gemm_4bit_fp8``: the (N, K) 4-bit weight (bytes ``packed``, absmax float32 or uint8 with
    the nested stats; float32 statistics may be their int32 bits) -> (W8 (N, K) float8_e4m3fn, sw (N,) float32),
    the bits of ``formats.fp8.dequantize_4bit_fp8``. K % blocksize == 0."""
    data = check_weight(packed, absmax, blocksize, quant_type, N, K)
    w8 = torch.empty(N, K, dtype=E4M3, device=data.device)
    sw = torch.empty(N, dtype=torch.float32, device=data.device)
    if N == 0:
        return w8, sw
    stats = absmax_args(absmax, nested_absmax, nested_code, offset, data.device)
    grid, args, kwargs = dequant_fp8_launch(data, stats, code_table(quant_type, data.device), w8.view(torch.uint8),
                                            sw, blocksize, N, K)
    launch(_dequant_fp8_kernel, grid, *args, **kwargs)
    return w8, sw


def dequant_fp8_launch(data, stats, code, w8_bits, sw, blocksize: int, N: int, K: int):
    """(grid, args, kwargs) of ``_dequant_fp8_kernel``: ``data`` uint8 bytes, ``stats`` the four absmax
    arguments (``fourbit.absmax_args``), ``code`` the (16,) float32 code table, outputs ``w8_bits`` (N, K) uint8
    and ``sw`` (N,) float32. N > 0 (one program per row)."""
    nblk = K // blocksize
    rb = triton.next_power_of_2(max(nblk, 1))
    cb = min(rb, max(1, _CHUNK // blocksize))
    kwargs = dict(BLOCKSIZE=blocksize, RB=rb, CB=cb, NESTED=stats[1] is not stats[0], USE_PTX=USE_PTX,
                  num_warps=4)
    return (N,), (data, *stats, code, w8_bits, sw, K), kwargs


def gemm_4bit_fp8(A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type):
    """CUDA kernel of ``halfbyte::gemm_4bit_fp8`` (contract in ops_fp8.py): the activation and weight kernels
    above, then cuBLAS's row-wise scaled matmul (float32 accumulation, bias in its epilogue, bfloat16 out)."""
    N, K = (int(s) for s in shape)
    if A.shape[-1] != K:
        raise ValueError(f"input has {A.shape[-1]} features, weight expects {K}")
    if N % 16 or K % 16:
        raise ValueError(f"fp8 compute needs in_features and out_features divisible by 16 (cuBLAS), got {N}x{K}")
    x8, sx = quantize_rows_fp8(A.reshape(-1, K))
    w8, sw = dequantize_4bit_fp8(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K)
    if x8.shape[0] == 0:
        return A.new_empty((*A.shape[:-1], N))
    out = torch._scaled_mm(x8, w8.t(), scale_a=sx.unsqueeze(1), scale_b=sw.unsqueeze(0),
                           bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return out.to(A.dtype).view(*A.shape[:-1], N)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation half of ``gemm_4bit_fp8``: x (M, K) float16/bfloat16/float32 -> (x8 (M, K) float8_e4m3fn,
    sx (M,) float32), the bits of ``formats.fp8.quantize_rows_fp8``."""
    if x.dim() != 2 or x.dtype not in fourbit.FLOAT_DTYPES:
        raise ValueError(f"quantize_rows_fp8 takes a 2-d float16/bfloat16/float32 tensor, got {tuple(x.shape)} "
                         f"{x.dtype}")
    x = x.contiguous()
    M, K = x.shape
    x8 = torch.empty(M, K, dtype=E4M3, device=x.device)
    sx = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return x8, sx
    if K == 0:
        return x8, sx.zero_()
    grid, kwargs = quant_rows_launch(K, x.device)
    launch(_quant_rows_fp8_kernel, grid, x, x8.view(torch.uint8), sx, M, K, **kwargs)
    return x8, sx


def quant_rows_launch(K: int, device: torch.device) -> tuple[tuple[int], dict]:
    """(grid, kwargs) of ``_quant_rows_fp8_kernel`` for rows of K: a fixed grid of programs per SM."""
    block = min(_CHUNK, triton.next_power_of_2(K))
    return (8 * _num_sms(device),), dict(BLOCK=block, USE_PTX=USE_PTX, num_warps=4 if block <= 2048 else 8)


class Fp8Plan:
    """Eager fp8 calls of one 4-bit weight with both launches prebuilt (``launch.Bound``), as ``gemm4bit.Plan``
    does for the default path: a call is four allocations, two bound launches and ``torch._scaled_mm``, instead of
    ``gemm_4bit_fp8``'s checks and cached-launcher lookups (~100 us of host time more per call on an H100's host,
    which left a FLUX step bound by the host). It keeps addresses, not tensors: its owner checks them before each
    call (``halfbyte.nn.Linear4bit._inference_plan``). Same results as ``gemm_4bit_fp8`` (same kernels)."""

    __slots__ = ("N", "K", "device", "_deq", "_xq")

    def __init__(self, B, absmax, nested_absmax, nested_code, offset, N, K, blocksize, quant_type, dtype):
        data = check_weight(B, absmax, blocksize, quant_type, N, K)
        self.N, self.K, self.device = N, K, data.device
        self._deq = self._xq = None  # an empty weight: calls take gemm_4bit_fp8
        if N == 0 or K == 0:
            return
        w8 = torch.empty(N, K, dtype=torch.uint8, device=data.device)
        sw = torch.empty(N, dtype=torch.float32, device=data.device)
        stats = absmax_args(absmax, nested_absmax, nested_code, offset, data.device)
        grid, args, kwargs = dequant_fp8_launch(data, stats, code_table(quant_type, data.device), w8, sw,
                                                blocksize, N, K)
        self._deq = bind(_dequant_fp8_kernel, grid, args, kwargs, free=(6, 7))
        x = torch.empty(1, K, dtype=dtype, device=data.device)  # calls pass 16-byte aligned rows like this one
        grid, kwargs = quant_rows_launch(K, data.device)
        args = (x, w8, sw, 1, K)
        self._xq = bind(_quant_rows_fp8_kernel, grid, args, kwargs, free=(0, 1, 2, 3))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """x (..., K) CUDA on the current device -> (..., N) in x's dtype; None for an x the launches were not
        built for (not contiguous or not 16-byte aligned: the caller takes ``gemm_4bit_fp8``)."""
        if self._deq is None or self._xq is None or not x.is_contiguous() or x.data_ptr() % 16:
            return None
        N, K, dev = self.N, self.K, self.device
        M = x.numel() // K
        stream = torch._C._cuda_getCurrentRawStream(dev.index)
        x8 = torch.empty((M, K), dtype=E4M3, device=dev)
        sx = torch.empty(M, dtype=torch.float32, device=dev)
        self._xq(stream, x.data_ptr(), x8.data_ptr(), sx.data_ptr(), M)
        w8 = torch.empty((N, K), dtype=E4M3, device=dev)
        sw = torch.empty(N, dtype=torch.float32, device=dev)
        self._deq(stream, w8.data_ptr(), sw.data_ptr())
        out = torch._scaled_mm(x8, w8.t(), scale_a=sx.unsqueeze(1), scale_b=sw.unsqueeze(0),
                               bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
        return (out if x.dtype == torch.bfloat16 else out.to(x.dtype)).view(*x.shape[:-1], N)
