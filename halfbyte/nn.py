"""Quantized drop-in replacements for ``nn.Linear``: ``Linear4bit`` (NF4/FP4) and ``Linear8bit`` (LLM.int8()).

Design (docs/integration-notes.md §0): every tensor is a registered parameter or persistent buffer under its
real name, so ``state_dict()`` keys are attribute paths the Hugging Face loaders and accelerate can follow; float32
statistics are stored as int32 bit-views, so no dtype cast (``model.to(torch.bfloat16)``, a loader's
``torch_dtype``, ``pipe.to("cuda", torch.bfloat16)``) can touch them, while device moves work as usual. The
bitsandbytes key layout exists only at the file boundary (``halfbyte.io.bnb``). Layers are built explicitly
(``from_linear`` or the constructor for empty shells); ``forward`` is one ``halfbyte::`` op call and never mutates
state (in eager mode ``ops.direct_kernel`` skips the dispatcher: inference on CUDA calls the op's registered CUDA
kernel, training calls an autograd.Function with the op's own backward; the same code without the dispatcher's
per-call cost). Weights are frozen; inputs and bias get gradients, so adapters can train on top.
"""

import torch
from torch import Tensor, nn

from . import ops as _ops  # noqa: F401  (registers the halfbyte:: ops)
from . import ops_fp8 as _ops_fp8
from . import pieces, transfer
from .formats import blockwise, fourbit
from .formats import int8 as int8_format
from .pieces import release_scratch  # noqa: F401  (public here: callers quantizing layers one by one)
from .tables import code_table as _code_table
from .tables import nested_code as _nested_code

#: Compiled CUDA inference of a 4-bit layer over more tokens than the fused kernels serve dequantizes inside the
#: graph (``Linear4bit._dequantize_in_graph``). False keeps the opaque ``gemm_4bit`` op there (benches compare).
DEQUANTIZE_IN_GRAPH = True

#: How that in-graph dequantize is issued. "launch": ``ops.dequantize_4bit_fused``, a launch Inductor issues itself
#: (the least host time), whose ``torch.empty`` output the scheduler may allocate early: in a FLUX single block it put
#: the 94 MB proj_out weight beside the MLP activation, 94 MB above bitsandbytes' compiled peak. "after": the opaque
#: op ``ops.dequantize_4bit_after``, which takes the layer's input and allocates the weight when it runs, so the
#: weight lives from its input to its matmul (~15 us more host time per call). "auto" (the default): "after" for
#: layers that narrow (in_features > out_features: MLP down-projections, FLUX's proj_out), whose input is the block's
#: widest activation, the one an early weight would stack on; "launch" for the rest (BENCHMARKS.md, session 19).
IN_GRAPH_DEQUANTIZE = "auto"

#: While ``halfbyte.precompile`` records a call: a callable ``(layer, x) -> output`` that every quantized layer's
#: eager forward hands its call to instead of computing (it notes the call and returns zeros); else None.
RECORDER = None



