"""Time FLUX-shaped layers or a FLUX-architecture transformer: bf16 vs halfbyte vs bitsandbytes where it runs.

layers (the default): FLUX.1's linear shapes (in -> out features), 3072->3072 (attention projections), 3072->9216
(fused q/k/v), 3072->12288 (MLP up), 12288->3072 (MLP down), 15360->3072 (single-block proj_out), on M tokens.
transformer: one forward pass of a FluxTransformer2DModel with FLUX.1's widths and --blocks blocks (random
weights), on M image tokens and --text-tokens T5 tokens. Each format is what a user gets (torch.nn.Linear;
halfbyte.Linear4bit / Linear8bit, "+fp8" with the opt-in fp8 compute; bitsandbytes' Linear4bit / Linear8bitLt,
listed when bitsandbytes is installed and runs on the device). Times are medians of --repeat calls after --warmup,
in milliseconds; every ratio compares formats of this one run on this one device. On the CPU the widths are
divided by --scale (default 8) and M is small, so the table comes in seconds; use a GPU for numbers that matter.
The full-model benchmarks (FLUX.1-size transformer step, T5-XXL, loading) are in the repository's bench/ folder.

examples:
  halfbyte bench                                  # GPU: M = 1, 256, 4096 at full width
  halfbyte bench --device cpu --tokens 16 --json
  halfbyte bench transformer --blocks 2 4 --formats nf4 int8 --tokens 1024 4096
"""

import argparse
import statistics
import time

from ..convert import memory_footprint
from ._common import (
    USAGE,
    CliError,
    dtype_of,
    human_bytes,
    notice,
    print_json,
    require_hf_libraries,
    resolve_device,
    table,
)

LAYERS = [(3072, 3072, "attention"), (3072, 9216, "fused qkv"), (3072, 12288, "MLP up"), (12288, 3072, "MLP down"),
          (15360, 3072, "proj_out")]
