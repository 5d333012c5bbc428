"""A whole FLUX-sized transformer step and a T5-XXL encode: bf16 vs bitsandbytes 0.50.2 vs halfbyte, one GPU.

    python bench/step.py [--compile] [--only flux t5] [--variants ...] [--json out.json]

Method (docs: baseline-h100.md): ``FluxTransformer2DModel(guidance_embeds=True)`` with its default (FLUX.1-dev)
config, built on the meta device and materialised on the GPU in bf16 with weights N(0, 1/fan_in); one 1024x1024
image (4096 latent tokens), 512 text tokens, batch 1, guidance 3.5; one step = one forward under
``torch.inference_mode()``, median of 5 after 2 warm-ups. Variants swap every ``nn.Linear`` for bitsandbytes'
``Linear4bit`` (nf4, bf16 compute) / ``Linear8bitLt`` (threshold 6) or halfbyte's ``Linear4bit`` / ``Linear8bit``,
quantized on the GPU from the same bf16 weights, one variant at a time; halfbyte's int8 variants then get the
groups of layers that share their input's quantization (``halfbyte.share_int8_inputs``, as ``quantize_`` and the
loaders do; ``hb-int8-unshared`` without); ``hb-nf4-fp8`` / ``hb-nf4-dq-fp8`` are halfbyte's NF4 with the opt-in fp8
compute (``halfbyte.set_fp8_compute``: no longer bitsandbytes' numbers); ``hb-nf4-noring`` / ``hb-nf4-dq-noring`` are
halfbyte's NF4 with the fused GEMM for 17-2048 tokens off (``halfbyte.kernels.gemm_ring.ENABLED``: dequantize +
cuBLAS, as before it).
"peak" is the variant's own peak GPU memory: the allocator's peak during its steps minus the bf16 linear weights
held aside (allocated before and untouched; exact accounting). ``--compile`` compiles the repeated blocks
(``compile_repeated_blocks(fullgraph=True)``, diffusers' regional compilation: one graph per block class, the way
diffusers recommends compiling FLUX) and reports the first call's seconds too. Every ratio is between columns of
this one run. "GPU ms" is the device time of one more call's kernels, summed (``gpu_ms``): where a step is bound
by the host (host ms = step ms), its ratio is the part the variant's kernels decide.
"""

import argparse
import importlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

