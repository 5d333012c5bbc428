"""Exploratory: layers that read one input (a FLUX block's q/k/v, a single block's proj_mlp + q/k/v) -- would
dequantizing their weights in one launch, or running one GEMM over the concatenated weight, beat one dequantize +
cuBLAS per layer? Session 29 estimated ~1 ms a step from the dequantize's lower speed at 3072 x 3072. Not library
code.

    python bench/qkv_group.py [--json out.json]

The members' NF4 codes are row slices of one quantized concatenated weight (whole rows, so each slice holds exactly
its member's bytes and absmax); a one-launch kernel is emulated by dequantizing the concatenation at once. Per
group (us, CUDA graph replay over 8 groups cycled past the L2, two rounds):
* separate: per member, dequantize into its own buffer and ``F.linear`` (the library's path);
* batched: per member, dequantize into row slices of one buffer, then the member GEMMs on those slices;
* one_launch: one dequantize of the group, then the member GEMMs on its slices (outputs stay separate tensors,
  so downstream code and bits are unchanged);
* one_gemm: one dequantize and one GEMM over the whole group (outputs would be column views);
* deq_sep / deq_one: the dequantizes alone, per member / in one launch.
Results: BENCHMARKS.md session 30.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from benchutil import timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402, F401  (registers the ops)
from halfbyte.kernels import fourbit  # noqa: E402
from halfbyte.kernels.launch import launch  # noqa: E402

GROUPS = 8  # groups cycled past the L2
CASES = [(4608, (3072, 3072, 3072)), (4096, (3072, 3072, 3072)), (512, (3072, 3072, 3072)),
         (4608, (12288, 3072, 3072, 3072))]
K = 3072


def dequantize_into(packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor) -> None:
    kernel, grid, args, kwargs = fourbit.dequant_launch(packed, absmax, None, None, None, 64, "nf4", out.numel(),
                                                        out.view(-1))
    launch(kernel, grid, *args, **kwargs)


def make_group(widths):
    w = torch.cat([(torch.randn(n, K, device="cuda") / K ** 0.5).bfloat16() for n in widths])
    packed, absmax = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
    edges = [0]
    for n in widths:
        edges.append(edges[-1] + n)
    members = [(packed.view(-1)[a * K // 2:e * K // 2], absmax[a * K // 64:e * K // 64])
               for a, e in zip(edges, edges[1:])]
    biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02 for n in widths]
    return packed, absmax, members, biases, torch.cat(biases)


def case(M: int, widths: tuple) -> dict:
    total = sum(widths)
    groups = [make_group(widths) for _ in range(GROUPS)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

    def slices(buf):
        out, a = [], 0
        for n in widths:
            out.append(buf[a:a + n])
            a += n
        return out

    def separate():
        for _, _, members, biases, _ in groups:
            for (p, a), b, n in zip(members, biases, widths):
                w = torch.empty(n, K, device="cuda", dtype=torch.bfloat16)
                dequantize_into(p, a, w)
                F.linear(x, w, b)

    def batched():
        for _, _, members, biases, _ in groups:
            parts = slices(torch.empty(total, K, device="cuda", dtype=torch.bfloat16))
            for (p, a), w in zip(members, parts):
                dequantize_into(p, a, w)
            for w, b in zip(parts, biases):
                F.linear(x, w, b)

    def one_launch():
        for packed, absmax, _, biases, _ in groups:
            buf = torch.empty(total, K, device="cuda", dtype=torch.bfloat16)
            dequantize_into(packed, absmax, buf)
            for w, b in zip(slices(buf), biases):
                F.linear(x, w, b)

    def one_gemm():
        for packed, absmax, _, _, bias in groups:
            buf = torch.empty(total, K, device="cuda", dtype=torch.bfloat16)
            dequantize_into(packed, absmax, buf)
            F.linear(x, buf, bias)

    def deq_sep():
        for _, _, members, _, _ in groups:
            for (p, a), n in zip(members, widths):
                dequantize_into(p, a, torch.empty(n, K, device="cuda", dtype=torch.bfloat16))

    def deq_one():
        for packed, absmax, _, _, _ in groups:
            dequantize_into(packed, absmax, torch.empty(total, K, device="cuda", dtype=torch.bfloat16))

    r = {"M": M, "widths": list(widths)}
    for rnd in range(2):
        for name, fn in (("separate", separate), ("batched", batched), ("one_launch", one_launch),
                         ("one_gemm", one_gemm), ("deq_sep", deq_sep), ("deq_one", deq_one)):
            r[f"{name}_{rnd}"] = timed_graph(fn) / GROUPS * 1e3
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    with torch.inference_mode():
        for M, widths in CASES:
            r = case(M, widths)
            rows.append(r)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
