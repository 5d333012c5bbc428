"""Triton 4-bit matmul ``out = x @ W.T + bias`` for ``halfbyte::gemm_4bit`` (x (M, K), W the 4-bit (N, K) weight).

* M == 1 (bandwidth-bound: the weight stream is the cost): a GEMV that decodes weight tiles in registers and never
  writes the weight out (``gemv``). On Hopper, 16-bit activations and weights from 2^23 elements: the TMA-ring
  kernel (``kernels.gemv_ring``). Elsewhere, by activation dtype (BENCHMARKS.md, "GEMV with register tables"):
  - bf16: ``gemv._gemv_lut_kernel`` reads the weight as 32-bit words of 8 codes and decodes each with ``prmt``
    register tables (``kernels.lut``, ~30 integer instructions per word instead of two table loads per byte);
  - fp16 (and bf16 where K % 2048 == 0): ``kernels.gemv_mma`` decodes the same way into 16-bit pairs and sums
    code * x on the tensor cores;
  - fp32, and where those do not apply (alignment, K): ``gemv._gemv_kernel``, two loads from the code table per
    byte.
* 17 tokens and more, bf16 or fp16, on Hopper: ``kernels.gemm_ring``, a fused GEMM that
  decodes the codes straight into the tensor cores' operand (the weight is never written out), in token tiles of
  64, 128 or 256, where ``gemm_ring.wanted`` says it beats the next path (weights from 2^24 elements, and 3072 x
  3072 ones from 513 tokens where its cost model says so: 0.41-0.95x the small-batch kernel's time at 24-64
  tokens, mostly 0.8-1.0x dequantize + cuBLAS's from 65 up to 8192).
* 2 <= M <= 64 with 16-bit activations (from 17 tokens only where the fused GEMM does not serve):
  ``kernels.gemm_small``, the GEMV's decode feeding ``mma`` with up to 32 tokens per decode (the weight is read
  once in 4 bits and never written out).
* Otherwise (fp32, other GPUs, the calls the cost model leaves): dequantize the whole weight with the nested
  absmax fused (``fourbit.dequantize``) into x's dtype, then cuBLAS. At M = 4608 the GEMMs are compute-bound and
  cuBLAS's speed is what counts.
  Dequantizing the next layer's weight on a side stream during this GEMM was tried and measured no faster (cuBLAS
  holds every SM, so the two kernels do not run concurrently; BENCHMARKS.md, "Side-stream dequantize").
The dequantize path uses the reference's weight values exactly (``code * absmax`` in float32, rounded once to x's
dtype); the fused GEMM rounds the code and the absmax to bf16 before their product (``gemm_ring``'s doc). The
GEMVs never round a weight: they sum ``code * x`` over each group sharing an absmax in float32 and
multiply the group's sum by the absmax once (bitsandbytes' GEMV rounds every weight to x's dtype first). The
register-table kernels use the codes rounded to x's dtype (as bitsandbytes' table is); fp32 uses them exactly.
The result differs from the reference by those roundings plus float32 sum order (tests/test_kernels.py derives
the bound).
"""

import functools

import torch

from ..formats import fourbit as ref4
from . import gemm_ring, gemm_small, gemv_mma, gemv_ring
from .common import INTERPRET, scratch_alloc, scratch_free
from .fourbit import absmax_args, code_table, dequant_launch, dequantize
from .gemv import (
    _gemv_kernel,
    _gemv_lut_kernel,
    fused_supported,
    gemv_launch,
    gemv_lut_launch,
    gemv_tables,
    lut_supported,
    lut_tables,
)
from .launch import PlanCache, bind, hooks_installed

#: Plans of the op's own calls (torch.compile graphs, direct kernel calls), keyed by ``plan_key``. ``halfbyte.nn``'s
#: eager layers keep their own plans.
PLANS = PlanCache()



