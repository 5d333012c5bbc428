"""The TMA-ring 4-bit GEMV (``halfbyte.kernels.gemv_ring``). Gluon does not run under the interpreter, so the CPU
tier checks what it can without a GPU: the table the kernel decodes through, its two assembly blocks emulated for
a warp (the table build and the lookups + mma), and that the kernel compiles for sm_90 with the installed triton.
The GPU tier runs it over the FLUX/T5 shapes it serves, against the GEMV's derived bound
(``test_kernels.assert_within_fp32_sum_bound``), through the registered op, a plan and a CUDA graph."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_helpers import DEV, FLUX_T5, gpu
from ptx_emulator import run_ptx
from test_kernels import _quantized_linear, assert_within_fp32_sum_bound

from halfbyte.formats import fourbit
from halfbyte.formats.codebooks import code_4bit
from halfbyte.kernels import gemm4bit, gemv_ring, launch

needs_gluon = pytest.mark.skipif(not gemv_ring.available(), reason="this triton has no Gluon: the ring is not built")
RING_SHAPES = [s for s in FLUX_T5 if s[0] * s[1] >= gemv_ring.MIN_WORK and s[1] % 512 == 0]
# K % 1024 == 512 from K = 8192 (LLaMA-13B's 13824: no 1024-weight K box fits), and N % 16 != 0 with it: 8 x 64
ODD_TILINGS = [(3072, 13824), (4104, 8704)]


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_table_words_are_code_pairs(qt, dtype):
    """Entry b decodes to (code[b >> 4], code[b & 15]) rounded to x's dtype, in an x pair's order (first element
    in the low half): the pair an mma register takes for byte b of a packed row."""
    words = torch.tensor(gemv_ring.table_words(qt, dtype), dtype=torch.int64)
    assert words.shape == (256,) and int(words.min()) >= 0 and int(words.max()) < 2**32
    code = code_4bit(qt).to(dtype)
    b = torch.arange(256)
    lo = (words & 0xFFFF).to(torch.int32).to(torch.int16).view(dtype)
    hi = ((words >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(dtype)
    assert torch.equal(lo, code[b >> 4]) and torch.equal(hi, code[b & 15])


def test_config_gives_every_program_whole_rounds_of_tiles():
    """8-row x 128-word tiles from K = 8192 only where the row tiles fit one round of 3 programs per SM, 16 x 64
    elsewhere (N % 16 permitting): at 4096 x 10240 the 8-row tiles would leave 116 of 396 programs two tiles."""
    assert gemv_ring.config(3072, 12288) == gemv_ring.config(3072, 15360) == (8, 128, 3)
    assert gemv_ring.config(4096, 10240) == (16, 64, 3)
    assert gemv_ring.config(4096, 10240, sms=171) == (8, 128, 3)  # a GPU with more SMs: one round
    assert gemv_ring.config(4104, 10240) == (8, 128, 3)  # N % 16 != 0
    assert gemv_ring.config(18432, 3072) == (16, 64, 3)
    # the 1024-weight K box only where it ends at K; 8-row tiles where N % 16 != 0
    assert gemv_ring.config(3072, 13824) == (16, 64, 3)
    assert gemv_ring.config(4104, 8704) == gemv_ring.config(4104, 3072) == (8, 64, 3)
    for N in (3072, 4096, 4104, 18432):
        for K in (3072, 8192, 8704, 10240, 13824, 15360):
            assert gemv_ring.tiles(N, K, *gemv_ring.config(N, K)[:2]), (N, K)
    assert not gemv_ring.tiles(3072, 13824, 8, 128) and not gemv_ring.tiles(4104, 4096, 16, 64)


_COMPILE = """
import json, sys, torch
from halfbyte.kernels import gemv_ring
dtype = getattr(torch, sys.argv[1])
k = gemv_ring.compile_offline(dtype, tuple(int(v) for v in sys.argv[2].split(",")), sys.argv[3], sys.argv[4] == "1",
                             nested=sys.argv[5] == "1")
