"""How many launches of each kind of call the host can queue ahead of a busy GPU before a launch blocks.

    python bench/launch_queue.py [--calls 3000]

Why: inside a host-bound T5 encode the bf16 ``wo`` layer (cuBLAS), which follows two 4-bit calls, took 46-85 us of
wall per call in halfbyte's model against 21-50 in the bf16 model (BENCHMARKS.md session 36). A launch blocks when
the driver's command queue is full; launches that carry large parameter blocks (TMA descriptors are 128 bytes each)
may fill it after fewer launches than cuBLAS's, and the call after them then waits for the GPU.

Method: the GPU is held busy by ``torch.cuda._sleep`` (long enough to outlast the loop), then ``--calls`` calls of one
kind are made back to back, each timed on the host. The first call (after the first three) whose host time jumps
over 200 us marks where the queue filled; the table gives its index and the median host time before and after it.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import halfbyte  # noqa: E402

SKIP = 3


def probe(name: str, call, n: int) -> str:
    call()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))  # ~1.5-2 s of GPU time at ~1.7 GHz: longer than the loop below
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    # the first few calls after the sleep are left out of the search (lazy first-use work on the host)
    first = next((i for i in range(SKIP, n) if times[i] > 200e-6), None)
    before = times[SKIP:first]
    med = statistics.median(before) * 1e6 if before else float("nan")
    after = statistics.median(times[first:]) * 1e6 if first is not None else float("nan")
    return (f"| {name} | {first if first is not None else f'none in {n}'} | {med:.1f} | {after:.1f} | "
            f"{max(times[:SKIP]) * 1e6:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    up = torch.nn.Linear(4096, 10240, bias=False, device=dev, dtype=dt)
    down = torch.nn.Linear(10240, 4096, bias=False, device=dev, dtype=dt)
    q_up = halfbyte.Linear4bit.from_linear(up)
    x = torch.randn(1, 512, 4096, device=dev, dtype=dt)
    h = torch.randn(1, 512, 10240, device=dev, dtype=dt)
    small = torch.randn(512, device=dev, dtype=dt)
    with torch.inference_mode():
        def mixed():  # T5's pattern: two 4-bit calls, then the bf16 wo
            q_up(x)
            q_up(x)
            down(h)

        rows = [("nn.Linear 512x10240->4096 (cuBLAS)", lambda: down(h)),
                ("Linear4bit 512x4096->10240 (fused ring GEMM)", lambda: q_up(x)),
                ("tensor add (elementwise, 512 elements)", lambda: small.add(small)),
                ("T5 pattern: 2 x Linear4bit + nn.Linear", mixed)]
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.calls} calls each")
        print("| calls | first blocking call | median host us before it | from it on | slowest of the first 3 |")
        print("|---|---|---|---|---|")
        for name, call in rows:
            print(probe(name, call, args.calls), flush=True)


if __name__ == "__main__":
    main()
