"""LoRA on a FLUX-sized NF4 transformer: halfbyte vs bitsandbytes (+ peft), with bf16 as the reference, one GPU.

    python bench/lora.py --out results.json [--libs bf16 halfbyte bnb] [--parts eager compiled train]
    python bench/lora.py --tiny --out smoke.json      # tiny FLUX on the CPU: a smoke test of this script

Model: ``FluxTransformer2DModel(guidance_embeds=True)`` with its default (FLUX.1-dev) config, built on the meta
device and materialised layer by layer on the GPU: each ``nn.Linear`` gets bf16 weights drawn from N(0, 1/fan_in)
(seeded per layer, so every library sees the same weights) and is quantized right away, so a library's model never
coexists with a bf16 copy; libraries run one after another, freeing the GPU in between. Norm weights are 1.
  bf16      plain ``nn.Linear`` (24 GB)
  halfbyte  ``halfbyte.Linear4bit`` NF4, block 64, no double quantization, computing in the activations' bf16
  bnb       ``bitsandbytes.nn.Linear4bit`` NF4, block 64, no double quantization, compute dtype bf16 (what
            diffusers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16)`` builds); the model is marked ``is_loaded_in_4bit`` as
            diffusers' quantizer marks it, so peft wraps the layers in its bitsandbytes LoRA class
LoRA: one rank-16 adapter (alpha 16) on the attention projections (``to_q, to_k, to_v, to_out.0, add_q_proj,
add_k_proj, add_v_proj, to_add_out``), added with diffusers' ``add_adapter``; adapters in bf16 for inference.

Parts (eager and compiled report the step without and with the LoRA, and the LoRA's overhead):
  eager     one transformer forward at 1024x1024 (4096 image tokens, 512 text tokens), batch 1, inference mode
  compiled  the same under ``torch.compile`` (default mode; graph breaks counted), compile time reported
  train     a QLoRA step at 512x512 (1024 image tokens, 512 text tokens): forward, MSE loss, backward, AdamW on
            the adapters (float32 trainable parameters, as diffusers' training scripts cast them); peak memory
Times are medians of ``--iters`` (default 5) after ``--warmup`` (2) calls, synchronised; peak memory is
``torch.cuda.max_memory_allocated`` over the timed calls. Compare ratios within one run only. A full run compiles
the transformer six times (about 100 s each on an H100); split it with ``--libs`` / ``--parts`` into several runs
on the same machine writing to the same ``--out`` file, which merges them.
"""

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LIBS = ("bf16", "halfbyte", "bnb")
PARTS = ("eager", "compiled", "train")


def tiny_config() -> dict:
    """A 2-block FLUX whose layer widths are multiples of 64: bitsandbytes' CPU kernels mis-handle rows shorter
    than a 4-bit block."""
    from halfbyte.testing import tiny_flux_transformer_config

    return tiny_flux_transformer_config(attention_head_dim=32, in_channels=64, joint_attention_dim=64,
                                        pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))


def build(lib: str, config: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The FLUX transformer of ``config`` on ``device`` with ``lib``'s linear layers (module docstring)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    for module in model.modules():  # everything but the linears: RMSNorm weights (FLUX has no other tensors)
        if type(module) is not nn.Linear:
            module.to_empty(device=device, recurse=False)
            for p in module.parameters(recurse=False):
                nn.init.ones_(p)
    for i, (parent, name, lin) in enumerate(linears):
        gen = torch.Generator(device).manual_seed(i)
        w = torch.randn(lin.out_features, lin.in_features, generator=gen, device=device) / lin.in_features ** 0.5
        dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if dense.bias is not None:
                dense.bias.normal_(0, 0.02, generator=gen)
        del w
        setattr(parent, name, quantized(lib, dense, dtype))
    if lib == "halfbyte":
        halfbyte.nn.release_scratch()  # layers quantized one by one: the scratch pool goes back
    if lib == "bnb":
        model.is_loaded_in_4bit = True  # as diffusers' bitsandbytes quantizer marks it (peft's dispatch reads it)
    return model.eval().requires_grad_(False)


def quantized(lib: str, dense: nn.Linear, dtype: torch.dtype) -> nn.Module:
    if lib == "bf16":
        return dense
    if lib == "halfbyte":
        return halfbyte.Linear4bit.from_linear(dense, quant_type="nf4")
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, dense.bias is not None, compute_dtype=dtype,
                          compress_statistics=False, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, compress_statistics=False,
                                 quant_type="nf4").to(dense.weight.device)
    q.bias = dense.bias
    return q


