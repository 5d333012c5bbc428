"""Per-layer timings: halfbyte's Triton kernels vs bf16 ``F.linear`` vs bitsandbytes (CUDA backend), one GPU.

    python bench/kernel_bench.py [--sweep] [--json results.json]

Layer shapes are FLUX.1 / T5-XXL linears (docs: baseline-h100.md). Every ratio in a table comes from this one
process on this one card; absolute times from another run or card are not comparable. Times are medians of
``triton.testing.do_bench``. At M <= 64 the layer reads its weight once, and a 4-bit weight (<= 40 MB) would stay
in the 50 MB L2 between repetitions, so each repetition cycles through enough weight copies to exceed the L2 (and
the time is divided by the number of copies); "graph" columns replay a CUDA graph of those calls, removing the
Python/launch overhead that eager mode pays per layer.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402
from halfbyte.kernels import fourbit as k4  # noqa: E402
from halfbyte.kernels import gemm4bit, gemv  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:  # the table then lacks the bitsandbytes columns
    bnb = None

DEV = "cuda"
DT = torch.bfloat16
L2_BYTES = 50 * 2**20
# (M, N, K, name): N = out_features, K = in_features
SMALL = [(1, 18432, 3072, "FLUX AdaLN"), (1, 14336, 4096, "decode"), (1, 3072, 3072, "FLUX attn"),
         (1, 12288, 3072, "FLUX MLP up"), (1, 10240, 4096, "T5 MLP up"), (16, 14336, 4096, "small batch"),
         (16, 12288, 3072, "FLUX MLP up"), (64, 12288, 3072, "FLUX MLP up")]
LARGE = [(4096, 3072, 3072, "FLUX attn"), (4096, 12288, 3072, "FLUX MLP up"), (4096, 3072, 12288, "FLUX MLP down"),
         (4096, 3072, 15360, "FLUX proj_out"), (512, 10240, 4096, "T5 MLP up"), (512, 4096, 10240, "T5 MLP down")]


def timed(fn, graph: bool = False) -> float:
    """Median milliseconds of ``fn()``; with ``graph`` the replay of a CUDA graph capturing one call."""
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    a = torch.empty(2**28, dtype=torch.float32, device=DEV)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / ms / 1e9  # TB/s, bytes read + written


class Layer:
    """One weight in every format under test: bf16, halfbyte NF4 (plain and double-quantized), bitsandbytes NF4."""

    def __init__(self, N: int, K: int):
        w = torch.randn(N, K, device=DEV) / K**0.5
        self.N, self.K = N, K
        self.w16 = w.to(DT)
        self.bias = torch.randn(N, device=DEV, dtype=DT)
        p, qs = halfbyte.functional.quantize_4bit(self.w16, 64, False, "nf4")
        self.hb = (p, qs)
        self.hb_dq = halfbyte.functional.quantize_4bit(self.w16, 64, True, "nf4")
        if bnb is not None:
            self.bnb = bnb.functional.quantize_4bit(self.w16, blocksize=64, compress_statistics=False,
                                                    quant_type="nf4")

    def hb_call(self, x, dq=False):
        p, qs = self.hb_dq if dq else self.hb
        return halfbyte.functional.gemm_4bit(x, p, qs, self.bias)

    def bnb_call(self, x):
        p, qs = self.bnb
        return bnb.matmul_4bit(x, p.t(), bias=self.bias, quant_state=qs)

    def packed_bytes(self, dq=False) -> int:
        p, qs = self.hb_dq if dq else self.hb
        b = p.numel() + qs.absmax.numel() * qs.absmax.element_size()
        return b + (qs.nested_absmax.numel() * 4 if dq else 0)


def cycled(layers, call):
    """One call per weight copy (so the weights stream from HBM, not L2)."""

    def run():
        for layer in layers:
            call(layer)

    return run


def bench_small(rows, out):
    print("\n## 4-bit NF4, small M (bf16 activations, bias); ms per layer, median; TB/s = 4-bit weight bytes / time")
    print("| M x K x N | layer | bf16 | bnb nf4 | hb nf4 | hb nf4+dq | hb graph | bnb graph | hb TB/s (graph) "
          "| hb vs bf16 | hb vs bnb |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for M, N, K, name in rows:
        copies = max(2, -(-3 * L2_BYTES // (N * K // 2)))
        layers = [Layer(N, K) for _ in range(copies)]
        x = torch.randn(M, K, device=DEV, dtype=DT)
        r = {"M": M, "N": N, "K": K, "layer": name}
        r["bf16"] = timed(cycled(layers, lambda ly: torch.nn.functional.linear(x, ly.w16, ly.bias))) / copies
        r["hb"] = timed(cycled(layers, lambda ly: ly.hb_call(x))) / copies
        r["hb_dq"] = timed(cycled(layers, lambda ly: ly.hb_call(x, True))) / copies
        r["hb_graph"] = timed(cycled(layers, lambda ly: ly.hb_call(x)), graph=True) / copies
        r["hb_tbs"] = layers[0].packed_bytes() / r["hb_graph"] / 1e9
        if bnb is not None:
            r["bnb"] = timed(cycled(layers, lambda ly: ly.bnb_call(x))) / copies
            try:
                r["bnb_graph"] = timed(cycled(layers, lambda ly: ly.bnb_call(x)), graph=True) / copies
            except Exception as e:  # noqa: BLE001 - a capture failure only loses a column
                print(f"bnb graph capture failed: {e!r}")
        # correctness spot check against the same weight dequantized (reference numerics)
        W = halfbyte.functional.dequantize_4bit(*layers[0].hb, dtype=DT)
        ref = torch.nn.functional.linear(x, W, layers[0].bias)
        err = (layers[0].hb_call(x).float() - ref.float()).norm() / ref.float().norm()
        r["rel_err_vs_dequant_linear"] = err.item()
        out.append(r)
        f = lambda k: f"{r[k]:.4f}" if k in r else "-"  # noqa: E731
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"  # noqa: E731
        print(f"| {M}x{K}x{N} | {name} | {f('bf16')} | {f('bnb')} | {f('hb')} | {f('hb_dq')} | {f('hb_graph')} | "
              f"{f('bnb_graph')} | {r['hb_tbs']:.2f} | {ratio('hb', 'bf16')} | {ratio('bnb', 'hb')} faster |")
        del layers
        torch.cuda.empty_cache()


def bench_large(rows, out):
    print("\n## 4-bit NF4, large M: dequantize (nested absmax fused) + cuBLAS; ms per layer, median")
    print("| M x K x N | layer | bf16 | bnb nf4 | hb nf4 | hb nf4+dq | bnb dequant | hb dequant | hb dequant+dq "
          "| hb vs bf16 | hb vs bnb |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for M, N, K, name in rows:
        layer = Layer(N, K)
        x = torch.randn(M, K, device=DEV, dtype=DT)
        r = {"M": M, "N": N, "K": K, "layer": name}
        r["bf16"] = timed(lambda: torch.nn.functional.linear(x, layer.w16, layer.bias))
        r["hb"] = timed(lambda: layer.hb_call(x))
        r["hb_dq"] = timed(lambda: layer.hb_call(x, True))
        p, qs = layer.hb
        pd, qd = layer.hb_dq
        r["hb_dequant"] = timed(lambda: k4.dequantize(p, qs.absmax, None, None, None, 64, "nf4", N * K, DT))
        r["hb_dequant_dq"] = timed(lambda: k4.dequantize(pd, qd.absmax, qd.nested_absmax, qd.nested_code,
                                                         qd.offset, 64, "nf4", N * K, DT))
        if bnb is not None:
            r["bnb"] = timed(lambda: layer.bnb_call(x))
            r["bnb_dequant"] = timed(lambda: bnb.functional.dequantize_4bit(*layer.bnb))
        out.append(r)
        f = lambda k: f"{r[k]:.4f}" if k in r else "-"  # noqa: E731
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"  # noqa: E731
        print(f"| {M}x{K}x{N} | {name} | {f('bf16')} | {f('bnb')} | {f('hb')} | {f('hb_dq')} | {f('bnb_dequant')} | "
              f"{f('hb_dequant')} | {f('hb_dequant_dq')} | {ratio('hb', 'bf16')} | {ratio('bnb', 'hb')} faster |")


def bench_sweep(out):
    print("\n## GEMV (M = 1) launch-config sweep (graph replay, ms)")
    for N, K in ((18432, 3072), (14336, 4096), (3072, 3072), (12288, 3072)):
        copies = max(2, -(-3 * L2_BYTES // (N * K // 2)))
        layers = [Layer(N, K) for _ in range(copies)]
        x = torch.randn(1, K, device=DEV, dtype=DT)
        cfgs = [gemv.Config(bn, ks, w) for bn, ks, w in ((16, 256, 4), (16, 512, 4), (16, 256, 8), (8, 512, 4),
                                                              (32, 128, 4), (32, 256, 8), (64, 128, 4))]
        res = []
        for cfg in cfgs:
            def call(ly, cfg=cfg):
                p, qs = ly.hb
                gemm4bit.gemv(x, p, qs.absmax, None, None, None, ly.bias, N, K, 64, "nf4", config=cfg)
            try:
                res.append((timed(cycled(layers, call), graph=True) / copies, cfg))
            except Exception as e:  # noqa: BLE001 - e.g. a config over the register or shared-memory limit
                print(f"  {cfg}: failed {type(e).__name__}")
        res.sort(key=lambda t: t[0])
        nbytes = layers[0].packed_bytes()
        print(f"N={N} K={K}: default {gemv.default_config(N, K)}")
        for ms, cfg in res[:6]:
            print(f"  {ms:.4f} ms  {nbytes / ms / 1e9:.2f} TB/s  {cfg}")
        out.append({"N": N, "K": K, "best": [(ms, vars(c)) for ms, c in res]})
        del layers
        torch.cuda.empty_cache()


def bench_int8_sweep(out):
    """Launch shapes of the fused int8 GEMM (quantized activations given), against cuBLAS ``_int_mm`` alone."""
    from halfbyte.kernels import int8_mm as km

    print("\n## int8 GEMM + fused epilogue, launch-config sweep (ms)")
    cands = [km.MMConfig(*c) for c in ((128, 128, 128, 8, 8, 4), (128, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4),
                                       (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4),
                                       (64, 128, 128, 8, 4, 4), (128, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4),
                                       (128, 192, 128, 8, 8, 3), (128, 128, 256, 8, 8, 3))]
    for M, N, K in ((4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 15360),
                    (512, 10240, 4096), (512, 4096, 10240), (16, 12288, 3072)):
        CA = torch.randint(-127, 128, (M, K), device=DEV, dtype=torch.int8)
        CB = torch.randint(-127, 128, (N, K), device=DEV, dtype=torch.int8)
        SCA = torch.rand(M, device=DEV) + 0.5
        SCB = torch.rand(N, device=DEV) + 0.5
        bias = torch.randn(N, device=DEV, dtype=DT)
        r = {"M": M, "N": N, "K": K}
        Mp = max(M, 32)
        CAp = torch.cat([CA, CA.new_zeros(Mp - M, K)]) if Mp > M else CA
        r["int_mm"] = timed(lambda: torch._int_mm(CAp, CB.t()))
        w = torch.randn(N, K, device=DEV, dtype=DT)
        x = torch.randn(M, K, device=DEV, dtype=DT)
        r["bf16"] = timed(lambda: torch.nn.functional.linear(x, w, bias))
        res = []
        for cfg in cands:
            try:
                res.append((timed(lambda cfg=cfg: km.int8_mm(CA, CB, SCA, SCB, bias, DT, cfg)), cfg))
            except Exception as e:  # noqa: BLE001 - over the shared-memory or register limit
                print(f"  {cfg}: failed {type(e).__name__}")
        res.sort(key=lambda t: t[0])
        r["best"] = [(ms, vars(c)) for ms, c in res]
        r["default"] = timed(lambda: km.int8_mm(CA, CB, SCA, SCB, bias, DT))
        print(f"M={M} N={N} K={K}: bf16 {r['bf16']:.4f}  _int_mm {r['int_mm']:.4f}  default {r['default']:.4f} "
              f"({2 * M * N * K / r['default'] / 1e9:.0f} TOP/s)")
        for ms, cfg in res[:4]:
            print(f"  {ms:.4f} ms {2 * M * N * K / ms / 1e9:.0f} TOP/s {cfg}")
        out.append(r)


def bench_overhead(out):
    """Host-side cost per call (eager): the op, its CUDA kernel without the dispatcher, a bare Triton launch."""
    print("\n## Eager host overhead per call, tiny GEMV (N=K=256, M=1), microseconds")
    layer = Layer(256, 256)
    x = torch.randn(1, 256, device=DEV, dtype=DT)
    p, qs = layer.hb
    calls = {
        "torch.ops.halfbyte.gemm_4bit": lambda: layer.hb_call(x),
        "kernels.gemm4bit.gemm_4bit (no dispatcher)": lambda: gemm4bit.gemm_4bit(
            x, p, qs.absmax, None, None, None, layer.bias, [256, 256], 64, "nf4"),
        "torch.nn.functional.linear bf16": lambda: torch.nn.functional.linear(x, layer.w16, layer.bias),
    }
    lin = torch.nn.Linear(256, 256, device=DEV, dtype=DT)
    hb4 = halfbyte.Linear4bit.from_linear(lin)
    hb8 = halfbyte.Linear8bit.from_linear(lin, threshold=6.0)
    x16 = torch.randn(16, 256, device=DEV, dtype=DT)
    calls["halfbyte.Linear4bit module, M=1"] = lambda: hb4(x)
    calls["halfbyte.Linear4bit module, M=16"] = lambda: hb4(x16)

    n = 256 * 256
    deq_args = (p, qs.absmax, None, None, None, 64, "nf4", n, DT)
    calls["kernels.fourbit.dequantize (cached launcher)"] = lambda: k4.dequantize(*deq_args)

    def triton_launch():
        out = torch.empty(n, dtype=DT, device=DEV)
        rows = k4._rows(64)
        k4._dequant_kernel[(triton.cdiv(n // 64, rows),)](
            p, qs.absmax, qs.absmax, qs.absmax, qs.absmax, k4.code_table("nf4", out.device), out, n,
            BLOCKSIZE=64, ROWS=rows, NESTED=False, USE_PTX=True, num_warps=4)

    calls["same dequantize through triton's own launch"] = triton_launch
    calls["halfbyte.Linear8bit module, M=16 (threshold 6)"] = lambda: hb8(x16)
    calls["nn.Linear bf16 module, M=16"] = lambda: lin(x16)
    if bnb is not None:
        calls["bnb.matmul_4bit"] = lambda: layer.bnb_call(x)
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(1000):
            fn()
        us = (time.perf_counter() - t0) / 1000 * 1e6
        torch.cuda.synchronize()
        out.append({"call": name, "us": us})
        print(f"| {name} | {us:.1f} |")


def bench_int8(out):
    print("\n## LLM.int8() (threshold 6, bf16 activations with 4 outlier columns), ms")
    print("| M x K x N | bf16 | bnb int8 | hb int8 | hb quant alone | bnb quant alone | hb vs bf16 | hb vs bnb |")
    print("|---|---|---|---|---|---|---|---|")
    for M, N, K, name in [(4096, 3072, 3072, "attn"), (4096, 12288, 3072, "MLP up"), (512, 10240, 4096, "T5 up")]:
        w = (torch.randn(N, K, device=DEV) / K**0.5).to(DT)
        bias = torch.randn(N, device=DEV, dtype=DT)
        x = torch.randn(M, K, device=DEV, dtype=DT)
        x[:, :4] *= 8
        CB, SCB, _ = torch.ops.halfbyte.int8_vectorwise_quant(w, 0.0)
        r = {"M": M, "N": N, "K": K, "layer": name}
        r["bf16"] = timed(lambda: torch.nn.functional.linear(x, w, bias))
        r["hb"] = timed(lambda: torch.ops.halfbyte.int8_mixed_mm(x, CB, SCB, bias, 6.0))
        r["hb_quant"] = timed(lambda: torch.ops.halfbyte.int8_vectorwise_quant(x, 6.0))
        if bnb is not None:
            lin = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False, threshold=6.0)
            lin.load_state_dict({"weight": w.cpu(), "bias": bias.cpu()})
            lin = lin.to(DEV)
            r["bnb"] = timed(lambda: lin(x))
            x16 = x.half()
            r["bnb_quant"] = timed(lambda: bnb.functional.int8_vectorwise_quant(x16, 6.0))
        out.append(r)
        f = lambda k: f"{r[k]:.4f}" if k in r else "-"  # noqa: E731
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"  # noqa: E731
        print(f"| {M}x{K}x{N} | {f('bf16')} | {f('bnb')} | {f('hb')} | {f('hb_quant')} | {f('bnb_quant')} | "
              f"{ratio('hb', 'bf16')} | {ratio('bnb', 'hb')} faster |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time launch configs of the fused kernels")
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--only", nargs="*", default=["overhead", "small", "large", "int8"])
    args = ap.parse_args()
    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "bitsandbytes": getattr(bnb, "__version__", None), "copy_TBps": copy_bandwidth()}
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    results = {"info": info}
    with torch.no_grad():
        for name, fn in (("sweep", bench_sweep), ("int8_sweep", bench_int8_sweep), ("overhead", bench_overhead),
                         ("small", bench_small), ("large", bench_large), ("int8", bench_int8)):
            if name in ("sweep", "int8_sweep") and not args.sweep or "sweep" not in name and name not in args.only:
                continue
            results[name] = []
            if name in ("small", "large"):
                fn(SMALL if name == "small" else LARGE, results[name])
            else:
                fn(results[name])
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
