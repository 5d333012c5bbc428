"""Formats vs bitsandbytes' CUDA bytes (golden files from an H100) and vs its CPU backend where they agree."""

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from halfbyte.formats import blockwise, fourbit, int8
from halfbyte.formats.codebooks import DYNAMIC_MAP_SHA256, NF4_CODE, code_4bit, dynamic_map
from halfbyte.formats.fastmath import rcp_approx

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def test_dynamic_map_matches_spec_sha256():
    m = dynamic_map()
    assert m.shape == (256,) and m[127] == 0 and m[255] == 1 and m[0] == -0.99296875
    assert hashlib.sha256(m.numpy().tobytes()).hexdigest() == DYNAMIC_MAP_SHA256


def test_code_tables_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_4bit(qt), F.get_4bit_type(qt, device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map().float())


def test_hand_checked_vectors():
    # docs/bnb-format.md §1.4: [1, -1, 0.5, 0] -> NF4 F0 C7, FP4 3B 50; odd length pads with code(0).
    x = torch.tensor([1.0, -1.0, 0.5, 0.0])
    assert fourbit.quantize_4bit(x, 64, "nf4")[0].tolist() == [0xF0, 0xC7]
    assert fourbit.quantize_4bit(x, 64, "fp4")[0].tolist() == [0x3B, 0x50]
    y = torch.tensor([0.5, -0.25, 1.0])
    assert fourbit.quantize_4bit(y, 64, "nf4")[0].tolist() == [0xC4, 0xF7]
    assert fourbit.quantize_4bit(y, 64, "fp4")[0].tolist() == [0x5F, 0x30]


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_4bit_bytes_match_cuda(goldens, dn, qt, bs):
    """Ties on every threshold, an all-zero segment (CUDA writes code 0), random data, odd length (16421)."""
    x = goldens[f"in.{dn}"]
    packed, absmax = fourbit.quantize_4bit(x, bs, qt)
    key = f"q4.{qt}.{dn}.bs{bs}"
    assert torch.equal(packed, goldens[key + ".packed"])
    assert torch.equal(absmax, goldens[key + ".absmax"])
    if bs in (64, 256):
        deq = fourbit.dequantize_4bit(packed, absmax, bs, qt, x.shape, x.dtype)
        assert torch.equal(deq, goldens[f"dq4.{qt}.{dn}.bs{bs}"])


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_double_quant_matches_cuda(goldens, dn, qt, bs):
    key = f"q4.{qt}.{dn}.bs{bs}.dq"
    absmax = fourbit.quantize_4bit(goldens[f"in.{dn}"], bs, qt)[1]
    q, nested, offset = blockwise.double_quantize(absmax)
    # mean() and the nested max are float reductions: the spec asks agreement to rounding, not to the bit.
    torch.testing.assert_close(offset, goldens[key + ".offset"], rtol=2e-6, atol=0)
    torch.testing.assert_close(nested, goldens[key + ".nested_absmax"], rtol=2e-6, atol=0)
    # Given CUDA's offset, the 8-bit codes (binary search + midpoint rule) are bit-exact.
    q_cuda_offset, nested2 = blockwise.quantize_blockwise(absmax - goldens[key + ".offset"])
    assert torch.equal(q_cuda_offset, goldens[key + ".absmax"])
    assert torch.equal(nested2, goldens[key + ".nested_absmax"])


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_nonfinite_inputs_match_cuda(goldens, dn, qt):
    """NaN ignored by the block max and coded 0; inf -> absmax inf; all-NaN block -> absmax -FLT_MAX."""
    packed, absmax = fourbit.quantize_4bit(goldens[f"in_nonfinite.{dn}"], 64, qt)
    assert torch.equal(packed, goldens[f"q4nf.{qt}.{dn}.bs64.packed"])
    assert torch.equal(absmax, goldens[f"q4nf.{qt}.{dn}.bs64.absmax"])
    assert torch.isinf(absmax[2]) and absmax[4] == -torch.finfo(torch.float32).max


def test_rcp_approx_reproduces_cuda_fdividef(goldens):
    """The measured reciprocal gives CUDA's __fdividef(127, a) for every positive finite float16 a."""
    a = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    assert torch.equal(127.0 * rcp_approx(a), goldens["fdividef127"])
    exact = 127.0 * (1.0 / a)
    assert (exact != goldens["fdividef127"]).sum() > 1000  # exact division would not do


def test_rcp_approx_edge_values():
    a = torch.tensor([0.0, float("inf"), -torch.finfo(torch.float32).max, 1e-40, 2.0**127, 1.0, 0.5])
    r = rcp_approx(a)
    assert r[0] == float("inf") and r[1] == 0 and r[2] == 0 and r[3] == float("inf") and r[4] == 0
    assert r[5] == 1.0 and r[6] == 2.0


@pytest.mark.parametrize("dn", DTYPES)
def test_int8_weight_bytes_match_cuda(goldens, dn):
    ca, sca, cols = int8.int8_vectorwise_quant(goldens[f"int8.w.{dn}"])
    assert torch.equal(ca, goldens[f"int8.cb.{dn}"]) and torch.equal(sca, goldens[f"int8.scb.{dn}"])
    assert cols.numel() == 0 and sca[3] == 0 and (ca[3] == 0).all()  # all-zero row


@pytest.mark.parametrize("th", [0, 6])
def test_int8_activation_outliers_match_cuda(goldens, th):
    ca, sca, cols = int8.int8_vectorwise_quant(goldens["int8.a"], float(th))
    assert torch.equal(ca, goldens[f"int8.ca.t{th}"])
    assert torch.equal(sca, goldens[f"int8.sca.t{th}"])
    assert torch.equal(cols, goldens[f"int8.cols.t{th}"])
    if th:
        assert {17, 100, 3} <= set(cols.tolist())  # 6.0 exactly is an outlier (>=)


