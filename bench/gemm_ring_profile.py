"""Target for Nsight Compute: the fused 4-bit GEMM (``gemm_ring``, NF4, bf16) against cuBLAS's bf16 GEMM of the same
call, three launches each, to compare them per clock. Inside a FLUX step the fused GEMM took ~3 % more GPU time than
cuBLAS on the same layers while the two tie in the isolated, power-bound bench (BENCHMARKS.md session 33); Nsight
Compute replays one kernel at a time, which removes the power limit from the comparison; ``sm__cycles_elapsed.max``
counts the cycles at whatever clock the card ran (session 34's machines ask for ``--clock-control none``; the fused
GEMM then ran at a 1-3 % lower clock than cuBLAS, and 0.8-1.3 % more cycles: BENCHMARKS.md):

    ncu --clock-control none --metrics gpu__time_duration.sum,sm__cycles_elapsed.max,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,\
"regex:sm__pipe_tensor.*cycles_active.avg.pct_of_peak_sustained_active",lts__t_bytes.sum,\
lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,\
smsp__inst_executed.sum,"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \
-k regex:"gemm_ring|nvjet" --launch-skip 2 --launch-count 4 python bench/gemm_ring_profile.py [M N K]

The module's settings come from the environment as in the library (``HALFBYTE_GEMM_RING_HALF_STORE``, ...), so
one command per setting compares them. Prints each path's time from CUDA events first (unlocked clocks, a sanity
check that the calls are the ones meant).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import halfbyte  # noqa: E402
from halfbyte.kernels import gemm_ring  # noqa: E402


def main():
    M, N, K = (int(v) for v in sys.argv[1:4]) if len(sys.argv) >= 4 else (4608, 12288, 3072)
    lin = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
    lin.weight.data.normal_(0, K ** -0.5)
    layer = halfbyte.Linear4bit.from_linear(lin, quant_type="nf4")
    gemm = gemm_ring.RingGemm(layer.weight.reshape(-1), layer.quant_stats()[0], N, K, "nf4")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    gemm(x, lin.bias)  # compiles before the profiled launches
    torch.cuda.synchronize()
    for name, fn in (("fused", lambda: gemm(x, lin.bias)), ("bf16", lambda: lin(x))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        print(f"{name} {M}x{N}x{K}: {start.elapsed_time(end) / 3 * 1e3:.1f} us per call", flush=True)


if __name__ == "__main__":
    main()
