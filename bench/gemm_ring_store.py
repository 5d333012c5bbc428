"""The fused 4-bit GEMM's epilogue and ring depth at 256-token tiles, one GPU: the output tile stored whole, with a
3-stage ring beside the byte table, or in two token halves (``gemm_ring.HALF_STORE_TILES``: 32 KB less epilogue
shared memory), with 4 stages.

    python bench/gemm_ring_store.py [--mnk MxNxK ...] [--json out.json]

Per call: bf16 ``F.linear``, then ``RingGemm`` in each variant (s3: whole boxes, 3 stages; s4: half boxes, 4
stages; smaller tiles always have 4 stages and whole boxes: s3 alone there). Every variant must give the first's
bits (``torch.equal``: the same products in the same order). CUDA graph replay over weight copies cycled past the
L2, us per call; the variants run in turn, then again in reverse order, and each cell is the mean of its two.
Session 33 also timed one wgmma left in flight while the next step decodes (``warpgroup_mma_wait(1)``, with both
depths): no faster, not kept (BENCHMARKS.md).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from benchutil import ring_copies, timed_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halfbyte.kernels import gemm_ring  # noqa: E402

CALLS = ["4608x3072x3072", "4608x12288x3072", "4608x3072x12288", "4608x3072x15360", "4096x12288x3072",
         "4096x3072x12288", "4096x3072x3072", "2048x12288x3072", "1024x12288x3072", "640x14336x4096",
         "512x12288x3072", "512x3072x12288", "512x3072x3072", "512x10240x4096", "512x4096x10240", "512x14336x4096",
         "256x12288x3072", "128x14336x4096", "128x4096x4096", "64x14336x4096", "64x4096x4096", "32x12288x3072"]
#: name -> HALF_STORE_TILES
VARIANTS = {"s3": (), "s4": (256,)}


def configured(half):
    """A call of a ``RingGemm`` with the variant's setting (module state, restored after each call; each
    ``RingGemm``'s bound launches and descriptors are kept by it)."""
    def call(g, x, bias):
        saved = gemm_ring.HALF_STORE_TILES
        gemm_ring.HALF_STORE_TILES = frozenset(half)
        try:
            return g(x, bias)
        finally:
            gemm_ring.HALF_STORE_TILES = saved
    return call


def rows_for(N: int, K: int, tokens, dtype=torch.bfloat16) -> list[dict]:
    copies, lins, layers, gemms = ring_copies(N, K, dtype)
    rows = []
    for M in tokens:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        bt = gemm_ring.tile_tokens(M)
        names = list(VARIANTS) if bt == 256 else ["s3"]
        r = {"M": M, "N": N, "K": K, "tile": bt, "schedule": gemm_ring.schedule(-(-M // bt) * (N // gemm_ring.BN),
                                                                                 K // 64, gemm_ring._sms(0))}
        times: dict[str, list[float]] = {n: [] for n in names}
        ref = None
        for order in (names, names[::-1]):
            t = timed_graph(lambda: [lin(x) for lin in lins]) / copies
            r.setdefault("bf16s", []).append(t)
            for name in order:
                call = configured(VARIANTS[name])
                out = call(gemms[0], x, layers[0].bias)
                if ref is None:
                    ref = out
                r[f"same_{name}"] = r.get(f"same_{name}", True) and bool(torch.equal(out, ref))
                times[name].append(timed_graph(lambda: [call(g, x, q.bias) for g, q in zip(gemms, layers)]) / copies)
        r["bf16"] = sum(r.pop("bf16s")) / 2
        for name in names:
            r[name] = sum(times[name]) / 2
        rows.append(r)
        base = r[names[0]]
        cells = " ".join(f"{n} {r[n] * 1e3:.1f} ({r[n] / base:.3f})" for n in names)
        same = all(v for k, v in r.items() if k.startswith("same"))
        print(f"{M}x{N}x{K} (tile {bt}, S {r['schedule'][2]}): bf16 {r['bf16'] * 1e3:.1f} {cells} us"
              f"{'' if same else '  BITS DIFFER'}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnk", nargs="*", default=CALLS)
    ap.add_argument("--json")
    a = ap.parse_args()
    calls = [tuple(int(v) for v in s.split("x")) for s in a.mnk]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    by_weight: dict[tuple[int, int], list[int]] = {}
    for M, N, K in calls:
        by_weight.setdefault((N, K), []).append(M)
    rows = []
    for (N, K), tokens in by_weight.items():
        rows += rows_for(N, K, tokens)
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