def inputs(config: dict, image_tokens: int, text_tokens: int, device, dtype) -> dict:
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    return dict(hidden_states=randn(1, image_tokens, config["in_channels"]),
                encoder_hidden_states=randn(1, text_tokens, config["joint_attention_dim"]),
                pooled_projections=randn(1, config["pooled_projection_dim"]),
                timestep=torch.tensor([0.5], device=device, dtype=dtype),
                img_ids=torch.zeros(image_tokens, 3, device=device),
                txt_ids=torch.zeros(text_tokens, 3, device=device),
                guidance=torch.tensor([3.5], device=device, dtype=dtype))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> dict:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup``; peak memory of the timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(ms=round(statistics.median(times), 2), peak_gb=None if peak is None else round(peak, 2))


def add_lora(model: nn.Module, trainable_dtype: torch.dtype | None = None) -> None:
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian"))
    for n, p in model.named_parameters():
        if "lora_" in n and trainable_dtype is not None:
            p.data = p.data.to(trainable_dtype)


def with_and_without_lora(model, run) -> dict:
    """Time ``run(model)`` before and after adding the LoRA."""
    base = run(model)
    add_lora(model)
    lora = run(model)
    out = dict(base_ms=base["ms"], lora_ms=lora["ms"], overhead_ms=round(lora["ms"] - base["ms"], 2),
               overhead_pct=round(100 * (lora["ms"] / base["ms"] - 1), 1), base_peak_gb=base["peak_gb"],
               lora_peak_gb=lora["peak_gb"])
    for key in ("compile_s", "graph_breaks"):
        if key in lora:
            out[f"base_{key}"], out[f"lora_{key}"] = base[key], lora[key]
    return out


def part_eager(model, config, device, dtype, args) -> dict:
    x = inputs(config, args.image_tokens, args.text_tokens, device, dtype)

    def run(m):
        with torch.inference_mode():
            return timed(lambda: m(**x), device, args.warmup, args.iters)

    return with_and_without_lora(model, run)


def part_compiled(model, config, device, dtype, args) -> dict:
    from torch._dynamo.utils import counters

    x = inputs(config, args.image_tokens, args.text_tokens, device, dtype)

    def run(m):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(m, backend=args.compile_backend)
        with torch.inference_mode():
            t = time.perf_counter()
            compiled(**x)
            sync(device)
            compile_s = time.perf_counter() - t
            result = timed(lambda: compiled(**x), device, args.warmup, args.iters)
        return {**result, "compile_s": round(compile_s, 1),
                "graph_breaks": sum(counters["graph_break"].values())}

    return with_and_without_lora(model, run)


