"""Every halfbyte:: op passes torch.library.opcheck (schema, fake, autograd registration, dynamic shapes)."""

import pytest
import torch
from torch.library import opcheck

import halfbyte  # noqa: F401
from halfbyte.formats.codebooks import dynamic_map

DT = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_opcheck_4bit(dtype, qt):
    A = torch.randn(8, 96, dtype=dtype)
    opcheck(torch.ops.halfbyte.quantize_4bit.default, (A, 64, qt))
    p, a = torch.ops.halfbyte.quantize_4bit(A, 64, qt)
    opcheck(torch.ops.halfbyte.dequantize_4bit.default, (p, a, 64, qt, [8, 96], dtype))
    code = dynamic_map()
    off = a.mean().reshape(1)
    opcheck(torch.ops.halfbyte.quantize_blockwise.default, (a - off, code, 256))
    q, n = torch.ops.halfbyte.quantize_blockwise(a - off, code, 256)
    opcheck(torch.ops.halfbyte.dequantize_blockwise.default, (q, n, code, 256, torch.float32))
    x = torch.randn(2, 3, 96, dtype=dtype, requires_grad=True)
    bias = torch.randn(8, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.halfbyte.gemm_4bit.default, (x, p, a, None, None, None, bias, [8, 96], 64, qt))
    opcheck(torch.ops.halfbyte.gemm_4bit.default, (x, p, q, n, code, off, None, [8, 96], 64, qt))
    x0 = x.detach()  # never differentiated: compiled inference only (halfbyte.nn.Linear4bit._dequantize_in_graph)
    opcheck(torch.ops.halfbyte.dequantize_4bit_after.default, (x0, p, a, None, None, None, 64, qt, [8, 96], dtype))
    opcheck(torch.ops.halfbyte.dequantize_4bit_after.default, (x0, p, q, n, code, off, 64, qt, [8, 96], dtype))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_opcheck_int8(threshold):
    a = torch.randn(6, 64, dtype=torch.float16) * 3
    opcheck(torch.ops.halfbyte.int8_vectorwise_quant.default, (a, threshold))
    cb, scb, _ = torch.ops.halfbyte.int8_vectorwise_quant(torch.randn(16, 64, dtype=torch.float16), 0.0)
    for dtype in DT:
        x = (torch.randn(2, 5, 64) * 3).to(dtype).requires_grad_()
        bias = torch.randn(16, dtype=dtype, requires_grad=True)
        opcheck(torch.ops.halfbyte.int8_mixed_mm.default, (x, cb, scb, bias, threshold))
        opcheck(torch.ops.halfbyte.int8_mixed_mm.default, (x, cb, scb, None, threshold))


def test_gemm_4bit_gradients_match_dequantized_linear():
    w = torch.randn(12, 64)
    p, a = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4")
    W = torch.ops.halfbyte.dequantize_4bit(p, a, 64, "nf4", [12, 64], torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    out = torch.ops.halfbyte.gemm_4bit(x, p, a, None, None, None, b, [12, 64], 64, "nf4")
    g = torch.randn_like(out)
    out.backward(g)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, W, b2).backward(g)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, W, b), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_compile_fullgraph_4bit_and_int8():
    """The layers trace into one graph (the int8 op has a fixed output shape: no dynamic-shape flags needed)."""
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    fresh = [torch.nn.Linear(layer.in_features, layer.out_features) for layer in lin]
    m4 = halfbyte.quantize_(torch.nn.Sequential(*fresh),
                            halfbyte.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    compiled = torch.compile(m4, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m4(x), rtol=0, atol=0)
    m8 = halfbyte.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 16)),
                            halfbyte.BitsAndBytesConfig(load_in_8bit=True))
    torch._dynamo.reset()
    compiled8 = torch.compile(m8, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled8(x), m8(x), rtol=0, atol=0)


def _grads(call, x, bias):
    x, bias = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    out = call(x, bias)
    out.backward(torch.arange(out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape) / out.numel())
    return out, x.grad, bias.grad


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU tier: needs a CUDA device")])])
def test_eager_autograd_path_equals_the_op(dq, dtype, device):
    """Training layers skip the dispatcher through ``ops.direct_kernel`` (an autograd.Function; on CUDA its
    backward dequantizes with the fused kernel): outputs and gradients equal the op's own autograd bit for bit,
    for 4-bit and LLM.int8()."""
    from halfbyte import ops
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 24)
    l4 = halfbyte.Linear4bit.from_linear(lin, double_quant=dq, device=device)
    l8 = halfbyte.Linear8bit.from_linear(lin, threshold=1.5, device=device)
    x = (torch.randn(3, 5, 128) * 2).to(device, dtype)
    bias = torch.randn(24, dtype=dtype, device=device)
    stats = l4.quant_stats()
    args4 = (l4.weight, *stats)
    xr = x.detach().requires_grad_()
    assert ops.direct_kernel("gemm_4bit", xr, None) is ops._EAGER_AUTOGRAD["gemm_4bit"]
    if device == "cpu":
        assert ops.direct_kernel("gemm_4bit", x, None) is None  # CPU inference: the op (reference kernel)
    for fn, op in ((ops._EAGER_AUTOGRAD["gemm_4bit"], torch.ops.halfbyte.gemm_4bit),):
        got = _grads(lambda x, b: fn(x, *args4, b, [24, 128], 64, "nf4"), x, bias)
        ref = _grads(lambda x, b: op(x, *args4, b, [24, 128], 64, "nf4"), x, bias)
        for g, r in zip(got, ref):
            assert torch.equal(g, r)
    scb = l8.SCB.view(torch.float32)
    got = _grads(lambda x, b: ops._EAGER_AUTOGRAD["int8_mixed_mm"](x, l8.weight, scb, b, 1.5), x, bias)
    ref = _grads(lambda x, b: torch.ops.halfbyte.int8_mixed_mm(x, l8.weight, scb, b, 1.5), x, bias)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    with torch.no_grad():  # inference: the registered CUDA kernel itself on CUDA, the op on the CPU
        assert ops.direct_kernel("gemm_4bit", xr, None) is ops._DIRECT.get("gemm_4bit" if device == "cuda" else "")
