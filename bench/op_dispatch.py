"""Per-call host time of the pieces of a 4-bit layer call as compiled graphs make it (``torch.ops.halfbyte.gemm_4bit``)
and of its parts: the CUDA kernel function, the plan lookup, the plan call, the bound dequantize launch, the
allocation, ``F.linear``. M = 16, 512 x 512 (the GPU work is negligible; this measures the host).

    python bench/op_dispatch.py
"""

import time

import torch
import torch.nn.functional as F

import halfbyte
from halfbyte.kernels import gemm4bit


def main():
    dev = "cuda"
    M, N, K = 16, 512, 512
    A = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev) / K ** 0.5
    B, am = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
    bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
    W = w.to(torch.bfloat16)
    args = (A, B, am, None, None, None, bias, [N, K], 64, "nf4")
    plan = gemm4bit.Plan(B, am, None, None, None, bias, N, K, 64, "nf4", torch.bfloat16)
    deq = plan._deq
    stream = torch._C._cuda_getCurrentRawStream(0)
    Wbuf = torch.empty(N, K, device=dev, dtype=torch.bfloat16)
    fake_key = gemm4bit.plan_key(*args[:7], N, K, 64, "nf4")
    cases = {
        "op via torch.ops (as inductor calls it)": lambda: torch.ops.halfbyte.gemm_4bit.default(*args),
        "registered CUDA fn (gemm4bit.gemm_4bit)": lambda: gemm4bit.gemm_4bit(*args),
        "plan_key alone": lambda: gemm4bit.plan_key(*args[:7], N, K, 64, "nf4"),
        "PLANS.get alone": lambda: gemm4bit.PLANS.get(fake_key, None),
        "plan(A, bias)": lambda: plan(A, bias),
        "bound dequant launch": lambda: deq(stream, Wbuf.data_ptr()),
        "torch.empty W": lambda: torch.empty((N, K), dtype=torch.bfloat16, device=dev),
        "F.linear bf16": lambda: F.linear(A, W, bias),
        "torch.ops.aten.addmm": lambda: torch.ops.aten.addmm.default(bias, A, W.t()),
        "check_4bit_args": lambda: halfbyte.formats.fourbit.check_4bit_args(64, "nf4"),
    }
    print(torch.cuda.get_device_name())
    for _ in range(3):
        for name, fn in cases.items():
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            n = 2000
            t = time.perf_counter()
            for _ in range(n):
                fn()
            dt = (time.perf_counter() - t) / n
            torch.cuda.synchronize()
            print(f"{name:45s} {dt * 1e6:7.1f} us")
        print()


if __name__ == "__main__":
    main()
