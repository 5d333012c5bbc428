"""Models, LoRA builders and comparisons shared by tests/test_lora.py and tests/test_lora_training.py."""

import copy
import math

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

import halfbyte
from halfbyte import BitsAndBytesConfig, Linear4bit, Linear8bit
from halfbyte.formats.codebooks import code_4bit
from halfbyte.ops import decode_absmax

FORMATS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "int8": dict(load_in_8bit=True)}
QUANTIZED = (Linear4bit, Linear8bit)
ATTN = [f"transformer_blocks.0.attn.{p}" for p in
        ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
ATTN += [f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
TARGETS = ATTN + ["single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2"]
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def load_transformer(flux_dir: str, fmt: str | None) -> FluxTransformer2DModel:
    cfg = None if fmt is None else BitsAndBytesConfig(**FORMATS[fmt])
    return FluxTransformer2DModel.from_pretrained(flux_dir + "/transformer", quantization_config=cfg,
                                                  torch_dtype=torch.float32)


def dense_copy(model: nn.Module) -> nn.Module:
    """The model with every halfbyte layer replaced by an nn.Linear holding its dequantized weight."""
    dense = halfbyte.dequantize_(copy.deepcopy(model))
    if hasattr(dense, "hf_quantizer"):  # what diffusers' own dequantize() also drops: a plain model now
        del dense.hf_quantizer
        dense.is_quantized = False
    return dense


def flux_inputs(channels: int = 16, batch: int = 1, tokens: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, tokens, channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(8, 3), guidance=torch.full((batch,), 3.5))


def run(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**flux_inputs(**kw)).sample


def flux_lora(model, names, rank=4, seed=0, in_features=None) -> dict[str, torch.Tensor]:
    """A random LoRA in diffusers' FLUX format whose deltas are about the size of the tiny weights."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        m = model.get_submodule(name)
        fan_in = (in_features or {}).get(name, m.in_features)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
    return sd


def quantized_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the halfbyte layers, cloned, by full name."""
    return {f"{n}.{t}": v.clone() for n, m in model.named_modules() if isinstance(m, QUANTIZED)
            for t, v in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def requantization_bound(layer, weight: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |dequantize(layer) - weight| when ``layer`` holds ``weight`` quantized, (out, in)."""
    if isinstance(layer, Linear8bit):  # half a step of the row's scale, plus the float16 cast it quantizes from
        bound = weight.abs().amax(1, keepdim=True) / 254 + weight.abs() * 2 ** -11
    else:  # codes are chosen against the block's absmax a: half the widest gap between neighbouring codes times
        # a, plus |code| <= 1 times the error of the stored absmax a' (double quantization; else a' = a)
        half_gap = code_4bit(layer.quant_type).sort().values.diff().max() / 2
        a = weight.reshape(-1, layer.blocksize).abs().amax(1, keepdim=True)
        a_stored = decode_absmax(*layer.quant_stats()).reshape(-1, 1)
        bound = (half_gap * a + (a - a_stored).abs()).expand(-1, layer.blocksize).reshape(weight.shape)
    return bound * (1 + 2 ** -20)  # float32 rounding of the products


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()
