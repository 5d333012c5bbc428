"""Triton LLM.int8() matmul: the int8 GEMM with bitsandbytes' dequantization in its epilogue, the outlier columns'
16-bit products, and ``int8_mixed_mm``, the whole layer launched directly (``int8_plan`` runs the same launches
through cached plans); bit-exact with ``formats.int8`` where no column is an outlier.

``int8_mixed_mm``: no host sync, three launches. (1) The outlier flags with their ascending list, then (2) the row
quantization with the gathers of the outlier columns (``int8``'s activation kernels). (3) ``_int8_mm_kernel``: one
Triton int8 GEMM (int32 accumulation on the tensor cores: exact, hence the reference's C) whose epilogue applies
``fp16(C * SCA * SCB * 6.200012e-05 + bias)`` in the reference's operation order to the tile in registers (the
int32 C never reaches memory: at 4608 x 12288 that round trip alone was 226 MB) and rounds to the activation dtype,
then adds ``xg @ wg.T`` over the ``count`` outlier columns (tensor cores, float32) to that result and rounds once
more, as the reference's ``addmm`` does; only that float32 sum's order differs from the reference. The loop is
skipped when no column is an outlier. ``MMConfig.fuse_outliers = False`` runs the products as (4)
``_outlier_add_kernel`` instead, which reads the output back and writes it again (same bits).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..formats import int8 as ref8
from .common import INTERPRET, USE_PTX, mul_rn, round_to
from .int8 import _OUT_PAD, _quant_rows, _quant_with_outliers, _rows_of, count_offset
from .int8 import quant_gather_launch as _qg_launch
from .launch import launch


@triton.jit
def _dequant_epilogue(c, sa, sb, b, HAS_BIAS: tl.constexpr, BIAS_FP16: tl.constexpr, USE_PTX: tl.constexpr):
    """float32 C (exact int32 values converted), SCA column, SCB row, float32 bias row -> float16
    ``fp16(C * SCA * SCB * 6.200012e-05 + bias)`` in the reference's operation order (``formats.int8``)."""
    v = mul_rn(c * sa * sb, 6.200012e-05, USE_PTX)  # ((C * SCA) * SCB) * 1/127^2, each product rounded
    if HAS_BIAS:
        if BIAS_FP16:
            v = (v + b).to(tl.float16)  # bitsandbytes fuses a float16 bias before its float16 rounding
        else:
            v = (v.to(tl.float16).to(tl.float32) + b).to(tl.float16)  # any other bias is added afterwards
    else:
        v = v.to(tl.float16)
    return v


@triton.jit
def _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC: tl.constexpr,
                  X_FP32: tl.constexpr, USE_PTX: tl.constexpr):
    """acc_x += xg[rows, c0:c0+OC] @ wg[cols, c0:c0+OC]^T in float32 (columns past the count hold zeros)."""
    oc = tl.multiple_of(c0, OC) + tl.arange(0, OC)
    xs = tl.load(xg_ptr + am[:, None] * stride_xg + oc[None, :])
    ws = tl.load(wg_ptr + bn[:, None] * stride_wg + oc[None, :])
    if X_FP32 or not USE_PTX:  # float32 inputs must not drop to tf32; the interpreter has no bf16 dot
        return tl.dot(xs.to(tl.float32), tl.trans(ws.to(tl.float32)), acc_x, input_precision="ieee")
    return tl.dot(xs, tl.trans(ws), acc_x)


@triton.jit
def _outlier_add_kernel(out_ptr, xg_ptr, wg_ptr, count_ptr, M, N, stride_om, stride_xg, stride_wg,
                        X_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OC: tl.constexpr,
                        STAGES: tl.constexpr, USE_PTX: tl.constexpr):
    """out[tile] = out-dtype(float32(out[tile]) + xg[rows, :count] @ wg[cols, :count]^T), the product summed in
    float32: the reference's ``addmm`` of the outlier columns onto the rounded int8 result. Nothing is read or
    written when count == 0. Runs with ``MMConfig.fuse_outliers = False`` only (benches): by default the GEMM's
    epilogue runs the same loop, which saves the output's second read and write."""
    n_out = tl.load(count_ptr)
    if n_out > 0:
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // grid_n
        pid_n = pid % grid_n
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        am = (rm % M).to(tl.int64)  # rows past M / N read a valid row; the store drops them
        bn = (rn % N).to(tl.int64)
        acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_PTX:  # a pipelined loop: the next steps' column loads are in flight during this step's dot
            for c0 in tl.range(0, n_out, OC, num_stages=STAGES):
                acc_x = _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC, X_FP32, USE_PTX)
        else:  # the interpreter's range() wants a Python int bound; the count is data
            c0 = 0
            while c0 < n_out:
                acc_x = _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC, X_FP32, USE_PTX)
                c0 += OC
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        offs = rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        res = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, round_to(res + acc_x, out_ptr.dtype.element_ty, USE_PTX), mask=mask)


