"""4-bit matmul of a few tokens (M = 2..64): the small-batch tensor-core kernel (``halfbyte.kernels.gemm_small``)
against dequantize + cuBLAS (what halfbyte ran before, and what bitsandbytes runs for M > 1), bitsandbytes'
``matmul_4bit`` and bf16 ``F.linear`` (graph replay, weight copies cycled past the L2, ms).

    python bench/gemm_small.py [--dtype bfloat16|float16] [--sweep] [--m 2 4 8 ...] [--json out.json]

``--sweep`` also times the launch shapes of ``CONFIGS`` (groups per K step, warps, programs per SM, tokens per
pass) at M = 8, 16, 32 and 64 and prints the best per shape. Every halfbyte result is checked against float64
``x @ (code * absmax).T`` within the 16-bit-input bound (2^-7 of ``|x| @ |W|.T``, twice tests/test_kernels.py's
GEMV bound for bf16).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import L2_BYTES, timed_graph  # noqa: E402

import halfbyte  # noqa: E402, F401  (registers the halfbyte:: ops)
from halfbyte.formats import fourbit as ref4  # noqa: E402
from halfbyte.kernels import gemm4bit, gemm_small  # noqa: E402
from halfbyte.kernels.fourbit import dequantize  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None

DEV = "cuda"
SHAPES = ((3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (3072, 15360), (10240, 4096), (4096, 10240))
CONFIGS = [(4, 4, 8, 32), (8, 4, 8, 32), (8, 4, 16, 32), (16, 4, 8, 32), (4, 2, 16, 32), (2, 2, 16, 32),
           (8, 8, 8, 32), (16, 8, 4, 32), (4, 4, 16, 32), (4, 4, 8, 16), (8, 4, 8, 16), (4, 4, 16, 16), (4, 4, 8, 8),
           (8, 4, 8, 8)]


def weights(N: int, K: int, dtype: torch.dtype):
    """Enough NF4 copies (blocksize 64, float32 absmax) of random (N, K) weights to pass the L2 three times, with
    the bf16 originals: [(packed uint8 flat, absmax, w)]."""
    copies = max(2, -(-3 * L2_BYTES // (N * K // 2)))
    ws = []
    for _ in range(copies):
        w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dtype)
        p, a = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
        ws.append((p.reshape(-1).view(torch.uint8), a, w))
    return ws


def checker(ws, x: torch.Tensor, N: int, K: int):
    deq = ref4.dequantize_4bit(ws[0][0], ws[0][1], 64, "nf4", (N, K), torch.float32).double()
    exact = x.double() @ deq.T
    bound = (x.double().abs() @ deq.abs().T) * 2.0 ** -7 + 1e-6

    def check(name: str, out: torch.Tensor) -> bool:
        err = (out.double() - exact).abs()
        ok = bool((err <= bound).all())
        if not ok:
            print(f"  {name}: WRONG, max err / bound {float((err / bound).max()):.2f}")
        return ok

    return check


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--m", type=int, nargs="*", default=[2, 4, 8, 16, 32, 64])
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bitsandbytes {getattr(bnb, '__version__', None)}, {dt}")
    results = []
    for N, K in SHAPES:
        ws = weights(N, K, dt)
        n = len(ws)
        bq = ([bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
               for _, _, w in ws] if bnb is not None else None)
        for M in args.m:
            x = torch.randn(M, K, device=DEV, dtype=dt)
            check = checker(ws, x, N, K)
            row = {"N": N, "K": K, "M": M}
            row["bf16"] = timed_graph(lambda: [torch.nn.functional.linear(x, w) for _, _, w in ws]) / n  # noqa: B023

            def deq(pa):
                W = dequantize(pa[0], pa[1], None, None, None, 64, "nf4", N * K, dt)  # noqa: B023
                return torch.nn.functional.linear(x, W.view(N, K))  # noqa: B023
            row["deq_ok"] = check("deq", deq(ws[0]))
            row["deq+cublas"] = timed_graph(lambda: [deq(pa) for pa in ws]) / n  # noqa: B023

            def small(pa, cfg=None):
                return gemm_small.mm_small(x, pa[0], pa[1], None, None, None, None, N, K, 64, "nf4", cfg)  # noqa: B023
            row["small_ok"] = check("small", small(ws[0]))
            row["small"] = timed_graph(lambda: [small(pa) for pa in ws]) / n  # noqa: B023
            lib = gemm4bit.gemm_4bit(x, ws[0][0], ws[0][1], None, None, None, None, [N, K], 64, "nf4")
            row["lib_ok"] = check("lib", lib)
            if bq is not None:
                row["bnb"] = timed_graph(
                    lambda: [bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in bq]) / n  # noqa: B023
            if args.sweep and M in (8, 16, 32, 64):
                best, seen = None, set()
                for cfg in CONFIGS:
                    grid, steps, _, kw = gemm_small.small_launch(N, K, M, 64, False, False, x.device, dt, cfg)
                    shape = (grid, steps, kw["TT"], kw["NG"], kw["num_warps"])
                    if shape in seen:  # tokens per pass above M: the same launch as a config already timed
                        continue
                    seen.add(shape)
                    try:
                        ok = check(f"small {cfg}", small(ws[0], cfg))
                        ms = timed_graph(lambda: [small(pa, cfg) for pa in ws]) / n  # noqa: B023
                    except Exception as e:  # noqa: BLE001
                        print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
                        continue
                    row["/".join(map(str, cfg))] = ms
                    if ok and (best is None or ms < best[0]):
                        best = (ms, cfg)
                row["best"] = best
            nbytes = N * K // 2 + N * K // 64 * 4
            cells = " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float) and "/" not in k)
            print(f"{M}x{K}x{N}: {cells}  small {nbytes / row['small'] / 1e9:.2f} TB/s "
                  f"deq/small {row['deq+cublas'] / row['small']:.2f} bf16/small {row['bf16'] / row['small']:.2f}"
                  + (f" bnb/small {row['bnb'] / row['small']:.2f}" if "bnb" in row else "")
                  + (f" best {row['best']}" if row.get("best") else ""), flush=True)
            if args.sweep and M in (8, 16, 32, 64):
                print("   sweep:", " ".join(f"{k}={v:.4f}" for k, v in row.items() if "/" in k))
            results.append(row)
        ws = bq = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
