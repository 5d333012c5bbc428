"""``precompile``: compile the Triton kernels that a call of a model will run, side by side, before that call.

Triton compiles a kernel specialization at its first launch, and a model's first forward reaches its kernels one
after another. On an H200 machine (16 CPUs) whose triton cache was empty, the first call took, against ~0.2 s for
the next one (BENCHMARKS.md, session 28):

- 15.8 s for a FLUX-sized NF4 step;
- 18.5 s for an LLM.int8() step;
- 27.9 s for a T5-XXL NF4 encode, 21 s of it the fused GEMM's three specializations.

A later process finds the kernels in triton's disk cache (0.9 s), so this is the cost of a fresh machine or
container. Much of a compile runs outside the GIL (MLIR passes, ptxas; triton's Python front end does not), so
threads compile side by side: with ``precompile`` the same calls took 9.2 + 0.6 s, 9.3 + 0.2 s and 13.5 + 0.1 s.

``precompile(fn, *args, **kwargs)`` does this in two phases:

1. **Record.** It calls ``fn(*args, **kwargs)`` once while every quantized layer records its call instead of
   computing. Each layer returns zeros of its output's shape, and the rest of the model runs on them, so the record
   costs about the model's unquantized work. The return value is discarded.
2. **Replay.** It calls each distinct recorded layer call once for real, on random inputs of the recorded shape
   and dtype, on a pool of threads. Beside them, on threads of their own, it compiles the fused 4-bit GEMM's
   specializations that those calls take (``kernels.gemm_ring.precompile``, ~5 s each). Otherwise a layer's
   first call would compile the device check's specialization and then its own, one after the other.

Afterwards the same call compiles nothing:

    pipe = FluxPipeline.from_pretrained(...)              # quantized by halfbyte, on the GPU
    halfbyte.precompile(pipe, prompt, num_inference_steps=1, output_type="latent")   # -> what it did
    image = pipe(prompt).images[0]

The token counts, and so the kernels, follow the call's sizes: record with the height, width and sequence length
that the real calls will use.

Details:

- **Distinct calls.** A call is distinct by what decides its kernels: the layer's kind, shape, format, bias,
  compute settings and device, the input's dtype, its token count, and the grad mode.
- **Outliers.** LLM.int8() calls are replayed with and without outlier columns, because the real inputs may take
  either path.
- **Memory.** Replays allocate their inputs, outputs and dequantized weights. They run side by side only within
  half of the device's free memory; a larger call runs alone.
- **Threads.** Threads that would compile the same specialization take turns (``kernels.common.compile_lock``).

Limits:

- It covers eager calls. Inside a ``torch.compile``'d graph the layers compute: the recorded call compiles the
  graph (once; the real call reuses it, the layers' check of the recorder leaves no guard) and records nothing.
- Layers whose weights leave the GPU between calls (accelerate's CPU offload hooks) are not replayed.
- A model whose control flow depends on a quantized layer's output values may take another path on the recorded
  zeros than on real inputs. Its other path then compiles on first use, as without ``precompile``.
"""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

from . import nn as hb_nn
from .nn import Linear4bit, Linear8bit

_ACTIVE = threading.Lock()


class _Recorder:
    """``nn.RECORDER`` while ``fn`` runs: keeps the first layer call of each distinct signature."""

    def __init__(self):
        self.calls: dict[tuple, tuple] = {}
        self.count = 0

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        layer._check_input(x)
        self.count += 1
        M = x.numel() // layer.in_features
        inference = torch.is_inference_mode_enabled()
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
        key = (_signature(layer), x.dtype, M, inference, grad)
        if M and key not in self.calls:
            self.calls[key] = (layer, M, x.dtype, inference, grad)
        return x.new_zeros(*x.shape[:-1], layer.out_features)


def _signature(layer) -> tuple:
    """What, beside the input, decides which kernels a layer's call launches (and how they specialize)."""
    bias = layer.bias
    common = (type(layer), layer.in_features, layer.out_features, None if bias is None else bias.dtype,
              layer.weight.device, layer.weight.data_ptr() % 16 == 0, None if bias is None else bias.data_ptr() % 16)
    if isinstance(layer, Linear4bit):
        return common + (layer.quant_type, layer.blocksize, layer.double_quant, layer.compute_dtype,
                         layer.fp8_compute, layer.absmax.data_ptr() % 16 == 0)
    return common + (layer.threshold, layer.share is not None)


def _compiles_on(device: torch.device) -> bool:
    """Whether calls on ``device`` compile kernels (CUDA; elsewhere the layers run PyTorch references)."""
    return device.type == "cuda"


class _Budget:
    """Bytes of device memory that replays may hold at once; a call larger than the whole budget runs alone."""

    def __init__(self, total: int):
        self.total, self.free = total, total
        self.cond = threading.Condition()

    def take(self, n: int) -> int:
        n = min(n, self.total)
        with self.cond:
            self.cond.wait_for(lambda: self.free >= n)
            self.free -= n
        return n

    def give(self, n: int) -> None:
        with self.cond:
            self.free += n
            self.cond.notify_all()


