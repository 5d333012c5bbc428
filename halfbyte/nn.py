"""Quantized drop-in replacements for ``nn.Linear``: ``Linear4bit`` (NF4/FP4) and ``Linear8bit`` (LLM.int8()).

Design (docs/integration-notes.md §0): every tensor is a registered parameter or persistent buffer under its
real name, so ``state_dict()`` keys are attribute paths the Hugging Face loaders and accelerate can follow; float32
statistics are stored as int32 bit-views, so no dtype cast (``model.to(torch.bfloat16)``, a loader's
``torch_dtype``, ``pipe.to("cuda", torch.bfloat16)``) can touch them, while device moves work as usual. The
bitsandbytes key layout exists only at the file boundary (``halfbyte.io.bnb``). Layers are built explicitly
(``from_linear`` or the constructor for empty shells); ``forward`` is one ``halfbyte::`` op call and never mutates
state. Weights are frozen; inputs and bias get gradients, so adapters can train on top.
"""

import torch
from torch import Tensor, nn

from . import ops as _ops  # noqa: F401  (registers the halfbyte:: ops)
from .formats import blockwise, fourbit
from .formats.codebooks import dynamic_map


def _f32_bits(t: Tensor) -> Tensor:
    """float32 tensor -> int32 tensor with the same bits (the storage form of statistics)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


class _QuantizedLinear(nn.Module):
    _f32_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept float32 statistics (bitsandbytes' dtype) as well as the int32 bit-views that state_dict() gives.
        for name in self._f32_buffers:
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype == torch.float32:
                state_dict[prefix + name] = _f32_bits(t)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _refuse_cast(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} holds quantized data and cannot change dtype; cast the activations instead, "
            "or call halfbyte.dequantize_(model) first"
        )

    def to(self, *args, **kwargs):
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None:
            self._refuse_cast()
        return super().to(*args, **kwargs)

    half = float = double = bfloat16 = _refuse_cast

    def type(self, dst_type):
        self._refuse_cast()


class Linear4bit(_QuantizedLinear):
    """4-bit blockwise linear layer, bitsandbytes' ``Linear4bit`` format.

    Tensors (n = out_features * in_features, B = ceil(n / blocksize)):
        weight: packed codes, uint8, (out_features // 2, in_features) for even out_features else ((n + 1) // 2,);
            the bytes of bitsandbytes' ((n + 1) // 2, 1) tensor, frozen.
        absmax: (B,) float32 stored as int32 bits, or (B,) uint8 codes with double quantization.
        nested_absmax: (ceil(B / 256),) float32 as int32 bits (double quantization only).
        offset: (1,) float32 as int32 bits (double quantization only).
        bias: (out_features,) floating point, or None.
    Attributes: quant_type, blocksize, double_quant, dtype (of the quantized weight; dequantization target),
    compute_dtype (None = the input's dtype), quant_storage (dtype of the packed bytes in bitsandbytes files).
    """

    _f32_buffers = ("absmax", "nested_absmax", "offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        dtype: torch.dtype = torch.float32,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        fourbit.check_4bit_args(blocksize, quant_type)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.dtype, self.compute_dtype, self.quant_storage = dtype, compute_dtype, quant_storage
        n = in_features * out_features
        nb = fourbit.num_blocks(n, blocksize)
        packed_shape = (out_features // 2, in_features) if out_features % 2 == 0 else (fourbit.packed_numel(n),)
        self.weight = nn.Parameter(torch.empty(packed_shape, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("absmax", torch.empty(nb, dtype=torch.uint8 if double_quant else torch.int32,
                                                   device=device))
        nested = fourbit.num_blocks(nb, blockwise.NESTED_BLOCKSIZE)
        self.register_buffer("nested_absmax", torch.empty(nested, dtype=torch.int32, device=device)
                             if double_quant else None)
        self.register_buffer("offset", torch.empty(1, dtype=torch.int32, device=device) if double_quant else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> "Linear4bit":
        """Quantize ``linear`` (on ``device`` if given, else where its weight is). A meta weight gives a shell."""
        w = linear.weight.detach()
        device = torch.device(device) if device is not None else w.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type=quant_type,
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, dtype=w.dtype,
                    quant_storage=quant_storage, device=device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=linear.bias.requires_grad)
        if w.is_meta or device.type == "meta":
            return layer
        packed, absmax = torch.ops.halfbyte.quantize_4bit(w.to(device), blocksize, quant_type)
        layer.weight.data = packed.view(layer.weight.shape)
        if double_quant:
            offset = absmax.mean().reshape(1)
            q, nested = torch.ops.halfbyte.quantize_blockwise(absmax - offset, dynamic_map(device),
                                                             blockwise.NESTED_BLOCKSIZE)
            layer.absmax, layer.nested_absmax, layer.offset = q, _f32_bits(nested), _f32_bits(offset)
        else:
            layer.absmax = _f32_bits(absmax)
        return layer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def quant_stats(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(absmax, nested_absmax, nested_code, offset) as the ops take them (float32, or uint8 + nested)."""
        if not self.double_quant:
            return self.absmax.view(torch.float32), None, None, None
        return (self.absmax, self.nested_absmax.view(torch.float32), dynamic_map(self.absmax.device),
                self.offset.view(torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        cdt = self.compute_dtype or x.dtype
        absmax, nested_absmax, nested_code, offset = self.quant_stats()
        out = torch.ops.halfbyte.gemm_4bit(x.to(cdt), self.weight, absmax, nested_absmax, nested_code, offset,
                                           self.bias, list(self.shape), self.blocksize, self.quant_type)
        return out.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) weight in ``dtype`` (default: the dtype it was quantized from)."""
        absmax = _ops.decode_absmax(*self.quant_stats())
        return torch.ops.halfbyte.dequantize_4bit(self.weight, absmax, self.blocksize, self.quant_type,
                                                  list(self.shape), dtype or self.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"dtype={self.dtype}, compute_dtype={self.compute_dtype}")


class Linear8bit(_QuantizedLinear):
    """LLM.int8() linear layer, bitsandbytes' ``Linear8bitLt`` format (inference weights, ``has_fp16_weights=False``).

    Tensors: weight (out_features, in_features) int8 (``CB``), frozen; SCB (out_features,) float32 row absmax of
    the float16 weight, stored as int32 bits; bias (out_features,) or None. ``threshold``: activation outlier
    threshold (0 disables the decomposition). Output dtype = input dtype; the int8 result passes through float16.
    """

    _f32_buffers = ("SCB",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        threshold: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.dtype = float(threshold), dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, threshold: float = 0.0, device: torch.device | str | None = None
    ) -> "Linear8bit":
        """Quantize ``linear`` row-wise (weight cast to float16 first, as bitsandbytes). Meta weight -> shell."""
        w = linear.weight.detach()
        device = torch.device(device) if device is not None else w.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold=threshold,
                    dtype=w.dtype, device=device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=linear.bias.requires_grad)
        if w.is_meta or device.type == "meta":
            return layer
        CB, SCB, _ = torch.ops.halfbyte.int8_vectorwise_quant(w.to(device, torch.float16), 0.0)
        layer.weight.data = CB
        layer.SCB = _f32_bits(SCB)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.halfbyte.int8_mixed_mm(x, self.weight, self.SCB.view(torch.float32), self.bias,
                                                self.threshold)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) weight ``CB * SCB / 127`` in ``dtype`` (default: the original dtype)."""
        W = self.weight.to(torch.float32) * (self.SCB.view(torch.float32)[:, None] * 7.874015718698502e-3)
        return W.to(dtype or self.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}, dtype={self.dtype}")
