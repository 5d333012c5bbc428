"""FP8 (e4m3) compute for 4-bit layers: the reference of halfbyte's opt-in ``set_fp8_compute`` mode.

Not a storage format: the weights stay bitsandbytes' 4-bit bytes. For a call over many tokens, the 4-bit weight is
decoded straight into float8 e4m3 with one float32 scale per output row, the activations are quantized to e4m3
with one scale per token, and the matmul runs on the fp8 tensor cores (``torch._scaled_mm``, float32
accumulation), which on an H100 take ~0.65x the time of the bf16 matmul. The price is precision: e4m3 keeps 3
mantissa bits (a relative rounding error up to 2^-4 per value, against 2^-8 for bf16), on both operands. That
is why this mode is opt-in and never the default (the default reproduces bitsandbytes' numbers).

Definitions (float32 arithmetic, each operation rounded to nearest even; ``e4m3`` = round to nearest even to
float8_e4m3fn, saturating at +-448):
* weight row n, blocks g of ``blocksize`` along K (K a multiple of blocksize): ``rowmax = max_g absmax[n, g]``,
  ``inv = 448 / rowmax`` (0 when rowmax is 0), ``a[n, g] = absmax[n, g] * inv``,
  ``W8[n, k] = e4m3(code[q[n, k]] * a[n, g])``, ``sw[n] = rowmax / 448``: W ~= W8 * sw;
* activation row m: ``amax = max_k |x[m, k]|``, ``inv = 448 / amax`` (0 when amax is 0),
  ``x8[m, k] = e4m3(x[m, k] * inv)``, ``sx[m] = amax / 448``: x ~= x8 * sx;
* ``out[m, n] = (sum_k x8[m, k] * W8[n, k]) * sx[m] * sw[n] + bias[n]``, accumulated in float32, rounded to
  bfloat16 (cuBLAS's row-wise scaled matmul writes bfloat16 only; other activation dtypes get it cast).
Non-finite activations are not supported (an infinite value zeroes its row's scale).
"""

import torch
from torch import Tensor

from . import fourbit
from .codebooks import code_4bit

E4M3_MAX = 448.0
E4M3 = torch.float8_e4m3fn


def e4m3(v: Tensor) -> Tensor:
    """float32 -> float8_e4m3fn, nearest even, saturating at +-448 (NaN stays NaN)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _inverse(amax: Tensor) -> Tensor:
    """448 / amax in float32 (one correctly rounded division: ``448.0 / tensor`` would multiply by a rounded
    reciprocal), 0 where amax is 0."""
    return torch.where(amax > 0, torch.full_like(amax, E4M3_MAX) / amax, torch.zeros_like(amax))


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float16/bfloat16/float32 -> (x8 (M, K) float8_e4m3fn, sx (M,) float32), x ~= x8 * sx[:, None]."""
    xf = x.float()
    amax = xf.abs().amax(dim=1) if x.shape[1] else xf.new_zeros(x.shape[0])
    return e4m3(xf * _inverse(amax)[:, None]), amax / E4M3_MAX


def check_weight(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, N: int, K: int) -> Tensor:
    """``packed`` as flat uint8, after checking that it and ``absmax`` hold an (N, K) 4-bit weight that fp8 compute
    takes (K a multiple of the blocksize)."""
    fourbit.check_4bit_args(blocksize, quant_type)
    if K % blocksize:
        raise ValueError(f"fp8 compute needs in_features ({K}) to be a multiple of the blocksize ({blocksize})")
    data = packed.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    if data.numel() != fourbit.packed_numel(N * K) or absmax.numel() != N * K // blocksize:
        raise ValueError(f"a ({N}, {K}) 4-bit weight at blocksize {blocksize} has {fourbit.packed_numel(N * K)} "
                         f"bytes and {N * K // blocksize} absmax values; got {data.numel()} and {absmax.numel()}")
    return data


def dequantize_4bit_fp8(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                        shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """packed 4-bit bytes of an (N, K) weight, absmax (N * K / blocksize,) float32 (decoded) -> (W8 (N, K)
    float8_e4m3fn, sw (N,) float32), W ~= W8 * sw[:, None]. K must be a multiple of ``blocksize``."""
    N, K = (int(s) for s in shape)
    data = check_weight(packed, absmax, blocksize, quant_type, N, K)
    codes = fourbit.unpack_nibbles(data, N * K).long().view(N, K // blocksize, blocksize)
    am = absmax.float().view(N, K // blocksize)
    rowmax = am.amax(dim=1) if K else am.new_zeros(N)
    a = am * _inverse(rowmax)[:, None]
    vals = code_4bit(quant_type, data.device)[codes] * a[..., None]
    return e4m3(vals).view(N, K), rowmax / E4M3_MAX


def scaled_matmul(x8: Tensor, sx: Tensor, w8: Tensor, sw: Tensor, bias: Tensor | None) -> Tensor:
    """(M, K) x (N, K) e4m3 with row scales -> (M, N) bfloat16, as ``torch._scaled_mm`` with row-wise scales
    computes it (products exact in float32, float32 sums in another order)."""
    acc = x8.float() @ w8.float().T
    out = acc * sx.float()[:, None] * sw.float()[None, :]
    if bias is not None:
        out = out + bias.to(torch.bfloat16).float()
    return out.to(torch.bfloat16)