def _replay_bytes(layer, M: int, dtype: torch.dtype) -> int:
    """A call's input, output and (4-bit, dequantize + matmul) dequantized weight, in bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    weight = layer.in_features * layer.out_features * size if isinstance(layer, Linear4bit) else 0
    return M * (layer.in_features + layer.out_features) * size + weight


def _replay(layer, calls: list[tuple], budgets: dict) -> int:
    """Calls ``layer`` for real once per recorded (M, dtype, inference, grad), on random inputs; LLM.int8() layers
    with a threshold once with outlier columns and once without. Returns the number of calls made."""
    made = 0
    device = layer.weight.device
    for M, dtype, inference, grad in calls:
        n = budgets[device].take(_replay_bytes(layer, M, dtype))
        try:
            outliers = (True, False) if isinstance(layer, Linear8bit) and layer.threshold > 0 else (False,)
            for with_outliers in outliers:
                mode = torch.inference_mode() if inference else (nullcontext() if grad else torch.no_grad())
                with torch.cuda.device(device) if device.type == "cuda" else nullcontext(), mode:
                    x = torch.randn(M, layer.in_features, device=device, dtype=dtype)
                    if with_outliers:  # two columns past the threshold: the decomposition's path
                        x[:, :2] = 2 * layer.threshold
                    if grad:
                        x.requires_grad_(True)
                    layer(x)
                    made += 1
                    if isinstance(layer, Linear8bit) and layer.share is not None:
                        layer.share.clear()  # an entry holds the input's quantization: not for real calls
        finally:
            budgets[device].give(n)
    return made


def _ring_variants(records) -> dict[tuple, tuple]:
    """The fused 4-bit GEMM specializations the recorded calls take: (device, S, bias, nested) -> arguments of
    ``kernels.gemm_ring.precompile``."""
    from .kernels import gemm_ring

    out = {}
    for layer, M, dtype, _, _ in records:
        if not isinstance(layer, Linear4bit) or not _compiles_on(layer.weight.device):
            continue
        if (layer.compute_dtype or dtype) != torch.bfloat16 or layer.fp8_compute:
            continue
        N, K = layer.out_features, layer.in_features
        S = gemm_ring.split_for(M, N, K, layer.blocksize, layer.quant_type, layer.weight.device)
        if S is None:
            continue
        absmax, nested_absmax, nested_code, offset = layer.quant_stats()
        nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
        key = (layer.weight.device, S, layer.bias is not None, nested is not None)
        data = layer.weight.reshape(-1).view(torch.uint8)
        out.setdefault(key, (S, layer.bias is not None, data, absmax, N, K, layer.quant_type, nested))
    return out


def _device_checks(records) -> list:
    """The device checks that the recorded 4-bit calls' plans will run (``kernels.gemm4bit.plan_checks``), each
    once. A plan runs its checks one after another, the fused GEMM's (~6 s of compiling) among them; started
    first, side by side, they are done by the time the replays' plans reach them."""
    from .kernels import gemm4bit

    checks = {}
    for layer, _, dtype, _, _ in records:
        if isinstance(layer, Linear4bit) and _compiles_on(layer.weight.device):
            checks.update((k, f) for k, f in gemm4bit.plan_checks(
                layer.out_features, layer.in_features, layer.blocksize, layer.quant_type, layer.compute_dtype or dtype,
                layer.double_quant, layer.bias is not None, layer.weight.device).items() if k not in checks)
    return list(checks.values())


def precompile(fn, *args, workers: int | None = None, **kwargs) -> dict:
    """Compiles what ``fn(*args, **kwargs)`` will run in its quantized layers (module doc), on ``workers`` threads
    (default: the CPU count, at most 32), and returns what it did: ``recorded`` layer calls, ``distinct`` ones on
    devices where kernels compile (CUDA; the others' layers run PyTorch references), ``replayed`` real calls,
    ``device_checks`` run first and ``gemm_variants`` fused-GEMM specializations compiled beside them, ``seconds``.
    ``fn``'s own return value is discarded (it ran on the recorded zeros). Not reentrant (one at a time)."""
    if workers is not None and workers < 1:
        raise ValueError(f"precompile: workers must be >= 1, got {workers}")
    if not _ACTIVE.acquire(blocking=False):
        raise RuntimeError("precompile: another precompile is running (the layers record process-wide)")
    t0 = time.perf_counter()
    try:
        recorder = _Recorder()
        hb_nn.RECORDER = recorder
        try:
            fn(*args, **kwargs)
        finally:
            hb_nn.RECORDER = None
        records = [r for r in recorder.calls.values() if _compiles_on(r[0].weight.device)]
        by_layer: dict[int, tuple] = {}
        for layer, M, dtype, inference, grad in records:
            by_layer.setdefault(id(layer), (layer, []))[1].append((M, dtype, inference, grad))
        variants = _ring_variants(records)
        checks = _device_checks(records)
        budgets = {}
        for layer, _ in by_layer.values():
            d = layer.weight.device
            if d not in budgets:
                free = torch.cuda.mem_get_info(d)[0] if d.type == "cuda" else 1 << 40
                budgets[d] = _Budget(max(free // 2, 1))  # (a full device: one replay at a time)
        replayed = 0
        if by_layer:
            from .kernels import gemm_ring

            n = workers or min(32, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="halfbyte-precompile") as pool:
                jobs = [pool.submit(check) for check in checks]  # the long ones first
                jobs += [pool.submit(gemm_ring.precompile, *v) for v in variants.values()]
                jobs += [pool.submit(_replay, layer, calls, budgets) for layer, calls in by_layer.values()]
                results = [j.exception() or j.result() for j in jobs]  # every job ends before an error is raised
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            replayed = sum(results[len(checks) + len(variants):])
            for d in budgets:
                if d.type == "cuda":
                    torch.cuda.synchronize(d)
        return dict(recorded=recorder.count, distinct=len(records), replayed=replayed, device_checks=len(checks),
                    gemm_variants=len(variants), seconds=time.perf_counter() - t0)
    finally:
        _ACTIVE.release()