ptx = k.asm["ptx"]
ty = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
code7 = gemv_ring.table_words(sys.argv[3], dtype)[0x70] & 0xFFFF
print(json.dumps({"shared": k.metadata.shared, "table": ptx.count(".shared .align 16 .b32 %s[8192]" % gemv_ring.TABLE),
                  "tma": ptx.count("cp.async.bulk.tensor"),
                  "mma": ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.%s.%s.f32" % (ty, ty)),
                  "setmaxnreg": "setmaxnreg" in ptx,
                  "code": ptx.count(".shared .align 16 .b32 %s[256]" % gemv_ring.CODE_TABLE),
                  "decode": ptx.count("mul.rn.f32"),
                  "entry": "or.b32 %%v, %%c, %d;" % code7 in ptx}))
"""


@needs_gluon
@pytest.mark.parametrize("dtype, cfg, qt, has_bias, nested", [
    ("bfloat16", "16,64,4,3", "nf4", "1", "0"),
    ("float16", "8,128,4,3", "fp4", "0", "0"),
    ("bfloat16", "16,64,4,3", "nf4", "1", "1"),
    ("float16", "8,128,4,3", "nf4", "0", "1"),
], ids=["bf16-16x64", "fp16-8x128", "bf16-16x64-dq", "fp16-8x128-dq"])
def test_compiles_for_sm90(dtype, cfg, qt, has_bias, nested):
    """The kernel compiles for sm_90 with this triton (its Gluon API moves between releases): three TMA loads per
    stage (two with double quantization: the consumers read the uint8 absmax), the table declared once and written
    from the code's 16 immediates, 32 mma.sync of x's type (4 consumer warps x 2 words x 4 per K tile), register
    reallocation between the partitions, and dynamic shared memory under 48 KB beside the 32 KB table (why
    ``_open_shared`` raises the limit itself). With double quantization each of the producer partition's 128
    threads decodes one absmax per stage (a tile has BN x KT / 8 = 128). In a process of its own: this tier's
    TRITON_INTERPRET turns triton's own reduction helpers into interpreter functions, which Gluon cannot
    compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE, dtype, cfg, qt, has_bias, nested], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    dq = nested == "1"
    assert got == {"shared": got["shared"], "table": 1, "tma": 2 if dq else 3, "mma": 32, "setmaxnreg": True,
                   "entry": True, "code": 1, "decode": int(dq)}
    assert got["shared"] < 48 * 1024


@pytest.fixture
def ring_on(monkeypatch):
    """The ring is on by default (``gemv_ring.ENABLED``), unless ``HALFBYTE_GEMV_RING=0``: its tests turn it on."""
    monkeypatch.setattr(gemv_ring, "ENABLED", True)


def _ring_expected(device) -> bool:
    return gemv_ring.available() and torch.cuda.get_device_capability(device)[0] == 9


def _nested(stats):
    """``gemv_ring.supported``'s ``nested`` argument for ``_quantized_linear``'s statistics."""
    return None if stats[1] is None else stats[1:]