@pytest.mark.parametrize("dn", ["fp16", "bf16"])
@pytest.mark.parametrize("th", [0, 6])
def test_int8_linear_matches_cuda(goldens, dn, th):
    dt = DTYPES[dn]
    cb, scb, _ = int8.int8_vectorwise_quant(goldens["lin.w"].to(dt))
    out = int8.int8_linear(goldens["lin.x"].to(dt), cb, scb, goldens["lin.bias"].to(dt), float(th))
    assert torch.equal(out, goldens[f"lin8.{dn}.t{th}"])


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [64, 256])
def test_4bit_matches_bitsandbytes_cpu_backend(dn, qt, bs):
    """bnb's CPU backend agrees with CUDA except FP4 ties/sign of zero and all-zero blocks (spec §1.3, §1.6);
    on random NF4 data without zero blocks the bytes must be identical."""
    F = pytest.importorskip("bitsandbytes.functional")
    x = (torch.randn(4099) * 0.1).to(DTYPES[dn])
    ref, qs = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=False)
    packed, absmax = fourbit.quantize_4bit(x, bs, qt)
    assert torch.equal(absmax, qs.absmax)
    ours = fourbit.dequantize_4bit(packed, absmax, bs, qt, x.shape, x.dtype)
    theirs = F.dequantize_4bit(ref, qs)
    if qt == "nf4":
        assert torch.equal(packed, ref.reshape(-1)) and torch.equal(ours, theirs)
    else:  # FP4: the CPU backend signs zeros differently and breaks exact ties the other way (spec §1.3)
        a, b = fourbit.unpack_nibbles(packed, x.numel()), fourbit.unpack_nibbles(ref.reshape(-1), x.numel())
        zero_sign_only = ((a & 7) == 0) & ((b & 7) == 0)
        assert ((a != b) & ~zero_sign_only).float().mean() < 0.005
        # a tie moves one code: the widest FP4 gap is 1/3 of absmax (0.667 -> 1.0), plus the output rounding
        step = absmax.repeat_interleave(bs)[: x.numel()] * (1 / 3) * (1 + torch.finfo(x.dtype).eps)
        assert ((ours.float() - theirs.float()).abs() <= step + 1e-6).all()


def test_int8_matches_bitsandbytes_cpu_backend():
    F = pytest.importorskip("bitsandbytes.functional")
    a = (torch.randn(64, 256) * 2).half()
    ca, sca, cols = int8.int8_vectorwise_quant(a, 6.0)
    ca_b, sca_b, cols_b = F.int8_vectorwise_quant(a.clone(), threshold=6.0)
    assert torch.equal(sca, sca_b) and torch.equal(cols, cols_b)
    # bnb's CPU backend divides exactly; CUDA (and halfbyte) use the approximate division: at most 1 apart.
    assert (ca.int() - ca_b.int()).abs().max() <= 1


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 700),
    bs=st.sampled_from(BLOCKSIZES),
    qt=st.sampled_from(["nf4", "fp4"]),
    dn=st.sampled_from(list(DTYPES)),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_error_bounded_by_half_code_step(n, bs, qt, dn, scale, seed):
    """|x - deq(q(x))| <= half the widest gap between adjacent codes * absmax (+ the output dtype's rounding)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * scale).to(DTYPES[dn])
    packed, absmax = fourbit.quantize_4bit(x, bs, qt)
    assert packed.numel() == (n + 1) // 2 and absmax.numel() == -(-n // bs)
    deq = fourbit.dequantize_4bit(packed, absmax, bs, qt, x.shape, torch.float32)
    codes = code_4bit(qt).sort().values
    half_step = ((codes[1:] - codes[:-1]).max() / 2).item()
    a = absmax.repeat_interleave(bs)[:n]
    rounding = torch.finfo(DTYPES[dn]).eps * a  # the input itself was rounded to its dtype
    assert ((deq - x.float()).abs() <= half_step * a * (1 + 1e-6) + rounding).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1))
def test_double_quant_roundtrip(n, seed):
    g = torch.Generator().manual_seed(seed)
    absmax = torch.rand(n, generator=g) * 3
    q, nested, offset = blockwise.double_quantize(absmax)
    back = blockwise.double_dequantize(q, nested, offset)
    # the dynamic map's largest relative gap near 1 is 1/64 of the block's range: half of it bounds the error
    bound = nested.repeat_interleave(256)[:n] * (1 / 128) * (1 + 1e-5)
    assert ((back - absmax).abs() <= bound + 1e-7).all()


def test_nf4_table_sorted_and_asymmetric():
    assert list(NF4_CODE) == sorted(NF4_CODE) and NF4_CODE[7] == 0.0 and sum(v < 0 for v in NF4_CODE) == 7


@pytest.mark.parametrize("bad", [(64, "int4"), (48, "nf4"), (8192, "fp4")])
def test_bad_4bit_arguments_raise(bad):
    with pytest.raises(ValueError, match="quant_type|blocksize"):
        fourbit.quantize_4bit(torch.randn(10), *bad)


def test_bad_dtype_and_packed_size_raise():
    with pytest.raises(ValueError, match="int32"):
        fourbit.quantize_4bit(torch.ones(10, dtype=torch.int32))
    p, a = fourbit.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match="expected 2048"):
        fourbit.dequantize_4bit(p[:-1], a, 64, "nf4", (64, 64), torch.float32)
