"""The fused 4-bit GEMM for more than 16 tokens (``halfbyte.kernels.gemm_ring``). Gluon does not run under the
interpreter, so the CPU tier checks what it can without a GPU: the shape and statistics rules, the byte gather
and decode assembly emulated for each lane and mapped to the fragment's columns as the kernel maps them, and that
the kernel compiles for sm_90 with the installed triton (the schedule and the routing: test_gemm_ring_route.py).
The GPU tier runs it over the FLUX/T5 shapes against the derived bound (``test_kernels.assert_within_fp32_sum_bound``
with the kernel's weight roundings), through the kernel, a plan, the registered op, a CUDA graph, a second stream
and a compiled layer."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import DEV, gpu
from ptx_emulator import run_ptx
from test_kernels import _quantized_linear, assert_within_fp32_sum_bound

from halfbyte.formats import fourbit
from halfbyte.formats.codebooks import code_4bit
from halfbyte.kernels import gemm_ring, lut

needs_gluon = pytest.mark.skipif(not gemm_ring.available(), reason="this triton has no Gluon: the kernel is not built")
WEIGHT_TERMS = 5  # bf16(bf16(code) * bf16(absmax)) against the reference's bf16(code * absmax): see the helper


@pytest.mark.parametrize("N, K, bs, qt, dtype", [
    (12288, 3072, 64, "nf4", torch.bfloat16), (12288, 3072, 64, "fp4", torch.bfloat16),
])
def test_shape_rule_takes_what_the_kernel_tiles(N, K, bs, qt, dtype, monkeypatch):
    monkeypatch.setattr(gemm_ring, "INTERPRET", False)
    assert gemm_ring.shape_ok(N, K, bs, qt, dtype) and not gemm_ring.shape_ok(N, K, bs, qt, torch.float32)
    assert gemm_ring.shape_ok(N, K, bs, qt, torch.float16)
    assert not gemm_ring.shape_ok(N, K, 128, qt, dtype)
    assert not gemm_ring.shape_ok(N, K + 64, bs, qt, dtype)  # K % 256
    assert not gemm_ring.shape_ok(N + 64, K, bs, qt, dtype)  # N % 128
    monkeypatch.setattr(gemm_ring, "ENABLED", False)
    assert not gemm_ring.shape_ok(N, K, bs, qt, dtype)


def test_supported_takes_float32_or_double_quantized_absmax(monkeypatch):
    """What ``supported`` asks of the statistics (here without a GPU: the device checks stubbed): float32 absmax
    16-byte aligned, or uint8 codes with their nested statistics; one absmax per 64 weights either way."""
    monkeypatch.setattr(gemm_ring, "INTERPRET", False)
    monkeypatch.setattr(gemm_ring, "device_ok", lambda device: True)
    monkeypatch.setattr(gemm_ring, "verdict", lambda device, nested=False, has_bias=True, dtype=None: True)
    N, K = 256, 1024
    data = torch.zeros(N * K // 2, dtype=torch.uint8)
    f32 = torch.zeros(N * K // 64, dtype=torch.float32)
    codes = torch.zeros(N * K // 64, dtype=torch.uint8)
    nested = (torch.zeros(N * K // 64 // 256, dtype=torch.float32), None, torch.zeros(1))
    args = (N, K, 64, "nf4", torch.bfloat16)
    assert gemm_ring.supported(*args, f32, data) and gemm_ring.supported(*args, codes, data, nested=nested)
    assert not gemm_ring.supported(*args, codes, data)  # uint8 codes need their nested statistics
    assert not gemm_ring.supported(*args, f32, data, nested=nested)
    assert not gemm_ring.supported(*args, f32[:-1], data) and not gemm_ring.supported(*args, codes[:-1], data,
                                                                                       nested=nested)
    assert not gemm_ring.supported(*args, torch.zeros(N * K // 64 + 1)[1:], data)  # absmax 4 bytes off
    assert not gemm_ring.supported(N, K, 64, "nf4", torch.float32, codes, data, nested=nested)
    assert gemm_ring.supported(N, K, 64, "nf4", torch.float16, codes, data, nested=nested)
    # the kernel reads the nested statistics by address: their lengths, dtypes and layout must be the expected ones
    assert gemm_ring.supported(*args, codes, data, nested=(nested[0], torch.zeros(256), nested[2]))
    for bad in ((nested[0][:-1], None, nested[2]), (nested[0], None, None), (nested[0], torch.zeros(255), nested[2]),
                (nested[0].view(torch.int32), None, nested[2]), (torch.zeros(2 * nested[0].numel())[::2], None,
                                                                 nested[2])):
        assert not gemm_ring.supported(*args, codes, data, nested=bad)


def _bits(x) -> int:
    return int(x) & 0xFFFFFFFF


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_gather_and_decode_give_each_fragment_column(qt, dt):
    """One weight row's 64-weight step (32 bytes, bitsandbytes' order: byte p holds weights 2p (high nibble) and
    2p + 1), emulated for the four lanes b of the row: ``_GATHER_ASM`` picks byte b of words 4t..4t+3, ``_WORD_ASM``
    (``_WORD_ASM_F16`` for fp16 activations) decodes the gathered word into four 16-bit pairs times the absmax, and
    the kernel's join/permute puts pair q_(h + 2 s0) of lane (b, t) at column b + 4h + 8s0 + 16t. Every column must
    hold dt(dt(code) * dt(absmax)) of its weights."""
    from halfbyte.kernels import _gemm_ring_decode as kr

    g = torch.Generator().manual_seed(3)
    code = code_4bit(qt)
    tables = [_bits(w) for w in lut.pair_tables(tuple(code.tolist()), dt)]
    word_asm = (kr._WORD_ASM_F16 if dt == torch.float16 else kr._WORD_ASM).value
    for _ in range(4):
        row = torch.randint(0, 256, (32,), generator=g, dtype=torch.int64)
        words = [int(sum(int(row[4 * w + i]) << (8 * i) for i in range(4))) for w in range(8)]
        absmax = float(torch.rand(1, generator=g) * 3 + 0.01)
        ab = int(torch.tensor([absmax]).to(dt).view(torch.int16).item()) & 0xFFFF
        got = [None] * 64
        for b in range(4):
            for t in range(2):
                ops = {4: words[4 * t], 5: words[4 * t + 1], 6: words[4 * t + 2], 7: words[4 * t + 3],
                       8: b | ((b + 4) << 4)}
                run_ptx(kr._GATHER_ASM.value, ops)
                dops = {4: ops[0], **{5 + i: tables[i] for i in range(8)}, 13: ab | (ab << 16)}
                run_ptx(word_asm, dops)
                for j in range(4):
                    h, s0 = j % 2, j // 2
                    p = b + 4 * h + 8 * s0 + 16 * t
                    got[2 * p], got[2 * p + 1] = dops[j] & 0xFFFF, dops[j] >> 16
        nib = torch.stack([row >> 4, row & 15], 1).reshape(-1)
        expect = (code.to(dt)[nib].float() * torch.tensor(absmax).to(dt).float())
        expect = expect.to(dt).view(torch.int16).to(torch.int64) & 0xFFFF
        assert got == expect.tolist()


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_byte_table_fill_and_lookup_give_each_fragment_column(qt, dt):
    """The byte-table decode (``SMEM_LUT``), emulated: ``_FILL_ASM`` run for the 128 threads of the loader
    warpgroup with ``fill_lut``'s operands (thread (w, l) holds elements (r, t) = ((l >> 2) + 8 q + 16 w, l & 3) of
    its [64, 4] layout) writes ``lut.byte_pairs`` word e at 128 e + 4 l for every entry and lane; then for each lane
    l of a row, ``_LOOKUP_ASM`` (``_F16``) with ``lut_lanes``' operands turns word j into the pair of weights
    k = 8 j + 2 (l & 3) times the absmax, and ``decode_lut``'s reshape/permute/join puts each pair at its column.
    Every column must hold dt(dt(code) * dt(absmax)) of its weight."""
    from halfbyte.kernels import _gemm_ring_decode as kr

    code = code_4bit(qt)
    table = [_bits(w) for w in lut.byte_pairs(tuple(code.tolist()), dt)]
    base, shared = 0x400, {}
    for w in range(4):
        for lane in range(32):
            ops = {}
            for q in range(2):
                r, t = (lane >> 2) + 8 * q + 16 * w, lane & 3
                ln, ww = t + 4 * (r & 7), (r >> 4) & 3
                e0 = 64 * ww + 4 * ((r >> 3) & 1) + (ln >> 3)
                ops.update({2 + 2 * s + q: table[e0 + 8 * s] for s in range(8)})
                ops[18 + q] = (64 * ww + (ln >> 3)) * 128 + (ln & 7) * 16
            run_ptx(kr._FILL_ASM.value, ops, shared, {"hb_lut": base})
            assert ops[0] == ops[1] == base
    assert shared == {base + 128 * e + 4 * ln: table[e] for e in range(256) for ln in range(32)}
    look = (kr._LOOKUP_ASM_F16 if dt == torch.float16 else kr._LOOKUP_ASM).value
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        row = torch.randint(0, 256, (32,), generator=g, dtype=torch.int64)
        words = [int(sum(int(row[4 * w + i]) << (8 * i) for i in range(4))) for w in range(8)]
        absmax = float(torch.rand(1, generator=g) * 3 + 0.01)
        ab = int(torch.tensor([absmax]).to(dt).view(torch.int16).item()) & 0xFFFF
        p = torch.zeros(1, 4, 8, dtype=torch.int64)  # [row, t, j], as the kernel's L3 tensor
        for lane in range(4 * 8):  # a row's four lanes t, under eight row positions (same t: same result)
            t = lane & 3
            for j in range(8):
                ops = {1: words[j], 2: (8 * t + 25) & 31, 3: 4 * lane, 4: ab | (ab << 16)}
                run_ptx(look, ops, shared, {"hb_lut": base})
                p[0, t, j] = ops[0]
        p = p.reshape(1, 4, 4, 2).permute(0, 2, 3, 1)
        got = torch.stack([p & 0xFFFF, p >> 16], -1).reshape(64)
        nib = torch.stack([row >> 4, row & 15], 1).reshape(-1)
        expect = (code.to(dt)[nib].float() * torch.tensor(absmax).to(dt).float())
        assert got.tolist() == (expect.to(dt).view(torch.int16).to(torch.int64) & 0xFFFF).tolist()


_COMPILE = """
import json, sys
from halfbyte.kernels import gemm_ring
import torch
k = gemm_ring.compile_offline(int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4]),
                              torch.float16 if sys.argv[5] == "1" else torch.bfloat16)
