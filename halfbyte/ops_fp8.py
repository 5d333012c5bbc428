"""The opt-in fp8 compute mode's operators (``formats.fp8`` has the definitions and the reason the mode exists).

* ``halfbyte::gemm_4bit_fp8``: a 4-bit layer's output computed on fp8 tensor cores. Its body is the reference
  (``formats.fp8``: decode, quantize, scaled matmul, all in PyTorch); its CUDA kernel is
  ``kernels.fp8.gemm_4bit_fp8`` (two Triton launches and cuBLAS's row-wise scaled matmul). Eager calls, and
  compiled graphs off CUDA, take this op.
* ``halfbyte::dequantize_4bit_fp8_fused``: the weight half, for compiled CUDA graphs: its body launches the Triton
  kernel through ``torch.library.wrap_triton``, so Inductor issues it from its generated code; the activation half
  is written in PyTorch there (``formats.fp8.quantize_rows_fp8``), so that Inductor fuses it into the kernel that
  produces the activations; the matmul is ``torch._scaled_mm``.

``forward`` is what ``halfbyte.nn.Linear4bit`` calls when the mode is on.
"""

import importlib
import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops as _ops
from .formats import fourbit
from .formats import fp8 as _fp8


@torch.library.custom_op("halfbyte::gemm_4bit_fp8", mutates_args=())
def gemm_4bit_fp8(
    A: Tensor,
    B: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    bias: Tensor | None,
    shape: Sequence[int],
    blocksize: int,
    quant_type: str,
) -> Tensor:
    """``F.linear(A, W, bias)`` on fp8 tensor cores (definition: ``formats.fp8``). A: (..., K) float16/bfloat16/
    float32; B, absmax, nested_absmax, nested_code, offset: the 4-bit weight of ``shape`` (N, K) as
    ``halfbyte::gemm_4bit`` takes it; bias (N,) or None. Returns (..., N) in A's dtype (computed in bfloat16)."""
    N, K = _check(A, shape, blocksize, quant_type)
    am = _ops.decode_absmax(absmax, nested_absmax, nested_code, offset)
    w8, sw = _fp8.dequantize_4bit_fp8(B, am, blocksize, quant_type, (N, K))
    x8, sx = _fp8.quantize_rows_fp8(A.reshape(-1, K))
    return _fp8.scaled_matmul(x8, sx, w8, sw, bias).to(A.dtype).view(*A.shape[:-1], N)


@gemm_4bit_fp8.register_fake
def _(A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type):
    N, _ = _check(A, shape, blocksize, quant_type)
    return A.new_empty((*A.shape[:-1], N))


def _check(A: Tensor, shape: Sequence[int], blocksize: int, quant_type: str) -> tuple[int, int]:
    fourbit.check_4bit_args(blocksize, quant_type)
    torch._check(len(shape) == 2, lambda: f"weight shape must be (N, K), got {shape}")
    N, K = shape
    torch._check(A.shape[-1] == K, lambda: f"input has {A.shape[-1]} features, weight expects {K}")
    torch._check(A.dtype in fourbit.FLOAT_DTYPES, lambda: f"fp8 compute takes float activations, got {A.dtype}")
    return N, K


_LIB = torch.library.Library("halfbyte", "FRAGMENT")  # module-level: it must outlive the registrations
_LIB.define(
    "dequantize_4bit_fp8_fused(Tensor B, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
    "Tensor code, int blocksize, str quant_type, SymInt[] shape) -> (Tensor, Tensor)")