FORMATS = ("nf4", "nf4+dq", "fp4", "int8", "nf4+fp8", "nf4+dq+fp8")
BASELINE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # the unquantized layer's name per dtype


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=("layers", "transformer"), default="layers",
                   help="layers (default): the five FLUX layer shapes; transformer: a FLUX-architecture transformer "
                        "of --blocks blocks at FLUX.1's widths, one forward pass")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available, else the CPU), cpu, cuda")
    p.add_argument("--tokens", type=int, nargs="+", metavar="M",
                   help="rows of the activation / image tokens (default: 1 256 4096 on a GPU, 16 on the CPU; "
                        "transformer: 4096 on a GPU, 64 on the CPU)")
    p.add_argument("--scale", type=int, default=None,
                   help="divide the widths by this (default: 1 on a GPU, 8 on the CPU)")
    p.add_argument("--blocks", type=int, nargs=2, default=(1, 2), metavar=("DOUBLE", "SINGLE"),
                   help="transformer: double- and single-stream blocks (default 1 2; FLUX.1 has 19 38)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="transformer: T5 tokens (default: 512 on a GPU, 32 on the CPU)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=["nf4", "nf4+dq", "int8"],
                   help="halfbyte formats to time besides the unquantized baseline (default: nf4 nf4+dq int8)")
    p.add_argument("--dtype", choices=tuple(BASELINE), default="bfloat16",
                   help="dtype of the activations and of the unquantized baseline (default bfloat16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 GPU, 2 CPU)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls (default: 50 GPU, 5 CPU; transformer: 10, 2)")
    p.add_argument("--no-bitsandbytes", action="store_true", help="leave bitsandbytes out even if installed")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    import torch

    device = resolve_device(args.device, args)
    gpu, layers = device.type == "cuda", args.what == "layers"
    tokens = args.tokens or (([1, 256, 4096] if gpu else [16]) if layers else ([4096] if gpu else [64]))
    scale = args.scale or (1 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    repeat = args.repeat or ((50 if gpu else 5) if layers else (10 if gpu else 2))
    if min(tokens) < 1 or scale < 1 or warmup < 0 or repeat < 1 or min(args.blocks) < 0:
        raise CliError("--tokens and --scale must be >= 1, --warmup and --blocks >= 0, --repeat >= 1", USAGE)
    if any(n % scale or k % scale or (k // scale) % 64 for k, n, _ in LAYERS):
        raise CliError(f"--scale {scale}: the widths (3072, 9216, 12288, 15360) must stay whole multiples of 64",
                       USAGE)
    if not layers and 24 % scale:
        raise CliError(f"--scale {scale}: FLUX's 24 attention heads must divide by it (1, 2, 3, 4, 6, 8, 12, 24)",
                       USAGE)
    dtype = dtype_of(args.dtype)
    bnb, bnb_note = (None, "left out (--no-bitsandbytes)") if args.no_bitsandbytes else _bitsandbytes(device, dtype)
    if bnb_note:
        notice(args, f"bitsandbytes: {bnb_note}")
    base = BASELINE[args.dtype]
    formats = [base, *dict.fromkeys(args.formats)]
    timing = dict(device=device, warmup=warmup, repeat=repeat)
    if layers:
        results = _bench_layers(formats, base, bnb, tokens, scale, dtype, timing)
    else:
        text = args.text_tokens or (512 if gpu else 32)
        results = _bench_transformer(formats, base, bnb, tokens, text, scale, tuple(args.blocks), dtype, timing)
    report = {"what": args.what, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if gpu else "cpu", "dtype": args.dtype,
              "baseline": base, "scale": scale, "warmup": warmup, "repeat": repeat,
              "bitsandbytes": getattr(bnb, "__version__", None), "bitsandbytes_note": bnb_note, "results": results}
    if args.json:
        print_json(report)
    else:
        _print(report)
    return 0


def _bench_layers(formats, base, bnb, tokens, scale, dtype, timing) -> list[dict]:
    import torch

    results = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for k, n, name in LAYERS:
        k, n = k // scale, n // scale
        linear = torch.nn.Linear(k, n, bias=True)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        linear = linear.to(timing["device"], dtype)
        layers = {f: linear if f == base else _layer(f, linear) for f in formats}
        if bnb is not None:
            layers.update(_bnb_layers(bnb, linear))
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(timing["device"], dtype)
            times = {f: _median_ms(lambda layer=layer: layer(x), **timing) for f, layer in layers.items()}
            results += [{"layer": name, "in_features": k, "out_features": n, "tokens": m, "format": f,
                         "ms": round(ms, 4), "vs_baseline": round(times[base] / ms, 3),
                         "bytes": memory_footprint(layers[f])} for f, ms in times.items()]
        del layers, linear
    return results


def _bench_transformer(formats, base, bnb, tokens, text, scale, blocks, dtype, timing) -> list[dict]:
    """One forward pass of a FLUX-architecture transformer (FLUX.1's widths divided by ``scale``) per format."""
    import copy

    import torch

    from ..convert import quantize_

    diffusers, _ = require_hf_libraries()

    device, (double, single) = timing["device"], blocks
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
            num_attention_heads=24 // scale, joint_attention_dim=4096 // scale, pooled_projection_dim=768 // scale,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = torch.nn.Module.to(model, device, dtype).eval()
    name = f"FLUX {double}+{single} blocks"
    gen = torch.Generator(device="cpu").manual_seed(0)
    results = []
    for m in tokens:
        inputs = dict(hidden_states=torch.randn(1, m, 64, generator=gen),
                      encoder_hidden_states=torch.randn(1, text, 4096 // scale, generator=gen),
                      pooled_projections=torch.randn(1, 768 // scale, generator=gen))
        inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
        inputs |= dict(timestep=torch.tensor([0.5], device=device, dtype=dtype),
                       guidance=torch.tensor([3.5], device=device, dtype=dtype),
                       img_ids=torch.zeros(m, 3, device=device), txt_ids=torch.zeros(text, 3, device=device),
                       return_dict=False)
        times, sizes = {}, {}
        variants = [*formats, *(["bnb nf4", "bnb int8"] if bnb is not None else [])]
        for f in variants:  # one quantized copy at a time: a full-width model per format would not fit
            if f == base:
                variant = model
            elif f.startswith("bnb "):
                variant = _swap_linears(copy.deepcopy(model), lambda lin, f=f: _bnb_layers(bnb, lin, (f,))[f])
            else:
                variant = _fp8(f, quantize_(copy.deepcopy(model), _config(f)))
            times[f] = _median_ms(lambda variant=variant: variant(**inputs), **timing)
            sizes[f] = memory_footprint(variant)
            del variant
        results += [{"layer": name, "in_features": 3072 // scale, "out_features": 3072 // scale, "tokens": m,
                     "text_tokens": text, "format": f, "ms": round(ms, 4),
                     "vs_baseline": round(times[base] / ms, 3), "bytes": sizes[f]} for f, ms in times.items()]
    return results


def _config(fmt: str):
    from ..config import BitsAndBytesConfig

    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt[:3],
                              bnb_4bit_use_double_quant="+dq" in fmt)


def _fp8(fmt: str, module):
    """``module`` with the opt-in fp8 compute on (``halfbyte.set_fp8_compute``) for the "+fp8" formats."""
    if fmt.endswith("+fp8"):
        from ..convert import set_fp8_compute

        set_fp8_compute(module)
    return module


def _swap_linears(model, make):
    """Replace every ``nn.Linear`` of ``model`` by ``make(linear)``, in place."""
    import torch

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, make(child))
    return model


def _layer(fmt: str, linear):
    from ..nn import Linear4bit, Linear8bit

    if fmt == "int8":
        return Linear8bit.from_linear(linear, threshold=6.0)
    return _fp8(fmt, Linear4bit.from_linear(linear, quant_type=fmt[:3], double_quant="+dq" in fmt))


def _bitsandbytes(device, dtype):
    """(bitsandbytes module, None) if its 4-bit and 8-bit layers run on ``device``; else (None, the reason)."""
    import logging

    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes
    except Exception as e:  # not installed, or a broken install (missing native library)
        return None, f"not available ({type(e).__name__}: {e})"
    try:
        import torch

        probe = torch.nn.Linear(64, 64).to(device, dtype)
        for layer in _bnb_layers(bitsandbytes, probe).values():
            layer(torch.zeros(2, 64, device=device, dtype=dtype))
    except Exception as e:  # e.g. no kernel for this device
        return None, f"{bitsandbytes.__version__} does not run on {device} ({type(e).__name__}: {e})"
    return bitsandbytes, None


def _bnb_layers(bnb, linear, which: tuple[str, ...] = ("bnb nf4", "bnb int8")) -> dict:
    """bitsandbytes' NF4 and/or LLM.int8() layers holding ``linear``'s weight, quantized by bitsandbytes."""
    import torch

    device, dtype = linear.weight.device, linear.weight.dtype
    w = linear.weight.detach().to("cpu")
    k, n = linear.in_features, linear.out_features
    bias = linear.bias.detach().to("cpu")
    nf4 = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type="nf4", device="meta")
    nf4.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)
    nf4.bias = torch.nn.Parameter(bias, requires_grad=False)
    int8 = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=6.0, device="meta")
    int8.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    int8.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return {f: layer.to(device) for f, layer in (("bnb nf4", nf4), ("bnb int8", int8)) if f in which}


def _median_ms(fn, device, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` calls after ``warmup`` (CUDA events on a GPU)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        if device.type != "cuda":
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)


def _print(report: dict) -> None:
    formats = list(dict.fromkeys(r["format"] for r in report["results"]))
    base, layers = report["baseline"], report["what"] == "layers"
    keyed = {(r["layer"], r["tokens"], r["format"]): r for r in report["results"]}
    rows = []
    for layer, m in dict.fromkeys((r["layer"], r["tokens"]) for r in report["results"]):
        first = keyed[(layer, m, base)]
        cells = [layer, f"{first['in_features']}->{first['out_features']}" if layers else str(first["in_features"]),
                 str(m)]
        for f in formats:
            r = keyed[(layer, m, f)]
            cells.append(f"{r['ms']:.3f}" + ("" if f == base else f" ({r['vs_baseline']:.2f}x)"))
        rows.append(cells)
    print(f"{report['device_name']} ({report['device']}), {report['dtype']} activations, median of "
          f"{report['repeat']} calls in ms (in parentheses: {base} time / this time; > 1 is faster than {base})")
    if report["bitsandbytes_note"]:
        print(f"bitsandbytes: {report['bitsandbytes_note']}")
    print(table(rows, ["layer" if layers else "model", "in->out" if layers else "width", "M", *formats],
                right=set(range(2, 3 + len(formats)))))
    if not layers:
        sizes = {r["format"]: r["bytes"] for r in report["results"]}
        print("memory: " + ", ".join(f"{f} {human_bytes(b)}" for f, b in sizes.items()))