DEV = "cuda"
BF16 = torch.bfloat16
TINY = False  # --tiny: a CPU smoke run of this script with tiny widths (numbers meaningless)
PROFILE: set[str] = set()  # variants whose step is also profiled (top CUDA kernels printed)
_FUSE_DEFAULT = importlib.import_module("halfbyte.kernels.int8_mm").FUSE_OUTLIERS
ROUNDS = 1  # --rounds: the variant list runs this many times in turn (ratios taken within each round)
#: callables ``f(kind, model, call, label)`` run after a variant's timed steps, under inference mode with the variant
#: in place (and compiled with --compile): other benches' probes (bench/compiled_timeline.py)
AFTER_STEPS: list = []
INPUTS: dict = {}  # the model inputs of the last ``flux``/``t5`` call (probes that run a second model on them)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def peak() -> int:
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def alloc_stats() -> dict[str, int]:
    """Caching-allocator events that stall the host (device allocations and frees, retries after a failed one)."""
    if DEV != "cuda":
        return {}
    st = torch.cuda.memory_stats()
    return {k: st.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def linears(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The model's nn.Linear layers, but those whose name ends with one of ``skip`` (kept in bf16 everywhere)."""
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(skip)}


def profile(fn, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
        fn()
        sync()
    print(f"--- profile {label}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    # per op and input shape: which layers' GEMMs (aten::addmm / mm, halfbyte's ops) cost what
    print(p.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=30,
                                                          max_name_column_width=40, max_shapes_column_width=70))
    # the GPU's own work in the step: against the unprofiled step time, what is left is the GPU waiting
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3
    print(f"--- {label}: {len(kernels)} kernels, {busy:.1f} ms of GPU time")
    sums: dict[str, list] = {}
    for e in kernels:
        cat = kernel_category(e.name)
        acc = sums.setdefault(cat, [0.0, 0])
        acc[0] += e.device_time / 1e3
        acc[1] += 1
    for cat, (ms, n) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
        print(f"    {cat:<28} {ms:8.2f} ms  {n:5d} kernels")
    return {cat: {"ms": ms, "kernels": n} for cat, (ms, n) in sums.items()}


#: (category, regex on the kernel name), first match wins: where a step's GPU time goes (--profile)
KERNEL_CATEGORIES = (
    ("halfbyte dequantize", r"_dequant"), ("halfbyte fused GEMM", r"gemm_ring"), ("halfbyte GEMV", r"gemv"),
    ("halfbyte small GEMM", r"gemm_small"), ("halfbyte int8", r"int8|_quant_rows|outlier|_flag"),
    ("bitsandbytes", r"kDequantize|kgemm|kInt8|kQuantize|kspmm|kdequant"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("cuBLAS GEMM", r"gemm|xmma|nvjet|cutlass|sm90_|sm80_|splitKreduce"),
    ("other", r""),
)


def kernel_category(name: str) -> str:
    return next(cat for cat, rx in KERNEL_CATEGORIES if re.search(rx, name, re.IGNORECASE))


def materialise(model: nn.Module) -> nn.Module:
    model = model.to_empty(device=DEV)
    gen = torch.Generator(DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)  # norm scales
        for b in model.buffers():  # e.g. rotary tables are recomputed per call; nothing to fill
            b.zero_()
    return model.eval()


def quantized(kind: str, lin: nn.Linear) -> nn.Module:
    w = lin.weight.detach()
    N, K = w.shape
    if kind in ("hb-nf4", "hb-nf4-op", "hb-nf4-launch", "hb-nf4-after", "hb-nf4-fp8", "hb-nf4-noring"):
        return halfbyte.Linear4bit.from_linear(lin, quant_type="nf4")
    if kind in ("hb-nf4-dq", "hb-nf4-dq-fp8", "hb-nf4-dq-noring"):
        return halfbyte.Linear4bit.from_linear(lin, quant_type="nf4", double_quant=True)
    if kind in ("hb-int8", "hb-int8-fused", "hb-int8-separate", "hb-int8-unshared"):
        return halfbyte.Linear8bit.from_linear(lin, threshold=6.0)
    if kind in ("bnb-nf4", "bnb-nf4-dq"):
        q = bnb.nn.Linear4bit(K, N, bias=lin.bias is not None, compute_dtype=BF16, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=kind == "bnb-nf4-dq").to(DEV)
    elif kind == "bnb-int8":
        q = bnb.nn.Linear8bitLt(K, N, bias=lin.bias is not None, has_fp16_weights=False, threshold=6.0,
                                device="meta")
        CB, SCB, _ = bnb.functional.int8_vectorwise_quant(w.half())
        q.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
        q.weight.CB, q.weight.SCB = CB, SCB
    else:
        raise ValueError(kind)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q


def swap(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        model.set_submodule(name, layer)


def steps(fn, n: int = 5, warmup: int = 2) -> tuple[float, float, float, torch.Tensor]:
    """(median seconds, median host seconds, first call seconds, output) of ``fn()``. Host seconds: from the
    call until it returns, before the sync; a step whose host time reaches its step time is bound by the host."""
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times, host = [], []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(host), first, out


def gpu_ms(fn) -> float | None:
    """Milliseconds of GPU work in one call of ``fn()``: the device time of every kernel it launched, summed
    (torch.profiler, CUDA activity). Beside a step whose host time reaches its step time (bound by the host: the
    T5 encode at 512 tokens on these machines), it is the part of the step that the variant's kernels decide.
    None on the CPU."""
    if DEV != "cuda":
        return None
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    sync()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        sync()
    return sum(e.device_time for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3


def set_int8_fusion(on: bool | None) -> None:
    """hb-int8-fused / hb-int8-separate: the outlier products in the int8 GEMM's epilogue or in their own kernel
    (``kernels.int8_mm.FUSE_OUTLIERS``; None: the library's default, restored)."""
    from halfbyte.kernels import int8_mm, int8_plan

    on = _FUSE_DEFAULT if on is None else on
    if int8_mm.FUSE_OUTLIERS != on:
        int8_mm.FUSE_OUTLIERS = on
        int8_plan.PLANS.clear()  # plans keep the launches they were built with


def set_gemm_ring(on: bool) -> None:
    if DEV == "cuda":
        importlib.import_module("halfbyte.kernels.gemm_ring").ENABLED = on


def run_variants(model, call, variants, compile_: bool, label: str, skip: tuple[str, ...] = ()) -> list[dict]:
    base = linears(model, skip)
    held = sum(m.weight.numel() * m.weight.element_size() + (m.bias.numel() * 2 if m.bias is not None else 0)
               for m in base.values())
    rows, ref = [], None
    for rnd, kind in [(r, k) for r in range(ROUNDS) for k in variants]:
        if kind.startswith("bnb") and bnb is None:
            continue
        torch._dynamo.reset()
        layers = None
        # hb-nf4-noring: halfbyte NF4 without the fused GEMM for 17-2048 tokens (kernels.gemm_ring; read when a
        # layer is built or moved and when its plan is built, so for the whole variant)
        set_gemm_ring(not kind.endswith("-noring"))
        try:
            if kind != "bf16":
                if kind.startswith("hb"):  # as halfbyte.quantize_ does: one reserved segment, no block rounding
                    cfg = (halfbyte.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0) if "int8" in kind
                           else halfbyte.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant="-dq" in kind))
                    halfbyte.transfer.reserve_device_memory(
                        torch.device(DEV), [b for m in base.values() for b in
                                            halfbyte.convert.quantized_tensor_bytes(m, cfg)])
                layers = {n: quantized(kind, m) for n, m in base.items()}
                halfbyte.nn.release_scratch()  # layers quantized one by one: the scratch pool goes back
                swap(model, layers)
                if "int8" in kind and kind.startswith("hb") and kind != "hb-int8-unshared":
                    halfbyte.share_int8_inputs(model)  # as quantize_ and the loaders do
                if kind.endswith("-fp8"):  # opt-in: > 64-token calls on the fp8 tensor cores
                    halfbyte.set_fp8_compute(model)
            sync()
            reset_peak()
            weights = allocated() - (held if kind != "bf16" else 0)
            # hb-nf4-op: compiled layers keep the opaque gemm_4bit op instead of dequantizing in the graph
            halfbyte.nn.DEQUANTIZE_IN_GRAPH = kind != "hb-nf4-op"
            # hb-nf4-launch / hb-nf4-after: every in-graph dequantize launched by Inductor itself / through the op
            # that takes the layer's input (halfbyte.nn.IN_GRAPH_DEQUANTIZE; hb-nf4 keeps the default, "auto")
            halfbyte.nn.IN_GRAPH_DEQUANTIZE = {"hb-nf4-launch": "launch", "hb-nf4-after": "after"}.get(kind, "auto")
            set_int8_fusion({"hb-int8-fused": True, "hb-int8-separate": False}.get(kind))
            if compile_:
                model.compile_repeated_blocks(fullgraph=True)
            with torch.inference_mode():
                stats0 = alloc_stats()
                sec, host, first, out = steps(call)
                allocs = {k: v - stats0[k] for k, v in alloc_stats().items()}
                gpu = gpu_ms(call)
                kernels = profile(call, f"{label} {kind}") if kind in PROFILE else None
                for probe in AFTER_STEPS:
                    probe(kind, model, call, label)
                through_plans = int8_plan_share(call) if "hb-int8" in kind and DEV == "cuda" else ""
            top = peak() - (held if kind != "bf16" else 0)
            out = out.float()
            if ref is None and kind == "bf16":
                ref = out
            err = ((out - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
            rows.append(dict(model=label, variant=kind, compiled=compile_, round=rnd, seconds=sec, host_seconds=host,
                             gpu_ms=gpu, first_call=first, weights_gb=weights / 1e9, peak_gb=top / 1e9, rel_err=err,
                             **({"kernels": kernels} if kernels else {})))
            print(f"  {label} {kind}{' compiled' if compile_ else ''}: {sec * 1e3:.1f} ms (host {host * 1e3:.1f} ms, "
                  f"{'' if gpu is None else f'GPU {gpu:.1f} ms, '}first {first:.1f} s), "
                  f"weights {weights / 1e9:.2f} GB, peak {top / 1e9:.2f} GB, rel err {err:.3f} {through_plans} "
                  f"allocator during the steps: {allocs}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others' numbers
            rows.append(dict(model=label, variant=kind, compiled=compile_, round=rnd,
                             error=f"{type(e).__name__}: {e}"[:300]))
            print(f"  {label} {kind}: error {type(e).__name__}: {str(e)[:300]}", flush=True)
        finally:
            halfbyte.nn.DEQUANTIZE_IN_GRAPH = True
            halfbyte.nn.IN_GRAPH_DEQUANTIZE = "auto"
            set_int8_fusion(None)
            set_gemm_ring(True)
            for blk in model.modules():  # undo compile_repeated_blocks
                if getattr(blk, "_compiled_call_impl", None) is not None:
                    blk._compiled_call_impl = None
            if layers is not None:
                swap(model, base)
                del layers
            reset_peak()
    return rows


def flux(variants, compile_: bool) -> list[dict]:
    from diffusers import FluxTransformer2DModel

    kw = dict(guidance_embeds=True)
    side, txt, ch, ctx, pooled = 64, 512, 64, 4096, 768
    if TINY:
        side, txt, ch, ctx, pooled = 8, 8, 16, 32, 16
        kw.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, in_channels=ch,
                  joint_attention_dim=ctx, pooled_projection_dim=pooled, axes_dims_rope=[4, 6, 6])
    with torch.device("meta"):
        model = FluxTransformer2DModel(**kw).to(BF16)
    model = materialise(model)
    gen = torch.Generator(DEV).manual_seed(1)
    img = side * side
    inputs = dict(
        hidden_states=torch.randn(1, img, ch, device=DEV, dtype=BF16, generator=gen),
        encoder_hidden_states=torch.randn(1, txt, ctx, device=DEV, dtype=BF16, generator=gen),
        pooled_projections=torch.randn(1, pooled, device=DEV, dtype=BF16, generator=gen),
        timestep=torch.tensor([0.5], device=DEV, dtype=BF16), guidance=torch.tensor([3.5], device=DEV, dtype=BF16),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                           indexing="ij"),
                            -1).reshape(-1, 3).to(DEV),
        txt_ids=torch.zeros(txt, 3, device=DEV), return_dict=False,
    )
    INPUTS["flux"] = inputs
    return run_variants(model, lambda: model(**inputs)[0], variants, compile_, "flux")


def t5(variants, compile_: bool) -> list[dict]:
    from transformers import T5Config, T5EncoderModel

    dims = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4) if TINY else \
        dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    cfg = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                   **dims)
    with torch.device("meta"):
        model = T5EncoderModel(cfg).to(BF16)
    model = materialise(model)
    ids = torch.randint(0, 32128, (1, 512), device=DEV, generator=torch.Generator(DEV).manual_seed(2))
    INPUTS["t5"] = ids
    if compile_:
        return []  # T5 is timed eagerly only (the T5 target is eager)
    # transformers keeps T5's ``wo`` out of quantization (``_keep_in_fp32_modules``) and its feed-forward casts the
    # activations to ``wo.weight.dtype`` unless that is int8: a 4-bit wo would receive uint8 activations (what
    # bitsandbytes' NF4 then silently computes on). Every variant keeps wo in bf16 here.
    return run_variants(model, lambda: model(input_ids=ids).last_hidden_state, variants, False, "t5",
                        skip=(".wo",))


def int8_plan_share(call) -> str:
    """How many of one step's LLM.int8() calls ran through cached plans (kernels.int8_plan), and how many took
    their quantized input from a share (kernels.share), counted by wrapping the plan call, the direct path and
    the share's lookup for one extra step."""
    from halfbyte.kernels import int8_plan
    from halfbyte.kernels.share import Share

    hits = [0, 0, 0]
    plan_call, direct, take = int8_plan.Plan.__call__, int8_plan.km.int8_mixed_mm, Share.take

    def counted_plan(self, *a, **kw):
        hits[0] += 1
        return plan_call(self, *a, **kw)

    def counted_direct(*a, **kw):
        hits[1] += 1
        return direct(*a, **kw)

    def counted_take(self, *a):
        value = take(self, *a)
        hits[2] += value is not None
        return value

    int8_plan.Plan.__call__, int8_plan.km.int8_mixed_mm, Share.take = counted_plan, counted_direct, counted_take
    try:
        call()
        sync()
    finally:
        int8_plan.Plan.__call__, int8_plan.km.int8_mixed_mm, Share.take = plan_call, direct, take
    return f"({hits[0]} of {hits[0] + hits[1]} int8 calls through plans, {hits[2]} served by a share)"


def table(rows: list[dict]) -> str:
    """One line per run, its ratio against bf16 in the same round; then, with several rounds, the median ratio
    per variant and its range."""
    out = ["| model | variant | compiled | round | step ms | host ms | vs bf16 | GPU ms | GPU vs bf16 | first call s "
           "| weights GB | peak GB | rel err |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bf16 = {(r["model"], r["compiled"], r["round"]): r for r in rows if r["variant"] == "bf16" and "seconds" in r}
    ratios: dict[tuple, list[float]] = {}
    gpu_ratios: dict[tuple, list[float]] = {}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['variant']} | {r['compiled']} | {r['round']} | "
                       f"error: {r['error'][:80]} |||||||||")
            continue
        key = (r["model"], r["variant"], r["compiled"])
        base = bf16.get((r["model"], r["compiled"], r["round"]))
        ratio = gpu_ratio = "-"
        if base:
            ratios.setdefault(key, []).append(r["seconds"] / base["seconds"])
            ratio = f"{ratios[key][-1]:.3f}"
            if r.get("gpu_ms") and base.get("gpu_ms"):
                gpu_ratios.setdefault(key, []).append(r["gpu_ms"] / base["gpu_ms"])
                gpu_ratio = f"{gpu_ratios[key][-1]:.3f}"
        gpu = "-" if r.get("gpu_ms") is None else f"{r['gpu_ms']:.1f}"
        out.append(f"| {r['model']} | {r['variant']} | {r['compiled']} | {r['round']} | {r['seconds'] * 1e3:.1f} | "
                   f"{r['host_seconds'] * 1e3:.1f} | {ratio} | {gpu} | {gpu_ratio} | "
                   f"{r['first_call']:.1f} | {r['weights_gb']:.2f} | {r['peak_gb']:.2f} | {r['rel_err']:.3f} |")
    if ROUNDS > 1:
        out += ["", "| model | variant | compiled | median vs bf16 | range | GPU time: median vs bf16 | range |",
                "|---|---|---|---|---|---|---|"]
        for (m, v, c), rs in ratios.items():
            gs = gpu_ratios.get((m, v, c))
            g = f"{statistics.median(gs):.3f} | {min(gs):.3f}-{max(gs):.3f}" if gs else "- | -"
            out.append(f"| {m} | {v} | {c} | {statistics.median(rs):.3f} | {min(rs):.3f}-{max(rs):.3f} | {g} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", nargs="*", default=["flux", "t5"])
    ap.add_argument("--variants", nargs="*",
                    default=["bf16", "bnb-nf4", "hb-nf4", "hb-nf4-dq", "bnb-int8", "hb-int8"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny widths")
    ap.add_argument("--profile", nargs="*", default=[], help="variants whose step is profiled")
    ap.add_argument("--rounds", type=int, default=1, help="run the variant list this many times in turn")
    a = ap.parse_args()
    PROFILE.update(a.profile)
    global DEV, TINY, ROUNDS
    ROUNDS = a.rounds
    if a.tiny:
        DEV, TINY = "cpu", True
    print(f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}, torch {torch.__version__}, bitsandbytes "
          f"{getattr(bnb, '__version__', '-')}, halfbyte {halfbyte.__version__}", flush=True)
    rows = []
    if "flux" in a.only:
        rows += flux(a.variants, a.compile)
    if "t5" in a.only:
        rows += t5(a.variants, a.compile)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
