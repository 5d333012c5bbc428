"""Offline demo: build a tiny FLUX pipeline, quantize, save, reload, generate an image, print the memory table.

Nothing is downloaded. The pipeline is a diffusers FluxPipeline built from the real diffusers and transformers
classes (FluxTransformer2DModel, CLIPTextModel, T5EncoderModel, AutoencoderKL, CLIP and T5 tokenizers built
locally) at tiny widths with random weights, so the image is noise; what runs is the path of a real checkpoint:
  1. save the float32 pipeline, as a Hub checkpoint is stored;
  2. quantize it as 'halfbyte quantize' does: transformer and text_encoder_2 streamed into nf4, the rest copied;
  3. reload it with plain FluxPipeline.from_pretrained (halfbyte registered itself with diffusers);
  4. generate from the same seed with the float and the quantized pipeline, and compare the images;
  5. print the memory table: the tiny pipeline as measured, and FLUX.1-dev at full size, computed from its
     architecture built on the meta device (exact byte counts, no weights).
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

from ._common import (
    FAILED,
    USAGE,
    CliError,
    Source,
    add_config_args,
    check_config_flags,
    config_for,
    human_bytes,
    kind_of,
    notice,
    print_json,
    quiet_hf_libraries,
    read_json,
    table,
)


def add_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, per_component=False)
    p.add_argument("--size", type=int, default=128, help="image height and width, a multiple of 16 (default 128)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise (default 0)")
    p.add_argument("--out", metavar="DIR", help="keep the float pipeline, the quantized one and image.png here "
                                                "(default: a temporary directory, removed at the end)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    check_config_flags(args, {args.quant})
    if args.size <= 0 or args.size % 16 or args.steps < 1:
        raise CliError(f"--size {args.size} must be a positive multiple of 16 and --steps {args.steps} at least 1",
                       USAGE)
    if args.out is not None and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise CliError(f"--out {args.out} exists and is not empty", USAGE)
    quiet_hf_libraries(args, progress=False)  # a tiny pipeline: bars would only flicker
    if args.out is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return _demo(Path(args.out), args)
    with tempfile.TemporaryDirectory(prefix="halfbyte-demo-") as work:
        return _demo(Path(work), args)


def _demo(work: Path, args: argparse.Namespace) -> int:
    import torch
    from diffusers import FluxPipeline

    import halfbyte
    from halfbyte import testing

    from .quantize import quantize_pipeline

    times = {}
    t = time.perf_counter()
    src = testing.save_tiny_flux_pipeline(work / "flux-tiny", seed=args.seed)
    times["build_and_save"] = time.perf_counter() - t
    notice(args, f"1/4 saved a tiny float32 FluxPipeline to {src}")

    t = time.perf_counter()
    out = work / f"flux-tiny-{args.quant}"
    plan = {"transformer": args.quant, "text_encoder_2": args.quant}
    source = Source(str(src), src, read_json(src / "model_index.json"))
    rows, copied = quantize_pipeline(source, out, plan, None, torch.device("cpu"), _QuantizeArgs(args))
    times["quantize_and_save"] = time.perf_counter() - t
    notice(args, f"2/4 quantized {' and '.join(plan)} to {args.quant}, copied {', '.join(copied)}: {out}")

    t = time.perf_counter()
    quantized = FluxPipeline.from_pretrained(out, dtype=torch.float32)
    times["reload"] = time.perf_counter() - t
    layers = {name: sum(isinstance(m, (halfbyte.Linear4bit, halfbyte.Linear8bit))
                        for m in getattr(quantized, name).modules()) for name in plan}
    notice(args, f"3/4 reloaded with FluxPipeline.from_pretrained: {layers} quantized layers")

    t = time.perf_counter()
    reference = FluxPipeline.from_pretrained(src, dtype=torch.float32)
    images = {}
    for label, pipe in (("float32", reference), ("quantized", quantized)):
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            images[label] = pipe("a photo of a cat", height=args.size, width=args.size, guidance_scale=3.5,
                                 num_inference_steps=args.steps, max_sequence_length=32, output_type="pil",
                                 generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    times["generate_both"] = time.perf_counter() - t
    image_path = work / "image.png"
    images["quantized"].save(image_path)
    psnr = _psnr(images["float32"], images["quantized"])
    notice(args, f"4/4 generated {args.size}x{args.size} in {args.steps} steps: {image_path}")

    tiny = _tiny_table(reference, quantized, plan)
    full = flux_dev_table(config_for(args.quant, args))
    result = {"format": kind_of(config_for(args.quant, args)), "work_dir": str(work) if args.out else None,
              "quantized_layers": layers, "image": str(image_path) if args.out else None,
              "image_psnr_db_vs_float32": psnr, "seconds": {k: round(v, 3) for k, v in times.items()},
              "tiny_pipeline": tiny, "flux1_dev": full}
    problems = [f"{n} has no quantized layer after the reload" for n, k in layers.items() if k == 0]
    problems += [f"{r['component']}: quantized {r['quantized_bytes']} B is not smaller than float32 "
                 f"{r['float32_bytes']} B" for r in tiny if r["format"] != "float32"
                 and r["quantized_bytes"] >= r["float32_bytes"]]
    if args.json:
        print_json(result | {"problems": problems})
    else:
        _print(result, args)
    if problems:
        raise CliError("; ".join(problems), FAILED)
    return 0


class _QuantizeArgs:
    """The attributes of ``halfbyte quantize``'s arguments that ``quantize_pipeline`` reads."""

    def __init__(self, args: argparse.Namespace):
        self.quiet, self.bitsandbytes_compatible, self.max_shard_size, self.durable = True, False, "5GB", False
        self.double_quant, self.compute_dtype, self.blocksize = args.double_quant, args.compute_dtype, args.blocksize
        self.threshold, self.skip = args.threshold, args.skip


