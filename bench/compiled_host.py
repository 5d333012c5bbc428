"""Host cost per call of a quantized layer eager vs inside a torch.compile'd region, on one GPU.

    python bench/compiled_host.py [--profile] [--m M]

A compiled region that calls ``halfbyte::int8_mixed_mm`` ran host-bound on a FLUX step (BENCHMARKS.md): this
times, per call, a loop of 500 calls of a small layer the GPU outruns (M = 16, 1024 x 1024), for nn.Linear bf16,
halfbyte's Linear4bit and Linear8bit (threshold 6), eager and compiled (fullgraph, one layer per region), and with
``--profile`` prints a cProfile of the compiled int8 loop (where the Python time goes). ``--m`` sets the tokens:
above 64 a compiled Linear4bit dequantizes inside the graph (``halfbyte.nn.DEQUANTIZE_IN_GRAPH``); the "op" row
keeps the opaque ``gemm_4bit`` call for comparison. ``--ablate`` times, compiled, stripped-down modules between
``nn.Linear`` and ``Linear4bit`` (the dequantize op and a matmul alone, without the int32 statistics views, the
dequantize alone, two matmuls) and prints cProfiles of the compiled bf16 and 4-bit calls: where a compiled 4-bit
layer's extra host time goes.
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


class _DequantMatmul(torch.nn.Module):
    """A compiled Linear4bit's traced graph without the layer's Python: dequantize op + matmul (+ bias)."""

    def __init__(self, q4, view: bool = True, matmul: bool = True):
        super().__init__()
        self.q4, self.view, self.matmul = q4, view, matmul
        self.register_buffer("absmax_f32", q4.absmax.view(torch.float32).clone())
        self.register_buffer("code", halfbyte.nn._code_table("nf4", q4.weight.device))

    def forward(self, x):
        q4 = self.q4
        am = q4.absmax.view(torch.float32) if self.view else self.absmax_f32
        W = torch.ops.halfbyte.dequantize_4bit_fused(q4.weight, am, None, None, None, self.code, 64, "nf4",
                                                     [q4.out_features, q4.in_features], x.dtype)
        return torch.nn.functional.linear(x, W, q4.bias) if self.matmul else W


class _TwoLinear(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(self.lin(x))


def ablate(lin, q4, x) -> None:
    variants = {"bf16 nn.Linear": lin, "two nn.Linear": _TwoLinear(lin),
                "dequantize op + matmul": _DequantMatmul(q4), "same, float32 absmax buffer (no view)":
                _DequantMatmul(q4, view=False), "dequantize op alone": _DequantMatmul(q4, matmul=False),
                "hb Linear4bit": q4}
    from torch._inductor.utils import run_and_get_code

    for name in ("dequantize op + matmul", "hb Linear4bit"):  # what the generated code does besides launching
        _, code = run_and_get_code(torch.compile(variants[name], fullgraph=True), x)
        calls = [ln.strip() for ln in "".join(code).splitlines() if "aten." in ln and "import" not in ln]
        print(f"aten calls in the generated code of {name}: {calls}")
    torch._dynamo.reset()
    compiled = {name: torch.compile(m, fullgraph=True) for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(7):  # round-robin: the host's speed drifts over a run; the minimum of each is compared
        for name, c in compiled.items():
            times[name].append(per_call(c, x, 300))
    print("\n| compiled module (fullgraph, one per region) | us per call, min of 7 | median |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {min(t):.1f} | {sorted(t)[3]:.1f} |", flush=True)
    for name in ("bf16 nn.Linear", "dequantize op + matmul", "hb Linear4bit"):
        print_cprofile(lambda c=compiled[name]: c(x), 500, f"cProfile, 500 compiled calls of {name}", limit=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ablate", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 1024, device=DEV, dtype=DT)
    q4 = halfbyte.Linear4bit.from_linear(lin)
    layers = {"bf16 nn.Linear": lin, "hb Linear4bit": q4, "hb Linear4bit, gemm_4bit op": q4,
              "hb Linear4bit, dequantize_4bit_after": q4,
              "hb Linear8bit": halfbyte.Linear8bit.from_linear(lin, threshold=6.0)}
    x = torch.randn(a.m, 1024, device=DEV, dtype=DT)
    x[:, 3] = 20  # one outlier column
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| layer | eager us | compiled us |\n|---|---|---|")
    compiled = {}
    if a.ablate:
        with torch.inference_mode():
            ablate(lin, q4, x)
        return
    with torch.inference_mode():
        for name, layer in layers.items():
            halfbyte.nn.DEQUANTIZE_IN_GRAPH = "op" not in name  # read (and guarded on) when the graph is traced
            halfbyte.nn.IN_GRAPH_DEQUANTIZE = "after" if "after" in name else "auto"
            c = compiled[name] = torch.compile(layer, fullgraph=True)
            print(f"| {name} | {per_call(layer, x):.1f} | {per_call(c, x):.1f} |", flush=True)
        halfbyte.nn.DEQUANTIZE_IN_GRAPH = True
        halfbyte.nn.IN_GRAPH_DEQUANTIZE = "auto"
        if a.profile:
            for name in ("hb Linear8bit", "hb Linear4bit"):
                print_cprofile(lambda c=compiled[name]: c(x), 200, f"cProfile, 200 compiled calls of {name}")


if __name__ == "__main__":
    main()
