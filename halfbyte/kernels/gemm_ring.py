"""4-bit matmul for more than 16 tokens on Hopper without writing the weight out: the NF4/FP4 codes decoded in
registers straight into wgmma's A operand (Gluon, warp-specialized, persistent).

Why: for M > 64 the other path dequantizes the whole weight to bf16 (0.5 byte read, 2 written per weight, at a
copy's speed) and calls cuBLAS. At 512 tokens that dequantize is a third of the layer's time; at 4608 tokens it is
4-8 %, which is what a quantized FLUX step spends over bf16 (BENCHMARKS.md, sessions 16, 22 and 24). Here:
* the product is transposed, out^T = W x^T, so that the decoded weight is wgmma's register operand A (never written
  to shared memory) and x tiles (BT tokens x 64: 256, or 64 / 128 for calls of up to 64 / 128 tokens,
  ``tile_tokens``) are operand B;
* a loader partition (4 warps, one thread issues) streams each K step's x tile, the 128 weight rows' packed words
  and their absmax into a 4-stage shared-memory ring by TMA; two consumer warpgroups
  (64 rows each) decode their fragments while their previous wgmma runs. Each byte of bitsandbytes' order holds
  the two weights of one A-fragment register, so a lane rotates its byte of a word into place and looks its pair up
  in a byte table (``lut.byte_pairs``, a copy per lane so that no two lanes share a bank: 32 KB of static shared
  memory, filled by the loader warps before the partitions start), then multiplies by the absmax (``mul.bf16x2``,
  ``mul.f16x2`` for fp16): 2 integer instructions and a shared load per two weights. Tile heights left out of
  ``LUT_TILES`` instead gather each lane's bytes (3 ``prmt`` per word) and decode them with the ``prmt`` pair
  tables of ``kernels.lut`` (16 ``prmt`` per 8 weights): the same bits, 9 % slower at 4608 tokens (H200,
  BENCHMARKS.md session 32);
* programs are persistent, one per SM: equal rounds of whole 128 x 256 tiles (GROUP_M token tiles per group, so a
  group's weight stays in L2), then the tiles left over -- all of them when there are fewer tiles than SMs, as at
  512 tokens -- are split along K into S pieces with a deterministic fix-up: the last piece of a tile to arrive
  adds the S float32 partials in piece order, so every call gives the same bits;
* bias in float32 in the epilogue; the tile leaves through shared memory by TMA, a 256-token tile in two halves
  (``HALF_STORE_TILES``: the 32 KB that saves keeps a fourth ring stage beside the byte table);
* a last token tile that holds fewer than 256 tokens is read in 64-row boxes, none wholly past M: TMA's fill of
  box rows past the tensor is slow (a 257-token call took 1.3-1.5x a 512-token one before; BENCHMARKS.md
  session 26).
Numerics: each weight is bf16(bf16(code) * bf16(absmax)), summed in float32 by the tensor cores; the reference
rounds code * absmax once (float32 product). The difference is a few bf16 roundings per weight, inside the
matmul tolerance tests/test_gemm_ring.py derives.

Serves: bf16 and fp16 activations (the weight decoded to x's dtype; fp16 rounds each weight 8x finer), NF4/FP4 with
blocksize 64 (float32 or double-quantized absmax), K % 256 == 0, N % 128 == 0, compute capability 9.x, triton with
Gluon; ``supported`` says where, ``wanted`` for which token counts (measured: ``bench/gemm_ring.py``), and each device
runs it once against the reference before use (``verdict``). ``RingGemm`` binds the launch (weight descriptors encoded
once). Gluon does not run under the interpreter: the CPU tier compiles the kernel for sm_90, checks the schedule and
emulates the byte gather (tests/test_gemm_ring.py).

Double-quantized absmax (uint8 codes + nested float32 stats): the loader partition's 128 threads decode each
stage's 128 row absmax themselves (``ncode[q] * nested + offset``, the product rounded: ``ops.decode_absmax``'s
bits) into the stage, where TMA would have put float32 absmax, so a double-quantized layer gives exactly the bits
of the same layer with its absmax decoded to float32.
"""

import functools
import os
import warnings

import torch

