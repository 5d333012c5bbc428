"""Per layer: the fused 4-bit GEMM (``halfbyte.kernels.gemm_ring``) against dequantize + cuBLAS, bf16 and
bitsandbytes, one GPU.

    python bench/gemm_ring.py [--mnk M,N,K ...] [--sweep] [--nested] [--dtype float16] [--json out.json]
    python bench/gemm_ring.py --splits [--mnk M,N,K ...] [--json out.json]

For each shape (tokens x out x in; default: the FLUX/T5 layers over 64 tokens, ``--sweep`` adds token counts at two
widths): bf16 ``F.linear``; bitsandbytes' NF4 ``Linear4bit`` (bf16 compute, plain absmax; when installed);
halfbyte's dequantize + cuBLAS (``kernels.fourbit.dequantize`` into bf16, then ``F.linear``: the path the library
took before); the fused kernel alone (``RingGemm``); halfbyte's ``Linear4bit`` as routed (``gemm_ring.wanted``).
CUDA graph replay, ms (``benchutil.timed_graph``). Every fused output is checked against the float64 product of
the dequantized weight within 2^-7 of |x| @ |W|^T + |bias| (the GPU tests' bound), and three calls must give the
same bits; the error column is each path's relative Frobenius error against that float64 product. ``--nested``:
double-quantized absmax in both libraries (bitsandbytes' ``compress_statistics=True``); the fused kernel then
decodes the absmax in its loader warps and must give the bits of the same weight with its absmax decoded to
float32, whose time the last column gives.

``--splits`` times the fused kernel alone under every split S of its tail tiles that gives each program at most
one piece, beside dequantize + cuBLAS and bf16, and marks the S that ``gemm_ring.schedule`` picks. Default shapes:
the token counts whose tiles leave SMs idle or end in a partial round at the FLUX/T5 widths.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from benchutil import timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402
from halfbyte.kernels import fourbit, gemm_ring  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 15360),
          (4096, 3072, 3072), (4096, 12288, 3072), (4096, 3072, 12288),
          (512, 3072, 3072), (512, 12288, 3072), (512, 3072, 12288),
          (512, 10240, 4096), (512, 4096, 10240), (512, 4096, 4096)]
SPLITS = [(600, 3072, 12288), (1024, 3072, 12288), (512, 3072, 12288), (512, 3072, 15360), (1536, 3072, 15360),
          (512, 12288, 3072), (1300, 12288, 3072), (1300, 3072, 12288), (512, 4096, 10240), (512, 10240, 4096),
          (512, 4096, 4096), (1024, 4096, 10240), (2048, 3072, 12288), (800, 4096, 4096)]
SWEEP = [(m, n, k) for n, k in ((12288, 3072), (3072, 3072)) for m in (65, 128, 256, 384, 1024, 2048, 8192)]


def rel(out, exact):
    return ((out.double() - exact).norm() / exact.norm()).item()


def row(M: int, N: int, K: int, nested: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict:
    lin = torch.nn.Linear(K, N, device="cuda", dtype=dtype)
    lin.weight.normal_(0, K ** -0.5)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    r = {"M": M, "N": N, "K": K, "bf16": timed_graph(lambda: lin(x))}
    if bnb is not None:
        qb = bnb.nn.Linear4bit(K, N, compute_dtype=dtype, quant_type="nf4", device="meta")
        qb.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=nested).cuda()
        qb.bias = lin.bias
        r["bnb"] = timed_graph(lambda: qb(x))
    q = halfbyte.Linear4bit.from_linear(lin, quant_type="nf4", double_quant=nested)
    data, (absmax, *stats) = q.weight.reshape(-1), q.quant_stats()
    bias = lin.bias.detach()

    def deq():
        W = fourbit.dequantize(data, absmax, *stats, 64, "nf4", N * K, dtype)
        return torch.nn.functional.linear(x, W.view(N, K), bias)

    r["deq+cublas"] = timed_graph(deq)
    fused = gemm_ring.RingGemm(data, absmax, N, K, "nf4", tuple(stats) if nested else None, dtype)
    r["fused"] = timed_graph(lambda: fused(x, bias))
    q(x)
    q(x)  # binds the plan
    r["routed"] = timed_graph(lambda: q(x))
    r["wanted"] = gemm_ring.wanted(M, N, K)
    W = q.dequantize(torch.float32).double()
    exact = x.double() @ W.T + bias.double()
    outs = [fused(x, bias) for _ in range(3)]
    bound = 2.0 ** -7 * (x.double().abs() @ W.abs().T + bias.double().abs()) + 1e-3
    r["ok"] = bool(((outs[0].double() - exact).abs() <= bound).all()) and all(torch.equal(outs[0], o) for o in outs)
    if nested:  # the bits of the same weight with its absmax decoded; its time with float32 absmax
        am = halfbyte.ops.decode_absmax(absmax, *stats)  # held: a RingGemm keeps addresses, not tensors
        plain = gemm_ring.RingGemm(data, am, N, K, "nf4", None, dtype)
        r["ok"] = r["ok"] and torch.equal(plain(x, bias), outs[0])
        r["fused_f32"] = timed_graph(lambda: plain(x, bias))
    r["err_deq"], r["err_fused"] = rel(deq(), exact), rel(outs[0], exact)
    return r


def splits_row(M: int, N: int, K: int) -> dict:
    """The fused kernel's time under each split S of the tail tiles, the schedule's pick, dequantize + cuBLAS."""
    lin = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
    lin.weight.normal_(0, K ** -0.5)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    q = halfbyte.Linear4bit.from_linear(lin, quant_type="nf4")
    data, (absmax, *stats) = q.weight.reshape(-1), q.quant_stats()
    bias = lin.bias.detach()
    W = q.dequantize(torch.float32).double()
    exact = x.double() @ W.T + bias.double()
    bound = 2.0 ** -7 * (x.double().abs() @ W.abs().T + bias.double().abs()) + 1e-3
    Wb = q.dequantize(torch.bfloat16)
    r = {"M": M, "N": N, "K": K, "deq+cublas": timed_graph(
        lambda: torch.nn.functional.linear(x, fourbit.dequantize(data, absmax, *stats, 64, "nf4", N * K,
                                                                  torch.bfloat16).view(N, K), bias)),
         "bf16": timed_graph(lambda: torch.nn.functional.linear(x, Wb, bias)), "S": {}, "ok": True}
    fused = gemm_ring.RingGemm(data, absmax, N, K, "nf4")
    n_tiles, k_steps = -(-M // gemm_ring.BT) * (N // gemm_ring.BN), K // 64
    r["tiles"], r["pick"] = n_tiles, gemm_ring.schedule(n_tiles, k_steps, fused.programs)[2]
    chosen = gemm_ring.schedule
    try:
        tail = n_tiles % fused.programs
        for S in gemm_ring.S_CHOICES:
            if S > 1 and (S > k_steps // 8 or tail * S > fused.programs):  # one piece per program
                continue
            gemm_ring.schedule = lambda n, k, p, S=S: (p if n >= p else n * S, n // p, S)
            outs = [fused(x, bias) for _ in range(2)]
            r["ok"] = r["ok"] and bool(((outs[0].double() - exact).abs() <= bound).all()) and torch.equal(*outs)
            r["S"][S] = timed_graph(lambda: fused(x, bias))
    finally:
        gemm_ring.schedule = chosen
    return r


def splits(shapes, out):
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fused kernel by split S of the tail tiles "
          f"(ms; * = schedule's pick)")
    print("| M x N x K | tiles | " + " | ".join(f"S={s}" for s in gemm_ring.S_CHOICES)
          + " | dequant + cuBLAS | bf16 | ok |")
    print("|---|---|" + "---|" * len(gemm_ring.S_CHOICES) + "---|---|---|")
    rows = []
    with torch.inference_mode():
        for M, N, K in shapes:
            r = splits_row(M, N, K)
            rows.append(r)
            cells = [(f"{r['S'][s]:.4f}" + ("*" if s == r["pick"] else "")) if s in r["S"] else "-"
                     for s in gemm_ring.S_CHOICES]
            print(f"| {M}x{N}x{K} | {r['tiles']} | " + " | ".join(cells)
                  + f" | {r['deq+cublas']:.4f} | {r['bf16']:.4f} | {'yes' if r['ok'] else 'NO'} |", flush=True)
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnk", nargs="*", default=[])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--nested", action="store_true", help="double-quantized absmax")
    ap.add_argument("--splits", action="store_true", help="the fused kernel under every split of its tail")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="float16: fp16 throughout (the bf16 column: fp16)")
    ap.add_argument("--json")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.splits:
        splits([tuple(int(v) for v in t.split(",")) for t in a.mnk] or SPLITS, a.json)
        return
    shapes = [tuple(int(v) for v in t.split(",")) for t in a.mnk] or SHAPES + (SWEEP if a.sweep else [])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes "
          f"{getattr(bnb, '__version__', '-')}{', double-quantized absmax' if a.nested else ''}")
    extra = " fused, float32 absmax |" if a.nested else ""
    print(f"| M x N x K | bf16 | bnb NF4 | dequant + cuBLAS | fused (vs d+c) | routed | ok | err d+c / fused |{extra}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if a.nested else ""))
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for M, N, K in shapes:
            r = row(M, N, K, a.nested, dtype)
            rows.append(r)
            print(f"| {M}x{N}x{K} | {r['bf16']:.4f} | {r.get('bnb', float('nan')):.4f} | {r['deq+cublas']:.4f} | "
                  f"{r['fused']:.4f} ({r['fused'] / r['deq+cublas']:.3f}) | {r['routed']:.4f}"
                  f"{' (fused)' if r['wanted'] else ''} | {'yes' if r['ok'] else 'NO'} | "
                  f"{r['err_deq']:.5f} / {r['err_fused']:.5f} |"
                  + (f" {r['fused_f32']:.4f} |" if a.nested else ""), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