@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, sca_ptr, scb_ptr, bias_ptr, out_ptr, M, N,
                    K: tl.constexpr, stride_am, stride_bn, stride_om,
                    xg_ptr, wg_ptr, count_ptr, stride_xg, stride_wg,
                    HAS_BIAS: tl.constexpr, BIAS_FP16: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr, OUTLIERS: tl.constexpr, OC: tl.constexpr, OUT_STAGES: tl.constexpr,
                    USE_PTX: tl.constexpr):
    """out (M, N) = epilogue(CA (M, K) int8 @ CB (N, K) int8 ^T): int32 accumulation on the tensor cores (exact,
    so any order gives the reference's C), the float16 dequantization applied to the tile in registers. The
    outlier columns' products are added afterwards by ``_outlier_add_kernel``, or with OUTLIERS here, to the
    rounded tile still in registers (``MMConfig.fuse_outliers``): the same operations and order as that kernel,
    without writing the output and reading it back. The loop runs after the int32 accumulator is dead (the first
    fused version kept a float32 accumulator beside it); at 128x128 tiles the launch caps the registers at 128
    (``MMConfig.fused_registers``) so that two programs still share an SM."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Programs walk GROUP_M row tiles per column tile, so neighbours share B tiles in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N read a valid row (results dropped by the store mask): no mask on the hot loads.
    am = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M).to(tl.int64)
    bn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + bn[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kin = rk[None, :] < K - k0
            a = tl.load(a_ptrs, mask=kin, other=0)
            b = tl.load(b_ptrs, mask=kin, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(sca_ptr + rm, mask=rm < M, other=0.0)[:, None]
    sb = tl.load(scb_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    else:
        b = sb
    v = _dequant_epilogue(acc.to(tl.float32), sa, sb, b, HAS_BIAS, BIAS_FP16, USE_PTX)
    odt = out_ptr.dtype.element_ty
    res = round_to(v.to(tl.float32), odt, USE_PTX)
    if OUTLIERS:
        n_out = tl.load(count_ptr)
        if n_out > 0:
            x_fp32: tl.constexpr = odt == tl.float32
            acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if USE_PTX:
                for c0 in tl.range(0, n_out, OC, num_stages=OUT_STAGES):
                    acc_x = _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC, x_fp32,
                                          USE_PTX)
            else:  # the interpreter's range() wants a Python int bound; the count is data
                c0 = 0
                while c0 < n_out:
                    acc_x = _outlier_step(acc_x, c0, xg_ptr, wg_ptr, am, bn, stride_xg, stride_wg, OC, x_fp32,
                                          USE_PTX)
                    c0 += OC
            res = round_to(res.to(tl.float32) + acc_x, odt, USE_PTX)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptr + offs, res, mask=mask)


@dataclass(frozen=True)
class MMConfig:
    """Launch shape of ``_int8_mm_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    # The outlier kernel's tile and columns per step. 64 columns per step: with the loop fused in the GEMM's
    # epilogue, 64 took 0.83-0.87x the time of 32 and of 128 at 350 outlier columns (bench/int8_outliers.py, H200).
    out_block_m: int = 128
    out_block_n: int = 128
    oc: int = 64
    out_warps: int = 8
    out_stages: int = 3  # software-pipelined column steps (bench/int8_outliers.py)
    # Outlier products in the GEMM's epilogue (one launch, the output written once) instead of their own kernel;
    # same bits (bench/int8_outliers.py, BENCHMARKS.md session 12).
    fuse_outliers: bool = False
    # ptxas register cap (triton's ``maxnreg``) of the GEMM when the outlier loop is fused in it, None: none. At
    # 128x128 tiles and 8 warps the fused kernel took 168 registers (ptxas of CUDA 13), one program per SM where
    # the plain GEMM's 127 allow two: 1.1-1.4x slower even when the loop never ran (ncu, bench/int8_profile.py).
    # Capped at 128 (4 registers spilled) it runs two per SM again.
    fused_registers: int | None = None


