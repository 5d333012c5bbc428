"""Per layer: bf16 vs halfbyte NF4 (bitsandbytes' numbers) vs halfbyte NF4 in the opt-in fp8 compute, one GPU.

    python bench/fp8_layers.py [--mnk M,N,K ...]

For each FLUX/T5 layer shape (tokens x out x in): bf16 ``F.linear``; bitsandbytes' NF4 ``Linear4bit`` (bf16
compute; when installed); halfbyte's ``Linear4bit`` (NF4, blocksize 64, plain absmax) as it runs by default
(dequantize + cuBLAS over 64 tokens); the same layer after ``halfbyte.set_fp8_compute``, and that call's three
parts alone: the activations' row quantization, the weight's decode to e4m3, cuBLAS's row-wise scaled matmul. CUDA
graph replay, ms (``benchutil.timed_graph``). Also the fp8 output's error against the exact float64 layer
(relative Frobenius norm), beside the default path's.
"""

import argparse
import sys
from pathlib import Path

import torch
from benchutil import timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402
from halfbyte.kernels import fp8 as k8  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 15360), (4608, 9216, 3072),
          (4096, 3072, 3072), (4096, 12288, 3072), (512, 12288, 3072), (512, 3072, 3072), (512, 10240, 4096),
          (512, 4096, 10240)]


def rel(out, exact):
    return ((out.double() - exact).norm() / exact.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnk", nargs="*", default=[])
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in t.split(",")) for t in a.mnk] or SHAPES
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes "
          f"{getattr(bnb, '__version__', '-')}")
    print("| M x N x K | bf16 | bnb NF4 | hb NF4 | hb NF4 fp8 (vs bf16) | x quant | W decode | scaled mm | "
          "err NF4 / NF4 fp8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for M, N, K in shapes:
            print(row(M, N, K), flush=True)


def row(M: int, N: int, K: int) -> str:
    lin = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
    lin.weight.normal_(0, K ** -0.5)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    t_bf = timed_graph(lambda: lin(x))
    t_bnb = float("nan")
    if bnb is not None:
        qb = bnb.nn.Linear4bit(K, N, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        qb.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=False).cuda()
        qb.bias = lin.bias
        t_bnb = timed_graph(lambda: qb(x))
    q = halfbyte.Linear4bit.from_linear(lin, quant_type="nf4")
    q(x)  # binds the plan
    t_hb = timed_graph(lambda: q(x))
    out_hb = q(x)
    halfbyte.set_fp8_compute(q)
    t_fp8 = timed_graph(lambda: q(x))
    out_fp8 = q(x)
    stats = q.quant_stats()
    t_xq = timed_graph(lambda: k8.quantize_rows_fp8(x))
    t_wd = timed_graph(lambda: k8.dequantize_4bit_fp8(q.weight, *stats, 64, "nf4", N, K))
    x8, sx = k8.quantize_rows_fp8(x)
    w8, sw = k8.dequantize_4bit_fp8(q.weight, *stats, 64, "nf4", N, K)
    t_mm = timed_graph(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx.unsqueeze(1), scale_b=sw.unsqueeze(0),
                                                bias=lin.bias, out_dtype=torch.bfloat16))
    W = q.dequantize(torch.float32).double()
    exact = x.double() @ W.T + lin.bias.double()
    return (f"| {M}x{N}x{K} | {t_bf:.4f} | {t_bnb:.4f} | {t_hb:.4f} | {t_fp8:.4f} ({t_fp8 / t_bf:.2f}x) | "
            f"{t_xq:.4f} | {t_wd:.4f} | {t_mm:.4f} | {rel(out_hb, exact):.5f} / {rel(out_fp8, exact):.4f} |")


if __name__ == "__main__":
    main()