def dequantize_4bit_fp8_fused(B, absmax, nested_absmax, nested_code, offset, code, blocksize, quant_type, shape):
    """``halfbyte::dequantize_4bit_fp8_fused``: (W8 (N, K) float8_e4m3fn, sw (N,) float32) of the 4-bit weight
    (``formats.fp8.dequantize_4bit_fp8``; statistics as ``gemm_4bit`` takes them, float32 ones also as their int32
    bits; with double quantization ``nested_code`` is the (256,) map; ``code`` the (16,) float32 code table). On
    CUDA the body launches the Triton kernel through ``wrap_triton`` (Inductor issues it from compiled code);
    elsewhere it is the reference."""
    N, K = (int(s) for s in shape)
    if B.device.type != "cuda":
        f32 = [None if t is None else t.view(torch.float32) if t.dtype == torch.int32 else t
               for t in (absmax, nested_absmax, offset)]
        am = _ops.decode_absmax(f32[0], f32[1], nested_code, f32[2])
        return _fp8.dequantize_4bit_fp8(B, am, blocksize, quant_type, (N, K))
    kernels = importlib.import_module("halfbyte.kernels.fp8")
    data = _fp8.check_weight(B, absmax, blocksize, quant_type, N, K)
    bits = torch.empty(N, K, dtype=torch.uint8, device=B.device)  # the kernel writes e4m3 bits
    sw = torch.empty(N, dtype=torch.float32, device=B.device)
    if N == 0:
        return bits.view(_fp8.E4M3), sw
    stats = (absmax, nested_absmax, nested_code, offset) if nested_absmax is not None else (absmax,) * 4
    grid, args, kwargs = kernels.dequant_fp8_launch(data, stats, code, bits, sw, blocksize, N, K)
    torch.library.wrap_triton(kernels._dequant_fp8_kernel)[grid](*args, **kwargs)
    return bits.view(_fp8.E4M3), sw


_LIB.impl("dequantize_4bit_fp8_fused", dequantize_4bit_fp8_fused, "CompositeImplicitAutograd")

if importlib.util.find_spec("triton") is not None:
    _ops._DIRECT["gemm_4bit_fp8"] = _ops._lazy_kernel("fp8", "gemm_4bit_fp8")
    _ops._CUDA_LIB.impl("gemm_4bit_fp8", _ops._DIRECT["gemm_4bit_fp8"], "CUDA")


def forward(layer, x: Tensor, code: Tensor, nested_code: Tensor | None) -> Tensor:
    """``layer`` (a ``halfbyte.nn.Linear4bit``) applied to ``x`` in fp8 compute; ``code`` its (16,) code table
    and ``nested_code`` the dynamic map (double quantization) or None, on x's device. Inference only. Eager CUDA
    calls go through the layer's plan (``kernels.fp8.Fp8Plan``), others through ``linear``."""
    plan = layer._inference_plan(x, "gemm_4bit_fp8") if x.is_cuda else None
    out = None if plan is None else plan(x, layer.bias)
    if out is not None:
        return out
    layer._check_input(x)
    return linear(layer, x, code, nested_code)


def linear(layer, x: Tensor, code: Tensor, nested_code: Tensor | None) -> Tensor:
    """``forward`` without the plan: the op (eager, or compiled off CUDA), or the in-graph form (compiled CUDA)."""
    if torch.is_grad_enabled() and (x.requires_grad or (layer.bias is not None and layer.bias.requires_grad)):
        raise RuntimeError("fp8 compute is for inference: this 4-bit layer's call records gradients; turn the mode "
                           "off for training (halfbyte.set_fp8_compute(model, False))")
    N, K = layer.shape
    if x.is_cuda and torch.compiler.is_compiling():
        w8, sw = torch.ops.halfbyte.dequantize_4bit_fp8_fused(
            layer.weight, layer.absmax, layer.nested_absmax, nested_code, layer.offset, code, layer.blocksize,
            layer.quant_type, [N, K])
        x8, sx = _fp8.quantize_rows_fp8(x.reshape(-1, K))  # PyTorch: Inductor fuses it into x's producer
        bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
        out = torch._scaled_mm(x8, w8.t(), scale_a=sx.unsqueeze(1), scale_b=sw.unsqueeze(0), bias=bias,
                               out_dtype=torch.bfloat16)
        return out.to(x.dtype).view(*x.shape[:-1], N)
    absmax, nested_absmax, nested_code, offset = layer.quant_stats()
    fn = _ops.direct_kernel("gemm_4bit_fp8", x, layer.bias) or torch.ops.halfbyte.gemm_4bit_fp8
    return fn(x, layer.weight, absmax, nested_absmax, nested_code, offset, layer.bias, [N, K], layer.blocksize,
              layer.quant_type)
