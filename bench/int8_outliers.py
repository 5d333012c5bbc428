"""LLM.int8() layer time by number of outlier columns and by the outlier kernel's shape, one GPU.

    python bench/int8_outliers.py [--no-bnb] [--json out.json]

For FLUX/T5 shapes, activations N(0, 1) with ``c`` columns scaled so that every row holds a value >= 6 there
(threshold 6: those columns go through the 16-bit path), c in {0, 8, 350} (350 of 3072: what random-weight FLUX
blocks show after the AdaLN modulation, BENCHMARKS.md). Times are CUDA-graph replays (GPU only, ms) of
``halfbyte.kernels.int8_mm.int8_mixed_mm`` under several ``MMConfig`` settings of the outlier kernel (columns per
step ``oc``, warps ``w``, software-pipeline stages ``st``; until session 5 the loop sat in the GEMM's epilogue) and
of the loop fused in the epilogue again, after the int32 accumulator ("fused", ``MMConfig.fuse_outliers``),
against bf16 ``F.linear`` and bitsandbytes' ``Linear8bitLt`` (whose outlier path syncs with
the host, so bitsandbytes and halfbyte's layer are also timed eagerly: ``bnb_eager``, ``hb_eager``). Each
variant's output is checked against the first config's (only the float32 order of the outlier products differs:
within one output rounding).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import outlier_activations, timed_graph  # noqa: E402

import halfbyte  # noqa: E402
from halfbyte.kernels import int8_mm as km  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None

DEV, DT = "cuda", torch.bfloat16
SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (512, 10240, 4096)]
# (columns per step, warps, software-pipeline stages) of the outlier kernel
LOOPS = [(64, 8, 1), (64, 8, 2), (64, 8, 3), (64, 8, 4), (32, 8, 3), (128, 8, 3), (64, 4, 3)]
# (columns per step, stages) of the loop fused in the GEMM's epilogue (``MMConfig.fuse_outliers``; warps: the GEMM's)
# and ptxas register cap (``MMConfig.fused_registers``: 128 lets two 8-warp programs share an SM)
FUSED = [(64, 3, None), (64, 3, 128), (64, 2, 128), (32, 3, 128)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--no-bnb", action="store_true", help="skip the eager bitsandbytes / halfbyte layer timings")
    ap.add_argument("--shapes", type=int, nargs="+", metavar="M N K", help="shapes to time (default: SHAPES)")
    ap.add_argument("--quick", action="store_true", help="only the default separate loop and one fused loop")
    args = ap.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(args.shapes[i:i + 3]) for i in range(0, len(args.shapes), 3)]
    loops, fused = (LOOPS[2:3], FUSED[:2]) if args.quick else (LOOPS, FUSED)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for M, N, K in shapes:
        lin = torch.nn.Linear(K, N, device=DEV, dtype=DT)
        with torch.no_grad():
            lin.weight.normal_(0, K ** -0.5)
        layer = halfbyte.Linear8bit.from_linear(lin, threshold=6.0)
        blin = None
        if bnb is not None:
            blin = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=6.0)
            blin.load_state_dict(lin.state_dict())
            blin = blin.to(DEV)
        for c in (0, 8, 350):
            x = outlier_activations(M, K, c, DT, DEV)
            r = {"shape": f"{M}x{N}x{K}", "outlier_cols": c}
            with torch.no_grad():
                r["bf16"] = timed_graph(lambda: lin(x))
                if blin is not None and not args.no_bnb:  # its outlier path syncs with the host: eager timing
                    r["bnb_eager"] = triton.testing.do_bench(lambda: blin(x), warmup=25, rep=100,
                                                             return_mode="median")
                    r["hb_eager"] = triton.testing.do_bench(lambda: layer(x), warmup=25, rep=100,
                                                            return_mode="median")
                base_cfg = km.mm_config(M, N, K)
                A2 = x
                ref = None
                variants = [(f"oc{oc}/w{w}/st{st}", dataclasses.replace(base_cfg, oc=oc, out_warps=w, out_stages=st))
                            for oc, w, st in loops]
                variants += [(f"fused oc{oc}/st{st}" + (f"/r{reg}" if reg else ""),
                              dataclasses.replace(base_cfg, oc=oc, out_stages=st, fuse_outliers=True,
                                                  fused_registers=reg)) for oc, st, reg in fused]
                for name, cfg in variants:

                    def call(cfg=cfg):
                        return km.int8_mixed_mm(A2, layer.weight, layer.SCB.view(torch.float32), layer.bias, 6.0,
                                                cfg)
                    try:
                        out = call()
                        if ref is None:
                            ref = out
                        ok = torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7)
                        r[name] = timed_graph(call)
                        if not ok:
                            r[f"{name}_WRONG"] = True
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name}: failed {type(e).__name__}: {str(e)[:120]}")
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
            rows.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
