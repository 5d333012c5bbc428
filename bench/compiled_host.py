"""Host cost per call of a quantized layer eager vs inside a torch.compile'd region, on one GPU.

    python bench/compiled_host.py [--profile] [--m M]

A compiled region that calls ``halfbyte::int8_mixed_mm`` ran host-bound on a FLUX step (BENCHMARKS.md): this
times, per call, a loop of 500 calls of a small layer the GPU outruns (M = 16, 1024 x 1024), for nn.Linear bf16,
halfbyte's Linear4bit and Linear8bit (threshold 6), eager and compiled (fullgraph, one layer per region), and with
``--profile`` prints a cProfile of the compiled int8 loop (where the Python time goes). ``--m`` sets the tokens:
above 64 a compiled Linear4bit dequantizes inside the graph (``halfbyte.nn.DEQUANTIZE_IN_GRAPH``); the "op" row
keeps the opaque ``gemm_4bit`` call for comparison.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import print_cprofile  # noqa: E402

import halfbyte  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def per_call(fn, x, n=500) -> float:
    for _ in range(20):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--m", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 1024, device=DEV, dtype=DT)
    q4 = halfbyte.Linear4bit.from_linear(lin)
    layers = {"bf16 nn.Linear": lin, "hb Linear4bit": q4, "hb Linear4bit, gemm_4bit op": q4,
              "hb Linear8bit": halfbyte.Linear8bit.from_linear(lin, threshold=6.0)}
    x = torch.randn(a.m, 1024, device=DEV, dtype=DT)
    x[:, 3] = 20  # one outlier column
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| layer | eager us | compiled us |\n|---|---|---|")
    compiled = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            halfbyte.nn.DEQUANTIZE_IN_GRAPH = "op" not in name  # read (and guarded on) when the graph is traced
            c = compiled[name] = torch.compile(layer, fullgraph=True)
            print(f"| {name} | {per_call(layer, x):.1f} | {per_call(c, x):.1f} |", flush=True)
        halfbyte.nn.DEQUANTIZE_IN_GRAPH = True
        if a.profile:
            for name in ("hb Linear8bit", "hb Linear4bit"):
                print_cprofile(lambda c=compiled[name]: c(x), 200, f"cProfile, 200 compiled calls of {name}")


if __name__ == "__main__":
    main()
