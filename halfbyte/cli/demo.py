"""Offline demo: quantize a randomly initialised FLUX-architecture transformer and report memory and fidelity.

The model has FLUX.1's real widths (3072 hidden, 24 heads of 128, 4096-wide T5 context) with fewer blocks, so it
runs on a laptop CPU; the per-parameter cost is then projected to the full 19 + 38 block, 11.9 B model.
"""

import argparse
import time

import torch


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=["nf4", "fp4", "int8"], default="nf4", help="format (default nf4)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics too")
    p.add_argument("--layers", type=int, default=1, help="double-stream blocks (FLUX.1 has 19)")
    p.add_argument("--single-layers", type=int, default=1, help="single-stream blocks (FLUX.1 has 38)")
    p.add_argument("--tokens", type=int, default=256, help="image tokens in the test forward pass")
    p.add_argument("--seed", type=int, default=0)


def _flux(layers: int, single_layers: int):
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as e:  # the demo needs the [hf] extra
        raise SystemExit(f"halfbyte demo needs diffusers: pip install 'halfbyte[hf]' ({e})") from None
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56],
    )


def _inputs(tokens: int, gen: torch.Generator) -> dict:
    txt = 32
    bf16 = torch.bfloat16
    return dict(
        hidden_states=torch.randn(1, tokens, 64, generator=gen).to(bf16),
        encoder_hidden_states=torch.randn(1, txt, 4096, generator=gen).to(bf16),
        pooled_projections=torch.randn(1, 768, generator=gen).to(bf16),
        timestep=torch.tensor([0.5], dtype=bf16),
        guidance=torch.tensor([3.5], dtype=bf16),
        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(txt, 3), return_dict=False,
    )


def run(args: argparse.Namespace) -> int:
    import halfbyte

    torch.manual_seed(args.seed)
    model = _flux(args.layers, args.single_layers).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    before = halfbyte.memory_footprint(model)
    inputs = _inputs(args.tokens, torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        ref = model(**inputs)[0].float()
    if args.quant == "int8":
        cfg = halfbyte.BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = halfbyte.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                                          bnb_4bit_use_double_quant=args.double_quant)
    t0 = time.perf_counter()
    halfbyte.quantize_(model, cfg)
    secs = time.perf_counter() - t0
    after = halfbyte.memory_footprint(model)
    with torch.no_grad():
        out = model(**inputs)[0].float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    n_q = sum(isinstance(m, (halfbyte.Linear4bit, halfbyte.Linear8bit)) for m in model.modules())

    # Project to FLUX.1 size: bytes per parameter measured here, applied to 11.9 B parameters.
    full_params = 11.9e9
    label = args.quant + ("+dq" if args.double_quant else "")
    print(f"FLUX-architecture transformer, {args.layers}+{args.single_layers} blocks, {n_params / 1e6:.0f} M params")
    print(f"  quantized {n_q} Linear layers to {label} in {secs:.1f} s on CPU")
    print(f"  memory: bf16 {before / 2**30:.2f} GiB -> {label} {after / 2**30:.2f} GiB "
          f"({before / after:.2f}x smaller)")
    print(f"  projected to FLUX.1 (11.9 B params): bf16 {full_params * before / n_params / 1e9:.1f} GB -> "
          f"{full_params * after / n_params / 1e9:.1f} GB")
    print(f"  output vs bf16 on {args.tokens} image tokens: cosine similarity {cos:.4f}")
    return 0 if cos > 0.9 and after < before else 1
