"""LLM.int8() (Dettmers et al. 2022): row-wise int8 quantization with outlier columns, byte-compatible with
bitsandbytes' CUDA kernels (``kInt8VectorQuant``, ``kdequant_mm_int32_fp16``; docs/bnb-format.md §5).

Quantization of a float16 matrix ``A`` (M, K), threshold ``t`` (0 disables outliers):
* outliers are elements with ``|a| >= t``; ``outlier_cols`` = columns holding any (int64 indices, ascending);
* ``SCA[m]`` = max ``|a|`` over the row's non-outlier elements, computed in float16 (0 for an empty row);
* ``CA = rint(a * fdividef(127, SCA[m]))`` (ties to even), outlier elements 0, and for M > 1 every element
  of an outlier column 0. ``fdividef`` is CUDA's approximate division, emulated bit-exactly (``fastmath``).
A row whose absmax is 0 quantizes to 0 (CUDA: 0 * inf = NaN, which the int conversion turns into 0).
NaN inputs: NaN is ignored by the row max (``fmaxf``) and quantizes to 0; ``inf`` gives absmax inf and 0 codes.

Matmul: ``C = CA @ CB.T`` in int32; ``out = fp16(C * SCA * SCB * 6.200012e-05 + bias)``, i.e. the result always
passes through float16; outlier columns are added in the activation dtype with the dequantized int8 weight.
"""

import torch

from .fastmath import fdividef

#: float32 constant of the CUDA dequant kernel: 1 / (127 * 127) as the literal ``6.200012e-05f``.
MM_DEQUANT_CONST = 6.200012e-05
#: Row-wise dequant constant 1/127 used by ``int8_vectorwise_dequant``.
INV_127 = 7.874015718698502e-3


def _row_absmax_fp16(A: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(M, K) float16 -> (M,) float32 max |a| (float16 values) over kept, non-NaN elements; 0 if none."""
    absA = A.abs()
    drop = torch.isnan(absA) if keep is None else (torch.isnan(absA) | ~keep)
    absA = absA.masked_fill(drop, 0.0)
    return absA.amax(dim=1).to(torch.float32) if A.shape[1] else A.new_zeros(A.shape[0], dtype=torch.float32)


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., K) float16 -> CA (..., K) int8, SCA (M,) float32, outlier_cols (n_outlier_cols,) int64.

    Inputs of another float dtype are cast to float16 first, as bitsandbytes does.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    shape = A.shape
    A2 = A.reshape(-1, shape[-1]).to(torch.float16)
    rows = A2.shape[0]
    if threshold > 0:
        # The row max compares in float16 (threshold rounded to half), the element test in float32.
        outlier_h = A2.abs() >= torch.tensor(threshold, dtype=torch.float16)
        outlier_cols = torch.nonzero(outlier_h.any(dim=0)).reshape(-1)
        sca = _row_absmax_fp16(A2, ~outlier_h)
        inlier = A2.float().abs() < threshold
    else:
        outlier_cols = torch.empty(0, dtype=torch.int64, device=A.device)
        sca = _row_absmax_fp16(A2, None)
        inlier = None
    scale = fdividef(127.0, sca)[:, None]
    q = torch.round(A2.float() * scale)
    q = torch.nan_to_num(q, nan=0.0)  # NaN inputs and 0-absmax rows (0 * inf) convert to 0 on CUDA
    if inlier is not None:
        q = torch.where(inlier, q, 0.0)
    ca = q.to(torch.int8)
    if rows > 1 and outlier_cols.numel():
        ca[:, outlier_cols] = 0
    return ca.view(shape), sca, outlier_cols


def int8_vectorwise_dequant(CA: torch.Tensor, SCA: torch.Tensor) -> torch.Tensor:
    """(M, K) int8, (M,) float32 -> (M, K) float32 ``(CA * SCA) * (1/127)``: bitsandbytes' constant and order of
    operations (multiplying SCA by the constant first rounds differently for about a third of the values)."""
    return CA.to(torch.float32) * SCA.reshape(-1, 1).to(torch.float32) * INV_127


def int8_mm_dequant(
    C: torch.Tensor, SCA: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(M, N) int32 -> (M, N) float16: ``fp16(C * SCA * SCB * 6.200012e-05 + bias)`` as CUDA's kernel.

    A float16 bias is fused (one rounding); any other bias is added to the float16 result afterwards.
    """
    out = C.to(torch.float32) * SCA.reshape(-1, 1) * SCB.reshape(1, -1) * MM_DEQUANT_CONST
    if bias is not None and bias.dtype == torch.float16:
        out = out + bias.to(torch.float32)
    out = out.to(torch.float16)
    if bias is not None and bias.dtype != torch.float16:
        out = (out.to(torch.float32) + bias.to(torch.float32)).to(torch.float16)
    return out


def int8_linear(
    A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """LLM.int8() forward: (..., K) float -> (..., N) in A's dtype, CB (N, K) int8, SCB (N,) float32.

    The int8 part is ``int8_mm_dequant`` of ``CA @ CB.T`` (bias in A's dtype); with outliers, the outlier columns
    of A (original dtype) are multiplied with the dequantized columns of CB and added in A's dtype.
    """
    shape = A.shape
    A2 = A.reshape(-1, shape[-1])
    bias = None if bias is None else bias.to(A.dtype)
    CA, SCA, cols = int8_vectorwise_quant(A2, threshold)
    # int32 accumulation; float64 is exact for |C| < 2**53, so the CPU reference needs no integer GEMM.
    C = (CA.to(torch.float64) @ CB.to(torch.float64).T).to(torch.int32)
    out = int8_mm_dequant(C, SCA, SCB, bias).to(A.dtype)
    if cols.numel():
        subB = int8_vectorwise_dequant(CB[:, cols], SCB).to(A.dtype)
        out = out.addmm(A2[:, cols], subB.T)
    return out.view(*shape[:-1], CB.shape[0])
