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