@gpu
@pytest.mark.parametrize("shape", RING_SHAPES + ODD_TILINGS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dn", ["bf16", "fp16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
def test_ring_gemv_flux_t5_shapes(shape, dn, nested, ring_on):
    """Where the ring serves (compute capability 9 with Gluon), the GEMV through the registered op, ``gemv`` and a
    plan, with and without bias, float32 or double-quantized absmax, is within the bound; elsewhere the same calls
    take the other GEMVs."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dn]
    N, K = shape
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", nested, dtype)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", shape, dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    x = torch.randn(1, K, device=DEV).to(dtype)
    data = packed.reshape(-1).view(torch.uint8)
    expect = _ring_expected(x.device)
    assert gemv_ring.supported(dtype, N, K, 64, _nested(stats), stats[0], x, data) == expect
    for b in (bias, None):
        out = torch.ops.halfbyte.gemm_4bit(x, packed, *stats, b, [N, K], 64, "nf4")
        assert_within_fp32_sum_bound(out, x, W, b, unrounded_weights=True)
        plan = gemm4bit.Plan(packed, *stats, b, N, K, 64, "nf4", dtype)
        assert (plan._ring is not None) == expect
        assert_within_fp32_sum_bound(plan(x, b), x, W, b, unrounded_weights=True)
        if expect:  # the ring and the tensor-core GEMV: one bound, different kernels
            other = gemm4bit.gemv(x, packed, *stats, b, N, K, 64, "nf4", use_ring=False)
            assert_within_fp32_sum_bound(other, x, W, b, unrounded_weights=True)


@gpu
def test_ring_serves_only_what_it_can(monkeypatch):
    """Off with ``ENABLED`` False; on, double-quantized statistics of the wrong dtype, count or alignment,
    blocksize 128, float32 x, a small weight and K % 512 != 0 take the other GEMVs (still within the bound through
    the op)."""
    N, K = 3072, 12288
    x = torch.randn(1, K, device=DEV).to(torch.bfloat16)
    plain_packed, plain_stats, _ = _quantized_linear(N, K, 64, "nf4", False, torch.bfloat16)
    monkeypatch.setattr(gemv_ring, "ENABLED", False)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, False, plain_stats[0], x, plain_packed)
    assert gemm4bit.Plan(plain_packed, *plain_stats, None, N, K, 64, "nf4", torch.bfloat16)._ring is None
    monkeypatch.setattr(gemv_ring, "ENABLED", True)
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", True, torch.bfloat16)
    data = packed.reshape(-1).view(torch.uint8)
    nest = _nested(stats)
    assert gemv_ring.supported(torch.bfloat16, N, K, 64, nest, stats[0], x, data) == _ring_expected(x.device)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, True, stats[0], x, data)  # (no statistics given)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, nest, stats[0].float(), x, data)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, (nest[0][1:], *nest[1:]), stats[0], x, data)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, (nest[0], nest[0], nest[2]), stats[0], x, data)
    shifted = torch.empty(nest[0].numel() + 1, device=DEV)[1:]
    shifted.copy_(nest[0])  # 4-byte aligned only
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, (shifted, *nest[1:]), stats[0], x, data)
    plain = torch.ones(N * K // 64, device=DEV)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 128, False, plain, x, data)
    assert not gemv_ring.supported(torch.float32, N, K, 64, False, plain, x, data)
    assert not gemv_ring.supported(torch.bfloat16, 2048, 3072, 64, False, plain, x, data)
    assert not gemv_ring.supported(torch.bfloat16, 65536, 640, 64, False, plain, x, data)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", (N, K), torch.bfloat16)
    out = torch.ops.halfbyte.gemm_4bit(x, packed, *stats, None, [N, K], 64, "nf4")
    assert_within_fp32_sum_bound(out, x, W, None, unrounded_weights=True)


@gpu
@pytest.mark.parametrize("direct", sorted({launch.DIRECT, False}), ids=lambda d: "direct" if d else "run")
def test_ring_bound_launch_over_x_addresses(direct, monkeypatch, ring_on):
    """A ``RingGemv`` encodes x's descriptor once per address: calls with x at 70 addresses (past the 64 it keeps),
    with and without bias in turn, each equal bit for bit to a fresh ``RingGemv``'s first call on a copy of x and
    within the GEMV's bound, through triton's C launcher (triton 3.6) and through the kernel's ``run`` (the layout
    other triton versions take); ``gemv``'s direct calls reuse one ``RingGemv`` per weight."""
    if not _ring_expected(torch.device(DEV)):
        pytest.skip("the ring is built for compute capability 9 with Gluon only")
    monkeypatch.setattr(launch, "DIRECT", direct)
    N, K, dtype = 12288, 3072, torch.bfloat16
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", False, dtype)
    data = packed.reshape(-1).view(torch.uint8)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", (N, K), dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    ring = gemv_ring.RingGemv(data, stats[0], N, K, "nf4", dtype)
    buf = torch.randn(70 * K + 8, device=DEV).to(dtype)
    for i in range(70):
        x = buf[i * K + 8 * (i % 2):][:K].view(1, K)  # 16-byte aligned, 70 addresses
        b = bias if i % 2 else None
        out = ring(x, b)
        assert torch.equal(out, gemv_ring.RingGemv(data, stats[0], N, K, "nf4", dtype)(x.clone(), b))
        if i % 17 == 0:
            assert_within_fp32_sum_bound(out, x, W, b, unrounded_weights=True)
    assert len(ring._x) <= 64
    gemv_ring._RINGS.clear()
    x = buf[:K].view(1, K)
    first = gemm4bit.gemv(x, packed, *stats, bias, N, K, 64, "nf4")
    assert len(gemv_ring._RINGS) == 1 and torch.equal(first, gemm4bit.gemv(x, packed, *stats, bias, N, K, 64, "nf4"))
    assert len(gemv_ring._RINGS) == 1


