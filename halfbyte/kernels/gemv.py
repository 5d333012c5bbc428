"""The 4-bit GEMVs that decode from tables (one token, x (1, K) times the 4-bit (N, K) weight): the register-table
kernel for bf16 and the table-load kernel for the rest, with their launch shapes. ``gemm4bit.gemv`` routes a GEMV to
the TMA ring (``gemv_ring``) or the tensor cores (``gemv_mma``) first, where they serve, and here otherwise
(``gemv_tables``).

* bf16: ``_gemv_lut_kernel`` reads the weight as 32-bit words of 8 codes and decodes each with ``prmt`` register
  tables (``kernels.lut``, ~30 integer instructions per word instead of two table loads per byte);
* fp32, and where that one does not apply (alignment): ``_gemv_kernel``, two loads from the code table per byte.

Layout: a program owns BLOCK_N weight rows and walks K in steps, accumulating products in float32 registers; K is
split across programs (float32 atomics into a workspace) when the N tiles alone cannot fill the GPU. Byte j of a
row holds elements 2j (high nibble) and 2j+1 (low). Precondition: K % blocksize == 0 (no block straddles two rows);
otherwise ``gemm4bit`` takes the dequantize path. Numerics: ``gemm4bit``'s module doc.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..formats import fourbit as ref4
from . import lut
from .common import USE_PTX, gemv_rows, gemv_split, gemv_store, load_absmax_inbounds
from .fourbit import absmax_args, code_table
from .launch import launch


@dataclass(frozen=True)
class Config:
    """GEMV launch shape: BLOCK_N weight rows per program, KSTEP weight bytes per row per K step, warps."""

    block_n: int
    kstep: int
    num_warps: int = 4
    xsplit: bool = False


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr, bias_ptr, out_ptr,
                 N, K: tl.constexpr, STEPS: tl.constexpr,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GB: tl.constexpr, I64: tl.constexpr,
                 XSPLIT: tl.constexpr, USE_PTX: tl.constexpr):
    rows, rows_c = gemv_rows(BLOCK_N, N, I64)
    KB: tl.constexpr = K // 2
    g = tl.arange(0, GROUPS)
    boff = g[:, None] * GB + tl.arange(0, GB)[None, :]  # (GROUPS, GB) byte offsets inside one K step
    w_rows = w_ptr + rows_c[:, None, None] * KB
    blk_rows = rows_c[:, None] * (K // BLOCKSIZE)
    acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
    kb_start = tl.program_id(1) * (STEPS * GROUPS * GB)
    for i in range(STEPS):  # constexpr trip count: also runs under the interpreter
        kb0 = kb_start + i * (GROUPS * GB)
        byte = tl.load(w_rows + (kb0 + boff)[None, :, :], eviction_policy="evict_first")  # (BLOCK_N, GROUPS, GB)
        blk = blk_rows + ((kb0 + g * GB) * 2 // BLOCKSIZE)[None, :]  # (BLOCK_N, GROUPS)
        am = load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk, NESTED, USE_PTX)
        if XSPLIT:  # x's (even, odd) column pairs as contiguous loads, split in registers
            x2 = tl.load(x_ptr + 2 * (kb0 + boff)[:, :, None] + tl.arange(0, 2)[None, None, :]).to(tl.float32)
            xe, xo = tl.split(x2)
        else:
            xe = tl.load(x_ptr + 2 * (kb0 + boff)).to(tl.float32)  # (GROUPS, GB): x at even and odd columns
            xo = tl.load(x_ptr + 2 * (kb0 + boff) + 1).to(tl.float32)
        p = tl.load(code_ptr + (byte >> 4)) * xe[None, :, :] + tl.load(code_ptr + (byte & 15)) * xo[None, :, :]
        acc += tl.sum(p, axis=2) * am  # a group's GB bytes share one absmax: one multiply per group
    gemv_store(tl.sum(acc, axis=1), rows, N, bias_ptr, out_ptr, HAS_BIAS, ATOMIC, USE_PTX)


@triton.jit
def _lut_words(q, tab_ptr, code_ptr, ASM: tl.constexpr, USE_PTX: tl.constexpr):
    """q: int32 words of 8 packed codes -> 8 float32 tensors shaped like q, weights 0..7 of each word (byte i holds
    weights 2i, high nibble, and 2i+1), the codes rounded to bfloat16 (``lut.effective_codes(code, 2)``). GPU: the
    ``prmt`` register-table decode of ``lut.decode_asm`` with the table words ``tab_ptr[0:8]`` as operands;
    interpreter: loads from the (16,) float32 table ``code_ptr`` of the same values."""
    if USE_PTX:
        z = tl.zeros_like(q)
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
            [q, z + tl.load(tab_ptr), z + tl.load(tab_ptr + 1), z + tl.load(tab_ptr + 2), z + tl.load(tab_ptr + 3),
             z + tl.load(tab_ptr + 4), z + tl.load(tab_ptr + 5), z + tl.load(tab_ptr + 6), z + tl.load(tab_ptr + 7)],
            dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        return (w0.to(tl.float32, bitcast=True), w1.to(tl.float32, bitcast=True), w2.to(tl.float32, bitcast=True),
                w3.to(tl.float32, bitcast=True), w4.to(tl.float32, bitcast=True), w5.to(tl.float32, bitcast=True),
                w6.to(tl.float32, bitcast=True), w7.to(tl.float32, bitcast=True))
    else:
        return (tl.load(code_ptr + ((q >> 4) & 15)), tl.load(code_ptr + (q & 15)),
                tl.load(code_ptr + ((q >> 12) & 15)), tl.load(code_ptr + ((q >> 8) & 15)),
                tl.load(code_ptr + ((q >> 20) & 15)), tl.load(code_ptr + ((q >> 16) & 15)),
                tl.load(code_ptr + ((q >> 28) & 15)), tl.load(code_ptr + ((q >> 24) & 15)))


@triton.jit
def _gemv_lut_kernel(x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, tab_ptr, code_ptr, bias_ptr, out_ptr,
                     N, K: tl.constexpr, STEPS: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_N: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, I64: tl.constexpr, ASM: tl.constexpr,
                     USE_PTX: tl.constexpr):
    rows, rows_c = gemv_rows(BLOCK_N, N, I64)
    KW: tl.constexpr = K // 8
    gi = tl.arange(0, NG)
    woff = gi[:, None] * G + tl.arange(0, G)[None, :]  # (NG, G) word offsets inside one K step
    w_rows = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + rows_c[:, None, None] * KW
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # x as (even, odd) bf16 pairs
    blk_rows = rows_c[:, None] * (K // BLOCKSIZE)
    acc = tl.zeros((BLOCK_N, NG), tl.float32)
    kw_start = tl.program_id(1) * (STEPS * NG * G)
    for i in range(STEPS):  # constexpr trip count: also runs under the interpreter
        kw0 = kw_start + i * (NG * G)
        q = tl.load(w_rows + (kw0 + woff)[None, :, :], eviction_policy="evict_first")  # (BLOCK_N, NG, G)
        blk = blk_rows + ((kw0 + gi * G) * 8 // BLOCKSIZE)[None, :]  # (BLOCK_N, NG): G words share one absmax
        am = load_absmax_inbounds(absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, blk, NESTED, USE_PTX)
        # one 16-byte load of x per word, split in registers into its 8 values (bf16 -> float32 is a shift)
        xq = tl.load(x32 + 4 * (kw0 + woff)[:, :, None] + tl.arange(0, 4)[None, None, :])
        xa, xb = tl.split(tl.reshape(xq, (NG, G, 2, 2)))
        p0, p2 = tl.split(xa)
        p1, p3 = tl.split(xb)
        w0, w1, w2, w3, w4, w5, w6, w7 = _lut_words(q, tab_ptr, code_ptr, ASM, USE_PTX)
        lo0, hi0 = (p0 << 16).to(tl.float32, bitcast=True), (p0 & -65536).to(tl.float32, bitcast=True)
        lo1, hi1 = (p1 << 16).to(tl.float32, bitcast=True), (p1 & -65536).to(tl.float32, bitcast=True)
        lo2, hi2 = (p2 << 16).to(tl.float32, bitcast=True), (p2 & -65536).to(tl.float32, bitcast=True)
        lo3, hi3 = (p3 << 16).to(tl.float32, bitcast=True), (p3 & -65536).to(tl.float32, bitcast=True)
        p = (w0 * lo0[None] + w1 * hi0[None] + w2 * lo1[None] + w3 * hi1[None]
             + w4 * lo2[None] + w5 * hi2[None] + w6 * lo3[None] + w7 * hi3[None])
        acc += tl.sum(p, axis=2) * am
    gemv_store(tl.sum(acc, axis=1), rows, N, bias_ptr, out_ptr, HAS_BIAS, ATOMIC, USE_PTX)


@functools.lru_cache(maxsize=None)
def lut_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(8,) int32 ``prmt`` table words and (16,) float32 bf16-rounded codes of ``quant_type`` on ``device``: what
    ``_lut_words`` reads on the GPU and under the interpreter. Cached: a call does no host-to-device copy."""
    code = tuple(ref4.code_4bit(quant_type, torch.device("cpu")).tolist())
    return (torch.tensor(lut.table_words(code, 2), dtype=torch.int32, device=device),
            torch.tensor(lut.effective_codes(code, 2), dtype=torch.float32, device=device))