#: ``MMConfig.fuse_outliers`` of the default launch shapes (benches switch it; cached plans keep the value they
#: were built with). On: with outlier columns the fused kernel took 0.90-0.98x the separate kernels' time at
#: FLUX's 4608-token shapes and 0.91-0.96x at 512 tokens; without any, 1.01-1.02x at 4608 tokens (the register
#: cap) and 0.97-0.99x at 512 (H100, BENCHMARKS.md session 12).
FUSE_OUTLIERS = True


def mm_config(M: int, N: int, K: int) -> MMConfig:
    """Launch shape by token count: the fastest of the bench/kernel_bench.py int8 sweep on an H100 (BENCHMARKS.md)."""
    if INTERPRET:
        return MMConfig(16, 16, 32, 2, 1, 1, out_block_m=16, out_block_n=16, oc=32, out_warps=1,
                        fuse_outliers=FUSE_OUTLIERS)
    if M <= 1024:
        return MMConfig(64, 128, 128, 8, 4, 4, fuse_outliers=FUSE_OUTLIERS)
    return MMConfig(128, 128, 128, 8, 8, 3, fuse_outliers=FUSE_OUTLIERS, fused_registers=128)


def mm_launch(CA, CB, SCA, SCB, bias, out, cfg: MMConfig, outliers=None):
    """(fn, grid, args, kwargs) of ``_int8_mm_kernel``: CA (M, K) int8, CB (N, K) int8 (unit column strides), SCA
    (M,), SCB (N,) float32, bias (N,) in out's dtype or None, into out (M, N); with ``outliers`` = (xg, wg, count)
    (see ``outlier_launch``) the outlier products are added in the epilogue (``MMConfig.fuse_outliers``)."""
    M, K = CA.shape
    N = CB.shape[0]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    if outliers is not None:
        _check_oc(cfg)
        xg, wg, count = outliers
        extra = (xg, wg, count, xg.stride(0), wg.stride(0))
    else:
        extra = (SCB, SCB, SCB, 0, 0)  # never read
    return (_int8_mm_kernel, grid,
            (CA, CB, SCA, SCB, bias if bias is not None else SCB, out, M, N, K, CA.stride(0), CB.stride(0),
             out.stride(0), *extra),
            dict(HAS_BIAS=bias is not None, BIAS_FP16=bias is not None and bias.dtype == torch.float16,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                 EVEN_K=K % cfg.block_k == 0, OUTLIERS=outliers is not None, OC=cfg.oc, OUT_STAGES=cfg.out_stages,
                 USE_PTX=USE_PTX, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                 **({"maxnreg": cfg.fused_registers} if outliers is not None and cfg.fused_registers else {})))


def _check_oc(cfg: MMConfig) -> None:
    if _OUT_PAD % cfg.oc:
        raise ValueError(f"MMConfig.oc must divide {_OUT_PAD} (the outlier columns' padding), got {cfg.oc}")


def mm_launches(CA, CB, SCA, SCB, bias, out, cfg: MMConfig, outliers=None) -> list:
    """The launches of the GEMM and, with ``outliers``, of their products: one fused launch or two
    (``MMConfig.fuse_outliers``)."""
    if outliers is None or cfg.fuse_outliers:
        return [mm_launch(CA, CB, SCA, SCB, bias, out, cfg, outliers)]
    return [mm_launch(CA, CB, SCA, SCB, bias, out, cfg), outlier_launch(out, *outliers, cfg)]


def outlier_launch(out, xg, wg, count, cfg: MMConfig):
    """(fn, grid, args, kwargs) of ``_outlier_add_kernel``: out (M, N) += xg (M, Kp) @ wg (N, Kp).T over the
    ``count`` (int32 (1,)) outlier columns."""
    _check_oc(cfg)
    M, N = out.shape
    grid = (triton.cdiv(M, cfg.out_block_m) * triton.cdiv(N, cfg.out_block_n),)
    return (_outlier_add_kernel, grid, (out, xg, wg, count, M, N, out.stride(0), xg.stride(0), wg.stride(0)),
            dict(X_FP32=out.dtype == torch.float32, BLOCK_M=cfg.out_block_m, BLOCK_N=cfg.out_block_n, OC=cfg.oc,
                 STAGES=cfg.out_stages, USE_PTX=USE_PTX, num_warps=cfg.out_warps))


