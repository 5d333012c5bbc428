"""4-bit GEMV (M = 1) for Hopper: weights streamed by TMA into a shared-memory ring, decoded through a
shared-memory code table, summed on the tensor cores (Gluon, warp-specialized).

Why: the register-table GEMVs (``gemv_mma``, ``gemv._gemv_lut_kernel``) spend ~22 integer instructions per
32-bit word of 8 codes on the ``prmt`` decode, and their loads hold registers; on an H100 they reach 1.29-1.49x
bitsandbytes' speed. Here (BENCHMARKS.md, session 17: 1.65-1.94x at the FLUX/T5 widths):
* the default partition (4 warps, one thread issues) loads each (BN-row, KT-word) tile's packed words, float32
  absmax and x into a STAGES-deep ring by TMA; no load touches a register;
* each of the 4 consumer warps is a partition of its own, so that it waits for a stage and releases it alone (a
  multi-warp partition's barrier arrive is one thread's, and needed a barrier of its warps first: the largest
  stall measured). A warp owns BN / 4 rows of every tile, half of them its mma rows a, half rows b;
* a byte of two codes decodes with one ``ld.shared`` from a 256-entry byte -> (code, code) table replicated per
  lane (entry e of lane l at word 32 e + l: a warp's 32 lookups never share a bank), 2 integer instructions for
  the address; the pairs feed ``mma.m16n8k16`` exactly as in ``gemv_mma`` (rows a / b in A rows g / g+8, x in B;
  the diagonal entry C[g][g] of an mma lane group is the sum over its absmax group), and a per-lane float mask
  folded into the absmax multiply keeps the diagonal;
* the table (32 KB of static shared memory declared in the PTX) is written by the consumer warps while the first
  loads are in flight, from 16 immediates (the code) in ~70 instructions per warp (``build_asm``).
Persistent programs (3 per SM) walk BN-row tiles in turn, so that every SM gets the same number of tiles +-1.

On by default (``ENABLED``; ``HALFBYTE_GEMV_RING=0`` turns it off). ``RingGemv`` binds the launch: the weight's
TMA descriptors are encoded once, x's once per address, and a call goes straight to triton's C launcher (triton
3.6; elsewhere through the compiled kernel's ``run``: ``launch.descriptor_launcher``). Serves: float16/bfloat16 x,
blocksize 64 with float32 absmax or double-quantized absmax (uint8 + nested float32 per 256 blocks + offset: a
tile's uint8 rows are 8 or 16 bytes, under or at TMA's 16-byte minimum, so the producer partition's idle threads
load them two tiles ahead and decode them into the stage's float32 absmax; BENCHMARKS.md, session 20), K % 512 ==
0, N * K >= 2^23, N a multiple of the row tile, on compute capability 9.x, with triton's Gluon; ``supported`` says
where, and each device runs it once before use (``verdict``: it compares with the dequantized float32 product).
Where not served the other GEMVs are. Gluon does not run under the interpreter:
the CPU tier checks that the kernel compiles for sm_90, that ``table_words`` holds the decode it assumes, and
emulates ``build_asm`` and ``step_asm`` for a warp (tests/test_gemv_ring.py).
"""

import ctypes
import functools
import os
import warnings

import torch

from ..formats import blockwise
from ..formats import fourbit as ref4
from . import fourbit as fourbit_kernels
from .common import INTERPRET, compile_lock
from .launch import descriptor_launcher, loaded


@functools.lru_cache(maxsize=None)
def _gluon():
    """(Gluon's language module, its TensorDescriptor, the kernel), or None where this triton has no Gluon (or one
    this code does not know). Imported on first use, not with the module: only Hopper GPUs and the tests need it
    (the import costs ~55 ms)."""
    try:  # Gluon and its Hopper TMA API (triton >= 3.5)
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        from ._gemv_ring_kernel import gemv_ring_kernel
    except Exception:  # noqa: BLE001  (the other GEMVs serve)
        return None
    return gl, TensorDescriptor, gemv_ring_kernel


def available() -> bool:
    """Whether this triton can build the kernel."""
    return _gluon() is not None