def gemv(x, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
         config=None, use_mma: bool = True, use_ring: bool = True) -> torch.Tensor:
    """x (1, K) fp16/bf16/fp32 (unit column stride), packed 4-bit W (N, K), bias (N,) in x's dtype or None
    -> (1, N) in x's dtype. absmax: (N*K/blocksize,) float32, or uint8 with nested float32 stats. Kernel, where
    ``use_mma``: the TMA-ring one (``gemv_ring``) where it applies and ``use_ring``, else the tensor-core one
    (``gemv_mma``) where it applies; else ``gemv.gemv_tables`` (register tables for bf16, else table loads;
    ``config``, a ``gemv.Config``, shapes those two)."""
    data = B.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
    if use_mma and use_ring and gemv_ring.supported(x.dtype, N, K, blocksize, nested, absmax, x, data):
        return gemv_ring.ring_for(data, absmax, N, K, quant_type, x.dtype, nested)(x, bias)
    if use_mma and gemv_mma.mma_supported(x.dtype, K, blocksize, x, data):
        return gemv_mma.gemv_mma(x, data, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                                 quant_type)
    return gemv_tables(x, data, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
                       config)


def gemm_4bit(A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type):
    """CUDA kernel of ``halfbyte::gemm_4bit``: A (..., K) float -> (..., N) in A's dtype (contract in ops.py)."""
    ref4.check_4bit_args(blocksize, quant_type)
    N, K = (int(s) for s in shape)
    if A.dim() == 0 or A.shape[-1] != K:  # a (2, K/2) input has K elements too: the GEMV must not take it
        raise ValueError(f"gemm_4bit: input of shape {tuple(A.shape)} has {A.shape[-1] if A.dim() else 0} features, "
                         f"the {N}x{K} weight expects {K}")
    key = plan_key(A, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type)
    if key is not None:
        plan = PLANS.get(key, lambda: Plan(B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                                           quant_type, A.dtype))
        if plan is not None:
            out = plan(A, bias)
            if out is None:  # a token count whose small-batch launch is not bound yet
                plan.bind_small(A.numel() // K, B, absmax, nested_absmax, nested_code, offset)
                out = plan(A, bias)
            if out is not None:
                return out
    bias = None if bias is None else bias.to(A.dtype)
    M = A.numel() // K if K else 0
    if fused_supported(M, K, blocksize, A.dtype):
        x = A.reshape(1, K)
        if x.stride(1) != 1:
            x = x.contiguous()
        return gemv(x, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                    quant_type).view(*A.shape[:-1], N)
    data = B.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    # the fused GEMM first: from 17 tokens it beats the small-batch kernel where both serve (gemm_ring.wanted)
    nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
    if (A.dtype in (torch.bfloat16, torch.float16) and A.is_cuda
            and gemm_ring.wanted(M, N, K, gemm_ring.sms(A.get_device()))
            and A.device == data.device == absmax.device == (A.device if bias is None else bias.device)
            and gemm_ring.supported(N, K, blocksize, quant_type, A.dtype, absmax, data, nested=nested,
                                    has_bias=bias is not None)):
        x, bias = gemm_ring.aligned(A.reshape(M, K)), None if bias is None else gemm_ring.aligned(bias)
        return gemm_ring.gemm_for(data, absmax, N, K, quant_type, nested, A.dtype)(x, bias).view(*A.shape[:-1], N)
    if gemm_small.MAX_M >= M >= 2 and A.dtype in (torch.float16, torch.bfloat16):
        x = A.reshape(M, K)
        x = x if x.is_contiguous() else x.contiguous()
        if gemm_small.small_supported(M, N, K, x.dtype, blocksize, x, data):
            return gemm_small.mm_small(x, data, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize,
                                       quant_type).view(*A.shape[:-1], N)
    W = dequantize(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K, A.dtype)
    return torch.nn.functional.linear(A, W.view(N, K), bias)


class Plan:
    """Inference calls of one 4-bit weight in one activation dtype, with every launch prebuilt.

    A FLUX step makes ~500 4-bit calls; through ``gemm_4bit`` each pays ~35 us of Python (checks, key lookups,
    pointer queries) on top of the launch itself, and the host outran the GPU. A plan binds the dequantize launch
    (and the GEMV launch when the weight allows it) once, to device addresses (``launch.Bound``), and the
    small-batch kernel's when its owner binds them (``bind_small``; until then such calls return None), and the fused
    GEMM's (``gemm_ring.RingGemm``) where it serves, so a call is an allocation, one bound launch and, for more
    tokens, ``F.linear``. It holds no tensor: its owner passes the
    bias and checks that the weight tensors still sit where the plan was bound (``halfbyte.nn``'s eager layers
    compare addresses; ``gemm_4bit`` itself, for compiled graphs and direct calls, looks plans up by the call's
    addresses, ``plan_key``). Results are those of ``gemm_4bit``'s direct path (same kernels, same arguments).
    """

    __slots__ = ("N", "K", "dtype", "device", "_deq", "_gemv", "_ring", "_atomic", "_small", "_small_args", "_fused")

    def __init__(self, B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type,
                 dtype: torch.dtype):
        """Tensors as ``gemm_4bit`` takes them (CUDA), ``bias`` in ``dtype`` or None; ``dtype`` the activations'."""
        ref4.check_4bit_args(blocksize, quant_type)
        self.N, self.K, self.dtype, self.device = N, K, dtype, B.device
        data = B.reshape(-1)
        data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        self._deq = bind_dequantize(data, absmax, nested_absmax, nested_code, offset, N * K, blocksize, quant_type,
                                    dtype)
        self._gemv, self._ring, self._atomic = None, None, False
        nested = None if nested_absmax is None else (nested_absmax, nested_code, offset)
        if fused_supported(1, K, blocksize, dtype):
            x = torch.empty(1, K, dtype=dtype, device=B.device)  # calls pass 16-byte aligned rows like this one
            if gemv_ring.supported(dtype, N, K, blocksize, nested, absmax, x, data):
                self._ring = gemv_ring.RingGemv(data, absmax, N, K, quant_type, dtype, nested=nested)
            if gemv_mma.mma_supported(dtype, K, blocksize, x, data):
                fn, launcher = gemv_mma._gemv_mma_kernel, functools.partial(gemv_mma.mma_launch, dtype=dtype)
                tables = gemv_mma.mma_tables(quant_type, B.device, dtype)
            elif lut_supported(dtype, x, data):
                fn, launcher, tables = _gemv_lut_kernel, gemv_lut_launch, lut_tables(quant_type, B.device)
            else:
                fn, launcher, tables = _gemv_kernel, gemv_launch, (code_table(quant_type, B.device),)
            grid, steps, self._atomic, kwargs = launcher(N, K, blocksize, nested_absmax is not None,
                                                         bias is not None, B.device)
            out = torch.empty(1, N, dtype=torch.float32 if self._atomic else dtype, device=B.device)
            args = (x, data, *absmax_args(absmax, nested_absmax, nested_code, offset, B.device), *tables,
                    bias if bias is not None else out, out, N, K, steps)
            self._gemv = bind(fn, grid, args, kwargs, free=(0, 7 + len(tables)))
        # Token count -> bound launches (see bind_small): a dict lookup per call, the launch shape computed once.
        self._small: dict[int, tuple] = {}
        self._small_args = None
        x = torch.empty(2, K, dtype=dtype, device=B.device)
        if gemm_small.small_supported(2, N, K, dtype, blocksize, x, data):
            self._small_args = (blocksize, nested_absmax is not None, bias is not None, quant_type)
        # Last: its device check is the longest compile (``plan_checks``), so threads that build plans side by side
        # bind the launches above while one of them runs it.
        self._fused = None  # calls of 17 tokens or more that gemm_ring.wanted picks
        if (gemm_ring.weight_wanted(N, K, blocksize, quant_type) and gemm_ring.supported(
                N, K, blocksize, quant_type, dtype, absmax, data, nested=nested, has_bias=bias is not None)):
            self._fused = gemm_ring.RingGemm(data, absmax, N, K, quant_type, nested, dtype)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (..., K) CUDA in the plan's dtype on the current device -> (..., N): ``gemm_4bit``'s result.
        (Outputs are made from the sizes as separate ints: ``torch.empty`` parses a ``torch.Size`` ~1.5 us slower.)"""
        stream = torch._C._cuda_getCurrentRawStream(self.device.index)
        if self._gemv is not None and x.numel() == self.K and x.shape[-1] == self.K:
            if x.stride(-1) == 1 and x.data_ptr() % 16 == 0:
                if self._ring is not None or not self._atomic:
                    out = torch.empty(*x.shape[:-1], self.N, dtype=self.dtype, device=self.device)
                    if self._ring is not None:
                        self._ring.run(stream, x.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr())
                    else:
                        self._gemv(stream, x.data_ptr(), out.data_ptr())
                    return out
                acc = torch.zeros(*x.shape[:-1], self.N, dtype=torch.float32, device=self.device)
                self._gemv(stream, x.data_ptr(), acc.data_ptr())
                if bias is not None:
                    acc += bias
                return acc.to(self.dtype)
        M = x.numel() // self.K if self.K else 0
        if self._fused is not None and gemm_ring.wanted(M, self.N, self.K, self._fused.programs):
            out = torch.empty(*x.shape[:-1], self.N, dtype=self.dtype, device=self.device)
            x, bias = gemm_ring.aligned(x), None if bias is None else gemm_ring.aligned(bias)
            self._fused.run(stream, x.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr(), M)
            return out
        if (self._small_args is not None and 2 <= M <= gemm_small.max_m(self.N, self.K) and x.shape[-1] == self.K
                and x.is_contiguous() and x.data_ptr() % 16 == 0):
            hit = self._small.get(M)
            if hit is None:
                return None  # not bound yet: the caller, who holds the tensors, calls bind_small
            mm, sum_, splits, _ = hit
            out = torch.empty(*x.shape[:-1], self.N, dtype=self.dtype, device=self.device)
            b = out.data_ptr() if bias is None else bias.data_ptr()  # never read without a bias
            if sum_ is None:
                mm(stream, x.data_ptr(), b, out.data_ptr(), M)
            else:  # the split's float32 partial sums: a stream-ordered temporary, given back once both are queued
                ws = scratch_alloc(splits * M * self.N * 4, stream)
                try:
                    mm(stream, x.data_ptr(), b, ws, M)
                    sum_(stream, ws, b, out.data_ptr(), M)
                finally:
                    scratch_free(ws)
            return out
        W = torch.empty((self.N, self.K), dtype=self.dtype, device=self.device)
        self._deq(stream, W.data_ptr())
        return torch.nn.functional.linear(x, W, bias)

    def bind_small(self, M: int, B, absmax, nested_absmax, nested_code, offset) -> None:
        """Bind the small-batch kernel's launches for M tokens (token tiles and grid: a few per plan) to these
        weight tensors (the ones the plan was built from; the plan keeps their addresses, not them). Free
        arguments: x, bias, out (or the partial sums' workspace) and M (not specialized); the sum's: workspace,
        bias, out, M. Token counts with the same launch shape share the bound launches. No-op where the plan does
        not serve M tokens."""
        if self._small_args is None or not 2 <= M <= gemm_small.max_m(self.N, self.K) or M in self._small:
            return
        blocksize, nested, has_bias, quant_type = self._small_args
        grid, steps, partial, kwargs = gemm_small.small_launch(self.N, self.K, M, blocksize, nested, has_bias,
                                                               self.device, self.dtype)
        for hit in self._small.values():  # a few launch shapes per plan: (token tiles, grid)
            if hit[3] == (kwargs["TT"], grid):
                self._small[M] = hit
                return
        data = B.reshape(-1)
        data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        stats = absmax_args(absmax, nested_absmax, nested_code, offset, self.device)
        x = torch.empty(M, self.K, dtype=self.dtype, device=self.device)
        out = torch.empty(M, self.N, dtype=self.dtype, device=self.device)
        ws = torch.empty(grid[1], M, self.N, dtype=torch.float32, device=self.device) if partial else out
        args = (x, data, *stats, *gemm_small.mma_tables(quant_type, self.device, self.dtype), out, ws, M, self.N,
                self.K, steps)
        mm = bind(gemm_small._mm_small_kernel, grid, args, kwargs, free=(0, 8, 9, 10))
        sum_ = None
        if partial:
            sgrid, skw = gemm_small.sum_launch(self.N, grid[1], has_bias)
            sum_ = bind(gemm_small._split_sum_kernel, sgrid, (ws, out, out, M, self.N), skw, free=(0, 1, 2, 3))
        self._small[M] = (mm, sum_, grid[1], (kwargs["TT"], grid))


def plan_checks(N: int, K: int, blocksize: int, quant_type: str, dtype: torch.dtype, nested: bool, has_bias: bool,
                device: torch.device) -> dict[tuple, functools.partial]:
    """The device checks that building a ``Plan`` of such a weight (CUDA ``device``, activations in ``dtype``) would
    run, by name: each compiles and runs a kernel once per device (~1-6 s), and a plan runs them one after another.
    ``halfbyte.precompile`` starts them all at once before it builds plans. Tensor alignment is not known here, so
    a check may be listed that a plan of misaligned tensors would skip."""
    checks = {}
    if fused_supported(1, K, blocksize, dtype):
        if gemv_ring.shape_ok(dtype, N, K, blocksize, device):
            checks[("gemv_ring", device, dtype, nested)] = functools.partial(gemv_ring.verdict, device, dtype, nested)
        if gemv_mma.shape_ok(dtype, K, blocksize):
            checks[("gemv_mma", device)] = functools.partial(gemv_mma.layout_ok, device)
    if gemm_small.shape_ok(K, dtype, blocksize):
        checks[("gemm_small", device)] = functools.partial(gemm_small.layout_ok, device)
    if (gemm_ring.weight_wanted(N, K, blocksize, quant_type) and gemm_ring.shape_ok(N, K, blocksize, quant_type, dtype)
            and gemm_ring.device_ok(device)):
        checks[("gemm_ring", device, nested, dtype)] = functools.partial(gemm_ring.verdict, device, nested, has_bias,
                                                                        dtype)
    return checks


def bind_dequantize(data, absmax, nested_absmax, nested_code, offset, n: int, blocksize: int, quant_type: str,
                    dtype: torch.dtype):
    """The dequantize launch of these weight tensors (``data`` uint8) into ``dtype``, bound with the output's
    address free: ``bound(stream, out_ptr)`` writes the ``n`` values (``dequantize``'s bytes)."""
    W = torch.empty(0, dtype=dtype, device=data.device)  # the output's place: only its dtype specializes
    kernel, grid, args, kwargs = dequant_launch(data, absmax, nested_absmax, nested_code, offset, blocksize,
                                                quant_type, n, W)
    bound = bind(kernel, grid, args, kwargs, free=(6,))
    if bound is None:
        raise RuntimeError("kernels.gemm4bit: launches cannot be bound here (interpreter or launch hooks)")
    return bound


#: Bound dequantize launches for ``halfbyte::dequantize_4bit_after`` (compiled graphs' weights), keyed as plans.
DEQUANT_PLANS = PlanCache()


def dequantize_weight(x, B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    """CUDA kernel of ``halfbyte::dequantize_4bit_after``: the (N, K) weight in ``dtype`` (contract in ops.py; of
    ``x`` only the dtype and device are read). A compiled graph calls it once per layer and step with the same
    tensors, so from a weight's second call on it is an allocation and one bound launch (``DEQUANT_PLANS``), not
    ``dequantize``'s checks and launch-cache lookup."""
    N, K = (int(s) for s in shape)
    key = None
    if x.dtype == dtype:
        key = plan_key(x, B, absmax, nested_absmax, nested_code, offset, None, N, K, blocksize, quant_type)
    if key is not None:
        data = B.reshape(-1)
        data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        bound = DEQUANT_PLANS.get(key, lambda: bind_dequantize(data, absmax, nested_absmax, nested_code, offset,
                                                               N * K, blocksize, quant_type, dtype))
        if bound is not None:
            W = torch.empty((N, K), dtype=dtype, device=B.device)
            bound(torch._C._cuda_getCurrentRawStream(key[1]), W.data_ptr())
            return W
    return dequantize(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K, dtype).view(N, K)


def plan_key(A, B, absmax, nested_absmax, nested_code, offset, bias, N: int, K: int, blocksize: int,
             quant_type: str) -> tuple | None:
    """The cache key of a ``gemm_4bit`` call that a ``Plan`` can serve (the addresses, shapes and dtypes it would
    be bound to), or None where the call must take the direct path (interpreter, profiler hooks on triton's
    launches, a bias in another dtype, non-contiguous or foreign-device weight tensors, not the current device)."""
    if INTERPRET or type(A) is not torch.Tensor or not A.is_cuda or A.dtype not in ref4.FLOAT_DTYPES:
        return None
    if bias is not None and bias.dtype != A.dtype:
        return None
    dev = A.get_device()
    if dev != torch._C._cuda_getDevice():
        return None
    tensors = (B, absmax, nested_absmax, nested_code, offset, bias)
    for t in tensors:
        if t is not None and (t.get_device() != dev or not t.is_contiguous()):
            return None
    if hooks_installed():
        return None
    return (A.dtype, dev, N, K, blocksize, quant_type, absmax.dtype,
            *(0 if t is None else t.data_ptr() for t in tensors))
