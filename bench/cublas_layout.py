"""Exploratory: would dequantizing into a (K, N) buffer (``x @ Wt``, cuBLAS "NN") or asking for the cuBLASLt
backend make the bf16 GEMM after the dequantize faster than ``F.linear(x, W)`` with W (N, K) (cuBLAS "TN", what bf16
and the library run)? The dequantize owns its output's layout, so a faster layout would be free. Not library code.

    python bench/cublas_layout.py [--json out.json]

Per FLUX/T5 shape (tokens x out x in): with and without bias, weights cold (copies cycled past the L2, as in a
model's step) and warm (one weight, as just written by a dequantize), under ``preferred_blas_library`` "cublas" and
"cublaslt". CUDA graph replay, ms per GEMM. Results: BENCHMARKS.md session 30 (no layout or backend was faster).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from benchutil import L2_BYTES, timed_graph

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 15360),
          (4096, 3072, 3072), (4096, 12288, 3072), (4096, 3072, 12288), (4096, 6144, 3072),
          (512, 3072, 3072), (512, 12288, 3072), (512, 3072, 12288), (512, 4096, 10240), (512, 10240, 4096)]


def row(M: int, N: int, K: int) -> dict:
    n = max(2, -(-3 * L2_BYTES // (N * K * 2)))  # weight copies: three times the L2
    ws = [(torch.randn(N, K, device="cuda") / K ** 0.5).bfloat16() for _ in range(n)]
    wts = [w.t().contiguous() for w in ws]
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, ws[0], b).float()
    if not torch.allclose(torch.addmm(b, x, wts[0]).float(), ref, atol=0.05, rtol=0.02):
        raise AssertionError(f"{M}x{N}x{K}: x @ Wt differs from F.linear(x, W)")
    r = {"M": M, "N": N, "K": K}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        r[f"NT_{lib}"] = timed_graph(lambda: [F.linear(x, w, b) for w in ws]) / n
        r[f"NN_{lib}"] = timed_graph(lambda: [torch.addmm(b, x, w) for w in wts]) / n
        r[f"NT_warm_{lib}"] = timed_graph(lambda: F.linear(x, ws[0], b))
        r[f"NN_warm_{lib}"] = timed_graph(lambda: torch.addmm(b, x, wts[0]))
        r[f"NT_nobias_{lib}"] = timed_graph(lambda: [F.linear(x, w) for w in ws]) / n
        r[f"NN_nobias_{lib}"] = timed_graph(lambda: [x @ w for w in wts]) / n
    torch.backends.cuda.preferred_blas_library("cublas")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for M, N, K in SHAPES:
        r = row(M, N, K)
        rows.append(r)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
