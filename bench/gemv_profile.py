"""Target for Nsight Compute: the library's GEMV (fp16, NF4, 18432 x 3072) and the bare read of the same words at the
same tiling (bench/gemv_read.py), three launches each. The session-9 numbers in BENCHMARKS.md came from

    ncu --clock-control none --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,\
sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,\
"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" -k regex:"gemv|read" --launch-skip 4 \
--launch-count 2 python bench/gemv_profile.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemv_read  # noqa: E402

import halfbyte  # noqa: E402, F401  (registers the halfbyte:: ops)
from halfbyte.kernels import gemm4bit  # noqa: E402


def main():
    N, K = 18432, 3072
    dt = torch.float16
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dt)
    p, a = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
    x = torch.randn(1, K, device="cuda", dtype=dt)
    wi = torch.randint(-2**31, 2**31 - 1, (N, K // 8), dtype=torch.int32, device="cuda")
    out = torch.empty(N, dtype=torch.int32, device="cuda")
    for _ in range(3):
        gemm4bit.gemv(x, p, a, None, None, None, None, N, K, 64, "nf4")
        gemv_read._read_tiles[(N // 4,)](wi, out, N, K // 8, BLOCK_N=4, WPS=128, num_warps=2)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
