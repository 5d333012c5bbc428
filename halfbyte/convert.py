"""Model conversion: swap ``nn.Linear`` layers for quantized ones in place, swap them back, count bytes."""

import torch
from torch import nn

from . import transfer
from .config import BitsAndBytesConfig
from .nn import Linear4bit, Linear8bit, release_scratch
from .sharing import share_int8_inputs

QUANTIZED_LINEARS = (Linear4bit, Linear8bit)


def default_skip_modules(model: nn.Module, config: BitsAndBytesConfig) -> list[str]:
    """``llm_int8_skip_modules`` plus the model's ``_keep_in_fp32_modules``, as diffusers' quantizer collects them."""
    skip = list(config.llm_int8_skip_modules or [])
    skip += [m for m in (getattr(model, "_keep_in_fp32_modules", None) or []) if m not in skip]
    return skip


def is_skipped(name: str, path: str, skip: list[str]) -> bool:
    """diffusers' rule: skip if the child's own ``name`` is listed, or a key ``k`` has ``k + "."`` inside the
    dotted ``path`` or equals it."""
    return name in skip or any((k + ".") in path or k == path for k in skip)


def _make_quantized(linear: nn.Linear, config: BitsAndBytesConfig, device) -> nn.Module:
    if config.load_in_4bit:
        return Linear4bit.from_linear(
            linear, quant_type=config.bnb_4bit_quant_type, blocksize=config.bnb_4bit_blocksize,
            double_quant=config.bnb_4bit_use_double_quant, compute_dtype=config.bnb_4bit_compute_dtype,
            quant_storage=config.bnb_4bit_quant_storage, device=device,
        )
    return Linear8bit.from_linear(linear, threshold=config.llm_int8_threshold, device=device)


def quantized_tensor_bytes(linear: nn.Linear, config: BitsAndBytesConfig) -> list[int]:
    """Bytes of each tensor the quantized form of ``linear`` holds (the shell of its exact shapes, on meta)."""
    K, N, bias = linear.in_features, linear.out_features, linear.bias is not None
    if config.load_in_4bit:
        shell = Linear4bit(K, N, bias, quant_type=config.bnb_4bit_quant_type, blocksize=config.bnb_4bit_blocksize,
                           double_quant=config.bnb_4bit_use_double_quant, device="meta")
    else:
        shell = Linear8bit(K, N, bias, threshold=config.llm_int8_threshold, device="meta")
    return [t.numel() * t.element_size() for t in (*shell.parameters(), *shell.buffers())]


def quantize_(
    model: nn.Module,
    config: BitsAndBytesConfig,
    device: torch.device | str | None = None,
    *,
    modules_to_not_convert: list[str] | None = None,
) -> nn.Module:
    """Replace every eligible ``nn.Linear`` (subclasses included) of ``model`` in place; returns ``model``.

    Skips follow diffusers (``is_skipped``) over ``modules_to_not_convert`` (default: the config's skip list plus
    the model's ``_keep_in_fp32_modules``; the Hugging Face quantizers pass the list their library computes).
    Each weight is quantized where it lives,
    or on ``device`` if given (the quantized layer stays there). Linears on the meta device become empty shells
    of the exact quantized shapes, for a later load to fill (``halfbyte.load_bitsandbytes_state_dict``).
    """
    if not isinstance(config, BitsAndBytesConfig):
        raise TypeError(f"config must be a halfbyte.BitsAndBytesConfig, got {type(config).__name__}")
    if not (config.load_in_4bit or config.load_in_8bit):
        raise ValueError("config quantizes nothing: set load_in_4bit=True or load_in_8bit=True")
    if config.load_in_8bit and config.llm_int8_has_fp16_weight:
        raise NotImplementedError(
            "llm_int8_has_fp16_weight=True (bitsandbytes' 8-bit training of the base weights) is not supported; "
            "halfbyte's 8-bit layers hold int8 weights: train adapters on top of them instead"
        )
    if isinstance(model, nn.Linear) and not isinstance(model, QUANTIZED_LINEARS):
        raise TypeError("quantize_ converts the Linear layers inside a model; use Linear4bit/Linear8bit.from_linear "
                        "for a single layer")
    skip = default_skip_modules(model, config) if modules_to_not_convert is None else list(modules_to_not_convert)

    targets: list[tuple[nn.Module, str, nn.Linear]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.Linear) and not is_skipped(name, path, skip):
                targets.append((parent, name, child))
            elif not isinstance(child, QUANTIZED_LINEARS):
                visit(child, path + ".")

    visit(model, "")
    # The quantized tensors are long-lived: carve them from one reserved free segment per CUDA device instead of
    # letting each large one round up (transfer.reserve_device_memory; ~60 MB on a FLUX transformer).
    sizes: dict[torch.device, list[int]] = {}
    for _, _, child in targets:
        where = torch.device(device) if device is not None else child.weight.device
        if where.type == "cuda":
            sizes.setdefault(where, []).extend(quantized_tensor_bytes(child, config))
    for where, nbytes in sizes.items():
        transfer.reserve_device_memory(where, nbytes)
    try:
        for parent, name, child in targets:
            setattr(parent, name, _make_quantized(child, config, device))
    finally:
        # visit() is a recursive closure, hence a reference cycle that holds ``targets``: emptied here, or the
        # replaced float layers would live until the next garbage collection
        targets.clear()
        release_scratch()
    if config.load_in_8bit:
        share_int8_inputs(model)  # a block's q/k/v (and other groups) quantize their common input once
    model._halfbyte_config = config  # read back by quantization_config_of (saving, inspection)
    return model