#: Whether GEMVs take the ring where it serves (on by default; ``HALFBYTE_GEMV_RING=0`` or setting this to False
#: turns it off). Its GPU time is 0.74-0.85x the tensor-core GEMV's at the FLUX/T5 widths, and its bound launch
#: costs the host about what that GEMV's does (BENCHMARKS.md, session 18).
ENABLED = os.environ.get("HALFBYTE_GEMV_RING", "1") != "0"

TABLE = "hb_ring_tab"
CODE_TABLE = "hb_ring_code"  # double quantization: the nested code (256 float32), copied in by the consumer warps
BAR_ID = 14  # the named barrier of the table build (warp specialization uses the low ids)
WARPS = 4  # consumer warps per program
STAGES = 4
# N * K from which the ring is used: at 3072 x 3072 (9.4 M) it is 11 % faster than gemv_mma, at 6336 x 512 (3.2 M)
# as fast (BENCHMARKS.md, session 21)
MIN_WORK = 1 << 23


def table_words(quant_type: str, dtype: torch.dtype) -> tuple[int, ...]:
    """The 256 table entries: entry b = code[b >> 4] | code[b & 15] << 16 as ``dtype`` bits (byte b of a packed
    row holds element 2j in its high nibble; an x pair keeps the first element in its low half)."""
    h = ref4.code_4bit(quant_type, torch.device("cpu")).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.arange(256)
    return tuple((h[b >> 4] | (h[b & 15] << 16)).tolist())


def declare_asm() -> str:
    """Declares the table (function scope, so emitted once: in the parent region) and returns its address."""
    return f".shared .align 16 .b32 {TABLE}[8192];\n.shared .align 16 .b32 {CODE_TABLE}[256];\nmov.u32 $0, {TABLE};"


def build_asm(words: tuple[int, ...]) -> str:
    """Writes the table with the consumer warps, then a named barrier of those warps; returns 0, which the lookups'
    lane offset ORs in: a data dependency that orders every lookup after the build (nothing else stops the
    compiler from moving the lookups' pure assembly before it; a constant such as ``t & 0`` would fold away). ($1
    is unused.) Entry 16 j + e = code[j] | code[e] << 16: lane l of consumer warp w takes e = 4 w + l / 8 (its
    code[e] selected from 16 immediates), then for j = 0..15 stores its entry to its 4 lane slots with one 16-byte
    store (a warp's store: 4 entries x 32 lanes). About 70 instructions per warp: the table written from 256
    immediates, one store each, was 8 KB of code per warp whose instruction fetches took ~1.6 us at the start of
    every program (BENCHMARKS.md, session 21)."""
    code = [w & 0xFFFF for w in words[::16]]  # entry 16 k = code[k] | code[0] << 16
    if tuple(code[b >> 4] | code[b & 15] << 16 for b in range(256)) != tuple(words):
        raise ValueError("gemv_ring: the table is not code pairs")
    lines = ["{", ".reg .b32 %ln, %w, %tb, %e, %c, %v, %a;", ".reg .pred %q;", "mov.u32 %ln, %laneid;",
             "mov.u32 %w, %tid.x;", "shr.u32 %w, %w, 5;", f"rem.u32 %w, %w, {WARPS};", "shr.u32 %e, %ln, 3;",
             "shl.b32 %a, %w, 2;", "add.u32 %e, %e, %a;", "mov.b32 %c, 0;"]
    for k, v in enumerate(code):
        lines += [f"setp.eq.u32 %q, %e, {k};", f"@%q mov.b32 %c, {v};"]
    # lane l's 4 slots of entry 16 j + e: word 32 (16 j + e) + 4 (l % 8) = 512 j + 128 w + 4 l
    lines += ["shl.b32 %c, %c, 16;", f"mov.u32 %tb, {TABLE};", "shl.b32 %a, %ln, 4;", "add.u32 %tb, %tb, %a;",
              "shl.b32 %a, %w, 9;", "add.u32 %tb, %tb, %a;"]
    for j, v in enumerate(code):
        lines += [f"or.b32 %v, %c, {v};", f"st.shared.v4.b32 [%tb+{2048 * j}], {{%v, %v, %v, %v}};"]
    lines += [f"bar.sync {BAR_ID}, {32 * WARPS};", "mov.u32 $0, 0;", "}"]
    return "\n".join(lines)