@functools.lru_cache(maxsize=None)
def _lut_asm() -> str:
    # The tables come in as operands, so one assembly (and one compiled kernel) serves NF4 and FP4.
    return lut.decode_asm(tuple(ref4.code_4bit("nf4", torch.device("cpu")).tolist()), 2, True)


def default_config(N: int, K: int) -> Config:
    """GEMV launch shape, from bench/gemv_variants.py's sweep on an H200 (BENCHMARKS.md, "GEMV"): small N wants
    more bytes per row per step and x split in registers; FLUX/T5 widths 16 rows x 256 bytes."""
    if N <= 4096:
        return Config(block_n=8, kstep=512, num_warps=4, xsplit=True)
    return Config(block_n=16, kstep=256, num_warps=4)


def lut_supported(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether the register-table GEMV (``_gemv_lut_kernel``) serves a bf16 call: it reads the weight and x as
    32-bit words, so both must start on a 4-byte boundary. Other dtypes keep the table-load kernel: the bf16-rounded
    codes are exact only within bf16 activations' tolerance."""
    return dtype == torch.bfloat16 and all(t.data_ptr() % 4 == 0 for t in tensors)


def fused_supported(M: int, K: int, blocksize: int, dtype: torch.dtype) -> bool:
    """Whether ``gemv`` serves this call: one token, whole blocks per weight row, a float activation."""
    return M == 1 and K % blocksize == 0 and dtype in ref4.FLOAT_DTYPES


def default_lut_config(N: int, K: int) -> Config:
    """Register-table GEMV launch shape, from bench/gemv_lut.py's sweep on an H100 (BENCHMARKS.md, "GEMV with
    register tables"): 8 rows x 512 bytes per step, 4 warps, fastest at every FLUX/T5 shape measured."""
    return Config(block_n=8, kstep=512, num_warps=4)


def gemv_lut_launch(N: int, K: int, blocksize: int, nested: bool, has_bias: bool, device: torch.device,
                    config: Config | None = None) -> tuple[tuple[int, int], int, bool, dict]:
    """``gemv_launch`` for ``_gemv_lut_kernel``: a K step is NG groups of G 32-bit words, G = the words sharing
    one absmax (at most 8)."""
    cfg = config or default_lut_config(N, K)
    g = min(blocksize // 8, 8)
    words = max(cfg.kstep // 4, g)
    while (K // 8) % words:  # K % blocksize == 0 makes a row a whole number of G-word groups
        words //= 2
    tiles = triton.cdiv(N, cfg.block_n)
    k_steps = (K // 8) // words
    split = gemv_split(tiles, k_steps, device)
    kwargs = dict(BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=has_bias, ATOMIC=split > 1, BLOCK_N=cfg.block_n,
                  NG=words // g, G=g, I64=N * K >= 2**31, ASM=_lut_asm(), USE_PTX=USE_PTX, num_warps=cfg.num_warps)
    return (tiles, split), k_steps // split, split > 1, kwargs


def gemv_launch(N: int, K: int, blocksize: int, nested: bool, has_bias: bool, device: torch.device,
                config: Config | None = None) -> tuple[tuple[int, int], int, bool, dict]:
    """(grid, K steps per program, atomic, kwargs) of ``_gemv_kernel`` for an (N, K) weight: the one place that
    derives them, for ``gemv`` and for the bound launches of ``Plan``. atomic: K is split across programs, which
    add float32 partial sums into a zeroed (1, N) float32 output (the bias is then added by the caller)."""
    cfg = config or default_config(N, K)
    kstep = cfg.kstep
    while (K // 2) % kstep:  # K % blocksize == 0 makes a row a whole number of blocksize/2-byte groups
        kstep //= 2
    tiles = triton.cdiv(N, cfg.block_n)
    k_steps = (K // 2) // kstep
    split = gemv_split(tiles, k_steps, device)
    atomic = split > 1
    gb = min(blocksize // 2, 32, kstep)
    kwargs = dict(BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=has_bias, ATOMIC=atomic, BLOCK_N=cfg.block_n,
                  GROUPS=kstep // gb, GB=gb, I64=N * K >= 2**31, XSPLIT=cfg.xsplit, USE_PTX=USE_PTX,
                  num_warps=cfg.num_warps)
    return (tiles, split), k_steps // split, atomic, kwargs


def gemv_tables(x, data, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
                config: Config | None = None) -> torch.Tensor:
    """``gemm4bit.gemv``'s contract (``data`` the packed weight as uint8) through the register-table kernel for bf16
    where ``lut_supported``, else the table-load kernel; ``config`` shapes either launch."""
    fn, launcher = ((_gemv_lut_kernel, gemv_lut_launch) if lut_supported(x.dtype, x, data)
                    else (_gemv_kernel, gemv_launch))
    grid, steps, atomic, kwargs = launcher(N, K, blocksize, nested_absmax is not None, bias is not None,
                                           x.device, config)
    out = torch.zeros(1, N, dtype=torch.float32, device=x.device) if atomic else x.new_empty(1, N)
    tables = lut_tables(quant_type, x.device) if fn is _gemv_lut_kernel else (code_table(quant_type, x.device),)
    launch(fn, grid, x, data, *absmax_args(absmax, nested_absmax, nested_code, offset, x.device),
           *tables, bias if bias is not None else out, out, N, K, steps, **kwargs)
    return finish(out, atomic, bias, x.dtype)


def finish(out: torch.Tensor, atomic: bool, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A GEMV's (1, N) output: as written when K was not split; else the float32 workspace plus the bias, in
    ``dtype`` (the split kernels add their partial sums atomically and leave the bias to the caller)."""
    if not atomic:
        return out
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(dtype)
