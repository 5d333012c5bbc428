"""Triton 4-bit (NF4/FP4) blockwise quantize and dequantize, bit-exact with ``formats.fourbit`` (bitsandbytes'
CUDA bytes, docs/bnb-format.md §1) for every blocksize 32..4096 and fp16/bf16/fp32.

The quantize and the tile dequantize give each program ``ROWS`` whole quantization blocks, held as a
(ROWS, blocksize/2) tile of bytes, so one absmax serves a tile row and no element needs its block index gathered.
The even element of a pair sits in the high nibble: the tile dequantize decodes both nibbles of each byte and
interleaves them in registers. Where the length is whole 32-bit words and the bytes are 4-byte aligned (FLUX's
and T5's weights), the word dequantize serves instead: a thread reads words and writes each word's 8 values with one
store (``dequant_launch``).
Double-quantized absmax (uint8 + nested float32 stats) is decoded inside the dequantize kernel.
"""

import functools

import torch
import triton
import triton.language as tl

from ..formats import fourbit
from ..formats.codebooks import FP4_MAG_CODES, FP4_THRESHOLDS, NF4_THRESHOLDS, code_4bit, dynamic_map
from .common import USE_PTX, f32_ptr, load_absmax, rcp_approx, rcp_table, round_to
from .launch import launch

#: Elements per program (ROWS * blocksize): enough bytes in flight per program without spilling registers.
_TILE = 4096
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@functools.lru_cache(maxsize=None)
def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(16,) float32 code values on ``device``, cached so that a call does no host-to-device copy."""
    return code_4bit(quant_type, device)


@functools.lru_cache(maxsize=None)
def nested_code_table(device: torch.device) -> torch.Tensor:
    return dynamic_map(device)


@functools.lru_cache(maxsize=None)
def _encode_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds float32, FP4 magnitude codes uint8) exactly as the reference's ``encode_4bit`` builds them."""
    thr = NF4_THRESHOLDS if quant_type == "nf4" else FP4_THRESHOLDS
    return (torch.tensor(thr, dtype=torch.float32, device=device),
            torch.tensor(FP4_MAG_CODES, dtype=torch.uint8, device=device))


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr, out_ptr, n,
                    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr, USE_PTX: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) quantization blocks
    j = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF) byte index
    byte = tl.load(packed_ptr + j, mask=j < (n + 1) // 2, other=0)
    # The float32 statistics may be int32 bits (halfbyte.nn stores them so, so that model-wide dtype casts leave
    # them alone): read through float32 pointers, so a compiled graph passes the buffers with no dtype view (one
    # aten call per view and use in Inductor's generated code).
    if NESTED:
        am = load_absmax(absmax_ptr, f32_ptr(nested_ptr), ncode_ptr, f32_ptr(offset_ptr), blk,
                         blk < tl.cdiv(n, BLOCKSIZE), NESTED, USE_PTX)
    else:
        am = load_absmax(f32_ptr(absmax_ptr), nested_ptr, ncode_ptr, offset_ptr, blk, blk < tl.cdiv(n, BLOCKSIZE),
                         NESTED, USE_PTX)
    hi = tl.load(code_ptr + (byte >> 4)) * am[:, None]  # float32 product, rounded once below (as the reference)
    lo = tl.load(code_ptr + (byte & 15)) * am[:, None]
    vals = round_to(tl.interleave(hi, lo), out_ptr.dtype.element_ty, USE_PTX)  # (ROWS, BLOCKSIZE), element 2j first
    e = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + e, vals, mask=e < n)


