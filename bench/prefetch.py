"""Side-stream dequantize (halfbyte.kernels.prefetch): chains of NF4 layers, prefetch off vs on vs bf16, one GPU.

    python bench/prefetch.py [--json out.json]

Each chain is a fixed sequence of distinct layers (FLUX-like at 4608 tokens: 3072->12288, gelu, 12288->3072,
3072->3072 x 2, repeated; T5-XXL-like at 512 tokens: 4096->4096 x 2, 4096->10240, gelu, 10240->4096), called in
the same order every pass as a model does. Time = median over passes of CUDA-event time, after warm-ups (the
first pass teaches the prefetcher the order). Outputs with prefetch on must equal those with it off bit for bit.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402
from halfbyte.kernels import prefetch  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
CHAINS = {
    "flux-like M=4608": (4608, [(3072, 12288), "gelu", (12288, 3072), (3072, 3072), (3072, 3072)] * 4),
    "t5-like M=512": (512, [(4096, 4096), (4096, 4096), (4096, 10240), "gelu", (10240, 4096)] * 6),
}


def build(spec):
    torch.manual_seed(0)
    mods = []
    for s in spec:
        if s == "gelu":
            mods.append(nn.GELU(approximate="tanh"))
        else:
            lin = nn.Linear(*s, device=DEV, dtype=DT)
            nn.init.normal_(lin.weight, std=s[0] ** -0.5)
            mods.append(lin)
    return nn.Sequential(*mods)


def quantized(seq):
    return nn.Sequential(*[halfbyte.Linear4bit.from_linear(m, quant_type="nf4") if isinstance(m, nn.Linear) else m
                           for m in seq])


def timed(model, x, passes=10, warm=3):
    with torch.inference_mode():
        for _ in range(warm):
            y = model(x)
        times = []
        for _ in range(passes):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y = model(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times), y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| chain | variant | ms | vs bf16 | hits | misses | peak GB |")
    print("|---|---|---|---|---|---|---|")
    for name, (M, spec) in CHAINS.items():
        seq = build(spec)
        x = torch.randn(M, spec[0][0], device=DEV, dtype=DT)
        q = quantized(seq)
        results = {}
        for variant, model, on, prio in (("bf16", seq, False, 0), ("hb nf4, prefetch off", q, False, 0),
                                         ("hb nf4, prefetch on", q, True, 0),
                                         ("hb nf4, prefetch on, side priority -1", q, True, -1)):
            prefetch.set_enabled(False)
            prefetch.PRIORITY = prio
            prefetch.set_enabled(on)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms, y = timed(model, x)
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
            pf = prefetch._PREFETCHERS.get(x.device)
            hits, misses = (pf.hits, pf.misses) if pf is not None else (0, 0)
            results[variant] = (ms, y)
            ratio = ms / results["bf16"][0]
            print(f"| {name} | {variant} | {ms:.3f} | {ratio:.3f} | {hits} | {misses} | {peak:.3f} |", flush=True)
            rows.append(dict(chain=name, variant=variant, ms=ms, vs_bf16=ratio, hits=hits, misses=misses,
                             peak_gb=peak))
        off, on = results["hb nf4, prefetch off"][1], results["hb nf4, prefetch on"][1]
        same = torch.equal(off, on)
        print(f"{name}: prefetch on == off bitwise: {same}")
        rows.append(dict(chain=name, bit_equal=same))
    prefetch.PRIORITY = 0
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
