"""Tensor-level API with bitsandbytes' names and meanings (``bitsandbytes.functional``), on halfbyte's ops.

``quantize_4bit`` returns ``(packed, QuantState)`` like bitsandbytes; ``QuantState`` is a frozen record, not a
device-moving object. Every function runs on any device through the ``halfbyte::`` ops.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .formats import blockwise
from .formats.codebooks import code_4bit, dynamic_map
from .formats.int8 import INV_127


@dataclass(frozen=True)
class QuantState:
    """4-bit quantization state (bitsandbytes' ``QuantState``): absmax is float32 (B,), or uint8 (B,) with
    ``nested_absmax`` float32 (ceil(B/256),) and ``offset`` float32 (1,) when double quantized."""

    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: Tensor
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    offset: Tensor | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def quantize_4bit(
    A: Tensor, blocksize: int = 64, compress_statistics: bool = False, quant_type: str = "fp4"
) -> tuple[Tensor, QuantState]:
    """A (any shape) fp16/bf16/fp32 -> (packed ((n+1)//2, 1) uint8, QuantState), bitsandbytes' CUDA bytes."""
    packed, absmax = torch.ops.halfbyte.quantize_4bit(A, blocksize, quant_type)
    code = code_4bit(quant_type, A.device)
    if not compress_statistics:
        return packed.view(-1, 1), QuantState(absmax, A.shape, A.dtype, blocksize, quant_type, code)
    offset = absmax.mean().reshape(1)
    nested_code = dynamic_map(A.device)
    q, nested = torch.ops.halfbyte.quantize_blockwise(absmax - offset, nested_code, blockwise.NESTED_BLOCKSIZE)
    state = QuantState(q, A.shape, A.dtype, blocksize, quant_type, code, nested, nested_code, offset)
    return packed.view(-1, 1), state


def dequantize_4bit(A: Tensor, quant_state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """packed bytes + QuantState -> tensor of ``quant_state.shape`` in ``dtype`` (default ``quant_state.dtype``)."""
    qs = quant_state
    absmax = ops.decode_absmax(qs.absmax, qs.nested_absmax, qs.nested_code, qs.offset)
    return torch.ops.halfbyte.dequantize_4bit(A, absmax, qs.blocksize, qs.quant_type, list(qs.shape),
                                              dtype or qs.dtype)


def quantize_blockwise(A: Tensor, code: Tensor | None = None, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """(n,) float -> (codes (n,) uint8, absmax float32) over the 8-bit dynamic map (or ``code``)."""
    code = dynamic_map(A.device) if code is None else code
    return torch.ops.halfbyte.quantize_blockwise(A.reshape(-1).float(), code, blocksize)


def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor | None = None, blocksize: int = 256,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    code = dynamic_map(A.device) if code is None else code
    return torch.ops.halfbyte.dequantize_blockwise(A, absmax, code, blocksize, dtype)


def gemm_4bit(A: Tensor, B: Tensor, quant_state: QuantState, bias: Tensor | None = None) -> Tensor:
    """``A @ dequantize_4bit(B).T + bias`` in A's dtype: (..., K) -> (..., N)."""
    qs = quant_state
    return torch.ops.halfbyte.gemm_4bit(A, B, qs.absmax, qs.nested_absmax, qs.nested_code, qs.offset, bias,
                                        list(qs.shape), qs.blocksize, qs.quant_type)


def int8_vectorwise_quant(A: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """(..., K) float16 -> (CA int8, SCA (rows,) float32, outlier_cols int64 or None when threshold is 0).

    Like bitsandbytes, ``outlier_cols`` is None without a threshold and an empty tensor when nothing exceeds it.
    """
    CA, SCA, cols = torch.ops.halfbyte.int8_vectorwise_quant(A, float(threshold))
    return CA, SCA, (cols if threshold > 0 else None)


def int8_vectorwise_dequant(A: Tensor, stats: Tensor) -> Tensor:
    """(rows, K) int8, (rows,) float32 -> float32 ``A * stats / 127``."""
    return A.to(torch.float32) * (stats.reshape(-1, 1) * INV_127)


def int8_mixed_mm(A: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None = None, threshold: float = 0.0) -> Tensor:
    """LLM.int8() matmul of A (..., K) with the row-wise int8 weight (CB (N, K), SCB (N,)) -> (..., N)."""
    return torch.ops.halfbyte.int8_mixed_mm(A, CB, SCB, bias, float(threshold))