def code_asm() -> str:
    """Double quantization: stores nested code entry $1 (an index) = $2 into the shared code table; returns 0.
    Runs before the table build, whose barrier then orders it before every decode."""
    return (f"{{\n.reg .b32 %a;\nmov.u32 %a, {CODE_TABLE};\nshl.b32 $0, $1, 2;\nadd.u32 %a, %a, $0;\n"
            f"st.shared.f32 [%a], $2;\nmov.u32 $0, 0;\n}}")


def decode_asm() -> str:
    """Double quantization: $0 = code[$1] * $2 + $3 (uint8 absmax $1, nested absmax $2, offset $3), rounded after
    the product and after the sum, as ``ops.decode_absmax`` and the other kernels compute it."""
    return (f"{{\n.reg .b32 %a, %i;\n.reg .f32 %c;\nmov.u32 %a, {CODE_TABLE};\nshl.b32 %i, $1, 2;\n"
            f"add.u32 %a, %a, %i;\nld.shared.f32 %c, [%a];\nmul.rn.f32 %c, %c, $2;\nadd.rn.f32 $0, %c, $3;\n}}")


def step_asm(dtype: torch.dtype) -> str:
    """$0,$1 / $2,$3: (d0, d1) / (d2, d3) of the accumulators (rows a / b: C[g][2t], C[g][2t+1]); $4,$5 / $6,$7
    two consecutive words of rows a / b; $8 + 2m + w: x pair m of word w; $16 laneid * 4."""
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    lines = ["{", ".reg .f32 %d<4>;", ".reg .b32 %t<16>, %tb;", f"mov.u32 %tb, {TABLE};"]
    for name, words in (("a", ("$4", "$5")), ("b", ("$6", "$7"))):
        for w, reg in enumerate(words):
            lines.append(".reg .b32 " + ", ".join(f"%{name}{w}_{k}" for k in range(4)) + ";")
            for k in range(4):  # byte k -> its pair: address table + byte * 128 + lane * 4
                t = f"%t{(0 if name == 'a' else 8) + 4 * w + k}"
                lines.append(f"shl.b32 {t}, {reg}, 7;" if k == 0 else f"shr.u32 {t}, {reg}, {8 * k - 7};")
                lines += [f"and.b32 {t}, {t}, 0x7F80;", f"or.b32 {t}, {t}, $16;", f"add.u32 {t}, {t}, %tb;",
                          f"ld.shared.b32 %{name}{w}_{k}, [{t}];"]
    lines += [f"mov.f32 %d{i}, 0f00000000;" for i in range(4)]
    d = "{%d0, %d1, %d2, %d3}"
    for w in range(2):
        for m0, m1 in ((0, 1), (2, 3)):  # A rows g (row a) / g+8 (row b) at this lane's k slots; B = x
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {d}, "
                         f"{{%a{w}_{m0}, %b{w}_{m0}, %a{w}_{m1}, %b{w}_{m1}}}, "
                         f"{{${8 + 2 * m0 + w}, ${8 + 2 * m1 + w}}}, {d};")
    lines += ["mov.b32 $0, %d0;", "mov.b32 $1, %d1;", "mov.b32 $2, %d2;", "mov.b32 $3, %d3;", "}"]
    return "\n".join(lines)


