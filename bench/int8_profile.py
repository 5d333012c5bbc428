"""Target for Nsight Compute: the int8 GEMM (``kernels.int8_mm._int8_mm_kernel``) with the outlier products in a
kernel of their own and fused in its epilogue (``MMConfig.fuse_outliers``), at one FLUX shape; three calls of the
separate variant, then three of the fused one. Why the fused kernel is slower even when its loop never runs
(BENCHMARKS.md, session 11) is what this is for:

    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
--section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
--section MemoryWorkloadAnalysis -k regex:_int8_mm_kernel --launch-skip 2 --launch-count 4 \
python bench/int8_profile.py [--shape 4608 12288 3072] [--outliers 0]

(the 3rd and 4th profiled launches are the separate variant's last call and the fused variant's first; with
``--launch-count 4`` after two skipped: separate #3, fused #1, #2, #3).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import outlier_activations  # noqa: E402

import halfbyte  # noqa: E402
from halfbyte.kernels import int8_mm as km  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[4608, 12288, 3072], metavar=("M", "N", "K"))
    ap.add_argument("--outliers", type=int, default=0, help="outlier columns in the activations")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap of the fused variant")
    a = ap.parse_args()
    M, N, K = a.shape
    lin = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, K ** -0.5)
    layer = halfbyte.Linear8bit.from_linear(lin, threshold=6.0)
    x = outlier_activations(M, K, a.outliers, torch.bfloat16, "cuda")
    base = km.mm_config(M, N, K)
    outs = []
    for fuse in (False, True):
        cfg = dataclasses.replace(base, fuse_outliers=fuse, fused_registers=a.maxnreg if fuse else None)
        for _ in range(3):
            outs.append(km.int8_mixed_mm(x, layer.weight, layer.SCB.view(torch.float32), layer.bias, 6.0, cfg))
        # the compiled GEMM's resources (a dummy outlier list: the kernel is the same specialization)
        CA = torch.zeros(M, K, dtype=torch.int8, device="cuda")
        sc = torch.ones(M, device="cuda")
        out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
        xg = torch.zeros(M, 64, dtype=torch.bfloat16, device="cuda")
        wg = torch.zeros(N, 64, dtype=torch.bfloat16, device="cuda")
        cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
        fn, grid, args, kwargs = km.mm_launch(CA, layer.weight, sc, layer.SCB.view(torch.float32), layer.bias, out,
                                              cfg, (xg, wg, cnt) if fuse else None)
        k = fn.warmup(*args, grid=grid, **kwargs)
        print(f"{'fused' if fuse else 'separate'} (maxnreg {cfg.fused_registers}): {k.n_regs} registers, "
              f"{k.n_spills} spilled, {k.metadata.shared} B shared")
    torch.cuda.synchronize()
    same = torch.equal(outs[0].view(torch.int16), outs[-1].view(torch.int16))
    print(f"{M}x{N}x{K}, {a.outliers} outlier columns, config {base}: fused and separate bits equal: {same}")


if __name__ == "__main__":
    main()