def _weight_gather_launch(A2, CA, SCA, ws, xg, CB, SCB, wg, threshold):
    """``quant_gather_launch`` over no rows: only the weight's outlier columns into wg (the activations' side came
    from a share)."""
    return _qg_launch(A2[:0], CA, SCA, ws, xg, CB, SCB, wg, threshold)


def int8_mm(CA: torch.Tensor, CB: torch.Tensor, SCA: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None,
            out_dtype: torch.dtype, config: MMConfig | None = None,
            outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """CA (M, K) int8, CB (N, K) int8, SCA (M,), SCB (N,) float32, bias (N,) or None -> (M, N) ``out_dtype``:
    ``out_dtype(fp16(CA @ CB.T * SCA * SCB * 6.200012e-05 + bias))``, bit-identical to ``formats.int8``.

    ``outliers = (xg (M, Kp), wg (N, Kp), count (1,) int32)`` from ``_quant_with_outliers`` (CA's outlier columns
    already zero): adds ``X[:, cols] @ dequant(CB[:, cols]).T`` in out_dtype (module doc)."""
    M, K = CA.shape
    N = CB.shape[0]
    cfg = config or mm_config(M, N, K)
    out = torch.empty((M, N), dtype=out_dtype, device=CA.device)
    for fn, grid, args, kwargs in mm_launches(CA, CB, SCA, SCB, bias, out, cfg, outliers):
        launch(fn, grid, *args, **kwargs)
    return out


def int8_mixed_mm(A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None,
                  threshold: float, config: MMConfig | None = None, share=None) -> torch.Tensor:
    """LLM.int8() linear on CUDA, launched directly (``int8_plan.int8_mixed_mm``, the op's CUDA kernel, runs the
    same launches through cached plans and comes here for everything else): A (..., K) float, CB (N, K) int8, SCB
    (N,) float32 ->
    (..., N) in A's dtype: ``formats.int8.int8_linear``, bit-identical without outliers (integer GEMM is exact);
    with outlier columns the float32 sum of their products may be ordered differently (at most one rounding
    apart; the same on every run). No host sync; three launches (outlier flags and their list; row quantization
    + gathers; GEMM with the outlier products), two without a threshold (four with ``fuse_outliers`` off).
    ``share`` (``kernels.share.Share``, threshold > 0): A's quantization is taken from it (then only the weight's
    outlier columns are gathered) or left in it for the group's next layers."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    shape = A.shape
    N, K = CB.shape
    M = A.numel() // K if K else 0
    if M == 0 or K == 0 or N == 0:
        return ref8.int8_linear(A, CB, SCB, bias, threshold)
    if CB.stride(1) != 1:
        CB = CB.contiguous()
    bias = None if bias is None else bias.to(A.dtype)
    A2 = _rows_of(A)
    if threshold > 0:
        hit = key = None
        if share is not None:
            stream = torch.cuda.current_stream(A.device).cuda_stream if A.is_cuda else 0
            key = share.key(A, threshold, stream, "direct")
            hit = share.take(A, key)
        if hit is not None:
            CA, SCA, ws, xg = hit
            wg = torch.empty((N, xg.shape[1]), dtype=A2.dtype, device=A2.device)
            fn, grid, args, kwargs = _weight_gather_launch(A2, CA, SCA, ws, xg, CB, SCB, wg, threshold)
            launch(fn, grid, *args, **kwargs)
            outliers = (xg, wg, ws[count_offset(K):])
        else:
            CA, SCA, outliers, ws = _quant_with_outliers(A2, CB, SCB, threshold, return_ws=True)
            if share is not None:
                share.put(A, key, (CA, SCA, ws, outliers[0]))
    else:
        (CA, SCA, _), outliers = _quant_rows(A2, threshold), None
    out = int8_mm(CA, CB, SCA, SCB, bias, A.dtype, config, outliers)
    return out.view(*shape[:-1], N)
