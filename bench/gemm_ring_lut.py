"""The fused 4-bit GEMM's two decodes, one GPU: ``prmt`` register tables (19 ``prmt`` per 8 weights) against the
shared-memory byte table (``gemm_ring.LUT_TILES``: one lookup per 2 weights), per tile height.

    python bench/gemm_ring_lut.py [--shapes NxK ...] [--tokens M ...] [--json out.json]

Per weight and token count: bf16 ``F.linear``, then ``RingGemm`` with the call's tile height (``tile_tokens``; 256-
token tiles also at 3 stages, the depth that leaves room for the table beside a 256-token ring) decoded each way.
The byte table must give the bits of the ``prmt`` decode (same products, same order): each pair is checked with
``torch.equal``. CUDA graph replay over weight copies cycled past the L2, us per call.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from benchutil import ring_copies, timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halfbyte.kernels import gemm_ring  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (3072, 12288), (12288, 3072)]
TOKENS = [32, 64, 128, 256, 512, 4608]


def configured(gemms, lut: bool, stages: int):
    """A call of the ``gemms`` with the decode and ring depth set (module state, restored after each call; each
    ``RingGemm``'s bound launches dropped: they are not keyed by the ring depth)."""
    def call(g, x, bias):
        saved = gemm_ring.LUT_TILES, gemm_ring.STAGES
        gemm_ring.LUT_TILES = frozenset((64, 128, 256)) if lut else frozenset()
        gemm_ring.STAGES = stages
        try:
            return g(x, bias)
        finally:
            gemm_ring.LUT_TILES, gemm_ring.STAGES = saved
    for g in gemms:
        g._bound.clear()
    return call


def shape_rows(N: int, K: int, tokens, dtype=torch.bfloat16) -> list[dict]:
    copies, lins, layers, gemms = ring_copies(N, K, dtype)
    rows = []
    for M in tokens:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        bt = gemm_ring.tile_tokens(M)
        r = {"N": N, "K": K, "M": M, "tile": bt, "bf16": timed_graph(lambda: [lin(x) for lin in lins]) / copies}
        pairs = [(4, 4)] if bt < 256 else [(4, 3), (3, 3)]  # (prmt stages, table stages)
        for ps, ls in pairs:
            outs = {}
            for name, lut, st in (("prmt", False, ps), ("lut", True, ls)):
                call = configured(gemms, lut, st)
                outs[name] = call(gemms[0], x, layers[0].bias)
                r[f"{name}{st}"] = timed_graph(lambda: [call(g, x, q.bias) for g, q in zip(gemms, layers)]) / copies
            r[f"same{ps}{ls}"] = bool(torch.equal(outs["prmt"], outs["lut"]))
        rows.append(r)
        cells = " ".join(f"{k} {v * 1e3:.1f}" for k, v in r.items() if isinstance(v, float))
        same = all(v for k, v in r.items() if k.startswith("same"))
        print(f"{M}x{N}x{K} (tile {bt}): {cells} us{'' if same else '  BITS DIFFER'}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--shapes", nargs="*", help="NxK")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--json")
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for N, K in shapes:
        rows += shape_rows(N, K, a.tokens, getattr(torch, a.dtype))
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