ptx = k.asm["ptx"]
print(json.dumps({"shared": k.metadata.shared, "warps": k.metadata.num_warps,
                  "wgmma": ptx.count("wgmma.mma_async.sync.aligned"),
                  "tma_load": ptx.count("cp.async.bulk.tensor.2d.shared"),
                  "tma_store": ptx.count("cp.async.bulk.tensor.2d.global"), "setmaxnreg": "setmaxnreg" in ptx,
                  "bf16x2": ptx.count("mul.rn.bf16x2"), "f16x2": ptx.count("mul.rn.f16x2"), "atom": ptx.count("atom."),
                  "mul_f32": ptx.count("mul.rn.f32"), "lut": ptx.count(".shared .align 16 .b8 hb_lut[32768];")}))
"""


@needs_gluon
@pytest.mark.parametrize("S, has_bias, nested, bt, f16", [
    (1, True, False, 256, False), (3, False, False, 256, False), (8, True, False, 256, False),
    (2, True, True, 256, False), (4, True, False, 64, False), (2, False, True, 128, False),
    (2, True, False, 256, True), (4, False, True, 64, True)])
def test_compiles_for_sm90(S, has_bias, nested, bt, f16):
    """The kernel compiles for sm_90 with this triton (its Gluon API moves between releases): 12 warps (a loader
    warpgroup and two consumer warpgroups with reallocated registers), three TMA loads per stage (two with
    double-quantized absmax, which the loader decodes with a rounded float32 product; a partial last token tile's x
    in 64-row boxes: one more per 64 tokens of the tile) and a TMA store, wgmma, the decode's bf16x2 products, a
    split's arrival counter only where S > 1, and shared memory of the ring's stages and two output tiles, within
    the 227 KB an SM gives one program beside the byte table where the tiles decode by it (tiles of 256, 128 and
    64 tokens). In a process of its own: this tier's
    TRITON_INTERPRET turns triton's own helpers into interpreter functions, which Gluon cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    flags = ("1" if f else "0" for f in (has_bias, nested))
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(S), *flags, str(bt), "1" if f16 else "0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["warps"] == 12 and got["setmaxnreg"] and got["wgmma"] > 0 and (got["bf16x2"] > 0) != f16
    assert got["tma_load"] == (2 if nested else 3) + bt // gemm_ring.XS and got["tma_store"] >= 1
    assert (got["mul_f32"] > 0) == nested
    assert got["f16x2"] > 0 if f16 else got["f16x2"] == 0  # the decode's products in x's dtype
    assert (got["atom"] > 0) == (S > 1)
    # x, words, absmax per stage; the two warpgroups' output boxes (half tiles at 256 tokens: a ring of 4 stages)
    assert gemm_ring.stages(bt) == 4 and gemm_ring.store_rows(bt) == (bt // 2 if bt == 256 else bt)
    ring = gemm_ring.stages(bt) * (bt * 128 + gemm_ring.BN * 48) + 2 * gemm_ring.store_rows(bt) * 128
    assert got["tma_store"] == 2 * bt // gemm_ring.store_rows(bt)  # per warpgroup partition
    table = 32768 * got["lut"]  # the byte table: static shared memory, declared once
    assert got["lut"] == gemm_ring.smem_lut(bt)
    assert ring <= got["shared"] <= min(ring + 4096, 227 * 1024 - table), (got["shared"], ring)


# --- GPU tier --------------------------------------------------------------------------------------------------

def _expected(device) -> bool:
    return gemm_ring.available() and torch.cuda.get_device_capability(device)[0] == 9


@pytest.fixture
def ring_on(monkeypatch):
    """On by default (``gemm_ring.ENABLED``) unless ``HALFBYTE_GEMM_RING=0``: its tests turn it on."""
    monkeypatch.setattr(gemm_ring, "ENABLED", True)


CASES = [(65, 12288, 3072), (512, 12288, 3072), (4608, 12288, 3072), (300, 18432, 3072), (512, 10240, 4096),
         (1000, 10240, 4096), (512, 3072, 3072), (129, 3072, 12288), (512, 4096, 10240), (4096, 3072, 3072),
         (8192, 8192, 256), (17, 4096, 4096), (40, 14336, 4096), (64, 4096, 14336), (100, 11008, 4096),
         (128, 3072, 12288)]


@gpu
@pytest.mark.parametrize("M, N, K", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_fused_gemm_within_bound(M, N, K, qt, ring_on):
    """The kernel itself, with and without bias, at FLUX/T5 widths and token counts that end mid-tile, against
    the derived bound; three calls give the same bits (the split's fixed summation order)."""
    if not _expected(torch.device(DEV)):
        pytest.skip("the fused GEMM needs compute capability 9.x and Gluon")
    packed, stats, am = _quantized_linear(N, K, 64, qt, False, torch.bfloat16)
    W = fourbit.dequantize_4bit(packed, am, 64, qt, (N, K), torch.bfloat16)
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    bias = torch.randn(N, device=DEV).to(torch.bfloat16)
    gemm = gemm_ring.RingGemm(packed.reshape(-1), am, N, K, qt)
    for b in (bias, None):
        outs = [gemm(x, b) for _ in range(3)]
        assert_within_fp32_sum_bound(outs[0], x, W, b, weight_terms=WEIGHT_TERMS)
        assert all(torch.equal(outs[0], o) for o in outs[1:])


@gpu
@pytest.mark.parametrize("M, N, K", [(17, 4096, 4096), (100, 11008, 4096), (512, 12288, 3072), (300, 10240, 4096),
                                     (4608, 3072, 3072)], ids=lambda v: str(v))
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
def test_fused_gemm_fp16(M, N, K, nested, ring_on):
    """fp16 activations: the weight decoded to fp16 (fp16 tables and absmax, ``mul.rn.f16x2``), fp16 wgmma and output,
    within the same derived bound in fp16's unit roundoff; fixed bits over three calls; the op, its plan and a ``Plan``
    give the kernel's bits; double-quantized absmax gives the bits of its decoded float32 absmax."""
    from halfbyte.kernels import gemm4bit

    if not _expected(torch.device(DEV)):
        pytest.skip("the fused GEMM needs compute capability 9.x and Gluon")
    dt = torch.float16
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", nested, dt)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", (N, K), dt)
    x = torch.randn(M, K, device=DEV).to(dt)
    bias = torch.randn(N, device=DEV).to(dt)
    gemm = gemm_ring.RingGemm(packed.reshape(-1), am, N, K, "nf4", None, dt)
    outs = [gemm(x, bias) for _ in range(3)]
    assert outs[0].dtype == dt
    assert_within_fp32_sum_bound(outs[0], x, W, bias, weight_terms=WEIGHT_TERMS)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    if nested:
        q, nested_absmax, _, offset = stats
        dq = gemm_ring.RingGemm(packed.reshape(-1), q, N, K, "nf4", (nested_absmax, None, offset), dt)
        assert torch.equal(dq(x, bias), outs[0])
    if gemm_ring.wanted(M, N, K, gemm_ring.sms(x.get_device())):
        for _ in range(3):  # direct, then the op's plan
            assert torch.equal(torch.ops.halfbyte.gemm_4bit(x, packed, *stats, bias, [N, K], 64, "nf4"), outs[0])
        plan = gemm4bit.Plan(packed, *stats, bias, N, K, 64, "nf4", dt)
        assert plan._fused is not None and torch.equal(plan(x, bias), outs[0])


@gpu
@pytest.mark.parametrize("M, N, K", [(512, 12288, 3072), (4608, 12288, 3072), (512, 3072, 3072), (100, 8192, 2048),
                                     (32, 12288, 3072), (4096, 3072, 3072), (640, 3072, 12288)],
                         ids=lambda v: str(v))  # the last two: the model says yes / no
def test_op_plan_and_direct_call_agree(M, N, K, ring_on):
    """Where ``wanted``, the registered op (first call: the direct path; later: its plan) and a ``Plan`` give the
    kernel's bits, on a (2, M/2, K) input too; where not wanted (or off) they give dequantize + cuBLAS's."""
    from halfbyte.kernels import gemm4bit

    packed, stats, am = _quantized_linear(N, K, 64, "nf4", False, torch.bfloat16)
    x = torch.randn(2, M // 2, K, device=DEV).to(torch.bfloat16)
    bias = torch.randn(N, device=DEV).to(torch.bfloat16)
    ref = gemm_ring.RingGemm(packed.reshape(-1), am, N, K, "nf4")(x.reshape(-1, K), bias).view(2, M // 2, N)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", (N, K), torch.bfloat16)
    plain = torch.nn.functional.linear(x, W, bias)
    fused = _expected(x.device) and gemm_ring.wanted(M // 2 * 2, N, K, gemm_ring.sms(x.get_device()))
    for _ in range(3):  # direct, then the op's plan (built at the second sighting)
        out = torch.ops.halfbyte.gemm_4bit(x, packed, *stats, bias, [N, K], 64, "nf4")
        assert torch.equal(out, ref if fused else plain)
    plan = gemm4bit.Plan(packed, *stats, bias, N, K, 64, "nf4", torch.bfloat16)
    assert (plan._fused is not None) == (_expected(x.device) and gemm_ring.weight_wanted(N, K, 64, "nf4"))
    assert torch.equal(plan(x, bias), ref if fused else plain)
    # the same values in a strided, 8-byte-offset view and a bias 2 bytes off: the fused route copies them (the
    # kernel's bits); the other route hands them to cuBLAS as they are
    wide = torch.empty(2, M // 2, K + 8, device=DEV, dtype=torch.bfloat16)
    xs = wide[..., 4:K + 4]
    xs.copy_(x)
    bs = torch.empty(N + 1, device=DEV, dtype=torch.bfloat16)[1:]
    bs.copy_(bias)
    assert not xs.is_contiguous() and bs.data_ptr() % 16
    want = ref if fused else torch.nn.functional.linear(xs, W, bs)  # cuBLAS may take another path for these
    assert torch.equal(torch.ops.halfbyte.gemm_4bit(xs, packed, *stats, bs, [N, K], 64, "nf4"), want)
    assert torch.equal(plan(xs, bs), want)


@gpu
@pytest.mark.parametrize("M, N, K", [(65, 12288, 3072), (257, 10240, 4096), (300, 10240, 4096), (1000, 3072, 3072),
                                     (129, 3072, 12288), (1300, 4096, 4096), (4600, 3072, 3072), (17, 4096, 4096),
                                     (50, 12288, 3072), (100, 3072, 12288)],
                         ids=lambda v: str(v))
def test_partial_token_tile_gives_the_bits_of_the_whole_tile(M, N, K):
    """The last token tile, when partial, is read in 64-row boxes (its boxes past M re-read x's last 64 rows): its
    tokens' outputs are the bits of the same tokens in a call whose rows fill the tile (the rows past M are other
    tokens, computed in columns of their own)."""
    if not _expected(torch.device(DEV)):
        pytest.skip("the fused GEMM needs compute capability 9.x and Gluon")
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", False, torch.bfloat16)
    P = -(-M // gemm_ring.tile_tokens(M)) * gemm_ring.tile_tokens(M)
    xp = torch.randn(P, K, device=DEV).to(torch.bfloat16)
    bias = torch.randn(N, device=DEV).to(torch.bfloat16)
    gemm = gemm_ring.RingGemm(packed.reshape(-1), am, N, K, "nf4")
    assert torch.equal(gemm(xp[:M], bias), gemm(xp, bias)[:M])


@gpu
def test_fused_gemm_serves_only_what_it_can(ring_on, monkeypatch):
    """Blocksize 128 (plain or double-quantized, bf16 or fp16) takes dequantize + cuBLAS (bit-identical to it); so
    does everything with ``ENABLED`` off."""
    from halfbyte.kernels import gemm4bit

    M, N, K = 512, 12288, 3072
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    for nested, bs, dtype in ((True, 128, torch.float16), (False, 128, torch.float16), (False, 128, torch.bfloat16),
                              (True, 128, torch.bfloat16)):
        packed, stats, am = _quantized_linear(N, K, bs, "nf4", nested, dtype)
        W = fourbit.dequantize_4bit(packed, am, bs, "nf4", (N, K), dtype)
        out = gemm4bit.gemm_4bit(x.to(dtype), packed, *stats, None, [N, K], bs, "nf4")
        assert torch.equal(out, torch.nn.functional.linear(x.to(dtype), W))
        plan = gemm4bit.Plan(packed, *stats, None, N, K, bs, "nf4", dtype)
        assert plan._fused is None
    monkeypatch.setattr(gemm_ring, "ENABLED", False)
    for nested in (False, True):
        packed, stats, am = _quantized_linear(N, K, 64, "nf4", nested, torch.bfloat16)
        assert gemm4bit.Plan(packed, *stats, None, N, K, 64, "nf4", torch.bfloat16)._fused is None


@gpu
@pytest.mark.parametrize("M, N, K, qt", [(512, 12288, 3072, "nf4"), (300, 10240, 4096, "fp4"),
                                         (2048, 3072, 12288, "nf4"), (512, 12800, 3072, "nf4"),
                                         (48, 12288, 3072, "nf4"), (120, 4096, 4096, "fp4")],
                         ids=lambda v: str(v))  # the last: a round, then whole tail tiles (S = 1) on 132 SMs
def test_double_quantized_layers_give_the_bits_of_their_decoded_absmax(M, N, K, qt, ring_on):
    """A double-quantized weight takes the fused GEMM through the kernel, the op (direct path, then its plan), a
    ``Plan`` and an eager ``Linear4bit`` (statistics stored as int32 bits), and each gives exactly the bits of the
    same weight with its absmax decoded to float32 (``double_dequantize``); twice in a row, and in a CUDA graph."""
    import halfbyte
    from halfbyte.kernels import gemm4bit

    if not _expected(torch.device(DEV)):
        pytest.skip("the fused GEMM needs compute capability 9.x and Gluon")
    packed, stats, am = _quantized_linear(N, K, 64, qt, True, torch.bfloat16)
    q, nested_absmax, _, offset = stats
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    bias = torch.randn(N, device=DEV).to(torch.bfloat16)
    want = gemm_ring.RingGemm(packed.reshape(-1), am, N, K, qt)(x, bias)
    W = fourbit.dequantize_4bit(packed, am, 64, qt, (N, K), torch.bfloat16)
    assert_within_fp32_sum_bound(want, x, W, bias, weight_terms=WEIGHT_TERMS)
    dq = gemm_ring.RingGemm(packed.reshape(-1), q, N, K, qt, nested=(nested_absmax, None, offset))
    assert torch.equal(dq(x, bias), want) and torch.equal(dq(x, bias), want)
    for _ in range(3):  # direct, then the op's plan
        assert torch.equal(torch.ops.halfbyte.gemm_4bit(x, packed, *stats, bias, [N, K], 64, qt), want)
    plan = gemm4bit.Plan(packed, *stats, bias, N, K, 64, qt, torch.bfloat16)
    assert plan._fused is not None and torch.equal(plan(x, bias), want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = plan(x, bias)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    # an eager layer holding these bytes (its float32 statistics stored as int32 bits)
    layer = halfbyte.Linear4bit(K, N, quant_type=qt, double_quant=True, dtype=torch.bfloat16, device=DEV)
    layer.weight.data.copy_(packed.reshape(layer.weight.shape))
    layer.absmax.copy_(q)
    layer.nested_absmax.copy_(nested_absmax.view(torch.int32))
    layer.offset.copy_(offset.view(torch.int32))
    layer.bias.data.copy_(bias)
    assert layer._ring_gemm_tokens == gemm_ring.MAX_M
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(layer(x), want)


@gpu
@pytest.mark.parametrize("M, N, K, nested, dtype", [
    (4608, 3072, 3072, False, torch.bfloat16), (300, 10240, 4096, True, torch.bfloat16),
    (512, 12288, 3072, False, torch.bfloat16), (1100, 3072, 12288, False, torch.float16),
    (100, 4096, 4096, False, torch.bfloat16)], ids=lambda v: str(v))
def test_half_output_boxes_give_the_bits_of_whole_ones(M, N, K, nested, dtype, ring_on, monkeypatch):
    """Output tiles stored in two token halves, with the 4-stage ring that frees (``HALF_STORE_TILES``, the default
    at 256-token tiles), change when products are stored and how far the loads run ahead, not what is computed:
    the bits of whole boxes with 3 stages (256-token tiles with one round, a partial tile and a split tail; a
    128-token tile, where the setting changes nothing), plain and double-quantized, bf16 and fp16."""
    if not _expected(torch.device(DEV)):
        pytest.skip("the fused GEMM needs compute capability 9.x and Gluon")
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", nested, dtype)
    x = torch.randn(M, K, device=DEV).to(dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    nest = (stats[1], None, stats[3]) if nested else None
    gemm = gemm_ring.RingGemm(packed.reshape(-1), stats[0] if nested else am, N, K, "nf4", nest, dtype)
    outs = []
    for half in (256,), (), (128, 256):
        monkeypatch.setattr(gemm_ring, "HALF_STORE_TILES", frozenset(half))
        outs.append(gemm(x, bias))
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", (N, K), dtype)
    assert_within_fp32_sum_bound(outs[0], x, W, bias, weight_terms=WEIGHT_TERMS)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@gpu
def test_fused_gemm_in_a_cuda_graph_and_on_two_streams(ring_on):
    """A plan's fused call captured in a CUDA graph replays to the eager bits (its split counters reset in the
    kernel); calls on two streams at once (one counter array each) give the same bits as one stream."""
    from halfbyte.kernels import gemm4bit

    if not _expected(torch.device(DEV)):
        pytest.skip("the fused GEMM needs compute capability 9.x and Gluon")
    M, N, K = 512, 12288, 3072
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", False, torch.bfloat16)
    plan = gemm4bit.Plan(packed, *stats, None, N, K, 64, "nf4", torch.bfloat16)
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    ref = plan(x, None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        plan(x, None)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = plan(x, None)
    for _ in range(2):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    xs = [torch.randn(M, K, device=DEV).to(torch.bfloat16) for _ in range(2)]
    refs = [plan(t, None) for t in xs]
    torch.cuda.synchronize()
    for _ in range(3):
        outs = []
        for st, t in zip((s1, s2), xs, strict=True):
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                outs.append(plan(t, None))
        torch.cuda.synchronize()
        assert all(torch.equal(o, r) for o, r in zip(outs, refs, strict=True))


@gpu
def test_fused_call_gives_its_split_workspace_back(ring_on):
    """A fused call split along K takes its float32 partial tiles raw from the caching allocator and gives them back
    once the launch is queued: during three calls the peak is the three outputs plus one workspace, and afterwards
    only the outputs stay allocated; the bits are the first call's."""
    from halfbyte.kernels import gemm4bit

    if not _expected(torch.device(DEV)):
        pytest.skip("the fused GEMM needs compute capability 9.x and Gluon")
    M, N, K = 64, 4096, 4096
    packed, stats, _ = _quantized_linear(N, K, 64, "nf4", False, torch.bfloat16)
    plan = gemm4bit.Plan(packed, *stats, None, N, K, 64, "nf4", torch.bfloat16)
    assert plan._fused is not None and gemm_ring.wanted(M, N, K, plan._fused.programs)
    bt = gemm_ring.tile_tokens(M)
    n_tiles = -(-M // bt) * (N // gemm_ring.BN)
    grid, full, S = gemm_ring.schedule(n_tiles, K // 64, plan._fused.programs)
    assert S > 1, "the case must split along K"
    ws = -(-(n_tiles - full * grid) * S * gemm_ring.BN * bt * 4 // 512) * 512  # the allocator's 512-byte rounding
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    ref = plan(x, None)  # compiles, makes this stream's counters
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = [plan(x, None) for _ in range(3)]
    torch.cuda.synchronize()
    out_bytes = M * N * 2
    assert torch.cuda.memory_allocated() - base == 3 * out_bytes
    assert torch.cuda.max_memory_allocated() - base == 3 * out_bytes + ws
    assert all(torch.equal(o, ref) for o in outs)


@gpu
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_layer_calls_the_fused_gemm(double_quant, dtype, ring_on):
    """A compiled bf16 or fp16 NF4 2048 -> 8192 layer (``layer_wanted``), plain or double-quantized: one graph for two
    token counts within 65..MAX_M, no graph break, the matmul left to ``gemm_4bit`` (no dequantize in the graph) where
    the kernel serves, and the eager layer's bits (both reach the same kernel). Past ``MAX_M`` tokens it dequantizes in
    the graph again."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    import halfbyte

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    lin = torch.nn.Linear(2048, 8192).to(DEV, dtype)
    layer = halfbyte.Linear4bit.from_linear(lin, quant_type="nf4", double_quant=double_quant)
    fused = _expected(torch.device(DEV))
    assert layer._ring_gemm_tokens == (gemm_ring.MAX_M if fused else 0)
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        for M in (80, 130):
            x = torch.randn(2, M, 2048, device=DEV, dtype=dtype)
            torch._dynamo.mark_dynamic(x, 1)
            out = compiled(x)
            want = layer(x)
            assert torch.equal(out, want) if fused else torch.allclose(out, want, rtol=2**-7, atol=1e-2)
        assert backend.frame_count == 1
        assert not counters["graph_break"], dict(counters["graph_break"])
        _, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
        code = "".join(code)
        assert ("gemm_4bit" in code and not re.search(r"_dequant_(words_)?kernel", code)) == fused
        big = torch.randn(1, gemm_ring.MAX_M + 1, 2048, device=DEV, dtype=dtype)
        _, code = run_and_get_code(torch.compile(layer, fullgraph=True), big)
        assert "gemm_4bit" not in "".join(code)