from ..formats import blockwise
from ..formats import fourbit as ref4
from . import fourbit, lut
from .common import INTERPRET, compile_lock, scratch_alloc, scratch_free
from .gemm_ring_route import (  # noqa: F401  (re-exported: the route is part of this module's interface)
    BN,
    BT,
    CUBLAS_FLOP_PER_US,
    DC_US,
    DEQUANT_BYTES_PER_US,
    FIXUP_US,
    FIXUP_US_PER_PIECE,
    FUSED_MIN_M,
    LAUNCH_US,
    MARGIN,
    MAX_M,
    MIN_WORK,
    MODEL_M,
    MODEL_WORK,
    RATE_ALONE,
    RATE_FULL,
    READ_BYTES_PER_US,
    S_CHOICES,
    dequantize_cublas_us,
    fused_us,
    schedule,
    tile_tokens,
    wanted,
)
from .gemv_ring import _Address, _sms
from .launch import descriptor_launcher

XS = 64  # rows of the boxes the last, partial token tile is read in
STAGES = 4  # ring depth; 3 for 256-token tiles with the byte table and whole output boxes (``stages``)
GROUP_M = 4  # bitsandbytes' byte order: 4 beat 8 by 3-7 % at the wide FLUX shapes (BENCHMARKS.md, session 22)
MAXNREG = 168  # 12 warps per program
CONS_REGS = 232
#: Tile heights whose consumers decode by the byte table in shared memory (``lut.byte_pairs``, 32 KB: one lookup
#: per two weights) rather than by ``prmt`` register tables (19 ``prmt`` per 8 weights). Read at each call;
#: ``HALFBYTE_GEMM_RING_LUT`` (comma-separated heights, empty for none) overrides it.
LUT_TILES = frozenset(int(v) for v in os.environ.get("HALFBYTE_GEMM_RING_LUT", "64,128,256").split(",") if v)
#: Tile heights whose output tiles are stored in two halves of tokens: half the epilogue's shared memory, so that a
#: 256-token ring keeps 4 stages beside the byte table (3 otherwise; 4 were 0-10 % faster: BENCHMARKS.md, session
#: 33). Read at each call; ``HALFBYTE_GEMM_RING_HALF_STORE`` (comma-separated heights, empty for none) overrides it.
HALF_STORE_TILES = frozenset(int(v) for v in os.environ.get("HALFBYTE_GEMM_RING_HALF_STORE", "256").split(",")
                             if v)

#: Whether 4-bit calls of more than 16 tokens take this kernel where it serves and is wanted (on by default;
#: ``HALFBYTE_GEMM_RING=0`` turns it off). Read when a plan is built and when a layer is built, moved or loaded
#: (its compiled route): set it before those.
ENABLED = os.environ.get("HALFBYTE_GEMM_RING", "1") != "0"


@functools.lru_cache(maxsize=None)
def _gluon():
    """(Gluon's language module, its TensorDescriptor, the kernel), or None where this triton has no Gluon (or one
    this code does not know)."""
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        from ._gemm_ring_kernel import gemm_ring_kernel
    except Exception:  # noqa: BLE001  (the dequantize path serves)
        return None
    return gl, TensorDescriptor, gemm_ring_kernel


def available() -> bool:
    """Whether this triton can build the kernel."""
    return _gluon() is not None


def shape_ok(N: int, K: int, blocksize: int, quant_type: str, dtype: torch.dtype) -> bool:
    """The static part of ``supported``: what the kernel's tiling and decode take."""
    return (ENABLED and not INTERPRET and dtype in (torch.bfloat16, torch.float16)
            and blocksize == 64
            and quant_type in ("nf4", "fp4") and N > 0 and K > 0 and N % BN == 0 and K % 256 == 0)


def sms(index: int) -> int:
    """The SM count of CUDA device ``index`` (``Tensor.get_device()``): the programs a launch runs, which
    ``wanted`` routes by. Cached: the direct path asks it at every call."""
    return _sms(index)


