"""The ``halfbyte::`` operator contract: every schema, fake (meta) implementation and autograd formula.

Each op's body is its pure-PyTorch reference (``halfbyte.formats``) and serves as the default kernel on every
device; the Triton kernels of ``halfbyte.kernels`` are registered for CUDA at the end of this file (only when
triton is installed, and imported on the first CUDA call so that ``import halfbyte`` stays free of triton) and are
tested against the reference. Fakes check dtypes and shapes so that torch.compile sees exact metadata;
the only data-dependent size (LLM.int8() outlier columns) uses ``new_dynamic_size``. One op is the other way
round: ``dequantize_4bit_fused``'s body launches the Triton kernel on CUDA (so that Inductor can launch it from
compiled code) and is the reference elsewhere.
"""

import importlib
import importlib.util
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from .formats import blockwise, fourbit, int8
from .formats.codebooks import dynamic_map


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- 4-bit -------------------------------------------------------------------------------------------------------


@torch.library.custom_op("halfbyte::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """A (any shape) fp16/bf16/fp32 -> packed ((n+1)//2,) uint8, absmax (ceil(n/blocksize),) float32."""
    return fourbit.quantize_4bit(A, blocksize, quant_type)


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    fourbit.check_4bit_args(blocksize, quant_type)
    torch._check(A.dtype in fourbit.FLOAT_DTYPES, lambda: f"4-bit quantization takes float tensors, got {A.dtype}")
    n = A.numel()
    return A.new_empty((n + 1) // 2, dtype=torch.uint8), A.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("halfbyte::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """packed uint8 bytes, absmax float32 -> tensor of ``shape`` and ``dtype``."""
    return fourbit.dequantize_4bit(A, absmax, blocksize, quant_type, tuple(shape), dtype)


@dequantize_4bit.register_fake
def _(A, absmax, blocksize, quant_type, shape, dtype):
    fourbit.check_4bit_args(blocksize, quant_type)
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    return A.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("halfbyte::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(n,) float32 -> codes (n,) uint8, absmax (ceil(n/blocksize),) float32 over the 256-entry ``code``."""
    return blockwise.quantize_blockwise(A, code, blocksize)


@quantize_blockwise.register_fake
def _(A, code, blocksize):
    torch._check(code.numel() == 256, lambda: f"code must have 256 entries, got {code.numel()}")
    n = A.numel()
    return A.new_empty(n, dtype=torch.uint8), A.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("halfbyte::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """(n,) uint8 codes -> (n,) ``dtype`` values ``code[A] * absmax[i // blocksize]``."""
    return blockwise.dequantize_blockwise(A, absmax, code, blocksize).to(dtype)


@dequantize_blockwise.register_fake
def _(A, absmax, code, blocksize, dtype):
    torch._check(A.dtype == torch.uint8, lambda: f"A must be uint8, got {A.dtype}")
    return A.new_empty(A.numel(), dtype=dtype)


def decode_absmax(
    absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None, offset: Tensor | None
) -> Tensor:
    """float32 4-bit absmax from plain (float32) or double-quantized (uint8 + nested stats) storage."""
    if nested_absmax is None:
        return absmax
    code = nested_code if nested_code is not None else dynamic_map(absmax.device)
    deq = torch.ops.halfbyte.dequantize_blockwise(absmax, nested_absmax, code, blockwise.NESTED_BLOCKSIZE,
                                                  torch.float32)
    return deq + offset.reshape(())


@torch.library.custom_op("halfbyte::gemm_4bit", mutates_args=())
def gemm_4bit(
    A: Tensor,
    B: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    bias: Tensor | None,
    shape: Sequence[int],
    blocksize: int,
    quant_type: str,
) -> Tensor:
    """``F.linear(A, W, bias)`` with W = dequantized 4-bit weight of ``shape`` (N, K), all in A's dtype.

    A: (..., K) float; B: packed weight bytes; absmax: (blocks,) float32, or uint8 with ``nested_absmax``
    (ceil(blocks/256),) float32, ``nested_code`` (256,) float32 and ``offset`` (1,) float32. W is dequantized
    straight into A's dtype from float32 math (one rounding, as bitsandbytes 0.50's fallback); bias is cast to
    A's dtype. Returns (..., N) in A's dtype.
    """
    am = decode_absmax(absmax, nested_absmax, nested_code, offset)
    W = fourbit.dequantize_4bit(B, am, blocksize, quant_type, tuple(shape), A.dtype)
    return torch.nn.functional.linear(A, W, None if bias is None else bias.to(A.dtype))


@gemm_4bit.register_fake
def _(A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type):
    fourbit.check_4bit_args(blocksize, quant_type)
    torch._check(len(shape) == 2, lambda: f"weight shape must be (N, K), got {shape}")
    torch._check(A.shape[-1] == shape[1], lambda: f"input has {A.shape[-1]} features, weight expects {shape[1]}")
    return A.new_empty((*A.shape[:-1], shape[0]))


def _gemm_4bit_setup(ctx, inputs, output):
    A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type = inputs
    ctx.save_for_backward(B, absmax, nested_absmax, nested_code, offset)
    ctx.meta = (tuple(shape), blocksize, quant_type, A.dtype, None if bias is None else bias.dtype)


def _gemm_4bit_backward(ctx, grad):
    B, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    shape, blocksize, quant_type, a_dtype, bias_dtype = ctx.meta
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        if getattr(ctx, "fused_dequant", False):  # eager CUDA (_Gemm4bitEager): nested absmax decoded in-kernel
            W = _DEQUANT_FUSED(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
                               shape[0] * shape[1], grad.dtype).view(shape)
        else:
            am = decode_absmax(absmax, nested_absmax, nested_code, offset)
            W = torch.ops.halfbyte.dequantize_4bit(B, am, blocksize, quant_type, shape, grad.dtype)
        grad_A = (grad @ W).to(a_dtype)
    if bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return grad_A, None, None, None, None, None, grad_bias, None, None, None


gemm_4bit.register_autograd(_gemm_4bit_backward, setup_context=_gemm_4bit_setup)


#: Most tokens ``gemm_4bit``'s CUDA kernel serves with fused kernels (the GEMV, ``kernels.gemm_small.MAX_M``) rather
#: than dequantize + matmul. Kept here so that ``halfbyte.nn`` need not import the kernels (and triton).
FUSED_MAX_TOKENS = 64


def fused_gemm_tokens(N: int, K: int, blocksize: int, quant_type: str, device: torch.device) -> int:
    """Up to how many tokens compiled 4-bit layers of an (N, K) weight on ``device`` call ``gemm_4bit`` instead of
    dequantizing in the graph: ``kernels.gemm_ring.MAX_M`` where its CUDA kernel serves bf16 and fp16 calls of the
    weight with the fused GEMM (from 17 tokens, up to ``FUSED_MAX_TOKENS`` in place of the small-batch kernel; the
    eager calls at any count ``gemm_ring.wanted`` takes); 0: never (not a Hopper GPU, no Gluon, a weight it does not
    serve). Imports triton, so it is asked for CUDA devices only."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return 0
    try:
        gemm_ring = importlib.import_module("halfbyte.kernels.gemm_ring")
        ok = gemm_ring.layer_wanted(N, K, blocksize, quant_type) and gemm_ring.device_ok(device)
    except Exception:  # noqa: BLE001  (a triton that fails to import or query: layers dequantize in the graph)
        return 0
    return gemm_ring.MAX_M if ok else 0


# Defined with a CompositeImplicitAutograd body rather than ``torch.library.triton_op``, which imports triton when
# it decorates (``import halfbyte`` must not, and must work without triton). The effect under torch.compile is the
# same: AOTAutograd decomposes the op into its body, where ``wrap_triton`` records the kernel launch for Inductor.
_FUSED_LIB = torch.library.Library("halfbyte", "FRAGMENT")  # module-level: it must outlive the registration
_FUSED_LIB.define(
    "dequantize_4bit_fused(Tensor B, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
    "Tensor code, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor")


def _reference_weight(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    """The in-graph dequantize ops' reference: float32 statistics may come as their int32 bits."""
    absmax, nested_absmax, offset = (None if t is None else t.view(torch.float32) if t.dtype == torch.int32 else t
                                     for t in (absmax, nested_absmax, offset))
    am = decode_absmax(absmax, nested_absmax, nested_code, offset)
    return fourbit.dequantize_4bit(B, am, blocksize, quant_type, tuple(shape), dtype)


def dequantize_4bit_fused(
    B: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    code: Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> Tensor:
    """``halfbyte::dequantize_4bit_fused``: the 4-bit weight of ``shape`` in ``dtype``, as ``gemm_4bit`` multiplies
    with it: packed bytes ``B``, absmax as ``gemm_4bit`` takes it (float32, or uint8 with the nested stats, decoded
    in the same kernel), ``code`` the (16,) float32 code table of ``quant_type``. Result: code[q] * absmax in
    float32, rounded once. The float32 statistics (absmax without double quantization, nested_absmax, offset) may
    also come as their int32 bits, as ``halfbyte.nn`` stores them: the kernel reads the bits as float32, so a
    compiled graph holds no dtype view of them (Inductor emits one aten call per view and use).

    On CUDA the body launches the Triton kernel through ``torch.library.wrap_triton``, so torch.compile traces the
    launch itself and Inductor issues it from its generated code, instead of calling an opaque op through the
    dispatcher (~45 us of host time per call). Compiled inference of a 4-bit layer over many tokens is this op and
    the matmul (``halfbyte.nn.Linear4bit.forward``). Elsewhere the body is the reference."""
    fourbit.check_4bit_args(blocksize, quant_type)
    if B.device.type != "cuda":
        return _reference_weight(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype)
    kernels = importlib.import_module("halfbyte.kernels.fourbit")
    n = _numel(shape)
    data = B.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    out = torch.empty(n, dtype=dtype, device=B.device)
    kernel, grid, args, kwargs = kernels.dequant_launch(data, absmax, nested_absmax, nested_code, offset, blocksize,
                                                        quant_type, n, out, code)
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    return out.view(tuple(shape))


_FUSED_LIB.impl("dequantize_4bit_fused", dequantize_4bit_fused, "CompositeImplicitAutograd")

# The same weight from an opaque op that also takes the layer's input, so that its buffer exists only from the
# input's computation to the matmul. ``dequantize_4bit_fused`` is a ``torch.empty`` filled by a kernel wrapper that
# the graph reads through ``getitem``; Inductor's ``reorder_for_locality`` pass never moves ``getitem`` nodes but sinks
# the activations computed after it to their consumers, so the buffer can end up allocated long before the launch's
# input exists: in a FLUX single block, the 94 MB proj_out weight beside the 113 MB MLP activation (BENCHMARKS.md,
# sessions 18-19). An opaque op allocates its own output when it runs, and that pass sinks it to its matmul.
_FUSED_LIB.define(
    "dequantize_4bit_after(Tensor x, Tensor B, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? offset, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor",
    # No layout constraint on the inputs: with the default (exact strides) Inductor stored the input a second time
    # for the op, beside the copy the matmul reads (a FLUX double block's 100 MB MLP activation, twice).
    tags=(torch.Tag.flexible_layout,))


def dequantize_4bit_after(
    x: Tensor,
    B: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> Tensor:
    """``halfbyte::dequantize_4bit_after``: the weight of ``shape`` in ``dtype`` that ``dequantize_4bit_fused``
    returns (same bytes; statistics as ``gemm_4bit`` takes them, float32 ones also as their int32 bits, nested code
    None for the dynamic map), computed only once ``x`` exists. ``x`` (the input the weight will multiply) is never
    read: it orders the op. This body is the reference (CPU, any device); CUDA runs the fused Triton kernel."""
    fourbit.check_4bit_args(blocksize, quant_type)
    return _reference_weight(B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype)


def _dequantize_4bit_after_fake(x, B, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                                dtype):
    fourbit.check_4bit_args(blocksize, quant_type)
    torch._check(len(shape) == 2, lambda: f"weight shape must be (N, K), got {shape}")
    torch._check(x.shape[-1] == shape[1], lambda: f"input has {x.shape[-1]} features, weight expects {shape[1]}")
    return B.new_empty(tuple(shape), dtype=dtype)


_FUSED_LIB.impl("dequantize_4bit_after", dequantize_4bit_after, "CompositeExplicitAutograd")
torch.library.register_fake("halfbyte::dequantize_4bit_after", _dequantize_4bit_after_fake, lib=_FUSED_LIB)


# --- 8-bit (LLM.int8()) ------------------------------------------------------------------------------------------


@torch.library.custom_op("halfbyte::int8_vectorwise_quant", mutates_args=())
def int8_vectorwise_quant(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(..., K) float -> CA (..., K) int8, SCA (rows,) float32, outlier_cols (n,) int64 (empty if none)."""
    return int8.int8_vectorwise_quant(A, threshold)


@int8_vectorwise_quant.register_fake
def _(A, threshold):
    torch._check(threshold >= 0, lambda: f"threshold must be >= 0, got {threshold}")
    rows = A.numel() // A.shape[-1] if A.shape[-1] else 0
    ca = A.new_empty(A.shape, dtype=torch.int8)
    sca = A.new_empty(rows, dtype=torch.float32)
    if threshold > 0:
        n = torch.library.get_ctx().new_dynamic_size()
        cols = A.new_empty(n, dtype=torch.int64)
    else:
        cols = A.new_empty(0, dtype=torch.int64)
    return ca, sca, cols


@torch.library.custom_op("halfbyte::int8_mixed_mm", mutates_args=())
def int8_mixed_mm(A: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """LLM.int8() linear: A (..., K) float, CB (N, K) int8, SCB (N,) float32 -> (..., N) in A's dtype."""
    return int8.int8_linear(A, CB, SCB, bias, threshold)


@int8_mixed_mm.register_fake
def _(A, CB, SCB, bias, threshold):
    torch._check(CB.dtype == torch.int8, lambda: f"CB must be int8, got {CB.dtype}")
    torch._check(SCB.dtype == torch.float32, lambda: f"SCB must be float32, got {SCB.dtype}")
    torch._check(A.shape[-1] == CB.shape[1], lambda: f"input has {A.shape[-1]} features, weight has {CB.shape[1]}")
    return A.new_empty((*A.shape[:-1], CB.shape[0]))


def _int8_setup(ctx, inputs, output):
    A, CB, SCB, bias, threshold = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.meta = (A.dtype, None if bias is None else bias.dtype)


def _int8_backward(ctx, grad):
    CB, SCB = ctx.saved_tensors
    a_dtype, bias_dtype = ctx.meta
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = (CB.to(torch.float32) * (SCB.reshape(-1, 1) * int8.INV_127)).to(grad.dtype)
        grad_A = (grad @ W).to(a_dtype)
    if bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return grad_A, None, None, grad_bias, None


int8_mixed_mm.register_autograd(_int8_backward, setup_context=_int8_setup)


# --- CUDA kernels (Triton) ---------------------------------------------------------------------------------------

#: op -> (module in halfbyte.kernels, function) registered as the op's CUDA kernel.
CUDA_KERNELS = {
    "quantize_4bit": ("fourbit", "quantize_4bit"),
    "dequantize_4bit": ("fourbit", "dequantize_4bit"),
    "gemm_4bit": ("gemm4bit", "gemm_4bit"),
    "int8_vectorwise_quant": ("int8", "int8_vectorwise_quant"),
    "int8_mixed_mm": ("int8_plan", "int8_mixed_mm"),  # cached prebuilt launches, else int8_mm.int8_mixed_mm
}


def _lazy_kernel(module: str, name: str):
    """A kernel that imports ``halfbyte.kernels.<module>`` (and with it triton) on its first call."""

    resolved = []

    def kernel(*args, **kwargs):
        if not resolved:
            resolved.append(getattr(importlib.import_module(f"halfbyte.kernels.{module}"), name))
        return resolved[0](*args, **kwargs)

    kernel.__name__ = f"{module}.{name}"
    return kernel


_DIRECT: dict[str, object] = {}
_DEQUANT_FUSED = None  # kernels.fourbit.dequantize: 4-bit dequantize with the nested absmax decoded in-kernel

# The CUDA kernels are registered on the dispatcher directly, not through ``CustomOpDef.register_kernel``: that
# wraps every call in ``torch._disable_dynamo`` and an output-aliasing check, 34 us of host time per call on an
# H100's host (``gemm_4bit`` through ``torch.ops``: 74 us, the kernel function itself: 41 us). Compiled graphs call
# the ops that way, ~500 times per FLUX step, and that host time left the GPU idle (BENCHMARKS.md, session 9).
# Every kernel here returns new tensors, which is all the aliasing check verifies.
_CUDA_LIB = torch.library.Library("halfbyte", "IMPL")  # module-level: it must outlive the registrations

if importlib.util.find_spec("triton") is not None:
    for _op, (_module, _name) in CUDA_KERNELS.items():
        _DIRECT[_op] = _lazy_kernel(_module, _name)
        _CUDA_LIB.impl(_op, _DIRECT[_op], "CUDA")
    _DEQUANT_FUSED = _lazy_kernel("fourbit", "dequantize")
    _CUDA_LIB.impl("dequantize_4bit_after", _lazy_kernel("gemm4bit", "dequantize_weight"), "CUDA")


# --- eager autograd without the dispatcher -----------------------------------------------------------------------
# A call that autograd records goes through the dispatcher, the custom op's autograd wrapper and its backend
# dispatch: ~180 us of host time per call on an H200's host, paid by every quantized layer of a QLoRA step. In
# eager mode these Functions record the same formulas (the ops' own setup_context/backward) around a direct call
# of the kernel the dispatcher would pick; torch.compile keeps tracing the ops.


class _Gemm4bitEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type):
        kernel = _DIRECT.get("gemm_4bit") if A.is_cuda else None
        out = (kernel or torch.ops.halfbyte.gemm_4bit)(A, B, absmax, nested_absmax, nested_code, offset, bias, shape,
                                                       blocksize, quant_type)
        _gemm_4bit_setup(ctx, (A, B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize,
                               quant_type), out)
        ctx.fused_dequant = kernel is not None
        return out

    backward = staticmethod(_gemm_4bit_backward)


class _Int8MixedMmEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, CB, SCB, bias, threshold):
        kernel = _DIRECT.get("int8_mixed_mm") if A.is_cuda else None
        out = (kernel or torch.ops.halfbyte.int8_mixed_mm)(A, CB, SCB, bias, threshold)
        _int8_setup(ctx, (A, CB, SCB, bias, threshold), out)
        return out

    backward = staticmethod(_int8_backward)


_EAGER_AUTOGRAD = {"gemm_4bit": _Gemm4bitEager.apply, "int8_mixed_mm": _Int8MixedMmEager.apply}


def direct_kernel(op: str, x: Tensor, *params: Tensor | None):
    """A callable with the signature of ``halfbyte::<op>`` (gemm_4bit or int8_mixed_mm) that a call with input
    ``x`` may use instead of the op, else None (then call the op).

    * eager inference on plain CUDA tensors: the op's registered CUDA kernel itself. The dispatcher's Python
      custom-op path costs ~30 us per call: on a FLUX step (~500 quantized layers) that host time outran the GPU.
    * eager calls that autograd records (training, any device): an ``autograd.Function`` with the op's own
      backward formula around the same kernel (~180 us less host time per call than the op's autograd wrapper).
    The op stays the only path under torch.compile/export (tracing), for tensor subclasses (fake, functional) and
    under functorch transforms.
    """
    if type(x) is not Tensor or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return None if torch._C._are_functorch_transforms_active() else _EAGER_AUTOGRAD.get(op)
    return _DIRECT.get(op) if x.is_cuda else None


def cuda_kernel(op: str):
    """The CUDA kernel registered for ``halfbyte::<op>`` (None without triton)."""
    return _DIRECT.get(op)


def plan_usable(op: str, x: Tensor, bias: Tensor | None) -> bool:
    """Whether a call of ``halfbyte::<op>`` with input ``x`` and ``bias`` may use an inference plan: the call is
    one that ``direct_kernel`` sends to the CUDA kernel itself (eager, nothing recorded, plain CUDA tensors), and no
    profiler hooks triton's launches (a plan's launches would not reach it). Written out rather than calling
    ``direct_kernel``: it runs on every eager call of every 4-bit layer."""
    if op not in _DIRECT or type(x) is not Tensor or not x.is_cuda or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    launch = sys.modules.get("halfbyte.kernels.launch")
    return launch is None or not launch.hooks_installed()


def inference_plan(op: str, x: Tensor, *args):
    """A prebuilt-launch plan (``kernels.gemm4bit.Plan``, ``kernels.fp8.Fp8Plan``) for eager inference calls of
    ``halfbyte::<op>`` like this one, or None where such a call must take ``direct_kernel``/the op (tracing,
    autograd recording, tensor subclasses, CPU, no triton, a profiler hooking triton's launches). ``args``: the op's
    arguments after ``x`` (gemm_4bit and gemm_4bit_fp8). The caller owns the plan and must check, before each use,
    that the tensors it was built from still sit at the same addresses (the plan holds addresses, not tensors)."""
    if op not in ("gemm_4bit", "gemm_4bit_fp8"):
        return None
    B, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type = args
    if not plan_usable(op, x, bias):
        return None
    N, K = (int(s) for s in shape)
    if op == "gemm_4bit_fp8":  # bias: cast to bfloat16 per call, any dtype
        fp8 = importlib.import_module("halfbyte.kernels.fp8")
        return fp8.Fp8Plan(B, absmax, nested_absmax, nested_code, offset, N, K, blocksize, quant_type, x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        return None
    gemm4bit = importlib.import_module("halfbyte.kernels.gemm4bit")
    return gemm4bit.Plan(B, absmax, nested_absmax, nested_code, offset, bias, N, K, blocksize, quant_type, x.dtype)