def part_train(model, config, device, dtype, args) -> dict:
    x = inputs(config, args.train_image_tokens, args.text_tokens, device, dtype)
    target = torch.randn_like(x["hidden_states"])
    add_lora(model, trainable_dtype=torch.float32)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = nn.functional.mse_loss(model(**x).sample.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = timed(step, device, args.warmup, args.iters)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(averages.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    model.eval()
    return dict(step_ms=result["ms"], peak_gb=result["peak_gb"],
                trainable_params=sum(p.numel() for p in params), checkpointing=args.checkpointing)


def free(device) -> None:
    torch._dynamo.reset()  # compiled graphs' guards hold on to the last model's tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(lib, part, config, device, dtype, args) -> dict:
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    model = build(lib, config, device, dtype)
    sync(device)
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                build_s=round(time.perf_counter() - t, 1),
                weights_gb=round(sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**30, 2))
    try:
        return {**info, **{"eager": part_eager, "compiled": part_compiled, "train": part_train}[part](
            model, config, device, dtype, args)}
    finally:
        del model
        free(device)


def table(results: dict) -> str:
    rows = ["| lib | part | without LoRA ms | with LoRA ms | LoRA overhead | peak GB (with LoRA) | notes |",
            "|---|---|---|---|---|---|---|"]
    for lib, parts in results.items():
        for part, r in parts.items():
            if "error" in r:
                rows.append(f"| {lib} | {part} | error: {r['error'][:100]} |||||")
            elif part == "train":
                rows.append(f"| {lib} | train | | {r['step_ms']} | | {r['peak_gb']} | "
                            f"{r['trainable_params']} trainable, checkpointing={r['checkpointing']} |")
            else:
                notes = (f"compile {r['base_compile_s']} / {r['lora_compile_s']} s, graph breaks "
                         f"{r['base_graph_breaks']} / {r['lora_graph_breaks']}") if part == "compiled" else ""
                rows.append(f"| {lib} | {part} | {r['base_ms']} | {r['lora_ms']} | {r['overhead_ms']} ms "
                            f"({r['overhead_pct']}%) | {r['lora_peak_gb']} | {notes} |")
    for part in ("eager", "compiled"):
        hb, bb = results.get("halfbyte", {}).get(part), results.get("bnb", {}).get(part)
        if hb and bb and "error" not in hb and "error" not in bb:
            verdict = "no larger" if hb["overhead_ms"] <= bb["overhead_ms"] else "LARGER"
            rows.append(f"\n{part}: halfbyte's LoRA overhead {hb['overhead_ms']} ms is {verdict} than "
                        f"bitsandbytes' {bb['overhead_ms']} ms")
    return "\n".join(rows)


def versions() -> dict:
    import diffusers
    import peft

    out = dict(torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__,
               halfbyte=halfbyte.__version__)
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        out["bitsandbytes"] = None
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="JSON file; results are merged into an existing one (each entry records its device)")
    p.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS))
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--tiny", action="store_true", help="tiny FLUX on the CPU in float32 (smoke test)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the train part")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one training step")
    p.add_argument("--compile-backend", default=None, help="default: inductor (aot_eager with --tiny)")
    p.add_argument("--cudnn-attention", action="store_true",
                   help="allow cuDNN's attention kernels (off by default: on an H200 with torch 2.11 cuDNN's "
                        "attention backward fails, mha_graph.execute, then an illegal memory access; "
                        "BENCHMARKS.md)")
    args = p.parse_args(argv)
    if not args.cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.tiny:
        config, device, dtype = tiny_config(), torch.device("cpu"), torch.float32
        args.image_tokens, args.train_image_tokens, args.text_tokens = 16, 16, 8
        args.compile_backend = args.compile_backend or "aot_eager"
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --tiny)")
        config, device, dtype = FLUX_DEV, torch.device("cuda"), torch.bfloat16
        args.image_tokens, args.train_image_tokens, args.text_tokens = 4096, 1024, 512
        args.compile_backend = args.compile_backend or "inductor"
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = saved.get("results", {})
    failed = False
    for lib in args.libs:
        for part in args.parts:
            print(f"{lib} {part} ...", flush=True)
            try:
                results.setdefault(lib, {})[part] = run_case(lib, part, config, device, dtype, args)
            except Exception as e:  # recorded and reported; the run goes on with the other cases, exit code 1
                traceback.print_exc()
                results.setdefault(lib, {})[part] = {"error": f"{type(e).__name__}: {e}"}
                failed = True
            print(json.dumps(results[lib][part]), flush=True)
            report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          versions=versions(), tiny=args.tiny, lora=dict(rank=16, alpha=16, targets=TARGETS),
                          tokens=dict(image=args.image_tokens, train_image=args.train_image_tokens,
                                      text=args.text_tokens), results=results)
            args.out.write_text(json.dumps(report, indent=2))
    print(table(results))
    if failed:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