def _f32_bits(t: Tensor) -> Tensor:
    """float32 tensor -> int32 tensor with the same bits (the storage form of statistics)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def _bias_for(linear: nn.Linear, device: torch.device, dtype: torch.dtype | None) -> nn.Parameter:
    """``linear.bias`` on ``device``, cast to ``dtype`` if given (shares memory when nothing changes)."""
    b = linear.bias.detach()
    return nn.Parameter(b.to(device, dtype or b.dtype), requires_grad=linear.bias.requires_grad)


class _QuantizedLinear(nn.Module):
    _f32_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept float32 statistics (bitsandbytes' dtype) as well as the int32 bit-views that state_dict() gives.
        for name in self._f32_buffers:
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype == torch.float32:
                state_dict[prefix + name] = _f32_bits(t)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._cache_tables()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._cache_tables()
        return out

    def _cache_tables(self) -> None:
        """Where the layer reaches a device (built, moved, loaded): cache the tables its forward reads there, so
        that a first call traced by torch.compile finds them (``halfbyte.tables``)."""

    def _check_input(self, x: Tensor) -> None:
        if x.device != self.weight.device:  # else the CUDA kernels would get a host pointer (triton's bare error)
            raise RuntimeError(
                f"{type(self).__name__}({self.in_features} -> {self.out_features}) holds its weight on "
                f"{self.weight.device} but got an input on {x.device}: move the inputs to the model's device"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}({self.in_features} -> {self.out_features}) got a {x.dtype} input; it computes "
                "on floating-point activations. A model that casts activations to `weight.dtype` (T5's feed-forward "
                "before `wo`) must keep that layer unquantized (transformers' _keep_in_fp32_modules, or "
                "llm_int8_skip_modules)"
            )

    def __getstate__(self):
        # Inference plans hold device addresses and compiled launchers: never pickled or deep-copied. (The compiled
        # route, _ring_gemm_tokens, is kept: a deep copy on this machine keeps it right, and elsewhere it only sends
        # compiled calls to gemm_4bit, whose CUDA kernel picks what that device runs.)
        state = dict(self.__dict__)
        state.pop("_plans", None)
        return state

    def _refuse_cast(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} holds quantized data and cannot change dtype; cast the activations instead, "
            "or call halfbyte.dequantize_(model) first"
        )

    def to(self, *args, **kwargs):
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None:
            self._refuse_cast()
        return super().to(*args, **kwargs)

    half = float = double = bfloat16 = _refuse_cast

    def type(self, dst_type):
        self._refuse_cast()

    @property
    def W_q(self) -> Tensor:
        """The packed weight (same tensor as ``weight``). peft's ``dequantize_module_weight`` (used by DoRA and by
        LoRA variants that read the base weight) calls ``module.dequantize()`` only on modules that have a ``W_q``
        attribute; without it peft would take the packed bytes for the float weight."""
        return self.weight


class Linear4bit(_QuantizedLinear):
    """4-bit blockwise linear layer, bitsandbytes' ``Linear4bit`` format.

    Tensors (n = out_features * in_features, B = ceil(n / blocksize)):
        weight: packed codes, uint8, (out_features // 2, in_features) for even out_features else ((n + 1) // 2,);
            the bytes of bitsandbytes' ((n + 1) // 2, 1) tensor, frozen.
        absmax: (B,) float32 stored as int32 bits, or (B,) uint8 codes with double quantization.
        nested_absmax: (ceil(B / 256),) float32 as int32 bits (double quantization only).
        offset: (1,) float32 as int32 bits (double quantization only).
        bias: (out_features,) floating point, or None.
    Attributes: quant_type, blocksize, double_quant, dtype (of the quantized weight; dequantization target),
    compute_dtype (None = the input's dtype), quant_storage (dtype of the packed bytes in bitsandbytes files),
    fp8_compute (opt-in, not saved: calls over more than ``ops.FUSED_MAX_TOKENS`` tokens run on fp8 tensor cores,
    ``halfbyte.set_fp8_compute``; compute_dtype is then not used).
    """

    _f32_buffers = ("absmax", "nested_absmax", "offset")
    fp8_compute = False
    _ring_gemm_tokens = 0  # see _cache_tables

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        dtype: torch.dtype = torch.float32,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        fourbit.check_4bit_args(blocksize, quant_type)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.dtype, self.compute_dtype, self.quant_storage = dtype, compute_dtype, quant_storage
        n = in_features * out_features
        nb = fourbit.num_blocks(n, blocksize)
        packed_shape = (out_features // 2, in_features) if out_features % 2 == 0 else (fourbit.packed_numel(n),)
        self.weight = nn.Parameter(torch.empty(packed_shape, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("absmax", torch.empty(nb, dtype=torch.uint8 if double_quant else torch.int32,
                                                   device=device))
        nested = fourbit.num_blocks(nb, blockwise.NESTED_BLOCKSIZE)
        self.register_buffer("nested_absmax", torch.empty(nested, dtype=torch.int32, device=device)
                             if double_quant else None)
        self.register_buffer("offset", torch.empty(1, dtype=torch.int32, device=device) if double_quant else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._cache_tables()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "Linear4bit":
        """Quantize ``linear`` (on ``device`` if given, else where its weight is). A meta weight gives a shell.

        ``dtype``: cast the weight and bias to it first (default: the weight's dtype); it becomes the layer's
        ``dtype``. The weight is read, cast and quantized in row pieces (``pieces.QUANT_PIECE_NUMEL``), so it may be a
        memory-mapped tensor on another device without ever being copied whole. On CUDA the pieces live in a
        scratch memory pool kept for the next call (``pieces.scratch``); ``quantize_`` and the loaders release it when
        they finish, callers quantizing layers one by one call ``halfbyte.nn.release_scratch()``.
        """
        w = linear.weight.detach()
        device = torch.device(device) if device is not None else w.device
        cast, dtype = dtype, dtype or w.dtype
        shell = w.is_meta or device.type == "meta"
        # A real layer is built as a meta shell and filled: no placeholder tensors allocated and dropped.
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type=quant_type,
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, dtype=dtype,
                    quant_storage=quant_storage, device=device if shell else "meta")
        if linear.bias is not None:
            layer.bias = _bias_for(linear, device, cast)
        if shell:
            return layer
        N, K = w.shape
        n, nb = N * K, fourbit.num_blocks(N * K, blocksize)
        packed = torch.empty(fourbit.packed_numel(n), dtype=torch.uint8, device=device)
        if double_quant:  # the float32 absmax is then a temporary: only its double-quantized form stays
            codes = torch.empty(nb, dtype=torch.uint8, device=device)
            nested = torch.empty(fourbit.num_blocks(nb, blockwise.NESTED_BLOCKSIZE), dtype=torch.float32,
                                 device=device)
            with pieces.scratch(device):
                absmax = torch.empty(nb, dtype=torch.float32, device=device)
        else:
            absmax = torch.empty(nb, dtype=torch.float32, device=device)
        with pieces.scratch(device):
            for r0, r1, piece in transfer.row_pieces_to(w, pieces.row_pieces(N, K, device, blocksize), device, dtype):
                p, a = torch.ops.halfbyte.quantize_4bit(piece, blocksize, quant_type)
                e0 = r0 * K  # a multiple of blocksize (even): the piece's bytes and blocks start on boundaries
                packed[e0 // 2:e0 // 2 + p.numel()] = p
                absmax[e0 // blocksize:e0 // blocksize + a.numel()] = a
            if double_quant:
                offset = pieces.double_quantize(absmax, codes, nested)
        layer.weight = nn.Parameter(packed.view(layer.weight.shape), requires_grad=False)
        if double_quant:
            layer.absmax, layer.nested_absmax, layer.offset = codes, _f32_bits(nested), _f32_bits(offset.clone())
        else:
            layer.absmax = _f32_bits(absmax)
        layer._cache_tables()
        return layer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _cache_tables(self) -> None:
        dev = self.weight.device
        if dev.type != "meta":
            _code_table(self.quant_type, dev)
            if self.double_quant:
                _nested_code(dev)
        # Decided here, not in a traced forward (it queries the device): compiled calls of this layer leave the
        # matmul to the op, whose CUDA kernel takes the fused GEMM (``kernels.gemm_ring``).
        self._ring_gemm_tokens = _ops.fused_gemm_tokens(self.out_features, self.in_features, self.blocksize,
                                                        self.quant_type, dev)

    def quant_stats(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(absmax, nested_absmax, nested_code, offset) as the ops take them (float32, or uint8 + nested)."""
        if not self.double_quant:
            return self.absmax.view(torch.float32), None, None, None
        return (self.absmax, self.nested_absmax.view(torch.float32), _nested_code(self.absmax.device),
                self.offset.view(torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and RECORDER is not None:  # (traced: no guard on RECORDER)
            return RECORDER(self, x)
        if self.fp8_compute and x.numel() // self.in_features > _ops.FUSED_MAX_TOKENS:
            return _ops_fp8.forward(self, x, _code_table(self.quant_type, x.device),
                                    _nested_code(x.device) if self.double_quant else None)
        if x.is_cuda and (self.compute_dtype is None or self.compute_dtype == x.dtype):
            plan = self._inference_plan(x)
            if plan is not None:
                out = plan(x, self.bias)
                if out is None:  # a token count whose small-batch launch is not bound yet: the layer holds the tensors
                    plan.bind_small(x.numel() // self.in_features, self.weight, *self.quant_stats())
                    out = plan(x, self.bias)
                if out is not None:
                    return out
        self._check_input(x)
        cdt = self.compute_dtype or x.dtype
        if x.is_cuda and torch.compiler.is_compiling() and self._dequantize_in_graph(x):
            # The statistics go in as stored (int32 bits): the kernel reads them as float32, no view in the graph.
            ncode = _nested_code(self.absmax.device) if self.double_quant else None
            mode = IN_GRAPH_DEQUANTIZE
            if mode == "auto":
                mode = "after" if self.in_features > self.out_features else "launch"
            if mode == "after":
                W = torch.ops.halfbyte.dequantize_4bit_after(
                    x, self.weight, self.absmax, self.nested_absmax, ncode, self.offset, self.blocksize,
                    self.quant_type, list(self.shape), cdt)
            else:
                W = torch.ops.halfbyte.dequantize_4bit_fused(
                    self.weight, self.absmax, self.nested_absmax, ncode, self.offset,
                    _code_table(self.quant_type, x.device), self.blocksize, self.quant_type, list(self.shape), cdt)
            bias = None if self.bias is None else self.bias.to(cdt)
            return nn.functional.linear(x.to(cdt), W, bias).to(x.dtype)
        absmax, nested_absmax, nested_code, offset = self.quant_stats()
        fn = _ops.direct_kernel("gemm_4bit", x, self.bias) or torch.ops.halfbyte.gemm_4bit
        out = fn(x.to(cdt), self.weight, absmax, nested_absmax, nested_code, offset, self.bias, list(self.shape),
                 self.blocksize, self.quant_type)
        return out.to(x.dtype)

    def _dequantize_in_graph(self, x: Tensor) -> bool:
        """Whether a traced CUDA forward dequantizes in the graph (``ops.dequantize_4bit_fused`` or
        ``ops.dequantize_4bit_after``, as ``IN_GRAPH_DEQUANTIZE`` picks) and leaves the matmul to Inductor, instead of
        calling ``gemm_4bit``: the calls ``gemm_4bit`` would serve by dequantize + matmul anyway (more than
        ``ops.FUSED_MAX_TOKENS`` tokens; not bf16/fp16 calls of the layers ``kernels.gemm_ring`` serves), with nothing
        recorded for backward (a traced backward would keep the dequantized weight alive until it runs; ``gemm_4bit``'s
        dequantizes it again). Same numbers as ``gemm_4bit`` up to how Inductor adds the bias."""
        if not DEQUANTIZE_IN_GRAPH:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return False
        M = x.numel() // self.in_features
        # a guard on M (as the line after; the dtype first, so that other dtypes get none): a second compile serves
        # token counts across the boundary
        if (self.compute_dtype or x.dtype) in (torch.bfloat16, torch.float16) and M <= self._ring_gemm_tokens:
            return False
        return M > _ops.FUSED_MAX_TOKENS

    def _inference_plan(self, x: Tensor, op: str = "gemm_4bit"):
        """The prebuilt-launch plan for this eager inference call of ``op`` (``ops.inference_plan``: gemm_4bit, or
        gemm_4bit_fp8 in fp8 compute), or None.

        One plan per activation dtype, valid while the layer's tensors stay where it was built (compared by
        address on every call). When they move between calls (offloading hooks that bring the weights in for each
        forward), a plan is only rebuilt once the same addresses are seen twice in a row, so a layer whose weights
        never stay put takes the ordinary path instead of rebuilding a plan per call.
        """
        params, bufs = self._parameters, self._buffers  # direct: Module.__getattr__ costs ~0.5 us a name
        b = params.get("bias")  # None when built without bias (then not registered)
        if not x.is_floating_point() or not _ops.plan_usable(op, x, b):
            return None
        dq = self.double_quant
        key = (params["weight"].data_ptr(), bufs["absmax"].data_ptr(), 0 if b is None else b.data_ptr(),
               bufs["nested_absmax"].data_ptr() if dq else 0, bufs["offset"].data_ptr() if dq else 0,
               x.get_device())
        if key[-1] != torch._C._cuda_getDevice():  # bound launches go to the current device's context
            return None
        if params["weight"].get_device() != key[-1]:  # weights elsewhere: the direct path raises a clear error
            return None
        plans = self.__dict__.setdefault("_plans", {})
        slot = x.dtype if op == "gemm_4bit" else (op, x.dtype)
        entry = plans.get(slot)
        if entry is not None and entry[0] == key and entry[1] is not None:
            return entry[1]
        if entry is not None and entry[0] != key:  # moved since the last call: wait until it stays put
            plans[slot] = (key, None)
            return None
        absmax, nested_absmax, nested_code, offset = self.quant_stats()
        plan = _ops.inference_plan(op, x, self.weight, absmax, nested_absmax, nested_code, offset, b,
                                   self.shape, self.blocksize, self.quant_type)
        plans[slot] = (key, plan)
        return plan

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) weight in ``dtype`` (default: the dtype it was quantized from)."""
        absmax = _ops.decode_absmax(*self.quant_stats())
        return torch.ops.halfbyte.dequantize_4bit(self.weight, absmax, self.blocksize, self.quant_type,
                                                  list(self.shape), dtype or self.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"dtype={self.dtype}, compute_dtype={self.compute_dtype}"
                + (", fp8_compute=True" if self.fp8_compute else ""))


class Linear8bit(_QuantizedLinear):
    """LLM.int8() linear layer, bitsandbytes' ``Linear8bitLt`` format (inference weights, ``has_fp16_weights=False``).

    Tensors: weight (out_features, in_features) int8 (``CB``), frozen; SCB (out_features,) float32 row absmax of
    the float16 weight, stored as int32 bits; bias (out_features,) or None. ``threshold``: activation outlier
    threshold (0 disables the decomposition). Output dtype = input dtype; the int8 result passes through float16.
    """

    _f32_buffers = ("SCB",)
    #: ``kernels.share.Share`` of the layers that read this layer's input too (``share_int8_inputs``); a class
    #: default, so that layers unpickled from before it existed have one
    share = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        threshold: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.dtype = float(threshold), dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        threshold: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "Linear8bit":
        """Quantize ``linear`` row-wise (weight cast to float16 first, as bitsandbytes). Meta weight -> shell.

        ``dtype``: cast the weight and bias to it first (default: the weight's dtype); it becomes the layer's
        ``dtype``. Quantizes in row pieces, with the same scratch pool as ``Linear4bit.from_linear``.
        """
        w = linear.weight.detach()
        device = torch.device(device) if device is not None else w.device
        cast, dtype = dtype, dtype or w.dtype
        shell = w.is_meta or device.type == "meta"
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold=threshold,
                    dtype=dtype, device=device if shell else "meta")
        if linear.bias is not None:
            layer.bias = _bias_for(linear, device, cast)
        if shell:
            return layer
        N, K = w.shape
        CB = torch.empty(N, K, dtype=torch.int8, device=device)
        SCB = torch.empty(N, dtype=torch.float32, device=device)
        with pieces.scratch(device):
            for r0, r1, piece in transfer.row_pieces_to(w, pieces.row_pieces(N, K, device), device, dtype):
                CB[r0:r1], SCB[r0:r1], _ = torch.ops.halfbyte.int8_vectorwise_quant(piece.to(torch.float16), 0.0)
        layer.weight = nn.Parameter(CB, requires_grad=False)
        layer.SCB = _f32_bits(SCB)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and RECORDER is not None:  # (traced: no guard on RECORDER)
            return RECORDER(self, x)
        self._check_input(x)
        fn = _ops.direct_kernel("int8_mixed_mm", x, self.bias)
        if fn is None:  # traced (torch.compile: never reads ``share``, so block instances share one graph), CPU
            return torch.ops.halfbyte.int8_mixed_mm(x, self.weight, self.SCB.view(torch.float32), self.bias,
                                                    self.threshold)
        if self.share is not None and fn is _ops.cuda_kernel("int8_mixed_mm"):  # eager inference on CUDA
            return fn(x, self.weight, self.SCB.view(torch.float32), self.bias, self.threshold, share=self.share)
        return fn(x, self.weight, self.SCB.view(torch.float32), self.bias, self.threshold)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) weight ``CB * SCB / 127`` in ``dtype`` (default: the original dtype)."""
        W = int8_format.int8_vectorwise_dequant(self.weight, self.SCB.view(torch.float32))
        return W.to(dtype or self.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}, dtype={self.dtype}")
