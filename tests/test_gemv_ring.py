"""The TMA-ring 4-bit GEMV (``halfbyte.kernels.gemv_ring``). Gluon does not run under the interpreter, so the CPU
tier checks what it can without a GPU: the table the kernel decodes through, and that the kernel compiles for sm_90
with the installed triton. The GPU tier runs it over the FLUX/T5 shapes it serves, against the GEMV's derived
bound (``test_kernels.assert_within_fp32_sum_bound``), through the registered op, a plan and a CUDA graph."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import DEV, FLUX_T5, gpu
from test_kernels import _quantized_linear, assert_within_fp32_sum_bound

from halfbyte.formats import fourbit
from halfbyte.formats.codebooks import code_4bit
from halfbyte.kernels import gemm4bit, gemv_ring

needs_gluon = pytest.mark.skipif(not gemv_ring.AVAILABLE, reason="this triton has no Gluon: the ring is not built")
RING_SHAPES = [s for s in FLUX_T5 if s[0] * s[1] >= gemv_ring.MIN_WORK and s[1] % 512 == 0]


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


_COMPILE = """
import json, sys, torch
from halfbyte.kernels import gemv_ring
dtype = getattr(torch, sys.argv[1])
k = gemv_ring.compile_offline(dtype, tuple(int(v) for v in sys.argv[2].split(",")), sys.argv[3], sys.argv[4] == "1")
ptx = k.asm["ptx"]
ty = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
print(json.dumps({"shared": k.metadata.shared, "table": ptx.count(".shared .align 16 .b32 %s[8192]" % gemv_ring.TABLE),
                  "tma": ptx.count("cp.async.bulk.tensor"),
                  "mma": ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.%s.%s.f32" % (ty, ty)),
                  "setmaxnreg": "setmaxnreg" in ptx,
                  "entry": "mov.b32 %%v, %d;" % gemv_ring.table_words(sys.argv[3], dtype)[0x7F] in ptx}))
"""


@needs_gluon
@pytest.mark.parametrize("dtype, cfg, qt, has_bias", [
    ("bfloat16", "16,64,4,3", "nf4", "1"),
    ("float16", "8,128,4,3", "fp4", "0"),
], ids=["bf16-16x64", "fp16-8x128"])
def test_compiles_for_sm90(dtype, cfg, qt, has_bias):
    """The kernel compiles for sm_90 with this triton (its Gluon API moves between releases): three TMA loads per
    stage, the table declared once and written from the code's immediates, 32 mma.sync of x's type (4 consumer
    warps x 2 words x 4 per K tile), register reallocation between the partitions, and dynamic shared memory under
    48 KB beside the 32 KB table (why ``_open_shared`` raises the limit itself). In a process of its own: this
    tier's TRITON_INTERPRET turns triton's own reduction helpers into interpreter functions, which Gluon cannot
    compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE, dtype, cfg, qt, has_bias], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {"shared": got["shared"], "table": 1, "tma": 3, "mma": 32, "setmaxnreg": True, "entry": True}
    assert got["shared"] < 48 * 1024


@pytest.fixture
def ring_on(monkeypatch):
    """The ring is opt-in (``gemv_ring.ENABLED``); the GPU tier turns it on for its tests."""
    monkeypatch.setattr(gemv_ring, "ENABLED", True)


def _ring_expected(device) -> bool:
    return gemv_ring.AVAILABLE and torch.cuda.get_device_capability(device)[0] == 9


@gpu
@pytest.mark.parametrize("shape", RING_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dn", ["bf16", "fp16"])
def test_ring_gemv_flux_t5_shapes(shape, dn, ring_on):
    """Where the ring serves (compute capability 9 with Gluon), the GEMV through the registered op, ``gemv`` and a
    plan, with and without bias, is within the bound; elsewhere the same calls take the other GEMVs."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dn]
    N, K = shape
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", False, dtype)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", shape, dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    x = torch.randn(1, K, device=DEV).to(dtype)
    data = packed.reshape(-1).view(torch.uint8)
    expect = _ring_expected(x.device)
    assert gemv_ring.supported(dtype, N, K, 64, False, stats[0], x, data) == expect
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
    """Off by default; on, double-quantized absmax, blocksize 128, float32 x, a small weight and K % 512 != 0 take
    the other GEMVs (still within the bound through the op)."""
    N, K = 3072, 12288
    x = torch.randn(1, K, device=DEV).to(torch.bfloat16)
    plain_packed, plain_stats, _ = _quantized_linear(N, K, 64, "nf4", False, torch.bfloat16)
    monkeypatch.setattr(gemv_ring, "ENABLED", False)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, False, plain_stats[0], x, plain_packed)
    assert gemm4bit.Plan(plain_packed, *plain_stats, None, N, K, 64, "nf4", torch.bfloat16)._ring is None
    monkeypatch.setattr(gemv_ring, "ENABLED", True)
    packed, stats, am = _quantized_linear(N, K, 64, "nf4", True, torch.bfloat16)
    data = packed.reshape(-1).view(torch.uint8)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 64, True, stats[0], x, data)
    plain = torch.ones(N * K // 64, device=DEV)
    assert not gemv_ring.supported(torch.bfloat16, N, K, 128, False, plain, x, data)
    assert not gemv_ring.supported(torch.float32, N, K, 64, False, plain, x, data)
    assert not gemv_ring.supported(torch.bfloat16, 3072, 3072, 64, False, plain, x, data)
    assert not gemv_ring.supported(torch.bfloat16, 65536, 640, 64, False, plain, x, data)
    W = fourbit.dequantize_4bit(packed, am, 64, "nf4", (N, K), torch.bfloat16)
    out = torch.ops.halfbyte.gemm_4bit(x, packed, *stats, None, [N, K], 64, "nf4")
    assert_within_fp32_sum_bound(out, x, W, None, unrounded_weights=True)


@gpu
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_ring_plan_in_a_cuda_graph(qt, ring_on):
    """A plan's ring GEMV captured in a CUDA graph replays to the eager result, bit for bit, for new inputs."""
    N, K, dtype = 12288, 3072, torch.bfloat16
    packed, stats, am = _quantized_linear(N, K, 64, qt, False, dtype)
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