@functools.lru_cache(maxsize=None)
def device_ok(device: torch.device) -> bool:
    """Compute capability 9.x and a triton with Gluon (the kernel is sm_90a code)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 and available()


def supported(N: int, K: int, blocksize: int, quant_type: str, dtype: torch.dtype, absmax: torch.Tensor,
              *tensors: torch.Tensor, nested: tuple | None = None, has_bias: bool = True) -> bool:
    """Whether this kernel can serve calls of this weight (any token count; ``wanted`` picks the counts), the
    device's ``verdict`` included (``has_bias``: whether the calls pass a bias, which the check then does too).
    ``absmax``: (N K / 64,) float32, 16-byte aligned (TMA reads it), or with ``nested`` = (nested_absmax
    (ceil(N K / 64 / 256),) float32, nested_code (256,) float32 or None, offset (1,) float32) the uint8 codes of
    double quantization; every statistic contiguous on absmax's device (the kernel reads them by address);
    ``tensors`` (the packed weight...) must be 16-byte aligned, as TMA needs."""
    nb = N * K // 64
    if not shape_ok(N, K, blocksize, quant_type, dtype) or absmax.numel() != nb or not absmax.is_contiguous():
        return False
    if nested is None:
        if absmax.dtype != torch.float32 or absmax.data_ptr() % 16:
            return False
    else:
        nested_absmax, nested_code, offset = nested
        want = ((nested_absmax, -(-nb // 256)), (offset, 1)) + (() if nested_code is None else ((nested_code, 256),))
        if absmax.dtype != torch.uint8 or any(
                t is None or t.dtype != torch.float32 or t.numel() != n or not t.is_contiguous()
                or t.device != absmax.device for t, n in want):
            return False
    if any(t.data_ptr() % 16 for t in tensors) or not device_ok(absmax.device):
        return False
    return verdict(absmax.device, nested is not None, has_bias, dtype)


def split_for(M: int, N: int, K: int, blocksize: int, quant_type: str, device: torch.device,
              dtype: torch.dtype = torch.bfloat16) -> int | None:
    """The S of the specialization that a ``dtype`` call of M tokens of an (N, K) weight on ``device`` takes where
    ``wanted`` sends it here, else None (shape, token count, device; the device check is not run)."""
    if not (ENABLED and device_ok(device) and shape_ok(N, K, blocksize, quant_type, dtype)):
        return None
    programs = sms(device.index)
    if not wanted(M, N, K, programs):
        return None
    return schedule(-(-M // tile_tokens(M)) * (N // BN), K // 64, programs)[2]


def precompile(S: int, has_bias: bool, data: torch.Tensor, absmax: torch.Tensor, N: int, K: int, quant_type: str,
               nested: tuple | None = None, bt: int = BT, dtype: torch.dtype = torch.bfloat16) -> None:
    """Compiles (no launch) the (S, has_bias, bt) specialization (``bt``: ``tile_tokens`` of the call) for this
    weight's kind of statistics (arguments as ``supported``). ``halfbyte.precompile`` runs it on a thread of its own
    beside the layers' calls: a layer's first call would otherwise compile the device check's specialization and
    then its own, one after the other (~5 s each)."""
    with torch.cuda.device(data.device):
        RingGemm(data, absmax, N, K, quant_type, nested, dtype)._bind(S, has_bias, bt)


def layer_wanted(N: int, K: int, blocksize: int, quant_type: str) -> bool:
    """Whether bf16 and fp16 calls of an (N, K) weight take this kernel at every token count from 17 to ``MODEL_M``
    - 1 (and above where the model says so): the static rule a compiled graph routes the layer by (plus a guard on
    the token count, up to ``MAX_M``)."""
    return shape_ok(N, K, blocksize, quant_type, torch.bfloat16) and N * K >= MIN_WORK


def weight_wanted(N: int, K: int, blocksize: int, quant_type: str) -> bool:
    """Whether eager bf16 and fp16 calls of an (N, K) weight may take this kernel at some token count (``wanted``
    decides per call): ``layer_wanted``'s weights, and from ``MODEL_M`` tokens those of ``MODEL_WORK`` elements."""
    return shape_ok(N, K, blocksize, quant_type, torch.bfloat16) and N * K >= MODEL_WORK


@functools.lru_cache(maxsize=None)
def _table_words(quant_type: str, dtype: torch.dtype) -> tuple[int, ...]:
    code = tuple(ref4.code_4bit(quant_type, torch.device("cpu")).tolist())
    words = lut.pair_tables(code, dtype) + lut.byte_pairs(code, dtype)
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in words)


