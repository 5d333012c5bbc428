"""Exploratory: does dequantizing a 4-bit weight in L2-sized row chunks into one reused workspace, each chunk
followed by its cuBLAS GEMM, beat dequantizing the whole weight first? The idea: the workspace's lines stay in
L2 (written, read by the GEMM, rewritten by the next chunk), so the dequantized bf16 weight never travels to
HBM and back; only the 4-bit bytes do. Not library code.

    python bench/l2_chunk.py [--json out.json]

Times (CUDA graph replay, so host time is out; ms) for FLUX and T5 shapes: bf16 ``F.linear``; whole dequantize +
``F.linear``; chunked with chunk rows 4096 / 2048 / 1024 / 512 (output written in place per chunk via
``torch.mm(out=column slice)``). Each chunked result is checked equal to the whole one (same products, same
cuBLAS reduction per output element is not guaranteed, so within 1 bf16 ulp).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import timed_graph  # noqa: E402

import halfbyte  # noqa: E402, F401
from halfbyte.kernels import fourbit  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
SHAPES = [(4608, 3072, 3072, "FLUX attn"), (4608, 12288, 3072, "FLUX MLP up"), (4608, 3072, 12288, "FLUX MLP down"),
          (4608, 18432, 3072, "FLUX single in"), (512, 10240, 4096, "T5 MLP up"), (512, 4096, 10240, "T5 MLP down")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for M, N, K, name in SHAPES:
        w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(DT)
        packed, absmax = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
        x = torch.randn(M, K, device=DEV, dtype=DT)
        r = {"shape": f"{M}x{N}x{K}", "layer": name}
        r["bf16"] = timed_graph(lambda: torch.nn.functional.linear(x, w), rep=200)

        def whole():
            W = fourbit.dequantize(packed, absmax, None, None, None, 64, "nf4", N * K, DT)
            return torch.nn.functional.linear(x, W.view(N, K))

        ref = whole()
        r["whole"] = timed_graph(whole, rep=200)
        for cn in (4096, 2048, 1024, 512):
            if cn >= N or N % cn:
                continue
            ws = torch.empty(cn, K, device=DEV, dtype=DT)
            out = torch.empty(M, N, device=DEV, dtype=DT)

            def chunked(cn=cn, ws=ws, out=out):
                for n0 in range(0, N, cn):
                    e0 = n0 * K
                    fourbit.launch(fourbit._dequant_kernel, (triton.cdiv(cn * K // 64, fourbit._rows(64)),),
                                   packed[e0 // 2:], absmax[e0 // 64:], absmax, absmax, absmax,
                                   fourbit.code_table("nf4", x.device), ws, cn * K, BLOCKSIZE=64,
                                   ROWS=fourbit._rows(64), NESTED=False, USE_PTX=True, num_warps=4)
                    torch.mm(x, ws.T, out=out[:, n0:n0 + cn])
                return out

            got = chunked()
            diff = (got.float() - ref.float()).abs().max().item()
            ok = torch.allclose(got.float(), ref.float(), rtol=2 ** -7, atol=1e-3)
            r[f"chunk{cn}"] = timed_graph(chunked, rep=200)
            r[f"chunk{cn}_ok"] = ok
            r[f"chunk{cn}_maxdiff"] = diff
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
        rows.append(r)
        w = packed = absmax = x = None  # frees this shape before the next
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
