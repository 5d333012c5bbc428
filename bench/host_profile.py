"""Host (CPU) cost per call of the pieces of an eager quantized linear, on one GPU: where the microseconds go.

    python bench/host_profile.py [--ring]

Each line is the wall time per call of a loop of 2000 calls that the GPU outruns (tiny shapes), so it measures
the host. Then a cProfile of halfbyte.Linear4bit forwards, with and without autograd recording. ``--ring``: the
pieces of a call that takes the fused ring GEMM instead (64 and 512 tokens of a 4096 x 4096 weight).
"""

import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchutil import print_cprofile  # noqa: E402

import halfbyte  # noqa: E402
from halfbyte.kernels import fourbit as k4  # noqa: E402
from halfbyte.kernels import launch as hl  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def per_call(fn, n=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def main():
    torch.manual_seed(0)
    lins = [torch.nn.Linear(256, 256, device=DEV, dtype=DT) for _ in range(2)]
    layers = [halfbyte.Linear4bit.from_linear(lin) for lin in lins]
    x = torch.randn(16, 256, device=DEV, dtype=DT)
    L = layers[0]
    absmax = L.absmax.view(torch.float32)
    n = 256 * 256
    out = torch.empty(n, dtype=DT, device=DEV)
    code = k4.code_table("nf4", out.device)
    rows = k4._rows(64)
    grid = (triton.cdiv(n // 64, rows),)
    kw = dict(BLOCKSIZE=64, ROWS=rows, NESTED=False, USE_PTX=True, num_warps=4)
    args = (L.weight, absmax, absmax, absmax, absmax, code, out, n)
    kernel = k4._dequant_kernel[grid](*args, **kw)
    stream = torch._C._cuda_getCurrentRawStream(0)
    tail = (64, rows, False, True)
    W = L.dequantize(DT)
    rows_out = []

    def row(name, fn):
        us = per_call(fn)
        rows_out.append((name, us))
        print(f"| {name} | {us:.1f} |", flush=True)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| call | host us |\n|---|---|")
    row("empty loop (lambda: None)", lambda: None)
    row("torch.empty(65536, bf16, cuda)", lambda: torch.empty(n, dtype=DT, device=DEV))
    row("torch._C._cuda_getCurrentRawStream", lambda: torch._C._cuda_getCurrentRawStream(0))
    row("torch.cuda.current_stream()", lambda: torch.cuda.current_stream())
    row("torch.cuda.current_device()", lambda: torch.cuda.current_device())
    row("kernel.run (compiled launcher, prebuilt args)", lambda: kernel.run(
        grid[0], 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail))
    row("triton fn[grid](...)", lambda: k4._dequant_kernel[grid](*args, **kw))
    row("halfbyte launch(...)", lambda: hl.launch(k4._dequant_kernel, grid, *args, **kw))
    row("kernels.fourbit.dequantize", lambda: k4.dequantize(L.weight, absmax, None, None, None, 64, "nf4", n, DT))
    row("F.linear(x16, W)", lambda: torch.nn.functional.linear(x, W.view(256, 256), L.bias))
    row("nn.Linear bf16 module, M=16", lambda: lins[0](x))
    row("L.quant_stats()", L.quant_stats)
    row("torch.compiler.is_compiling()", torch.compiler.is_compiling)
    row("ops.direct_kernel", lambda: halfbyte.ops.direct_kernel("gemm_4bit", x, L.bias))
    x1 = x[:1].clone()
    with torch.no_grad():
        row("Linear4bit M=16, no_grad (inference plan)", lambda: L(x))
        row("Linear4bit M=1, no_grad (inference plan, GEMV)", lambda: L(x1))
        fn = halfbyte.ops.direct_kernel("gemm_4bit", x, L.bias)
        args = (L.weight, *L.quant_stats(), L.bias, [256, 256], 64, "nf4")
        row("gemm_4bit CUDA kernel function, M=16 (direct kernel, no plan)", lambda: fn(x, *args))
        try:
            import bitsandbytes as bnb
            qw, qs = bnb.functional.quantize_4bit(W.view(256, 256), blocksize=64, quant_type="nf4",
                                                 compress_statistics=False)
            row("bitsandbytes matmul_4bit, M=16", lambda: bnb.matmul_4bit(x, qw.t(), bias=L.bias, quant_state=qs))
            row("bitsandbytes matmul_4bit, M=1", lambda: bnb.matmul_4bit(x1, qw.t(), bias=L.bias, quant_state=qs))
        except ImportError:
            print("(bitsandbytes not installed: its rows skipped)")
        row("nn.Linear bf16 module, M=16, no_grad", lambda: lins[0](x))
    xg = x.clone().requires_grad_()
    row("Linear4bit M=16, input requires grad (autograd records)", lambda: L(xg))
    row("nn.Linear bf16 module, M=16, input requires grad", lambda: lins[0](xg))
    row("Linear4bit M=16, forward + backward", lambda: L(xg).sum().backward())
    row("nn.Linear bf16 module, M=16, forward + backward", lambda: lins[0](xg).sum().backward())
    for name, ctx in (("no_grad", torch.no_grad), ("autograd", torch.enable_grad)):
        with ctx():
            inp = x if name == "no_grad" else xg
            print_cprofile(lambda: L(inp), 2000, f"cProfile, Linear4bit M=16, {name}", limit=15)  # noqa: B023


def ring_layer(M: int, N: int = 4096, K: int = 4096) -> None:
    """Host us per call of the pieces of an eager 4-bit layer call that takes the fused ring GEMM (M tokens of an
    N x K weight, as T5-XXL's 512-token encode calls it), beside ``nn.Linear``'s."""
    from halfbyte import ops
    from halfbyte.kernels import gemm_ring

    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False, device=DEV, dtype=DT)
    L = halfbyte.Linear4bit.from_linear(lin)
    x = torch.randn(M, K, device=DEV, dtype=DT)
    print(f"\n## {M} tokens of a {N}x{K} weight (no bias), host us per call")
    print("| call | host us |\n|---|---|")
    row = lambda name, fn: print(f"| {name} | {per_call(fn):.1f} |", flush=True)  # noqa: E731
    with torch.inference_mode():
        plan = L._inference_plan(x)
        ring = plan._fused
        assert ring is not None and gemm_ring.wanted(M, N, K, ring.programs), "the call does not take the ring"
        out = torch.empty(M, N, dtype=DT, device=DEV)
        stream = torch._C._cuda_getCurrentRawStream(0)
        row("nn.Linear bf16 module", lambda: lin(x))
        row("Linear4bit module", lambda: L(x))
        row("  L._inference_plan(x)", lambda: L._inference_plan(x))
        row("    ops.plan_usable", lambda: ops.plan_usable("gemm_4bit", x, None))
        row("    torch.compiler.is_compiling()", torch.compiler.is_compiling)
        row("    launch.hooks_installed()", hl.hooks_installed)
        row("  plan(x, None)", lambda: plan(x, None))
        row("    torch.empty(out)", lambda: torch.empty(x.shape[:-1] + (N,), dtype=DT, device=plan.device))
        row("    gemm_ring.wanted", lambda: gemm_ring.wanted(M, N, K, ring.programs))
        row("    ring.run (prebuilt addresses)", lambda: ring.run(stream, x.data_ptr(), out.data_ptr(), None, M))
        row("      torch.empty(17 MB f32 workspace)", lambda: torch.empty(132 * 128 * 256, dtype=torch.float32,
                                                                     device=plan.device))
        alloc = torch._C._cuda_cudaCachingAllocator_raw_alloc
        free = torch._C._cuda_cudaCachingAllocator_raw_delete
        row("      raw_alloc + raw_delete (17 MB)", lambda: free(alloc(132 * 128 * 256 * 4, stream)))
        row("      torch.cuda.is_current_stream_capturing()", torch.cuda.is_current_stream_capturing)
        row("      torch._C._cuda_isCurrentStreamCapturing()", torch._C._cuda_isCurrentStreamCapturing)


if __name__ == "__main__":
    if "--ring" in sys.argv:
        for m in (64, 512):
            ring_layer(m)
    else:
        main()