_TABLES: dict[tuple, torch.Tensor] = {}


def pair_table(quant_type: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The code rounded to ``dtype``: the 8 ``prmt`` pair-table words, then the 256 ``lut.byte_pairs`` words of the
    shared-memory byte table (int32 on ``device``, one copy per device)."""
    key = (quant_type, device, dtype)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = torch.tensor(_table_words(quant_type, dtype), dtype=torch.int32, device=device)
    return t


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(device: torch.device, stream: int) -> torch.Tensor:
    """The split tiles' arrival counters (2 per tile, fewer tiles than SMs), zero between calls (the last piece of
    a tile resets its counter). Per (device, stream), so that calls on two streams never share one. While a CUDA
    graph is captured, a new zeroed array per call: its memset is part of that graph (a cached array first
    created inside a capture would hold garbage until the graph replayed), and graphs replayed on several streams
    at once share none."""
    n = 2 * _sms(device.index)
    if torch._C._cuda_isCurrentStreamCapturing():  # (torch.cuda.is_current_stream_capturing without its frame)
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device, stream)
    c = _COUNTERS.get(key)
    if c is None:
        c = _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return c


def _layouts(gl, dtype: torch.dtype = torch.bfloat16):
    # x's and out's swizzle follows their 128-byte rows of 64 16-bit values, the same for every tile height
    x_layout = gl.NVMMASharedLayout.get_default_for([BT, 64], gl.float16 if dtype == torch.float16 else gl.bfloat16)
    flat = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return x_layout, flat


def smem_lut(bt: int) -> bool:
    """Whether ``bt``-token tiles decode by the shared-memory byte table (``LUT_TILES``) rather than ``prmt``."""
    return bt in LUT_TILES


def store_rows(bt: int) -> int:
    """The tokens of one output store box of ``bt``-token tiles (``HALF_STORE_TILES``: half the tile)."""
    return bt // 2 if bt in HALF_STORE_TILES else bt


def stages(bt: int) -> int:
    """The ring depth of ``bt``-token tiles: ``STAGES``, or 3 where a 256-token ring (4 x 38 KB) and its two whole
    output tiles (64 KB) must leave room for the byte table (32 KB of the SM's 227)."""
    return 3 if bt >= 256 and smem_lut(bt) and store_rows(bt) == bt else STAGES


def variant(bt: int) -> tuple:
    """The module settings a ``bt``-token launch is compiled for (its bound launches are kept by them)."""
    return bt in LUT_TILES, bt in HALF_STORE_TILES


def _launch_kwargs(S: int, has_bias: bool, nested: bool, bt: int = BT) -> dict:
    return dict(S=S, STAGES=stages(bt), GROUP_M=GROUP_M, CONS_REGS=CONS_REGS, HAS_BIAS=has_bias, NESTED=nested,
                SMEM_LUT=smem_lut(bt), num_warps=4, maxnreg=MAXNREG)


_DUMMIES: dict[torch.device, torch.Tensor] = {}


def _unread_absmax(device: torch.device) -> torch.Tensor:
    """A (BN, 4) float32 block for the absmax descriptor of double-quantized launches (which never read it)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.zeros(BN, 4, dtype=torch.float32, device=device)
    return t


class RingGemm:
    """The launch of one (N, K) 4-bit weight, bound: the weight and absmax descriptors are encoded once, x's and
    out's once per (address, token count) (a few dozen kept), and a call is one call of triton's C launcher
    (``launch.descriptor_launcher``) plus the split's workspace. ``__call__(x, bias)``: x (M, K) ``dtype`` (bf16 or
    fp16), contiguous, 16-byte aligned on the weight's device, bias (N,) ``dtype`` or None -> (M, N) ``dtype``.
    ``absmax`` float32, or uint8
    with ``nested`` = (nested_absmax float32, nested_code (256,) float32 or None for the dynamic map, offset
    float32): double quantization, decoded in the kernel's loader warps.
    Holds the weight's addresses, not its tensors: its owner checks that they still hold the weight."""

    def __init__(self, data: torch.Tensor, absmax: torch.Tensor, N: int, K: int, quant_type: str,
                 nested: tuple | None = None, dtype: torch.dtype = torch.bfloat16):
        self.N, self.K, self.device, self.dtype = N, K, data.device, dtype
        gl, self._descriptor, self._kernel = _gluon()
        self.x_layout, self._flat = _layouts(gl, dtype)
        self.programs = _sms(data.device.index)
        self.w_desc = self._descriptor(_Address(data.data_ptr(), torch.int32), [N, K // 8], [K // 8, 1], [BN, 8],
                                       self._flat)
        self.table = pair_table(quant_type, data.device, dtype)
        self.nested = nested is not None
        if nested is None:
            self.a_desc = self._descriptor(_Address(absmax.data_ptr(), torch.float32), [N, K // 64], [K // 64, 1],
                                           [BN, 4], self._flat)
            self.stats = (self.table.data_ptr(),) * 4  # not read
        else:
            nested_absmax, nested_code, offset = nested
            code = fourbit.nested_code_table(data.device) if nested_code is None else nested_code
            self.a_desc = self._descriptor(_unread_absmax(data.device), [BN, 4], [4, 1], [BN, 4], self._flat)
            self.stats = tuple(t.data_ptr() for t in (absmax, nested_absmax, code, offset))
        self._bound: dict[tuple, tuple] = {}  # (S, has_bias, bt, variant) -> (launcher, head, w / absmax, expand,
        #                                       the constexprs that end the launch)
        self._calls: dict[tuple, tuple] = {}  # (x, out, M, has_bias, variant) -> ``_call``'s launch
        self._table = self.table.data_ptr()

    def _bind(self, S: int, has_bias: bool, bt: int = BT) -> tuple:
        """Compiles (no launch) the (S, has_bias) specialization with ``bt``-token tiles and encodes the weight's
        descriptors for it."""
        x = torch.empty(bt, self.K, dtype=self.dtype, device=self.device)  # dtypes and alignment specialize
        out = torch.empty(bt, self.N, dtype=self.dtype, device=self.device)
        ws = torch.empty(16, dtype=torch.float32, device=self.device)
        cnt = torch.empty(16, dtype=torch.int32, device=self.device)
        stats = (torch.empty(16, dtype=torch.uint8, device=self.device),
                 *(torch.empty(16, dtype=torch.float32, device=self.device) for _ in range(3)))  # dtypes specialize
        args = (self._io_desc(x.data_ptr(), bt, self.K, bt), self.w_desc, self.a_desc,
                self._io_desc(out.data_ptr(), bt, self.N, store_rows(bt)), self._io_desc(x.data_ptr(), bt, self.K, XS),
                out, out, self.table, ws, cnt, *stats, bt, self.N, 1, 1, 1, 1, 2)
        kw = _launch_kwargs(S, has_bias, self.nested, bt)
        with compile_lock(("gemm_ring", self.device, S, has_bias, self.nested, bt, variant(bt), self.dtype)):
            compiled = self._kernel.warmup(*args, grid=(1,), **kw)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
        c_launch, head, expand = descriptor_launcher(compiled)
        # the launch's last arguments
        consts = (S, kw["STAGES"], GROUP_M, CONS_REGS, has_bias, self.nested, kw["SMEM_LUT"])
        bound = self._bound[(S, has_bias, bt, variant(bt))] = (
            c_launch, head, (*expand(self.w_desc, 1), *expand(self.a_desc, 2)), expand, consts)
        return bound

    def _io_desc(self, ptr: int, M: int, cols: int, rows: int):
        return self._descriptor(_Address(ptr, self.dtype), [M, cols], [cols, 1], [rows, 64], self.x_layout)

    def run(self, stream: int, x: int, out: int, bias: int | None, M: int) -> None:
        """Launches on the raw CUDA ``stream`` with device addresses: x (M, K) and out (M, N) in the launch's dtype,
        row-major, 16-byte aligned; ``bias`` (N,) in that dtype or None."""
        has_bias = bias is not None
        key = (x, out, M, has_bias, variant(tile_tokens(M)))  # (M decides the tiles; the settings, what compiled)
        c_launch, grid, head, post, ws_bytes = self._calls.get(key) or self._call(key)
        if not ws_bytes:  # S == 1: neither the split's workspace nor its counters are read (``out`` stands in)
            c_launch(grid, 1, 1, stream, *head, bias if has_bias else out, self._table, out, out, *post)
            return
        cnt = _counters(self.device, stream)  # (held until the launch is queued: a capture's is a new array)
        ws = scratch_alloc(ws_bytes, stream)  # the pieces' float32 partial tiles, back to the allocator once queued
        try:
            c_launch(grid, 1, 1, stream, *head, bias if has_bias else out, self._table, ws, cnt.data_ptr(), *post)
        finally:
            scratch_free(ws)

    def _call(self, key: tuple) -> tuple:
        """One (x, out, M, has_bias, variant) call's launch but its per-call pointers: (launcher, grid, parameters
        up to ``out``, those after the counters, workspace bytes or 0). 64 kept: steady calls reuse a few."""
        x, out, M, has_bias, v = key
        bt = tile_tokens(M)
        tiles_m, tiles_n, k_steps = -(-M // bt), self.N // BN, self.K // 64
        n_tiles = tiles_m * tiles_n
        grid, full, S = schedule(n_tiles, k_steps, self.programs)
        c_launch, head, wa, expand, consts = self._bound.get((S, has_bias, bt, v)) or self._bind(S, has_bias, bt)
        params = (*head, *expand(self._io_desc(x, M, self.K, bt), 0), *wa,
                  *expand(self._io_desc(out, M, self.N, store_rows(bt)), 3),
                  *expand(self._io_desc(x, M, self.K, XS), 4), out)
        post = (*self.stats, M, self.N, n_tiles, full, tiles_m, tiles_n, k_steps, *consts)
        ws_bytes = (n_tiles - full * grid) * S * BN * bt * 4 if S > 1 else 0
        if len(self._calls) >= 64:
            self._calls.clear()
        self._calls[key] = call = (c_launch, grid, params, post, ws_bytes)
        return call

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        M = x.shape[0]
        out = torch.empty(M, self.N, dtype=self.dtype, device=self.device)
        if M:
            self.run(torch._C._cuda_getCurrentRawStream(self.device.index), x.data_ptr(), out.data_ptr(),
                     None if bias is None else bias.data_ptr(), M)
        return out


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and 16-byte aligned (what the kernel's TMA descriptors and its vectorized bias
    loads assume), else a contiguous copy (new storage is aligned)."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


_GEMMS: dict[tuple, RingGemm] = {}


def gemm_for(data: torch.Tensor, absmax: torch.Tensor, N: int, K: int, quant_type: str,
             nested: tuple | None = None, dtype: torch.dtype = torch.bfloat16) -> RingGemm:
    """A ``RingGemm`` for ``gemm_4bit``'s direct calls, kept by the weight's addresses and shape (at most 256,
    forgotten together when full)."""
    stats = () if nested is None else tuple(0 if t is None else t.data_ptr() for t in nested)
    key = (data.data_ptr(), absmax.data_ptr(), *stats, N, K, quant_type, data.device, dtype)
    g = _GEMMS.get(key)
    if g is None:
        if len(_GEMMS) >= 256:
            _GEMMS.clear()
        g = _GEMMS[key] = RingGemm(data, absmax, N, K, quant_type, nested, dtype)
    return g


_VERDICTS: dict[tuple, bool] = {}


def verdict(device: torch.device, nested: bool = False, has_bias: bool = True,
            dtype: torch.dtype = torch.bfloat16) -> bool:
    """Runs the kernel once on ``device`` (a 256 x 1024 NF4 weight, 300 tokens, on 3 programs: a round of whole tiles,
    then a tail tile split in 2 with its fix-up; compiling first), with float32 or (``nested``) double-quantized
    absmax, against the dequantized float32 product; False, with a warning, if it fails or disagrees, and the
    dequantize path serves. While a CUDA graph is being captured an unchecked device answers False (a plan built then
    keeps the dequantize path) and is checked on a later call. One check per (device, nested, activation dtype); the
    first caller's ``has_bias`` says whether it passes a bias. The check's specialization (S = 2, has_bias) is the one
    that most of FLUX's and T5's 512-token calls take, so a model's own calls reuse its compile (~6 s) rather than add
    one: checked with a bias always, a model without biases (T5) compiled a specialization it never ran (BENCHMARKS.md,
    session 28)."""
    key = (device, nested, dtype)
    if key not in _VERDICTS:
        if torch.cuda.is_current_stream_capturing():
            return False
        with compile_lock(("gemm_ring.verdict", key)):  # threads: one check, the others wait for it
            if key not in _VERDICTS:
                _VERDICTS[key] = _check(device, nested, has_bias, dtype)
    return _VERDICTS[key]


def _check(device: torch.device, nested: bool, has_bias: bool, dtype: torch.dtype) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    M, N, K = 300, 256, 1024
    w = torch.randn(N, K, generator=g) / K**0.5
    packed, absmax = ref4.quantize_4bit(w, 64, "nf4")
    stats = None
    if nested:
        q, nested_absmax, offset = blockwise.double_quantize(absmax)
        absmax, stats = blockwise.double_dequantize(q, nested_absmax, offset), (q, nested_absmax, None, offset)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if has_bias else torch.zeros(N, dtype=dtype)
    W = ref4.dequantize_4bit(packed, absmax, 64, "nf4", (N, K), torch.float32)
    exact = x.float() @ W.T + bias.float()
    bound = 2.0**-7 * (x.float().abs() @ W.abs().T + bias.float().abs()) + 1e-3
    try:
        with torch.cuda.device(device):
            data, am = packed.reshape(-1).to(device), absmax.to(device)  # held: a RingGemm keeps addresses only
            if stats is None:
                gemm = RingGemm(data, am, N, K, "nf4", None, dtype)
            else:
                q, nested_absmax, _, offset = (None if t is None else t.to(device) for t in stats)
                gemm = RingGemm(data, q, N, K, "nf4", (nested_absmax, None, offset), dtype)
            gemm.programs = 3  # 4 tiles: one round of 3, then the last tile in 2 pieces (schedule: (3, 1, 2))
            out = gemm(x.to(device), bias.to(device) if has_bias else None)
        ok = bool(((out.float().cpu() - exact).abs() <= bound).all())
        reason = "disagreed with the reference"
    except Exception as e:  # noqa: BLE001  (a triton or driver without what it needs: the dequantize path serves)
        ok, reason = False, f"failed ({type(e).__name__}: {str(e)[:200]})"
    if not ok:
        what = f"({str(dtype)[6:]}{', double-quantized absmax' if nested else ''}) "
        warnings.warn(f"halfbyte: the fused 4-bit GEMM {what}{reason} on {device}; those calls take the "
                      "small-batch kernel (up to 64 tokens) or dequantize and call cuBLAS", RuntimeWarning,
                      stacklevel=4)
    return ok


def compile_offline(S: int = 3, has_bias: bool = True, nested: bool = False, bt: int = BT,
                    dtype: torch.dtype = torch.bfloat16):
    """Compiles the kernel (``bt``-token tiles) for sm_90 without a GPU (``triton.compile``) -> the CompiledKernel.
    For the CPU tests and the bench's ``--compile-only``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    gl, _, kernel = _gluon()
    x_layout, flat = _layouts(gl, dtype)
    ty = "fp16" if dtype == torch.float16 else "bf16"
    sig = {"x_desc": f"tensordesc<{ty}[{bt}, 64],{x_layout!r}>", "w_desc": f"tensordesc<i32[{BN}, 8],{flat!r}>",
           "a_desc": f"tensordesc<fp32[{BN}, 4],{flat!r}>",
           "out_desc": f"tensordesc<{ty}[{store_rows(bt)}, 64],{x_layout!r}>",
           "xs_desc": f"tensordesc<{ty}[{XS}, 64],{x_layout!r}>",
           "out_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "tab_ptr": "*i32", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
           "am_ptr": "*u8", "nabs_ptr": "*fp32", "ncode_ptr": "*fp32", "off_ptr": "*fp32",
           "M": "i32", "N": "i32", "n_tiles": "i32", "full_rounds": "i32", "tiles_m": "i32",
           "tiles_n": "i32", "k_steps": "i32"}
    kw = _launch_kwargs(S, has_bias, nested, bt)
    opts = {"num_warps": kw.pop("num_warps"), "maxnreg": kw.pop("maxnreg")}
    sig.update({k: "constexpr" for k in kw})
    src = GluonASTSource(kernel, sig, constexprs=kw,
                         attrs={(i,): [["tt.divisibility", 16]] for i in range(5, 10)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
