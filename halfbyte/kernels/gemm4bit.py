"""Triton 4-bit matmul ``out = x @ W.T + bias`` for ``halfbyte::gemm_4bit`` (x (M, K), W the 4-bit (N, K) weight).

* M == 1 (bandwidth-bound: the weight stream is the cost): ``_gemv_kernel`` decodes weight tiles in registers and
  never writes the weight out.
* M > 1: dequantize the whole weight with the nested absmax fused (``fourbit.dequantize``) into x's dtype, then
  cuBLAS. On an H100 this beat this module's fused Triton tensor-core kernels at every M from 8 to 128 that
  bench/kernel_bench.py measured (BENCHMARKS.md, "Triton kernels"), so those kernels were dropped.
  Dequantizing the next layer's weight on a side stream during this GEMM was tried and measured no faster (cuBLAS
  holds every SM, so the two kernels do not run concurrently; BENCHMARKS.md, "Side-stream dequantize").
Both paths use the reference's weight values exactly (``code * absmax`` in float32, rounded once to x's dtype);
the GEMV differs from the reference only in the order of its float32 sums.

GEMV layout: a program owns BLOCK_N weight rows and walks K in steps of GROUPS x GB bytes (GB = bytes sharing one
absmax, at most 32), accumulating products in float32 registers; K is split across programs (float32 atomics into
a workspace) when the N tiles alone cannot fill the GPU. Byte j of a row holds elements 2j (high nibble) and 2j+1
(low), so the kernel multiplies the high nibbles by x's even columns and the low ones by its odd columns.
Precondition: K % blocksize == 0 (no block straddles two rows); otherwise the dequantize path runs.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..formats import fourbit as ref4
from .common import USE_PTX, load_absmax_inbounds, round_to
from .fourbit import code_table, dequantize, nested_code_table
from .launch import launch


@dataclass(frozen=True)
class Config:
    """GEMV launch shape: BLOCK_N weight rows per program, KSTEP weight bytes per row per K step, warps."""

    block_n: int
    kstep: int
    num_warps: int = 4


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr, bias_ptr, out_ptr,
                 N, K: tl.constexpr, STEPS: tl.constexpr,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GB: tl.constexpr, I64: tl.constexpr,
                 USE_PTX: tl.constexpr):
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.where(rows < N, rows, 0)  # clamped rows load valid data; their results are dropped
    if I64:
        rows_c = rows_c.to(tl.int64)
    KB: tl.constexpr = K // 2
    g = tl.arange(0, GROUPS)
    boff = g[:, None] * GB + tl.arange(0, GB)[None, :]  # (GROUPS, GB) byte offsets inside one K step
    w_rows = w_ptr + rows_c[:, None, None] * KB
    blk_rows = rows_c[:, None] * (K // BLOCKSIZE)
    xdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, GROUPS, GB), tl.float32)
    kb_start = tl.program_id(1) * (STEPS * GROUPS * GB)
    for i in range(STEPS):  # constexpr trip count: also runs under the interpreter
        kb0 = kb_start + i * (GROUPS * GB)
        byte = tl.load(w_rows + (kb0 + boff)[None, :, :], eviction_policy="evict_first")  # (BLOCK_N, GROUPS, GB)
        blk = blk_rows + ((kb0 + g * GB) * 2 // BLOCKSIZE)[None, :]  # (BLOCK_N, GROUPS)
        am = load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk, NESTED, USE_PTX)[:, :, None]
        hi = round_to(tl.load(code_ptr + (byte >> 4)) * am, xdt, USE_PTX).to(tl.float32)
        lo = round_to(tl.load(code_ptr + (byte & 15)) * am, xdt, USE_PTX).to(tl.float32)
        xe = tl.load(x_ptr + 2 * (kb0 + boff)).to(tl.float32)  # (GROUPS, GB): x at even and odd columns
        xo = tl.load(x_ptr + 2 * (kb0 + boff) + 1).to(tl.float32)
        acc += hi * xe[None, :, :] + lo * xo[None, :, :]
    res = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCK_N,)
    mask = rows < N
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, res, mask=mask)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, round_to(res, out_ptr.dtype.element_ty, USE_PTX), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs exercise the split-K path without slowing the CPU tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(N: int, K: int) -> Config:
    """GEMV launch shape: the fastest of the bench/kernel_bench.py sweep on an H100 for all four FLUX/T5 shapes it
    timed (BENCHMARKS.md, "Triton kernels")."""
    return Config(block_n=16, kstep=256, num_warps=4)


def _split(tiles: int, k_steps: int, device: torch.device) -> int:
    """K splits so that tiles x splits covers the SMs about twice (a divisor of k_steps); 1 when the N tiles do."""
    sms = _num_sms(device)
    if tiles >= sms:
        return 1
    split = max(1, min(triton.cdiv(2 * sms, tiles), k_steps // 4 if k_steps >= 8 else 1))
    while k_steps % split:  # every program gets the same whole number of K steps
        split -= 1
    return split


def fused_supported(M: int, K: int, blocksize: int, dtype: torch.dtype) -> bool:
    """Whether ``gemv`` serves this call: one token, whole blocks per weight row, a float activation."""
    return M == 1 and K % blocksize == 0 and dtype in ref4.FLOAT_DTYPES


def gemv(x, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
         config: Config | None = None) -> torch.Tensor:
    """x (1, K) fp16/bf16/fp32 (unit column stride), packed 4-bit W (N, K), bias (N,) in x's dtype or None
    -> (1, N) in x's dtype. absmax: (N*K/blocksize,) float32, or uint8 with nested float32 stats."""
    cfg = config or default_config(N, K)
    data = B.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    nested = nested_absmax is not None
    if nested:
        ncode = nested_code if nested_code is not None else nested_code_table(x.device)
        stats = (absmax, nested_absmax, ncode, offset)
    else:
        stats = (absmax, absmax, absmax, absmax)  # unused pointers
    kstep = cfg.kstep
    while (K // 2) % kstep:  # K % blocksize == 0 makes a row a whole number of blocksize/2-byte groups
        kstep //= 2
    tiles = triton.cdiv(N, cfg.block_n)
    k_steps = (K // 2) // kstep
    split = _split(tiles, k_steps, x.device)
    atomic = split > 1
    out = torch.zeros(1, N, dtype=torch.float32, device=x.device) if atomic else x.new_empty(1, N)
    common = (code_table(quant_type, x.device), bias if bias is not None else out, out, N, K, k_steps // split)
    flags = dict(BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=bias is not None, ATOMIC=atomic,
                 BLOCK_N=cfg.block_n, I64=N * K >= 2**31, USE_PTX=USE_PTX, num_warps=cfg.num_warps)
    gb = min(blocksize // 2, 32, kstep)
    launch(_gemv_kernel, (tiles, split), x, data, *stats, *common, GROUPS=kstep // gb, GB=gb, **flags)
    if atomic:
        if bias is not None:
            out += bias.to(torch.float32)
        out = out.to(x.dtype)
    return out


def gemm_4bit(A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type):
    """CUDA kernel of ``halfbyte::gemm_4bit``: A (..., K) float -> (..., N) in A's dtype (contract in ops.py)."""
    ref4.check_4bit_args(blocksize, quant_type)
    N, K = (int(s) for s in shape)
    bias = None if bias is None else bias.to(A.dtype)
    M = A.numel() // K if K else 0
    if fused_supported(M, K, blocksize, A.dtype):
        x = A.reshape(1, K)
        if x.stride(1) != 1:
            x = x.contiguous()
        return gemv(x, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                    quant_type).view(*A.shape[:-1], N)
    W = dequantize(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K, A.dtype)
    return torch.nn.functional.linear(A, W.view(N, K), bias)