@triton.jit
def _dequant_words_kernel(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr, out_ptr, n,
                          WORDS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, USE_PTX: tl.constexpr):
    """The tile kernel's values, with its arguments, for n % 8 == 0 and a 4-byte aligned ``packed``: each thread
    reads whole 32-bit words and writes a word's 8 values, contiguous in the output, with one store."""
    # (WORDS, 1) tiles rather than (WORDS,): the word loads then share the stores' layout (one thread, one word,
    # its 8 values), with no shared-memory conversion between them.
    w = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)[:, None]
    live = w < n // 8
    q = tl.load(packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + w, mask=live, other=0)
    blk = w // (BLOCKSIZE // 8)
    if NESTED:
        am = load_absmax(absmax_ptr, f32_ptr(nested_ptr), ncode_ptr, f32_ptr(offset_ptr), blk, live, NESTED, USE_PTX)
    else:
        am = load_absmax(f32_ptr(absmax_ptr), nested_ptr, ncode_ptr, offset_ptr, blk, live, NESTED, USE_PTX)
    k = tl.arange(0, 8)[None, :]
    nib = (q >> ((k // 2) * 8 + (1 - k % 2) * 4)) & 15  # element k: byte k // 2 (little endian), even k high
    vals = round_to(tl.load(code_ptr + nib) * am, out_ptr.dtype.element_ty, USE_PTX)
    tl.store(out_ptr + w * 8 + k, vals, mask=live)


@triton.jit
def _encode(s, thr_ptr, mag_ptr, NF4: tl.constexpr):
    """Scaled float32 values -> int32 codes by CUDA's strict-``>`` rules; NaN fails every test and gets 0."""
    code = tl.zeros(s.shape, tl.int32)
    if NF4:
        for k in tl.static_range(15):  # code = number of thresholds below s (ties go down)
            code += (s > tl.load(thr_ptr + k)).to(tl.int32)
        return code
    else:
        mag = tl.abs(s)
        for k in tl.static_range(7):
            code += (mag > tl.load(thr_ptr + k)).to(tl.int32)
        return tl.load(mag_ptr + code).to(tl.int32) | ((s < 0).to(tl.int32) << 3)


@triton.jit
def _quant_kernel(a_ptr, packed_ptr, absmax_ptr, thr_ptr, mag_ptr, delta_ptr, n,
                  BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NF4: tl.constexpr, USE_PTX: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF) byte index; elements 2j and 2j+1
    # Missing elements read as 0: the absmax of a partial block and the padding nibble of an odd length see 0.
    xe = tl.load(a_ptr + 2 * j, mask=2 * j < n, other=0.0).to(tl.float32)
    xo = tl.load(a_ptr + 2 * j + 1, mask=2 * j + 1 < n, other=0.0).to(tl.float32)
    # fmaxf ignores NaN: a NaN element counts as -FLT_MAX, so an all-NaN block has absmax -FLT_MAX.
    ae = tl.where(xe != xe, -_FLT_MAX, tl.abs(xe))
    ao = tl.where(xo != xo, -_FLT_MAX, tl.abs(xo))
    am = tl.maximum(tl.max(ae, axis=1), tl.max(ao, axis=1))  # (ROWS,)
    r = rcp_approx(am, delta_ptr, USE_PTX)[:, None]  # bitsandbytes multiplies by the fast reciprocal
    byte = (_encode(xe * r, thr_ptr, mag_ptr, NF4) << 4) | _encode(xo * r, thr_ptr, mag_ptr, NF4)
    tl.store(packed_ptr + j, byte.to(tl.uint8), mask=j < (n + 1) // 2)
    tl.store(absmax_ptr + blk, am, mask=blk < tl.cdiv(n, BLOCKSIZE))


def _rows(blocksize: int) -> int:
    return max(1, _TILE // blocksize)


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    quant_type: str,
    n: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """packed ((n+1)//2 bytes, any dtype viewed as uint8), absmax (B,) float32 or uint8 with nested stats
    (nested_absmax (ceil(B/256),) float32, nested_code (256,) float32 or None for the dynamic map, offset (1,)
    float32) -> (n,) ``dtype``: ``code[q] * absmax[block]`` in float32, rounded once. The float32 statistics may
    be passed as their int32 bits (``halfbyte.nn``'s storage; ``common.f32_ptr``)."""
    fourbit.check_4bit_args(blocksize, quant_type)
    data = packed.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    if data.numel() != fourbit.packed_numel(n):
        raise ValueError(f"packed 4-bit data has {data.numel()} bytes, expected {fourbit.packed_numel(n)}")
    nb = fourbit.num_blocks(n, blocksize)
    if absmax.numel() != nb:
        raise ValueError(f"absmax has {absmax.numel()} blocks, expected {nb} for {n} elements, blocksize {blocksize}")
    out = torch.empty(n, dtype=dtype, device=data.device)
    if n == 0:
        return out
    kernel, grid, args, kwargs = dequant_launch(data, absmax, nested_absmax, nested_code, offset, blocksize,
                                                quant_type, n, out)
    launch(kernel, grid, *args, **kwargs)
    return out


def absmax_args(absmax, nested_absmax, nested_code, offset, device) -> tuple:
    """The four absmax pointers the kernels take: (absmax, nested_absmax, nested code, offset) with double
    quantization (the dynamic map when ``nested_code`` is None), else absmax four times (never read)."""
    if nested_absmax is None:
        return (absmax, absmax, absmax, absmax)
    ncode = nested_code if nested_code is not None else nested_code_table(device)
    return (absmax, nested_absmax, ncode, offset)


#: Words per program of ``_dequant_words_kernel`` (4 warps): 512 and 1024 took the same time, 2048 on 8 warps 15 %
#: more (bench/dequant_words.py, H200).
_WORDS = 512


def _aligned4(t: torch.Tensor) -> bool:
    try:
        return t.data_ptr() % 4 == 0
    except RuntimeError:  # a fake tensor, while torch.compile traces: Inductor places its inputs by storage offset
        return t.storage_offset() * t.element_size() % 4 == 0


def dequant_launch(data, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, n, out, code=None):
    """(kernel, grid, args, kwargs) of the dequantize writing the ``n`` values of ``data`` (uint8) into ``out``; the
    one place that builds them, for ``dequantize``, the bound launches of ``gemm4bit.Plan`` and the in-graph op
    (``code``: its (16,) float32 code table, default the cached one). Both kernels take the same arguments (``out``
    at position 6) and give the same bits. ``_dequant_words_kernel`` where n % 8 == 0 and ``data`` is 4-byte aligned:
    on an H200 it took 0.84-0.93x the tile kernel's time (12288 x 3072: 29.0 against 34.2 us; a copy of the same
    bytes 28.6 us; on an H100 0.95-0.98x: BENCHMARKS.md sessions 12 and 29); else ``_dequant_kernel``."""
    code = code_table(quant_type, data.device) if code is None else code
    args = (data, *absmax_args(absmax, nested_absmax, nested_code, offset, data.device), code, out, n)
    nested = nested_absmax is not None
    if n % 8 == 0 and _aligned4(data):
        kwargs = dict(WORDS=_WORDS, BLOCKSIZE=blocksize, NESTED=nested, USE_PTX=USE_PTX, num_warps=4)
        return _dequant_words_kernel, (triton.cdiv(n // 8, _WORDS),), args, kwargs
    rows = _rows(blocksize)
    kwargs = dict(BLOCKSIZE=blocksize, ROWS=rows, NESTED=nested, USE_PTX=USE_PTX, num_warps=4)
    return _dequant_kernel, (triton.cdiv(fourbit.num_blocks(n, blocksize), rows),), args, kwargs


def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """CUDA kernel of ``halfbyte::dequantize_4bit``: same contract as ``formats.fourbit.dequantize_4bit``."""
    n = 1
    for s in shape:
        n *= int(s)
    return dequantize(A, absmax, None, None, None, blocksize, quant_type, n, dtype).view(tuple(shape))


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel of ``halfbyte::quantize_4bit``: A (any shape) fp16/bf16/fp32 -> packed ((n+1)//2,) uint8,
    absmax (ceil(n/blocksize),) float32; the bytes of ``formats.fourbit.quantize_4bit``."""
    fourbit.check_4bit_args(blocksize, quant_type)
    if A.dtype not in fourbit.FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float16, bfloat16 or float32 tensors, got {A.dtype}")
    flat = A.reshape(-1).contiguous()
    n = flat.numel()
    nb = fourbit.num_blocks(n, blocksize)
    packed = torch.empty(fourbit.packed_numel(n), dtype=torch.uint8, device=A.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=A.device)
    if n == 0:
        return packed, absmax
    thr, mag = _encode_tables(quant_type, A.device)
    rows = _rows(blocksize)
    launch(
        _quant_kernel, (triton.cdiv(nb, rows),), flat, packed, absmax, thr, mag, rcp_table(A.device), n,
        BLOCKSIZE=blocksize, ROWS=rows, NF4=quant_type == "nf4", USE_PTX=USE_PTX, num_warps=4,
    )
    return packed, absmax
