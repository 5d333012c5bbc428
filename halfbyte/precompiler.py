"""``precompile``: compile the Triton kernels that a call of a model will run, side by side, before that call.

Triton compiles a kernel specialization at its first launch, and a model's first forward reaches its kernels one
after another. On an H200 machine (16 CPUs) whose triton cache was empty, the first call took, against ~0.2 s for
the next one (BENCHMARKS.md, sessions 28-29):

- 15.8-16.9 s for a FLUX-sized NF4 step;
- 18.5 s for an LLM.int8() step;
- 16.5 s for a T5-XXL NF4 encode, 11.7 s of it the fused GEMM's two specializations.

A later process finds the kernels in triton's disk cache (0.9 s), so this is the cost of a fresh machine or
container. Much of a compile runs outside the GIL (MLIR passes, ptxas; triton's Python front end does not), so
threads compile side by side: with ``precompile`` the NF4 calls took 6.2 + 0.7 s (FLUX) and 6.4 + 0.1 s (T5), the
int8 step 9.3 + 0.2 s (session 28).

``precompile(fn, *args, **kwargs)`` does this in two phases:

1. **Record.** It calls ``fn(*args, **kwargs)`` once while every quantized layer records its call instead of
   computing. Each layer returns zeros of its output's shape, and the rest of the model runs on them, so the record
   costs about the model's unquantized work. The return value is discarded. As the record finds each new 4-bit
   call, it starts, on a pool of threads, the compiles that need no replay: the device checks that the call's plan
   will run (``kernels.gemm4bit.plan_checks``), and the fused 4-bit GEMM's specialization that the call takes
   (``kernels.gemm_ring.precompile``, ~6 s each). A layer's first call would otherwise run its plan's checks and
   compile its own specialization one after another.
2. **Replay.** It calls each distinct recorded layer call once for real, on random inputs of the recorded shape
   and dtype, on the same pool.

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
from . import ops as hb_ops
from .nn import Linear4bit, Linear8bit

_ACTIVE = threading.Lock()


class _Recorder:
    """``nn.RECORDER`` while ``fn`` runs: keeps the first layer call of each distinct signature, and hands it to
    ``on_new(layer, M, dtype)`` as it comes."""

    def __init__(self, on_new):
        self.calls: dict[tuple, tuple] = {}
        self.count = 0
        self.on_new = on_new

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        layer._check_input(x)
        self.count += 1
        M = x.numel() // layer.in_features
        inference = torch.is_inference_mode_enabled()
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
        key = (_signature(layer), x.dtype, M, inference, grad)
        if M and key not in self.calls:
            self.calls[key] = (layer, M, x.dtype, inference, grad)
            self.on_new(layer, M, x.dtype)
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
    """Whether calls on ``device`` compile kernels: CUDA with triton installed (elsewhere, and on CUDA without
    triton, the layers run PyTorch references)."""
    return device.type == "cuda" and hb_ops.cuda_kernel("gemm_4bit") is not None


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


class _Early:
    """The compiles that need no replay, submitted to ``pool`` while the record runs, as its calls come in: the
    device checks that the 4-bit calls' plans will run (``kernels.gemm4bit.plan_checks``; a plan runs its own one
    after another, the fused GEMM's ~6 s compile among them) and the fused GEMM's specializations the calls take
    (``kernels.gemm_ring.precompile``). Each once."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.checks: dict[tuple, object] = {}
        self.variants: dict[tuple, object] = {}

    def __call__(self, layer, M: int, dtype: torch.dtype) -> None:
        if not isinstance(layer, Linear4bit) or not _compiles_on(layer.weight.device):
            return
        from .kernels import gemm4bit, gemm_ring

        N, K, device, has_bias = layer.out_features, layer.in_features, layer.weight.device, layer.bias is not None
        cdt = layer.compute_dtype or dtype
        for key, check in gemm4bit.plan_checks(N, K, layer.blocksize, layer.quant_type, cdt, layer.double_quant,
                                               has_bias, device).items():
            if key not in self.checks:
                self.checks[key] = self.pool.submit(check)
        if cdt not in (torch.bfloat16, torch.float16) or layer.fp8_compute:  # (fp8 compute: its own path)
            return
        S = gemm_ring.split_for(M, N, K, layer.blocksize, layer.quant_type, device, cdt)
        bt = gemm_ring.tile_tokens(M)
        key = (device, S, has_bias, layer.double_quant, bt, cdt)
        if S is not None and key not in self.variants:
            absmax, nested_absmax, nested_code, offset = layer.quant_stats()
            nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
            data = layer.weight.reshape(-1).view(torch.uint8)
            self.variants[key] = self.pool.submit(gemm_ring.precompile, S, has_bias, data, absmax, N, K,
                                                  layer.quant_type, nested, bt, cdt)

    def jobs(self) -> list:
        return [*self.checks.values(), *self.variants.values()]


def precompile(fn, *args, workers: int | None = None, **kwargs) -> dict:
    """Compiles what ``fn(*args, **kwargs)`` will run in its quantized layers (module doc), on ``workers`` threads
    (default: the CPU count, at most 32), and returns what it did: ``recorded`` layer calls, ``distinct`` ones on
    devices where kernels compile (CUDA; the others' layers run PyTorch references), ``replayed`` real calls,
    ``device_checks`` and ``gemm_variants`` (fused-GEMM specializations) compiled from the record on, beside
    them, ``record_seconds`` (the record's share) and ``seconds``.
    ``fn``'s own return value is discarded (it ran on the recorded zeros). Not reentrant (one at a time)."""
    if workers is not None and workers < 1:
        raise ValueError(f"precompile: workers must be >= 1, got {workers}")
    if not _ACTIVE.acquire(blocking=False):
        raise RuntimeError("precompile: another precompile is running (the layers record process-wide)")
    t0 = time.perf_counter()
    try:
        n = workers or min(32, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="halfbyte-precompile") as pool:
            early = _Early(pool)
            recorder = _Recorder(early)
            hb_nn.RECORDER = recorder
            try:
                fn(*args, **kwargs)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # (waits for the compiles under way)
                raise
            finally:
                hb_nn.RECORDER = None
            record_seconds = time.perf_counter() - t0
            records = [r for r in recorder.calls.values() if _compiles_on(r[0].weight.device)]
            by_layer: dict[int, tuple] = {}
            for layer, M, dtype, inference, grad in records:
                by_layer.setdefault(id(layer), (layer, []))[1].append((M, dtype, inference, grad))
            budgets = {}
            for layer, _ in by_layer.values():
                d = layer.weight.device
                if d not in budgets:
                    free = torch.cuda.mem_get_info(d)[0] if d.type == "cuda" else 1 << 40
                    budgets[d] = _Budget(max(free // 2, 1))  # (a full device: one replay at a time)
            jobs = early.jobs()
            replays = [pool.submit(_replay, layer, calls, budgets) for layer, calls in by_layer.values()]
            results = [j.exception() or j.result() for j in jobs + replays]  # all end before an error is raised
        for r in results:
            if isinstance(r, BaseException):
                raise r
        replayed = sum(results[len(jobs):])
        for d in budgets:
            if d.type == "cuda":
                torch.cuda.synchronize(d)
        return dict(recorded=recorder.count, distinct=len(records), replayed=replayed,
                    device_checks=len(early.checks), gemm_variants=len(early.variants),
                    record_seconds=record_seconds, seconds=time.perf_counter() - t0)
    finally:
        _ACTIVE.release()
