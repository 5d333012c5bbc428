"""Target for Nsight Compute: LLM.int8()'s activation side (``kernels.int8``: the outlier flag kernel, then the row
quantization with the outlier gathers) at one FLUX shape, four calls:

    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
--section WarpStateStats --section MemoryWorkloadAnalysis -k regex:"_flag_kernel|_quant_gather_kernel" \
--launch-skip 4 --launch-count 2 python bench/int8_act_profile.py [--shape 4608 3072 3072] [--outliers 350]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import outlier_activations  # noqa: E402

import halfbyte  # noqa: E402
from halfbyte.kernels import int8 as k8  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[4608, 3072, 3072], metavar=("M", "N", "K"))
    ap.add_argument("--outliers", type=int, default=350, help="outlier columns in the activations")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    M, N, K = a.shape
    dt = getattr(torch, a.dtype)
    lin = torch.nn.Linear(K, N, device="cuda", dtype=dt)
    layer = halfbyte.Linear8bit.from_linear(lin, threshold=6.0)
    x = outlier_activations(M, K, a.outliers, dt, "cuda")
    for _ in range(4):
        k8._quant_with_outliers(x, layer.weight, layer.SCB.view(torch.float32), 6.0)
    torch.cuda.synchronize()
    print(f"{M}x{N}x{K} {a.dtype}, {a.outliers} outlier columns: 4 calls")


if __name__ == "__main__":
    main()