def config(N: int, K: int, sms: int = 132) -> tuple[int, int, int]:
    """(BN rows, KT words, programs per SM), from bench/gemv_gluon.py on an H100 (``sms`` SMs): 8 x 128 from K =
    8192 where its row tiles fit one round of programs (so every program gets one), else 16 x 64, or 8 x 64 where
    N % 16 != 0. At 4096 x 10240, 8 x 128 gave 512 tiles to 396 programs, 116 of them two, and took 1.14x the time
    of 16 x 64's 256 programs of one tile each (BENCHMARKS.md, session 21). A 128-word (1024-weight) K box needs K %
    1024 == 0: at K = 13824 (LLaMA-13B's MLP, 3072 x 13824) the last box would end half past K, so 16 x 64 serves."""
    ctas = 3
    if K >= 8192 and (K // 8) % 128 == 0 and (N // 8 <= ctas * sms or N % 16):
        return (8, 128, ctas)
    return (8 if N % 16 else 16, 64, ctas)


def tiles(N: int, K: int, BN: int, KT: int) -> bool:
    """Whether an N x K weight splits into whole BN-row x KT-word tiles the kernel can take."""
    return (KT in (64, 128) and BN >= 8 and not BN & (BN - 1) and not N % BN and not K % 512
            and not (K // 8) % KT)


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def shape_ok(dtype: torch.dtype, N: int, K: int, blocksize: int, device: torch.device) -> bool:
    """The static part of ``supported``: ``ENABLED``, the dtype, shape and tiling, a Hopper device, Gluon."""
    if not ENABLED or INTERPRET or dtype not in (torch.float16, torch.bfloat16) or blocksize != 64:
        return False
    if K % 512 or N * K < MIN_WORK:
        return False
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9 or not available():
        return False
    return tiles(N, K, *config(N, K, _sms(device.index))[:2])


def supported(dtype: torch.dtype, N: int, K: int, blocksize: int, nested, absmax: torch.Tensor,
              *tensors: torch.Tensor) -> bool:
    """Whether this kernel serves a GEMV (see the module doc): ``shape_ok``, the statistics and alignment, and the
    device's ``verdict``. ``nested``: None / False without double quantization, else (nested_absmax, nested_code or
    None, offset)."""
    if nested is True:  # double quantization without its statistics
        return False
    if not shape_ok(dtype, N, K, blocksize, absmax.device):
        return False
    if nested:
        nested_absmax, nested_code, offset = nested
        stats = (absmax, nested_absmax, offset) + (() if nested_code is None else (nested_code,))
        if (absmax.dtype != torch.uint8 or nested_absmax.dtype != torch.float32 or offset.dtype != torch.float32
                or (nested_code is not None and (nested_code.dtype != torch.float32 or nested_code.numel() != 256))
                or nested_absmax.numel() != -(-absmax.numel() // 256) or any(t.data_ptr() % 16 for t in stats)):
            return False
    elif absmax.dtype != torch.float32:
        return False
    if any(t.data_ptr() % 16 for t in tensors):
        return False
    return verdict(absmax.device, dtype, bool(nested))


_SHARED_OK: set = set()


def _open_shared(compiled) -> None:
    """Lets ``compiled`` (a triton CompiledKernel) use its dynamic shared memory beside the 32 KB static table:
    triton raises the limit only when the dynamic part alone passes 48 KB. Carveout: all shared memory, so that
    three programs fit on an SM."""
    loaded(compiled)
    key = compiled.function
    if key in _SHARED_OK:
        return
    cuda = ctypes.CDLL("libcuda.so.1")
    for attr, value in ((8, compiled.metadata.shared), (9, 100)):  # MAX_DYNAMIC_SHARED_SIZE_BYTES, CARVEOUT
        rc = cuda.cuFuncSetAttribute(ctypes.c_void_p(compiled.function), attr, ctypes.c_int(value))
        if rc:
            raise RuntimeError(f"gemv_ring: cuFuncSetAttribute({attr}, {value}) failed with CUDA error {rc}")
    _SHARED_OK.add(key)


@functools.lru_cache(maxsize=None)
def _asm(quant_type: str, dtype: torch.dtype) -> tuple[str, str, str]:
    return declare_asm(), build_asm(table_words(quant_type, dtype)), step_asm(dtype)


def _launch_kwargs(quant_type: str, dtype: torch.dtype, stages: int, ctas: int, mode: int = 0,
                   nested: bool = False) -> dict:
    """The kernel's constexprs and options (HAS_BIAS aside) for ``ctas`` programs per SM (``nested``: double
    quantization)."""
    # registers for ctas programs of 8 warps (the producer partition pads to a warpgroup); the producer gives its
    # share back down to 24 per thread, the consumer warps take the rest
    maxnreg = min(255, 65536 // (ctas * 32 * (4 + WARPS)) // 8 * 8)
    cons_regs = min(248, (maxnreg * (4 + WARPS) - 24 * 4) // WARPS // 8 * 8)
    declare, build, step = _asm(quant_type, dtype)
    return dict(STAGES=stages, MODE=mode, CONS_REGS=cons_regs, DECLARE=declare, BUILD=build, ASM=step, num_warps=4,
                maxnreg=maxnreg, NESTED=nested, CODE=code_asm() if nested else "",
                DECODE=decode_asm() if nested else "")


def compile_offline(dtype: torch.dtype = torch.bfloat16, cfg: tuple[int, int, int, int] = (16, 64, STAGES, 3),
                    quant_type: str = "nf4", has_bias: bool = True, nested: bool = False):
    """Compiles the kernel for sm_90 without a GPU (``triton.compile``; the launch would specialize the same way:
    16-byte aligned pointers) -> the CompiledKernel. For the CPU tests and the bench's ``--compile-only``.
    ``nested``: the double-quantized variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    BN, KT, stages, ctas = cfg
    gl, _, gemv_ring_kernel = _gluon()
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    ty = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    st = ("u8", "fp32", "fp32", "fp32") if nested else ("fp32",) * 4
    sig = {"out_ptr": f"*{ty}", "bias_ptr": f"*{ty}", **{n: f"*{t}" for n, t in zip(_STATS, st, strict=True)},
           "w_desc": f"tensordesc<i32[{BN}, {KT}],{layout!r}>",
           "a_desc": f"tensordesc<fp32[{BN}, {KT // 8}],{layout!r}>",
           "x_desc": f"tensordesc<i32[{KT // 64}, 256],{layout!r}>", "N": "i32", "n_items": "i32", "KTILES": "i32"}
    kw = _launch_kwargs(quant_type, dtype, stages, ctas, nested=nested)
    opts = {"num_warps": kw.pop("num_warps"), "maxnreg": kw.pop("maxnreg")}
    consts = dict(kw, HAS_BIAS=has_bias)
    sig.update({k: "constexpr" for k in consts})
    src = GluonASTSource(gemv_ring_kernel, sig, constexprs=consts,
                         attrs={(i,): [["tt.divisibility", 16]] for i in range(2 + len(_STATS))})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


_STATS = ("am_ptr", "nabs_ptr", "ncode_ptr", "off_ptr")  # the kernel's absmax pointers (double quantization)


class _Address:
    """What a TMA descriptor needs of its base tensor: the address and the element type."""

    __slots__ = ("_ptr", "dtype")

    def __init__(self, ptr: int, dtype: torch.dtype):
        self._ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self._ptr


class RingGemv:
    """The launch of one (N, K) weight in one activation dtype, bound: the weight and absmax descriptors are
    encoded once, x's once per x address (kept, a few dozen at most), and a call is an allocation and one call of
    triton's C launcher (``launch.descriptor_launcher``). ``__call__(x, bias)``: x (1, K) 16-byte aligned on the
    weight's device, bias (N,) in x's dtype or None -> (1, N).
    Holds the weight's addresses, not its tensors (as ``gemm4bit.Plan``): its owner checks that they still hold
    the weight (or, as ``gemv``'s cache, keys it by them: the encoded descriptors depend on nothing else)."""

    def __init__(self, data: torch.Tensor, absmax: torch.Tensor, N: int, K: int, quant_type: str,
                 dtype: torch.dtype, cfg: tuple[int, int, int, int] | None = None, mode: int = 0,
                 nested: tuple | None = None):
        """``nested``: (nested_absmax, nested_code or None, offset) with double-quantized (uint8) ``absmax``.
        ``cfg`` (BN, KT, STAGES, programs per SM) and ``mode`` (the kernel's MODE) are for the bench."""
        self.N, self.K, self.dtype, self.device = N, K, dtype, data.device
        sms = _sms(data.device.index)
        BN, KT, ctas = config(N, K, sms)
        BN, KT, stages, ctas = cfg or (BN, KT, STAGES, ctas)
        if not tiles(N, K, BN, KT):
            raise ValueError(f"gemv_ring: a {N}x{K} weight does not tile by {BN} rows x {KT} words")
        self.KT = KT
        gl, TensorDescriptor, self._kernel = _gluon()
        self._descriptor = TensorDescriptor
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        self.layout = layout
        # descriptors over the weight's addresses, not its tensors: a plan must not keep a layer's weights alive
        self.w_desc = TensorDescriptor(_Address(data.data_ptr(), torch.int32), [N, K // 8], [K // 8, 1], [BN, KT],
                                       layout)
        if nested:  # the kernel reads the four statistics itself; a_desc is a placeholder it never loads
            nested_absmax, nested_code, offset = nested
            code = nested_code if nested_code is not None else fourbit_kernels.nested_code_table(data.device)
            self._stats = (absmax.data_ptr(), nested_absmax.data_ptr(), code.data_ptr(), offset.data_ptr())
            self._stat_dtypes = (torch.uint8, torch.float32, torch.float32, torch.float32)
            self.a_desc = TensorDescriptor(_Address(code.data_ptr(), torch.float32), [16, 16], [16, 1],
                                           [BN, KT // 8], layout)
        else:
            self._stats = (absmax.data_ptr(),) * 4
            self._stat_dtypes = (torch.float32,) * 4
            self.a_desc = TensorDescriptor(_Address(absmax.data_ptr(), torch.float32), [N, K // 64], [K // 64, 1],
                                           [BN, KT // 8], layout)
        n_items = N // BN
        # ctas programs per SM (fewer where there are fewer tiles), program p taking tiles p, p + grid, ...: the
        # first sms programs land one per SM, the next sms one more each, so every SM gets the same number of
        # tiles +-1. (As few programs as give each the same count +-1 left SMs with 2 programs beside SMs with
        # 3: 2-4 % slower at 10240x4096 and 14336x4096, BENCHMARKS.md session 20.)
        self.grid = (min(n_items, ctas * sms),)
        self.n_items, self.ktiles = n_items, (K // 8) // KT
        self.kwargs = _launch_kwargs(quant_type, dtype, stages, ctas, mode, bool(nested))
        self._bound: dict[bool, tuple] = {}  # has_bias -> (C launcher, head, w / absmax params, tail, expand)
        self._x: dict[tuple[int, bool], list] = {}  # (x address, has_bias) -> x descriptor params

    def x_descriptor(self, ptr: int):
        """The TMA descriptor of an x at ``ptr``: (K / 512, 256) int32, blocks of (KT / 64, 256)."""
        return self._descriptor(_Address(ptr, torch.int32), [self.K // 512, 256], [256, 1], [self.KT // 64, 256],
                                self.layout)

    def _bind(self, has_bias: bool) -> tuple:
        """Compiles (no launch) this specialization, opens its shared memory, encodes the weight's descriptors."""
        out = torch.empty(1, self.N, dtype=self.dtype, device=self.device)  # only its dtype specializes
        stats = tuple(torch.empty(16, dtype=t, device=self.device) for t in self._stat_dtypes)  # (dtypes too)
        args = (out, out, *stats, self.w_desc, self.a_desc, self.x_descriptor(out.data_ptr()), self.N, self.n_items,
                self.ktiles)
        kw = dict(self.kwargs, HAS_BIAS=has_bias)
        with compile_lock(("gemv_ring", self.device, self.dtype, tuple(sorted(kw.items())))):
            compiled = self._kernel.warmup(*args, grid=self.grid, **kw)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
        _open_shared(compiled)
        c_launch, head, expand = descriptor_launcher(compiled)
        tail = (self.N, self.n_items, self.ktiles) + tuple(kw[n] for n in self._kernel.arg_names[len(args):])
        bound = self._bound[has_bias] = (c_launch, head, (*expand(self.w_desc, 0), *expand(self.a_desc, 1)), tail,
                                         expand)
        return bound

    def run(self, stream: int, x: int, out: int, bias: int | None) -> None:
        """Launches on the raw CUDA ``stream`` with device addresses: x (K,) and out (N,) in the dtype, 16-byte
        aligned; ``bias`` (N,) or None. (The plans' call: no tensor is made or reshaped.)"""
        has_bias = bias is not None
        c_launch, head, wa, tail, expand = self._bound.get(has_bias) or self._bind(has_bias)
        xp = self._x.get((x, has_bias))
        if xp is None:
            if len(self._x) >= 64:
                self._x.clear()
            xp = self._x[(x, has_bias)] = expand(self.x_descriptor(x), 2)
        c_launch(self.grid[0], 1, 1, stream, *head, out, bias if has_bias else out, *self._stats, *wa, *xp, *tail)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.empty(1, self.N, dtype=self.dtype, device=self.device)
        self.run(torch._C._cuda_getCurrentRawStream(self.device.index), x.data_ptr(), out.data_ptr(),
                 None if bias is None else bias.data_ptr())
        return out


_RINGS: dict[tuple, RingGemv] = {}


def ring_for(data: torch.Tensor, absmax: torch.Tensor, N: int, K: int, quant_type: str,
             dtype: torch.dtype, nested: tuple | None = None) -> RingGemv:
    """A ``RingGemv`` for ``gemv``'s direct calls, kept by the weight's addresses and shape (what its encoded
    descriptors and the statistics' pointers depend on; at most 256, forgotten together when full)."""
    stats = tuple(None if t is None else t.data_ptr() for t in nested) if nested else None
    key = (data.data_ptr(), absmax.data_ptr(), stats, N, K, quant_type, dtype, data.device)
    ring = _RINGS.get(key)
    if ring is None:
        if len(_RINGS) >= 256:
            _RINGS.clear()
        ring = _RINGS[key] = RingGemv(data, absmax, N, K, quant_type, dtype, nested=nested)
    return ring


_VERDICTS: dict[tuple, bool] = {}


def verdict(device: torch.device, dtype: torch.dtype, nested: bool = False) -> bool:
    """Runs the kernel once on ``device`` for ``dtype`` (a 64 x 1024 weight, double-quantized where ``nested``;
    every call path compiles and opens the shared memory first) against the dequantized float32 product; False,
    with a warning, if it fails or disagrees, and the other GEMVs serve. While a CUDA graph is being captured an
    unchecked device answers False and is checked on a later call."""
    key = (device, dtype, nested)
    if key not in _VERDICTS:
        if torch.cuda.is_current_stream_capturing():
            return False
        with compile_lock(("gemv_ring.verdict", key)):  # threads: one check, the others wait for it
            if key not in _VERDICTS:
                _VERDICTS[key] = _check(device, dtype, nested)
    return _VERDICTS[key]


def _check(device: torch.device, dtype: torch.dtype, nested: bool) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    N, K = 64, 1024
    w = torch.randn(N, K, generator=g) / K**0.5
    packed, absmax = ref4.quantize_4bit(w, 64, "nf4")
    x = torch.randn(1, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    stats = None
    if nested:  # four 256-block groups: the offset and each nested absmax apply
        q, nested_absmax, offset = blockwise.double_quantize(absmax)
        stats = (nested_absmax, None, offset)
        absmax = q
        W = ref4.dequantize_4bit(packed, blockwise.double_dequantize(q, nested_absmax, offset), 64, "nf4", (N, K),
                                 torch.float32)
    else:
        W = ref4.dequantize_4bit(packed, absmax, 64, "nf4", (N, K), torch.float32)
    exact = x.float() @ W.T + bias.float()
    bound = 2.0**-7 * (x.float().abs() @ W.abs().T + bias.float().abs()) + 1e-3
    try:
        with torch.cuda.device(device):
            data, am = packed.reshape(-1).to(device), absmax.to(device)  # alive while the ring reads them
            nest = None if stats is None else tuple(None if t is None else t.to(device) for t in stats)
            out = RingGemv(data, am, N, K, "nf4", dtype, nested=nest)(x.to(device), bias.to(device))
        ok = bool(((out.float().cpu() - exact).abs() <= bound).all())
        reason = "disagreed with the reference"
    except Exception as e:  # noqa: BLE001  (a triton or driver without what it needs: the other GEMVs serve)
        ok, reason = False, f"failed ({type(e).__name__}: {str(e)[:200]})"
    if not ok:
        warnings.warn(f"halfbyte: the TMA-ring GEMV {reason} on {device}; GEMVs use the register-table kernels",
                      RuntimeWarning, stacklevel=4)
    return ok
