"""Few tokens (16-128): the fused 4-bit GEMM (``kernels.gemm_ring``) with 64-, 128- and 256-token tiles against the
small-batch kernel (``kernels.gemm_small``), bf16 and bitsandbytes, one GPU.

    python bench/gemm_ring_tiles.py [--tokens 16 24 32 ...] [--shapes NxK ...] [--all-tiles] [--dtype float16]
                                    [--json out.json]

Per weight (default: LLaMA-7B/-3-8B and FLUX widths) and token count: bf16 ``F.linear``; bitsandbytes' NF4
``Linear4bit`` (bf16 compute; when installed); the small-batch kernel where it serves (up to 64 tokens); the fused
kernel with each tile height that holds the tokens (``--all-tiles``: every height, a call then spanning several token
tiles; ``RingGemm`` with ``tile_tokens`` pinned); halfbyte's ``Linear4bit`` as routed. ``--dtype float16``: fp16
activations and weights throughout (the "bf16" column is then fp16 cuBLAS). CUDA graph replay over weight copies
cycled past the L2 (a model's layers are), us per call. Each fused output is checked against the small-batch kernel's
(or, past 64 tokens, the 256-token tiles') within 2^-7 of |x| @ |W|^T.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from benchutil import ring_copies, timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halfbyte.kernels import gemm_ring, gemm_small  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (3072, 12288), (12288, 3072)]
TOKENS = [16, 24, 32, 48, 64, 96, 128]


def pinned(bt: int):
    """``RingGemm`` calls with ``bt``-token tiles whatever the token count (the route's ``tile_tokens`` swapped; the
    launch's cached x / out descriptors dropped, as they are keyed by token count, which decides the tile)."""
    def call(gemm, x, bias):
        gemm._calls.clear()
        saved = gemm_ring.tile_tokens
        gemm_ring.tile_tokens = lambda M: bt
        try:
            return gemm(x, bias)
        finally:
            gemm_ring.tile_tokens = saved
    return call


def shape_rows(N: int, K: int, tokens, all_tiles: bool = False, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    copies, lins, layers, gemms = ring_copies(N, K, dtype)
    qbs = []
    if bnb is not None:
        for lin in lins:
            qb = bnb.nn.Linear4bit(K, N, compute_dtype=dtype, quant_type="nf4", device="meta")
            qb.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4").cuda()
            qb.bias = lin.bias
            qbs.append(qb)
    rows = []
    for M in tokens:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        r = {"N": N, "K": K, "M": M, "tile": gemm_ring.tile_tokens(M)}
        r["bf16"] = timed_graph(lambda: [lin(x) for lin in lins]) / copies
        if qbs:
            r["bnb"] = timed_graph(lambda: [qb(x) for qb in qbs]) / copies
        W = layers[0].dequantize(torch.float32).double()
        bound = 2.0 ** -7 * (x.double().abs() @ W.abs().T + lins[0].bias.double().abs()) + 1e-3
        ref = None
        if gemm_small.small_supported(M, N, K, x.dtype, 64, x, layers[0].weight.reshape(-1).view(torch.uint8)):
            def small(q, x=x):
                absmax, *stats = q.quant_stats()
                return gemm_small.mm_small(x, q.weight.reshape(-1).view(torch.uint8), absmax, *stats, q.bias, N, K,
                                           64, "nf4")
            r["small"] = timed_graph(lambda: [small(q) for q in layers]) / copies
            ref = small(layers[0])
        r["ok"] = True
        for bt in (64, 128, 256):
            if bt < M and not all_tiles:
                continue
            call = pinned(bt)
            out = call(gemms[0], x, layers[0].bias)
            ref = out if ref is None else ref
            r["ok"] = r["ok"] and bool(((out.double() - ref.double()).abs() <= 2 * bound).all())
            r[f"tiles{bt}"] = timed_graph(lambda: [call(g, x, q.bias) for g, q in zip(gemms, layers)]) / copies
        with torch.inference_mode():
            for q in layers:  # the plans: built at a layer's first call, outside the capture
                q(x)
            r["routed"] = timed_graph(lambda: [q(x) for q in layers]) / copies
        rows.append(r)
        cells = " ".join(f"{k} {v * 1e3:.1f}" for k, v in r.items() if isinstance(v, float))
        print(f"{M}x{N}x{K} (tile {r['tile']}): {cells} us{'' if r['ok'] else '  WRONG'}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--shapes", nargs="*", help="NxK")
    ap.add_argument("--all-tiles", action="store_true", help="also tile heights below the token count")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--json")
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    dtype = getattr(torch, a.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"bitsandbytes {getattr(bnb, '__version__', '-')}")
    rows = []
    for N, K in shapes:
        rows += shape_rows(N, K, a.tokens, a.all_tiles, dtype)
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