@gpu
@pytest.mark.parametrize("qt, nested", [("nf4", False), ("fp4", False), ("nf4", True)], ids=["nf4", "fp4", "nf4-dq"])
def test_ring_plan_in_a_cuda_graph(qt, nested, ring_on):
    """A plan's ring GEMV captured in a CUDA graph replays to the eager result, bit for bit, for new inputs."""
    N, K, dtype = 12288, 3072, torch.bfloat16
    packed, stats, am = _quantized_linear(N, K, 64, qt, nested, dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    plan = gemm4bit.Plan(packed, *stats, bias, N, K, 64, qt, dtype)
    assert (plan._ring is not None) == _ring_expected(torch.device(DEV))
    x = torch.randn(1, K, device=DEV).to(dtype)
    plan(x, bias)  # compiles outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = plan(x, bias)
    for _ in range(2):
        x.copy_(torch.randn(1, K, device=DEV).to(dtype))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, plan(x, bias))
    W = fourbit.dequantize_4bit(packed, am, 64, qt, (N, K), dtype)
    assert_within_fp32_sum_bound(y, x, W, bias, unrounded_weights=True)


def _run_step_warp(asm: str, operands: list[dict[int, int]], table: dict[int, int], base: int) -> None:
    """Runs ``gemv_ring.step_asm`` for the 32 lanes of a warp in lockstep (its integer ops, ``ld.shared`` from
    ``table`` {address: word}, the table symbol at ``base``, and ``mma.m16n8k16`` with the PTX ISA's fragment
    layout: lane = 4 g + t; A regs (row g, k 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..); B regs
    (k 2t.., col g), (k 2t + 8.., col g); C (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1); the lower-indexed
    element in a register's low half). ``operands[lane]`` {index: 32-bit value} gets the outputs."""
    regs = [dict() for _ in range(32)]

    def val(lane, tok):
        tok = tok.strip().rstrip(";")
        if tok.startswith("$"):
            return operands[lane][int(tok[1:])]
        if tok.startswith("%"):
            return regs[lane][tok]
        if tok == gemv_ring.TABLE:
            return base
        return int(tok[2:], 16) if tok.startswith("0f") else int(tok, 0)

    def halves(word, dtype):
        h = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
        return h.double().tolist()

    dtype = torch.bfloat16 if ".bf16." in asm else torch.float16
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op.startswith("mma.sync"):
            groups = [g.strip("{} ").split(",") for g in rest.replace("}, {", "}|{").split("|")]
            d, a, b, c = ([t.strip() for t in g] for g in groups)
            A = torch.zeros(16, 16, dtype=torch.float64)
            B = torch.zeros(16, 8, dtype=torch.float64)
            C = torch.zeros(16, 8, dtype=torch.float64)
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for i, (r, k) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                    A[r, k:k + 2] = torch.tensor(halves(val(lane, a[i]), dtype))
                for i, k in enumerate((2 * t, 2 * t + 8)):
                    B[k:k + 2, g] = torch.tensor(halves(val(lane, b[i]), dtype))
                for i, (r, n) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                    C[r, n] = float(np.array([val(lane, c[i])], dtype=np.uint32).view(np.float32)[0])
            D = A @ B + C
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for i, (r, n) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                    regs[lane][d[i]] = int(np.array([D[r, n]], dtype=np.float32).view(np.uint32)[0])
            continue
        dst, *srcs = [s.strip() for s in rest.split(",")]
        for lane in range(32):
            if op == "ld.shared.b32":
                v = table[val(lane, srcs[0].strip("[]"))]
            else:
                x = [val(lane, s) for s in srcs]
                v = {"mov.u32": lambda: x[0], "mov.f32": lambda: x[0], "mov.b32": lambda: x[0],
                     "shl.b32": lambda: x[0] << x[1], "shr.u32": lambda: x[0] >> x[1], "and.b32": lambda: x[0] & x[1],
                     "or.b32": lambda: x[0] | x[1], "add.u32": lambda: x[0] + x[1]}[op]()
            v &= 0xFFFFFFFF
            if dst.startswith("$"):
                operands[lane][int(dst[1:])] = v
            else:
                regs[lane][dst] = v


