"""Triton 4-bit matmul ``out = x @ W.T + bias`` for ``halfbyte::gemm_4bit`` (x (M, K), W the 4-bit (N, K) weight).

* M == 1 (bandwidth-bound: the weight stream is the cost): a GEMV that decodes weight tiles in registers and never
  writes the weight out. Three kernels, by activation dtype (BENCHMARKS.md, "GEMV with register tables"):
  - bf16: ``_gemv_lut_kernel`` reads the weight as 32-bit words of 8 codes and decodes each with ``prmt``
    register tables (``kernels.lut``, ~30 integer instructions per word instead of two table loads per byte);
  - fp16: ``kernels.gemv_mma`` decodes the same way into float16 pairs and sums code * x on the tensor cores;
  - fp32, and where those do not apply (alignment, K): ``_gemv_kernel``, two loads from the code table per byte.
* 2 <= M <= 64 with 16-bit activations: ``kernels.gemm_small``, the GEMV's decode feeding ``mma`` with up to 32
  tokens per decode (the weight is read once in 4 bits and never written out).
* 65 to 2048 tokens, bf16, on Hopper: ``kernels.gemm_ring``, a fused GEMM that decodes the codes
  straight into the tensor cores' operand (the weight is never written out), where ``gemm_ring.wanted`` says it beats
  the next path (weights from 2^24 elements: 0.55-0.96x its time).
* Larger M (and fp32, fp16): dequantize the whole weight with the nested absmax fused
  (``fourbit.dequantize``) into x's dtype, then cuBLAS. At M = 4608 the GEMMs are compute-bound and cuBLAS's speed
  is what counts.
  Dequantizing the next layer's weight on a side stream during this GEMM was tried and measured no faster (cuBLAS
  holds every SM, so the two kernels do not run concurrently; BENCHMARKS.md, "Side-stream dequantize").
The dequantize path uses the reference's weight values exactly (``code * absmax`` in float32, rounded once to x's
dtype); the fused GEMM rounds the code and the absmax to bf16 before their product (``gemm_ring``'s doc). The
GEMVs never round a weight: they sum ``code * x`` over each group sharing an absmax in float32 and
multiply the group's sum by the absmax once (bitsandbytes' GEMV rounds every weight to x's dtype first). The
register-table kernels use the codes rounded to x's dtype (as bitsandbytes' table is); fp32 uses them exactly.
The result differs from the reference by those roundings plus float32 sum order (tests/test_kernels.py derives
the bound).

GEMV layout (``_gemv_kernel``, ``_gemv_lut_kernel``): a program owns BLOCK_N weight rows and walks K in steps,
accumulating products in float32 registers; K is split across programs (float32 atomics into a workspace) when
the N tiles alone cannot fill the GPU. Byte j of a row holds elements 2j (high nibble) and 2j+1 (low).
Precondition: K % blocksize == 0 (no block straddles two rows); otherwise the dequantize path runs.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..formats import fourbit as ref4
from . import gemm_ring, gemm_small, gemv_mma, gemv_ring, lut
from .common import INTERPRET, USE_PTX, gemv_rows, gemv_split, gemv_store, load_absmax_inbounds
from .fourbit import absmax_args, code_table, dequant_launch, dequantize
from .launch import PlanCache, bind, hooks_installed, launch

#: Plans of the op's own calls (torch.compile graphs, direct kernel calls), keyed by ``plan_key``. ``halfbyte.nn``'s
#: eager layers keep their own plans.
PLANS = PlanCache()


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


def gemv(x, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
         config: Config | None = None, use_mma: bool = True, use_ring: bool = True) -> torch.Tensor:
    """x (1, K) fp16/bf16/fp32 (unit column stride), packed 4-bit W (N, K), bias (N,) in x's dtype or None
    -> (1, N) in x's dtype. absmax: (N*K/blocksize,) float32, or uint8 with nested float32 stats. Kernel, where
    ``use_mma``: the TMA-ring one (``gemv_ring``) where it applies and ``use_ring``, else the tensor-core one
    (``gemv_mma``) where it applies; else the register-table one for bf16, else the table-load one; ``config``
    shapes the latter two."""
    data = B.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
    if use_mma and use_ring and gemv_ring.supported(x.dtype, N, K, blocksize, nested, absmax, x, data):
        return gemv_ring.ring_for(data, absmax, N, K, quant_type, x.dtype, nested)(x, bias)
    if use_mma and gemv_mma.mma_supported(x.dtype, K, blocksize, x, data):
        return gemv_mma.gemv_mma(x, data, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                                 quant_type)
    fn, launcher = ((_gemv_lut_kernel, gemv_lut_launch) if lut_supported(x.dtype, x, data)
                    else (_gemv_kernel, gemv_launch))
    grid, steps, atomic, kwargs = launcher(N, K, blocksize, nested_absmax is not None, bias is not None,
                                           x.device, config)
    out = torch.zeros(1, N, dtype=torch.float32, device=x.device) if atomic else x.new_empty(1, N)
    tables = lut_tables(quant_type, x.device) if fn is _gemv_lut_kernel else (code_table(quant_type, x.device),)
    launch(fn, grid, x, data, *absmax_args(absmax, nested_absmax, nested_code, offset, x.device),
           *tables, bias if bias is not None else out, out, N, K, steps, **kwargs)
    return gemv_mma.finish(out, atomic, bias, x.dtype)


def gemm_4bit(A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type):
    """CUDA kernel of ``halfbyte::gemm_4bit``: A (..., K) float -> (..., N) in A's dtype (contract in ops.py)."""
    ref4.check_4bit_args(blocksize, quant_type)
    N, K = (int(s) for s in shape)
    if A.dim() == 0 or A.shape[-1] != K:  # a (2, K/2) input has K elements too: the GEMV must not take it
        raise ValueError(f"gemm_4bit: input of shape {tuple(A.shape)} has {A.shape[-1] if A.dim() else 0} features, "
                         f"the {N}x{K} weight expects {K}")
    key = plan_key(A, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type)
    if key is not None:
        plan = PLANS.get(key, lambda: Plan(B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                                           quant_type, A.dtype))
        if plan is not None:
            out = plan(A, bias)
            if out is None:  # a token count whose small-batch launch is not bound yet
                plan.bind_small(A.numel() // K, B, absmax, nested_absmax, nested_code, offset)
                out = plan(A, bias)
            if out is not None:
                return out
    bias = None if bias is None else bias.to(A.dtype)
    M = A.numel() // K if K else 0
    if fused_supported(M, K, blocksize, A.dtype):
        x = A.reshape(1, K)
        if x.stride(1) != 1:
            x = x.contiguous()
        return gemv(x, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                    quant_type).view(*A.shape[:-1], N)
    data = B.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    if gemm_small.MAX_M >= M >= 2 and A.dtype in (torch.float16, torch.bfloat16):
        x = A.reshape(M, K)
        x = x if x.is_contiguous() else x.contiguous()
        if gemm_small.small_supported(M, N, K, x.dtype, blocksize, x, data):
            return gemm_small.mm_small(x, data, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                                       quant_type).view(*A.shape[:-1], N)
    nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
    if (A.dtype == torch.bfloat16 and A.is_cuda and gemm_ring.wanted(M, N, K, gemm_ring.sms(A.get_device()))
            and A.device == data.device == absmax.device == (A.device if bias is None else bias.device)
            and gemm_ring.supported(N, K, blocksize, quant_type, A.dtype, absmax, data, nested=nested,
                                    has_bias=bias is not None)):
        x, bias = gemm_ring.aligned(A.reshape(M, K)), None if bias is None else gemm_ring.aligned(bias)
        return gemm_ring.gemm_for(data, absmax, N, K, quant_type, nested)(x, bias).view(*A.shape[:-1], N)
    W = dequantize(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K, A.dtype)
    return torch.nn.functional.linear(A, W.view(N, K), bias)


class Plan:
    """Inference calls of one 4-bit weight in one activation dtype, with every launch prebuilt.

    A FLUX step makes ~500 4-bit calls; through ``gemm_4bit`` each pays ~35 us of Python (checks, key lookups,
    pointer queries) on top of the launch itself, and the host outran the GPU. A plan binds the dequantize launch
    (and the GEMV launch when the weight allows it) once, to device addresses (``launch.Bound``), and the
    small-batch kernel's when its owner binds them (``bind_small``; until then such calls return None), and the fused
    GEMM's (``gemm_ring.RingGemm``) where it serves, so a call is an allocation, one bound launch and, for more
    tokens, ``F.linear``. It holds no tensor: its owner passes the
    bias and checks that the weight tensors still sit where the plan was bound (``halfbyte.nn``'s eager layers
    compare addresses; ``gemm_4bit`` itself, for compiled graphs and direct calls, looks plans up by the call's
    addresses, ``plan_key``). Results are those of ``gemm_4bit``'s direct path (same kernels, same arguments).
    """

    __slots__ = ("N", "K", "dtype", "device", "_deq", "_gemv", "_ring", "_atomic", "_small", "_small_args", "_fused")

    def __init__(self, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
                 dtype: torch.dtype):
        """Tensors as ``gemm_4bit`` takes them (CUDA), ``bias`` in ``dtype`` or None; ``dtype`` the activations'."""
        ref4.check_4bit_args(blocksize, quant_type)
        self.N, self.K, self.dtype, self.device = N, K, dtype, B.device
        data = B.reshape(-1)
        data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        self._deq = bind_dequantize(data, absmax, nested_absmax, nested_code, offset, N * K, blocksize, quant_type,
                                    dtype)
        self._gemv, self._ring, self._atomic = None, None, False
        nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
        if fused_supported(1, K, blocksize, dtype):
            x = torch.empty(1, K, dtype=dtype, device=B.device)  # calls pass 16-byte aligned rows like this one
            if gemv_ring.supported(dtype, N, K, blocksize, nested, absmax, x, data):
                self._ring = gemv_ring.RingGemv(data, absmax, N, K, quant_type, dtype, nested=nested)
            if gemv_mma.mma_supported(dtype, K, blocksize, x, data):
                fn, launcher = gemv_mma._gemv_mma_kernel, functools.partial(gemv_mma.mma_launch, dtype=dtype)
                tables = gemv_mma.mma_tables(quant_type, B.device, dtype)
            elif lut_supported(dtype, x, data):
                fn, launcher, tables = _gemv_lut_kernel, gemv_lut_launch, lut_tables(quant_type, B.device)
            else:
                fn, launcher, tables = _gemv_kernel, gemv_launch, (code_table(quant_type, B.device),)
            grid, steps, self._atomic, kwargs = launcher(N, K, blocksize, nested_absmax is not None,
                                                         bias is not None, B.device)
            out = torch.empty(1, N, dtype=torch.float32 if self._atomic else dtype, device=B.device)
            args = (x, data, *absmax_args(absmax, nested_absmax, nested_code, offset, B.device), *tables,
                    bias if bias is not None else out, out, N, K, steps)
            self._gemv = bind(fn, grid, args, kwargs, free=(0, 7 + len(tables)))
        # Token count -> bound launches (see bind_small): a dict lookup per call, the launch shape computed once.
        self._small: dict[int, tuple] = {}
        self._small_args = None
        x = torch.empty(2, K, dtype=dtype, device=B.device)
        if gemm_small.small_supported(2, N, K, dtype, blocksize, x, data):
            self._small_args = (blocksize, nested_absmax is not None, bias is not None, quant_type)
        # Last: its device check is the longest compile (``plan_checks``), so threads that build plans side by side
        # bind the launches above while one of them runs it.
        self._fused = None  # calls over 64 tokens that gemm_ring.wanted picks
        if (gemm_ring.layer_wanted(N, K, blocksize, quant_type) and gemm_ring.supported(
                N, K, blocksize, quant_type, dtype, absmax, data, nested=nested, has_bias=bias is not None)):
            self._fused = gemm_ring.RingGemm(data, absmax, N, K, quant_type, nested)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (..., K) CUDA in the plan's dtype on the current device -> (..., N): ``gemm_4bit``'s result."""
        stream = torch._C._cuda_getCurrentRawStream(self.device.index)
        if self._gemv is not None and x.numel() == self.K and x.shape[-1] == self.K:
            if x.stride(-1) == 1 and x.data_ptr() % 16 == 0:
                if self._ring is not None or not self._atomic:
                    out = torch.empty(x.shape[:-1] + (self.N,), dtype=self.dtype, device=self.device)
                    if self._ring is not None:
                        self._ring.run(stream, x.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr())
                    else:
                        self._gemv(stream, x.data_ptr(), out.data_ptr())
                    return out
                acc = torch.zeros(x.shape[:-1] + (self.N,), dtype=torch.float32, device=self.device)
                self._gemv(stream, x.data_ptr(), acc.data_ptr())
                if bias is not None:
                    acc += bias
                return acc.to(self.dtype)
        M = x.numel() // self.K if self.K else 0
        if (self._small_args is not None and 2 <= M <= gemm_small.max_m(self.N, self.K) and x.shape[-1] == self.K
                and x.is_contiguous() and x.data_ptr() % 16 == 0):
            hit = self._small.get(M)
            if hit is None:
                return None  # not bound yet: the caller, who holds the tensors, calls bind_small
            mm, sum_, splits, _ = hit
            out = torch.empty(x.shape[:-1] + (self.N,), dtype=self.dtype, device=self.device)
            b = out.data_ptr() if bias is None else bias.data_ptr()  # never read without a bias
            if sum_ is None:
                mm(stream, x.data_ptr(), b, out.data_ptr(), M)
            else:
                ws = torch.empty((splits, M, self.N), dtype=torch.float32, device=self.device)
                mm(stream, x.data_ptr(), b, ws.data_ptr(), M)
                sum_(stream, ws.data_ptr(), b, out.data_ptr(), M)
            return out
        if self._fused is not None and gemm_ring.wanted(M, self.N, self.K, self._fused.programs):
            out = torch.empty(x.shape[:-1] + (self.N,), dtype=self.dtype, device=self.device)
            x, bias = gemm_ring.aligned(x), None if bias is None else gemm_ring.aligned(bias)
            self._fused.run(stream, x.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr(), M)
            return out
        W = torch.empty((self.N, self.K), dtype=self.dtype, device=self.device)
        self._deq(stream, W.data_ptr())
        return torch.nn.functional.linear(x, W, bias)

    def bind_small(self, M: int, B, absmax, nested_absmax, nested_code, offset) -> None:
        """Bind the small-batch kernel's launches for M tokens (token tiles and grid: a few per plan) to these
        weight tensors (the ones the plan was built from; the plan keeps their addresses, not them). Free
        arguments: x, bias, out (or the partial sums' workspace) and M (not specialized); the sum's: workspace,
        bias, out, M. Token counts with the same launch shape share the bound launches. No-op where the plan does
        not serve M tokens."""
        if self._small_args is None or not 2 <= M <= gemm_small.max_m(self.N, self.K) or M in self._small:
            return
        blocksize, nested, has_bias, quant_type = self._small_args
        grid, steps, partial, kwargs = gemm_small.small_launch(self.N, self.K, M, blocksize, nested, has_bias,
                                                               self.device, self.dtype)
        for hit in self._small.values():  # a few launch shapes per plan: (token tiles, grid)
            if hit[3] == (kwargs["TT"], grid):
                self._small[M] = hit
                return
        data = B.reshape(-1)
        data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        stats = absmax_args(absmax, nested_absmax, nested_code, offset, self.device)
        x = torch.empty(M, self.K, dtype=self.dtype, device=self.device)
        out = torch.empty(M, self.N, dtype=self.dtype, device=self.device)
        ws = torch.empty(grid[1], M, self.N, dtype=torch.float32, device=self.device) if partial else out
        args = (x, data, *stats, *gemm_small.mma_tables(quant_type, self.device, self.dtype), out, ws, M, self.N,
                self.K, steps)
        mm = bind(gemm_small._mm_small_kernel, grid, args, kwargs, free=(0, 8, 9, 10))
        sum_ = None
        if partial:
            sgrid, skw = gemm_small.sum_launch(self.N, grid[1], has_bias)
            sum_ = bind(gemm_small._split_sum_kernel, sgrid, (ws, out, out, M, self.N), skw, free=(0, 1, 2, 3))
        self._small[M] = (mm, sum_, grid[1], (kwargs["TT"], grid))


def plan_checks(N: int, K: int, blocksize: int, quant_type: str, dtype: torch.dtype, nested: bool, has_bias: bool,
                device: torch.device) -> dict[tuple, functools.partial]:
    """The device checks that building a ``Plan`` of such a weight (CUDA ``device``, activations in ``dtype``) would
    run, by name: each compiles and runs a kernel once per device (~1-6 s), and a plan runs them one after another.
    ``halfbyte.precompile`` starts them all at once before it builds plans. Tensor alignment is not known here, so
    a check may be listed that a plan of misaligned tensors would skip."""
    checks = {}
    if fused_supported(1, K, blocksize, dtype):
        if gemv_ring.shape_ok(dtype, N, K, blocksize, device):
            checks[("gemv_ring", device, dtype, nested)] = functools.partial(gemv_ring.verdict, device, dtype, nested)
        if gemv_mma.shape_ok(dtype, K, blocksize):
            checks[("gemv_mma", device)] = functools.partial(gemv_mma.layout_ok, device)
    if gemm_small.shape_ok(K, dtype, blocksize):
        checks[("gemm_small", device)] = functools.partial(gemm_small.layout_ok, device)
    if (gemm_ring.layer_wanted(N, K, blocksize, quant_type) and gemm_ring.shape_ok(N, K, blocksize, quant_type, dtype)
            and gemm_ring.device_ok(device)):
        checks[("gemm_ring", device, nested)] = functools.partial(gemm_ring.verdict, device, nested, has_bias)
    return checks


def bind_dequantize(data, absmax, nested_absmax, nested_code, offset, n: int, blocksize: int, quant_type: str,
                    dtype: torch.dtype):
    """The dequantize launch of these weight tensors (``data`` uint8) into ``dtype``, bound with the output's
    address free: ``bound(stream, out_ptr)`` writes the ``n`` values (``dequantize``'s bytes)."""
    W = torch.empty(0, dtype=dtype, device=data.device)  # the output's place: only its dtype specializes
    kernel, grid, args, kwargs = dequant_launch(data, absmax, nested_absmax, nested_code, offset, blocksize,
                                                quant_type, n, W)
    bound = bind(kernel, grid, args, kwargs, free=(6,))
    if bound is None:
        raise RuntimeError("kernels.gemm4bit: launches cannot be bound here (interpreter or launch hooks)")
    return bound


#: Bound dequantize launches for ``halfbyte::dequantize_4bit_after`` (compiled graphs' weights), keyed as plans.
DEQUANT_PLANS = PlanCache()


def dequantize_weight(x, B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    """CUDA kernel of ``halfbyte::dequantize_4bit_after``: the (N, K) weight in ``dtype`` (contract in ops.py; of
    ``x`` only the dtype and device are read). A compiled graph calls it once per layer and step with the same
    tensors, so from a weight's second call on it is an allocation and one bound launch (``DEQUANT_PLANS``), not
    ``dequantize``'s checks and launch-cache lookup."""
    N, K = (int(s) for s in shape)
    key = None
    if x.dtype == dtype:
        key = plan_key(x, B, absmax, nested_absmax, nested_code, offset, None, N, K, blocksize, quant_type)
    if key is not None:
        data = B.reshape(-1)
        data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        bound = DEQUANT_PLANS.get(key, lambda: bind_dequantize(data, absmax, nested_absmax, nested_code, offset,
                                                               N * K, blocksize, quant_type, dtype))
        if bound is not None:
            W = torch.empty((N, K), dtype=dtype, device=B.device)
            bound(torch._C._cuda_getCurrentRawStream(key[1]), W.data_ptr())
            return W
    return dequantize(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K, dtype).view(N, K)


def plan_key(A, B, absmax, nested_absmax, nested_code, offset, bias, N: int, K: int, blocksize: int,
             quant_type: str) -> tuple | None:
    """The cache key of a ``gemm_4bit`` call that a ``Plan`` can serve (the addresses, shapes and dtypes it would
    be bound to), or None where the call must take the direct path (interpreter, profiler hooks on triton's
    launches, a bias in another dtype, non-contiguous or foreign-device weight tensors, not the current device)."""
    if INTERPRET or type(A) is not torch.Tensor or not A.is_cuda or A.dtype not in ref4.FLOAT_DTYPES:
        return None
    if bias is not None and bias.dtype != A.dtype:
        return None
    dev = A.get_device()
    if dev != torch._C._cuda_getDevice():
        return None
    tensors = (B, absmax, nested_absmax, nested_code, offset, bias)
    for t in tensors:
        if t is not None and (t.get_device() != dev or not t.is_contiguous()):
            return None
    if hooks_installed():
        return None
    return (A.dtype, dev, N, K, blocksize, quant_type, absmax.dtype,
            *(0 if t is None else t.data_ptr() for t in tensors))
