"""Triton LLM.int8() kernels: row-wise activation quantization with outlier detection in one pass over the input,
and the int8 matmul's dequantization epilogue; bit-exact with ``formats.int8`` (bitsandbytes' CUDA bytes, §5).

``int8_vectorwise_quant``: one program per row. The first sweep over the row takes the absmax over the
non-outlier elements and flags outlier columns in an int32 (K,) array; the second sweep (the row is still in L1/L2)
writes ``rint(a * fdividef(127, absmax))``. Only the flagged columns are then zeroed across all rows (bitsandbytes
zeroes whole outlier columns when M > 1), which needs every row's flags and so runs after the kernel.

``int8_mixed_mm``: int8 GEMM by cuBLAS (``torch._int_mm``, exact int32), then one Triton pass applying
``fp16(C * SCA * SCB * 6.200012e-05 + bias)`` in the reference's operation order, then the outlier columns in the
activation dtype with the same ``addmm`` as the reference.
"""

import torch
import triton
import triton.language as tl

from ..formats import int8 as ref8
from .common import USE_PTX, mul_rn, rcp_approx, rcp_table, rint, round_to

#: Columns per sweep step: a FLUX/T5 row (K <= 16384) fits in at most 4 steps.
_BLOCK_K = 4096


@triton.jit
def _row_quant_kernel(a_ptr, ca_ptr, sca_ptr, flags_ptr, delta_ptr, stride_am, thr_h, thr_f,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_THR: tl.constexpr, USE_PTX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * stride_am
    STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    run_max = tl.zeros((BLOCK_K,), tl.float32)
    for c in range(STEPS):
        k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        # bitsandbytes quantizes float16: round once to half, then compare and scale in float32
        a = tl.load(a_row + k, mask=k < K, other=0.0).to(tl.float32).to(tl.float16).to(tl.float32)
        mag = tl.abs(a)
        keep = mag == mag  # fmaxf ignores NaN
        if HAS_THR:
            outlier = mag >= thr_h  # the column/absmax test compares in half precision
            tl.store(flags_ptr + k, tl.full((BLOCK_K,), 1, tl.int32), mask=outlier & (k < K))
            keep = keep & (mag < thr_h)
        run_max = tl.maximum(run_max, tl.where(keep, mag, 0.0))
    absmax = tl.max(run_max, axis=0)
    scale = 127.0 * rcp_approx(absmax, delta_ptr, USE_PTX)  # __fdividef(127, absmax)
    for c in range(STEPS):
        k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(a_row + k, mask=k < K, other=0.0).to(tl.float32).to(tl.float16).to(tl.float32)
        q = rint(a * scale, USE_PTX)
        q = tl.where(q == q, q, 0.0)  # NaN (a NaN input, or 0 * inf in an all-zero row) converts to 0 on CUDA
        if HAS_THR:
            q = tl.where(tl.abs(a) < thr_f, q, 0.0)  # outlier elements are 0 (float32 test, as the reference)
        tl.store(ca_ptr + row * K + k, q.to(tl.int8), mask=k < K)
    tl.store(sca_ptr + row, absmax)


def int8_vectorwise_quant(A: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA kernel of ``halfbyte::int8_vectorwise_quant``: (..., K) float -> CA (..., K) int8, SCA (rows,) float32,
    outlier_cols (n,) int64 ascending (empty without threshold); the bytes of ``formats.int8``."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    shape = A.shape
    K = shape[-1] if A.dim() else 1
    rows = A.numel() // K if K else 0
    if rows == 0 or K == 0:
        return ref8.int8_vectorwise_quant(A, threshold)
    A2 = A.reshape(rows, K)
    if A2.stride(1) != 1:
        A2 = A2.contiguous()
    ca = torch.empty((rows, K), dtype=torch.int8, device=A.device)
    sca = torch.empty(rows, dtype=torch.float32, device=A.device)
    has_thr = threshold > 0
    flags = torch.zeros(K if has_thr else 1, dtype=torch.int32, device=A.device)
    thr_h = float(torch.tensor(threshold, dtype=torch.float16))
    thr_f = float(torch.tensor(threshold, dtype=torch.float32))
    _row_quant_kernel[(rows,)](
        A2, ca, sca, flags, rcp_table(A.device), A2.stride(0), thr_h, thr_f,
        K=K, BLOCK_K=min(_BLOCK_K, triton.next_power_of_2(K)), HAS_THR=has_thr, USE_PTX=USE_PTX, num_warps=8,
    )
    if has_thr:
        cols = torch.nonzero(flags).reshape(-1)  # the output's size depends on the data: one host sync
        if rows > 1 and cols.numel():
            ca[:, cols] = 0
    else:
        cols = torch.empty(0, dtype=torch.int64, device=A.device)
    return ca.view(shape), sca, cols


@triton.jit
def _mm_dequant_kernel(c_ptr, sca_ptr, scb_ptr, bias_ptr, out_ptr, M, N,
                       HAS_BIAS: tl.constexpr, BIAS_FP16: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, USE_PTX: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (m < M)[:, None] & (n < N)[None, :]
    offs = m.to(tl.int64)[:, None] * N + n[None, :]
    c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.float32)
    sa = tl.load(sca_ptr + m, mask=m < M, other=0.0)[:, None]
    sb = tl.load(scb_ptr + n, mask=n < N, other=0.0)[None, :]
    v = mul_rn(c * sa * sb, 6.200012e-05, USE_PTX)  # ((C * SCA) * SCB) * 1/127^2, each product rounded
    if HAS_BIAS:
        b = tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if BIAS_FP16:
            v = (v + b).to(tl.float16)  # bitsandbytes fuses a float16 bias before its float16 rounding
        else:
            v = (v.to(tl.float16).to(tl.float32) + b).to(tl.float16)  # any other bias is added afterwards
    else:
        v = v.to(tl.float16)
    tl.store(out_ptr + offs, round_to(v.to(tl.float32), out_ptr.dtype.element_ty, USE_PTX), mask=mask)


def int8_mixed_mm(A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None,
                  threshold: float) -> torch.Tensor:
    """CUDA kernel of ``halfbyte::int8_mixed_mm``: A (..., K) float, CB (N, K) int8, SCB (N,) float32 ->
    (..., N) in A's dtype, bit-identical to ``formats.int8.int8_linear`` (integer GEMM is exact)."""
    shape = A.shape
    N, K = CB.shape
    A2 = A.reshape(-1, K)
    M = A2.shape[0]
    if M == 0 or K % 8 or N % 8:  # cuBLASLt's int8 GEMM needs K and N divisible by 8
        return ref8.int8_linear(A, CB, SCB, bias, threshold)
    bias = None if bias is None else bias.to(A.dtype)
    CA, SCA, cols = int8_vectorwise_quant(A2, threshold)
    if M <= 16:  # torch._int_mm takes more than 16 rows; zero rows add nothing
        CA = torch.cat([CA, CA.new_zeros(32 - M, K)])
    C = torch._int_mm(CA, CB.t())[:M]  # (M, N) int32; CB.t() is the column-major operand cuBLASLt wants
    out = torch.empty((M, N), dtype=A.dtype, device=A.device)
    grid = (triton.cdiv(M, 32), triton.cdiv(N, 128))
    _mm_dequant_kernel[grid](
        C, SCA, SCB, bias if bias is not None else SCB, out, M, N,
        HAS_BIAS=bias is not None, BIAS_FP16=bias is not None and bias.dtype == torch.float16,
        BLOCK_M=32, BLOCK_N=128, USE_PTX=USE_PTX, num_warps=4,
    )
    if cols.numel():
        subB = ref8.int8_vectorwise_dequant(CB[:, cols], SCB).to(A.dtype)
        out = out.addmm(A2[:, cols], subB.T)
    return out.view(*shape[:-1], N)
