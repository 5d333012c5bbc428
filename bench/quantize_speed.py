"""Weight quantization speed on the GPU, the cost a quantize-on-load pays per layer: halfbyte vs bitsandbytes.

    python bench/quantize_speed.py

For a FLUX-sized bf16 weight (3072 x 12288): the quantization kernels alone (weight already on the GPU), and the
whole ``from_linear`` path from a CPU tensor (host-to-device copy included), for NF4 and int8. Median of 20 runs.
"""

import time

import torch
from torch import nn

import halfbyte


def bench(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    import bitsandbytes as bnb

    w_cpu = (torch.randn(3072, 12288) * 0.02).to(torch.bfloat16)
    w = w_cpu.cuda()
    lin = nn.Linear(12288, 3072, bias=False, device="meta")
    lin.weight = nn.Parameter(w_cpu, requires_grad=False)
    rows = {
        "nf4 kernel: halfbyte": lambda: torch.ops.halfbyte.quantize_4bit(w, 64, "nf4"),
        "nf4 kernel: bitsandbytes": lambda: bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4"),
        "int8 kernel: halfbyte": lambda: torch.ops.halfbyte.int8_vectorwise_quant(w.half(), 0.0),
        "int8 kernel: bitsandbytes": lambda: bnb.functional.int8_vectorwise_quant(w.half()),
        "H2D copy of the bf16 weight": lambda: w_cpu.cuda(),
        "nf4 from CPU: halfbyte Linear4bit.from_linear": lambda: halfbyte.Linear4bit.from_linear(lin, device="cuda"),
        "nf4 from CPU: bitsandbytes Params4bit": lambda: bnb.nn.Params4bit(w_cpu, requires_grad=False,
                                                                           quant_type="nf4").cuda(),
        "int8 from CPU: halfbyte Linear8bit.from_linear": lambda: halfbyte.Linear8bit.from_linear(lin, device="cuda"),
        "int8 from CPU: bitsandbytes Int8Params": lambda: bnb.nn.Int8Params(w_cpu, requires_grad=False).cuda(),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    print("| step (3072 x 12288 bf16) | ms |\n|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {bench(fn):.3f} |")


if __name__ == "__main__":
    main()
