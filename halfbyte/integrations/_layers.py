"""What both Hugging Face quantizers do to halfbyte layers: placeholders before loading, filling while loading.

The loaders walk the meta model's ``state_dict()`` and check shapes against it (docs/integration-notes.md §0.8),
so before loading each quantized layer holds a *placeholder* ``weight``: meta, floating point, the logical
``(out_features, in_features)`` shape. Its statistics are meta buffers of their exact shapes. While loading, a
layer is filled either from a floating-point weight (quantized on the weight's device) or from the bitsandbytes
tensors of a pre-quantized checkpoint; the real packed weight and statistics replace the placeholders.
"""

import types
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..config import BitsAndBytesConfig
from ..convert import QUANTIZED_LINEARS, quantize_
from ..io import bnb as bnb_io
from ..nn import Linear4bit, Linear8bit

# Tensor names of halfbyte layers that checkpoints never hold under the same name (bitsandbytes files spell them
# weight.absmax, ...); the loaders must not report them missing. SCB is both a checkpoint key and a buffer name.
STAT_NAMES = ("absmax", "nested_absmax", "offset")
BNB_4BIT_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                     "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
BNB_8BIT_SUFFIXES = ("SCB", "weight_format")


def replace_with_placeholders(model: nn.Module, config: BitsAndBytesConfig, skip: list[str]) -> list[str]:
    """Swap the eligible ``nn.Linear`` of a meta ``model`` for halfbyte layers with placeholder weights.

    Returns the dotted names of the swapped layers. Placeholder weight: meta, dtype of the replaced Linear,
    shape (out_features, in_features), frozen.
    """
    dtypes = {n: m.weight.dtype for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_(model, config, device="meta", modules_to_not_convert=skip)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LINEARS) and module.weight.is_meta:
            module.weight = nn.Parameter(
                torch.empty(module.out_features, module.in_features, dtype=dtypes.get(name, torch.float32),
                            device="meta"),
                requires_grad=False,
            )
            names.append(name)
    return names


def is_halfbyte_layer(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZED_LINEARS)


def is_filled(module: nn.Module) -> bool:
    return not module.weight.is_meta


def quantized_tensors(module: nn.Module, weight: Tensor,
                      device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Quantize a floating-point ``weight`` (out, in) for ``module`` on ``device`` (default: where the weight is);
    sets ``module.dtype``. A weight elsewhere (a loader's CPU tensor) moves in row pieces, never whole.

    Returns the layer's quantized tensors by attribute name (weight, absmax, ... / weight, SCB), no bias.
    """
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight to quantize, got {weight.dtype}")
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a layer of shape "
                         f"({module.out_features}, {module.in_features})")
    lin = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if isinstance(module, Linear4bit):
        new = Linear4bit.from_linear(lin, quant_type=module.quant_type, blocksize=module.blocksize,
                                     double_quant=module.double_quant, compute_dtype=module.compute_dtype,
                                     quant_storage=module.quant_storage, device=device)
    else:
        new = Linear8bit.from_linear(lin, threshold=module.threshold, device=device)
    module.dtype = weight.dtype
    return {n: t for n, t in list(new.named_parameters()) + list(new.named_buffers()) if n != "bias"}


def deserialized_tensors(module: nn.Module, tensors: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """The layer tensors for ``module`` from its bitsandbytes tensors keyed without prefix (``weight``,
    ``weight.absmax``, ... / ``weight``, ``SCB``, ``weight_format``); the checkpoint decides the 4-bit format
    (quant type, block size, double quantization, dtype), which is set on ``module``. ``where`` names the layer
    in errors. Raises ValueError on anything that does not fit.
    """
    if isinstance(module, Linear4bit) and tensors.get("weight") is not None and tensors["weight"].dtype == torch.int8:
        raise ValueError(f"{where}: the checkpoint holds an 8-bit layer but the model expects a 4-bit one")
    if isinstance(module, Linear8bit) and any(k.startswith("weight.quant_state") for k in tensors):
        raise ValueError(f"{where}: the checkpoint holds a 4-bit layer but the model expects an 8-bit one")
    try:
        layer, native = bnb_io.import_layer("", module, tensors)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: {e.args[0]}") from None
    if isinstance(module, Linear4bit):
        for attr in ("quant_type", "blocksize", "double_quant", "dtype", "quant_storage"):
            setattr(module, attr, getattr(layer, attr))
    native.pop("bias", None)
    return native


def check_all_filled(model: nn.Module) -> None:
    """Raise if a halfbyte layer still holds a placeholder after loading (a loader that logs conversion errors
    instead of raising, as transformers does, would otherwise leave it filled with uninitialised memory).

    Judged by the weight's dtype, which survives accelerate's offload hooks putting loaded weights on meta: a
    placeholder is floating point, a loaded weight uint8 (4-bit) or int8 (8-bit).
    """
    bad = [n for n, m in model.named_modules()
           if is_halfbyte_layer(m) and m.weight.dtype not in (torch.uint8, torch.int8)]
    if bad:
        raise ValueError(f"{len(bad)} quantized layers were not loaded from the checkpoint (see the loading report "
                         f"above for the cause): {bad[:5]}")


def assign(module: nn.Module, tensors: Mapping[str, Tensor], device: torch.device | str | None = None) -> None:
    """Put ``tensors`` (from ``quantized_tensors`` / ``deserialized_tensors``) into ``module``, replacing the
    placeholders: ``weight`` as a frozen Parameter, statistics as persistent buffers. Then the layer caches what its
    forward reads on that device (``_cache_tables``: code tables, the compiled route), as ``load_state_dict`` and
    moves do: these writes bypass both."""
    for name, t in tensors.items():
        t = t.to(device) if device is not None else t
        if name == "weight":
            module._parameters["weight"] = nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[name] = t
    module._is_hf_initialized = True
    cache = getattr(module, "_cache_tables", None)
    if cache is not None:
        cache()


def layer_of(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    """(module, tensor name) for a dotted parameter name."""
    prefix, _, name = param_name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), name


def _guarded_to(self, *args, **kwargs):
    if torch._C._nn._parse_to(*args, **kwargs)[1] is not None:
        raise ValueError(
            f"{type(self).__name__} is quantized by halfbyte: casting it to another dtype is not supported (the "
            "quantized layers keep their format). Choose the dtype of the other layers with torch_dtype= in "
            "from_pretrained, or call model.dequantize() first"
        )
    return type(self).to(self, *args, **kwargs)


def refuse_dtype_casts(model: nn.Module) -> None:
    """Make ``model.to(dtype)`` raise, as the libraries do for bitsandbytes models (device moves still work).

    A bound method in the instance dict, so ``copy.deepcopy`` rebinds it to the copy.
    """
    model.to = types.MethodType(_guarded_to, model)