def test_nested_absmax_asm_decodes_as_the_reference():
    """Double quantization, emulated lane by lane: ``code_asm`` stores each of the 256 nested code entries at
    its slot of the shared table, and ``decode_asm`` turns every uint8 absmax with its nested absmax and offset
    into the float32 bits of the reference's ``double_dequantize`` (product rounded, then the sum)."""
    from halfbyte.formats import blockwise
    from halfbyte.formats.codebooks import dynamic_map

    code = dynamic_map().numpy()
    shared: dict[int, int] = {}
    base = 0x400
    symbols = {gemv_ring.CODE_TABLE: base}
    for i in range(256):
        ops = {1: i, 2: int(code[i:i + 1].view(np.uint32)[0])}
        run_ptx(gemv_ring.code_asm(), ops, shared, symbols)
        assert ops[0] == 0
    assert shared == {base + 4 * i: int(code[i:i + 1].view(np.uint32)[0]) for i in range(256)}
    g = torch.Generator().manual_seed(1)
    absmax = torch.rand(256 * 3, generator=g) * 4 + 0.01
    q, nested, offset = blockwise.double_quantize(absmax)
    expect = blockwise.double_dequantize(q, nested, offset).numpy().view(np.uint32)
    off = int(offset.numpy().view(np.uint32)[0])
    for blk in range(q.numel()):
        ops = {1: int(q[blk]), 2: int(nested[blk // 256:blk // 256 + 1].numpy().view(np.uint32)[0]), 3: off}
        run_ptx(gemv_ring.decode_asm(), ops, shared, symbols)
        assert ops[0] == int(expect[blk]), blk


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_step_asm_sums_each_lane_group(qt, dtype):
    """The consumer's assembly, emulated for a warp: with the table laid out as the build writes it (entry e of
    lane l at base + 128 e + 4 l), the element the kernel keeps (lane 4g + g/2, output (d0, d1)[g % 2]) is lane
    group g's sum of code * x over its 8 words (2 per lane) of row a, and of row b in the second output pair."""
    gen = torch.Generator().manual_seed(1)
    words = gemv_ring.table_words(qt, dtype)
    base = 0x8000
    table = {base + 128 * e + 4 * lane: w for e, w in enumerate(words) for lane in range(32)}
    code = code_4bit(qt).to(dtype).double()
    qa = torch.randint(0, 2**32, (32, 2), generator=gen, dtype=torch.int64)
    qb = torch.randint(0, 2**32, (32, 2), generator=gen, dtype=torch.int64)
    xv = torch.randn(32, 2, 8, generator=gen).to(dtype)  # per lane, word j: its 8 x values in order
    pairs = xv.view(torch.int16).to(torch.int64).view(32, 2, 4, 2) & 0xFFFF
    xw = pairs[..., 0] | (pairs[..., 1] << 16)  # (lane, word, pair m): the low half holds the earlier element
    ops = []
    for lane in range(32):
        o = {4: int(qa[lane, 0]), 5: int(qa[lane, 1]), 6: int(qb[lane, 0]), 7: int(qb[lane, 1]), 16: 4 * lane}
        o.update({8 + 2 * m + w: int(xw[lane, w, m]) for m in range(4) for w in range(2)})
        ops.append(o)
    _run_step_warp(gemv_ring.step_asm(dtype), ops, table, base)

    def word_dot(q, x):  # byte i holds weights 2i (high nibble) and 2i + 1 (low nibble)
        idx = [(q >> (8 * i + 4 - 4 * h)) & 15 for i in range(4) for h in range(2)]
        return sum(float(code[k]) * float(x[n]) for n, k in enumerate(idx))

    for g in range(8):
        lane = 4 * g + g // 2
        got = [np.array([ops[lane][i]], dtype=np.uint32).view(np.float32)[0] for i in range(4)]
        exp_a = sum(word_dot(int(qa[4 * g + t, j]), xv[4 * g + t, j].double()) for t in range(4) for j in range(2))
        exp_b = sum(word_dot(int(qb[4 * g + t, j]), xv[4 * g + t, j].double()) for t in range(4) for j in range(2))
        # float32 accumulation of 64 products: a few ulps of the magnitude
        scale = sum(abs(float(v)) for v in xv[4 * g:4 * g + 4].flatten()) * 1.0
        assert abs(got[g % 2] - exp_a) <= 1e-5 * scale + 1e-6, (g, got, exp_a)
        assert abs(got[2 + g % 2] - exp_b) <= 1e-5 * scale + 1e-6, (g, got, exp_b)


def _run_build(asm: str, base: int) -> dict[int, int]:
    """Runs ``gemv_ring.build_asm`` for the 4 consumer warps (warps 4-7 of the program: thread ids 128-255) and
    returns the shared words it stores {address: word} (the table symbol at ``base``)."""
    memory: dict[int, int] = {}
    for tid in range(128, 256):
        regs = {"%laneid": tid % 32, "%tid.x": tid}
        preds: dict[str, bool] = {}

        def val(tok):
            tok = tok.strip()
            if tok in regs:
                return regs[tok]
            return base if tok == gemv_ring.TABLE else int(tok, 0)

        for line in asm.splitlines():
            line = line.strip().rstrip(";")
            if line in ("{", "}") or line.startswith(".reg") or line.startswith("bar.sync") or "$0" in line:
                continue
            if line.startswith("@"):
                p, line = line.split(None, 1)
                if not preds[p[1:]]:
                    continue
            op, rest = line.split(None, 1)
            if op.startswith("st.shared"):  # st.shared.b32 [reg+off], v / st.shared.v4.b32 [reg+off], {a, b, c, d}
                addr, values = rest.split(",", 1)
                reg, off = addr.strip("[] ").split("+")
                for i, v in enumerate(values.strip(" {}").split(",")):
                    at = regs[reg] + int(off) + 4 * i
                    assert at not in memory, "a table word written twice"
                    memory[at] = val(v)
                continue
            dst, *srcs = [s.strip() for s in rest.split(",")]
            x = [val(s) for s in srcs]
            if op == "setp.eq.u32":
                preds[dst] = x[0] == x[1]
                continue
            regs[dst] = {"mov.u32": lambda: x[0], "mov.b32": lambda: x[0], "shl.b32": lambda: x[0] << x[1],
                         "shr.u32": lambda: x[0] >> x[1], "add.u32": lambda: x[0] + x[1],
                         "or.b32": lambda: x[0] | x[1], "rem.u32": lambda: x[0] % x[1]}[op]() & 0xFFFFFFFF
    return memory


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_build_asm_writes_the_replicated_table(qt):
    """The table build, emulated for the 4 consumer warps: every word base + 128 e + 4 l (entry e, lane l) is
    written, once, with entry e; nothing else."""
    words = gemv_ring.table_words(qt, torch.bfloat16)
    base = 0x8000
    memory = _run_build(gemv_ring.build_asm(words), base)
    assert memory == {base + 128 * e + 4 * lane: w for e, w in enumerate(words) for lane in range(32)}