def _psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (inf when identical)."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else round(10 * math.log10(255.0**2 / mse), 2)


def _tiny_table(reference, quantized, plan: dict) -> list[dict]:
    from halfbyte import memory_footprint

    rows = []
    for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        ref, q = getattr(reference, name), getattr(quantized, name)
        rows.append({"component": name, "class": type(q).__name__, "format": plan.get(name) or "float32",
                     "parameters": sum(p.numel() for p in ref.parameters()),
                     "float32_bytes": memory_footprint(ref), "quantized_bytes": memory_footprint(q)})
    return rows


def flux_dev_table(config) -> list[dict]:
    """FLUX.1-dev's components at full size, built on the meta device (no memory, no weights): their bf16 bytes
    and their bytes with the transformer and T5 encoder quantized by ``config`` (the others in bf16)."""
    import diffusers
    import torch
    import transformers

    from halfbyte import memory_footprint, quantize_

    t5 = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    clip = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77)
    builders = {  # FLUX.1-dev's configs (transformer: diffusers' defaults are FLUX.1's, plus guidance)
        "transformer": (lambda: diffusers.FluxTransformer2DModel(guidance_embeds=True), True),
        "text_encoder_2": (lambda: transformers.T5EncoderModel(t5), True),
        "text_encoder": (lambda: transformers.CLIPTextModel(clip), False),
        "vae": (lambda: diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=16, use_quant_conv=False, use_post_quant_conv=False), False),
    }
    rows = []
    for name, (build, quantize) in builders.items():
        with torch.device("meta"):
            model = torch.nn.Module.to(build(), torch.bfloat16)
        bf16 = memory_footprint(model)
        params = sum(p.numel() for p in model.parameters())
        if quantize:
            quantize_(model, config)  # shells of the exact quantized shapes, still on meta
        rows.append({"component": name, "class": type(model).__name__, "format": kind_of(config) if quantize
                     else "bfloat16", "parameters": params, "bf16_bytes": bf16,
                     "quantized_bytes": memory_footprint(model)})
    return rows


def _print(result: dict, args: argparse.Namespace) -> None:
    fmt = result["format"]
    print(f"tiny FLUX.1-architecture pipeline (random weights), {fmt} transformer and T5 encoder, measured:")
    rows = [[r["component"], r["class"], r["format"], f"{r['parameters']:,}", human_bytes(r["float32_bytes"]),
             human_bytes(r["quantized_bytes"]), f"{r['float32_bytes'] / r['quantized_bytes']:.2f}x"]
            for r in result["tiny_pipeline"]]
    print(table(rows, ["component", "class", "format", "params", "float32", "halfbyte", "smaller"],
                right={3, 4, 5, 6}))
    print(f"\nFLUX.1-dev at full size (architecture on the meta device, exact bytes), {fmt}:")
    full = result["flux1_dev"]
    rows = [[r["component"], r["class"], r["format"], f"{r['parameters'] / 1e9:.2f} B",
             f"{r['bf16_bytes'] / 1e9:.2f} GB", f"{r['quantized_bytes'] / 1e9:.2f} GB"] for r in full]
    bf16, q = sum(r["bf16_bytes"] for r in full), sum(r["quantized_bytes"] for r in full)
    rows.append(["total", "", "", f"{sum(r['parameters'] for r in full) / 1e9:.2f} B", f"{bf16 / 1e9:.2f} GB",
                 f"{q / 1e9:.2f} GB"])
    print(table(rows, ["component", "class", "format", "params", "bf16", "halfbyte"], right={3, 4, 5}))
    print("(T5 keeps its embedding and its `wo` layers, transformers' _keep_in_fp32_modules, unquantized)")
    s = result["seconds"]
    print(f"\nquantized pipeline vs float32, same seed: image PSNR {result['image_psnr_db_vs_float32']} dB")
    print(f"quantize + save {s['quantize_and_save']:.1f} s, reload {s['reload']:.1f} s, "
          f"generate (both pipelines) {s['generate_both']:.1f} s")
    if result["image"]:
        print(f"image: {result['image']}; checkpoints in {result['work_dir']}")
    else:
        print("(pass --out DIR to keep the checkpoints and the image)")