def quantization_config_of(model: nn.Module) -> BitsAndBytesConfig | None:
    """The halfbyte config a model was quantized with, or None if it holds no halfbyte layer.

    Looks at what ``quantize_`` recorded, then at a Hugging Face loader's quantizer and ``model.config``; a
    bitsandbytes config there (a model loaded from a bitsandbytes checkpoint) is translated field by field.
    """
    if not any(isinstance(m, QUANTIZED_LINEARS) for m in model.modules()):
        return None
    candidates = [getattr(model, "_halfbyte_config", None),
                  getattr(getattr(model, "hf_quantizer", None), "quantization_config", None),
                  getattr(getattr(model, "config", None), "quantization_config", None)]
    if isinstance(getattr(model, "config", None), dict):
        candidates.append(model.config.get("quantization_config"))
    for cfg in candidates:
        if cfg is not None:
            try:
                return BitsAndBytesConfig.coerce(cfg)
            except ValueError:
                continue
    raise ValueError(f"{type(model).__name__} holds halfbyte layers but no quantization config was recorded: "
                     "quantize it with halfbyte.quantize_ or load it through a halfbyte loader")


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every halfbyte quantized layer of ``model`` in place by an ``nn.Linear`` in its original dtype."""

    def to_linear(q: Linear4bit | Linear8bit) -> nn.Linear:
        device = q.weight.device
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta", dtype=q.dtype)
        weight = torch.empty(q.out_features, q.in_features, dtype=q.dtype, device="meta") if device.type == "meta" \
            else q.dequantize(q.dtype)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if q.bias is not None:
            lin.bias = q.bias
        return lin

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, QUANTIZED_LINEARS):
                setattr(parent, name, to_linear(child))
            else:
                visit(child)

    if isinstance(model, QUANTIZED_LINEARS):
        raise TypeError("dequantize_ converts the layers inside a model; call .dequantize() on a single layer")
    visit(model)
    if hasattr(model, "_halfbyte_config"):
        del model._halfbyte_config
    return model


def memory_footprint(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, quantization statistics included (shared tensors once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def set_fp8_compute(model: nn.Module, enabled: bool = True) -> list[str]:
    """Opt in (or back out of) fp8 compute for the model's 4-bit layers; returns the names of the layers switched.

    With it on, a 4-bit layer called on more than ``ops.FUSED_MAX_TOKENS`` tokens decodes its weight straight to
    float8 e4m3 (one scale per output row), quantizes its input to e4m3 (one scale per token) and multiplies on
    the fp8 tensor cores with float32 accumulation (``halfbyte.formats.fp8``): on an H100 the matmul takes about
    two thirds of bf16's time, so a FLUX-sized NF4 step runs faster than bf16's. e4m3 keeps 3 mantissa bits, so the
    outputs are less precise than bitsandbytes' (which this mode stops reproducing); calls over fewer tokens keep
    the exact path. Inference only (a call that records gradients raises). The setting is not saved.

    Layers whose shape fp8 matmuls cannot take (in_features a multiple of the blocksize and of 16, out_features a
    multiple of 16, neither 0) are left as they are, with a warning naming them. Raises ValueError if a 4-bit
    layer's weight sits on a CUDA device without fp8 tensor cores (compute capability below 8.9).
    """
    import warnings

    switched, left = [], []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        if not enabled:
            if module.fp8_compute:
                module.fp8_compute = False
                switched.append(name)
            continue
        dev = module.weight.device
        if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
            raise ValueError(f"fp8 compute needs fp8 tensor cores (compute capability 8.9+); {name or 'the model'}'s "
                             f"weight is on {dev} ({torch.cuda.get_device_name(dev)}, capability "
                             f"{torch.cuda.get_device_capability(dev)})")
        N, K = module.out_features, module.in_features
        if K % module.blocksize or K % 16 or N % 16 or not N or not K:
            left.append(f"{name} ({N}x{K}, blocksize {module.blocksize})")
            continue
        if not module.fp8_compute:
            module.fp8_compute = True
            switched.append(name)
    if left:
        warnings.warn("set_fp8_compute: these 4-bit layers keep their exact path (fp8 matmuls need in_features a "
                      "multiple of the blocksize and of 16, out_features a multiple of 16, neither 0): "
                      + ", ".join(left), stacklevel=2)
    return switched
