"""LLM.int8() Triton kernels (halfbyte.kernels.int8, int8_mm) vs the reference (halfbyte.formats.int8) and
bitsandbytes' CUDA goldens, in the two tiers of tests/test_kernels.py: the interpreter on tiny shapes without a GPU,
compiled (plus FLUX / T5-XXL shapes, M up to 8192) with one. Row quantization and the int8 GEMM without outliers are
bit-exact; with outlier columns the float32 sum of their products may be ordered differently (one rounding)."""

import pytest
import torch
from kernel_helpers import CUDA, DEV, DTYPES, FLUX_T5, IGNORE_NUMPY_WARNINGS, bits, gpu

pytest.importorskip("triton")

from halfbyte.formats import int8  # noqa: E402
from halfbyte.kernels import int8 as k8  # noqa: E402
from halfbyte.kernels import int8_mm as km  # noqa: E402

pytestmark = IGNORE_NUMPY_WARNINGS


@pytest.mark.parametrize("t", [0, 6])
def test_int8_vectorwise_quant_matches_cuda_goldens(goldens, t):
    a = goldens["int8.a"].to(DEV)
    ca, sca, cols = k8.int8_vectorwise_quant(a, float(t))
    assert torch.equal(ca.cpu(), goldens[f"int8.ca.t{t}"])
    assert torch.equal(sca.cpu(), goldens[f"int8.sca.t{t}"])
    assert torch.equal(cols.cpu(), goldens[f"int8.cols.t{t}"])
    for dn in DTYPES:  # weights: bitsandbytes casts them to float16 first, the kernel likewise
        cb, scb, _ = k8.int8_vectorwise_quant(goldens[f"int8.w.{dn}"].to(DEV), 0.0)
        assert torch.equal(cb.cpu(), goldens[f"int8.cb.{dn}"]) and torch.equal(scb.cpu(), goldens[f"int8.scb.{dn}"])


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0, 6.1])
def test_int8_vectorwise_quant_matches_reference(dn, threshold):
    """NaN, zero rows, inf, outliers, K not a power of two, a single row (outlier columns kept)."""
    for M, K in ((1, 64), (5, 100), (9, 5000)):
        a = (torch.randn(M, K, device=DEV) * 3).to(DTYPES[dn])
        a[0, :3] = 0
        a[0, 7] = float("nan")
        if M > 2:
            a[2] = 0
            a[1, 11] = float("inf")
        got, want = k8.int8_vectorwise_quant(a, threshold), int8.int8_vectorwise_quant(a, threshold)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def assert_int8_matches(got, x, cb, scb, bias, threshold):
    """The fused kernel against ``formats.int8.int8_linear``: bit-identical where no column holds an outlier (the
    int32 GEMM is exact and the epilogue repeats the reference's float32 operation order). With outlier columns
    both add S = x[:, cols] @ W[:, cols]^T (float32 sums of n products, any order) to the same x-dtype value and
    round once: |got - want| <= (n+1)(u + u_ref) * sum|x_c W_c| + ulp(want) (u = 2^-24 for the kernel's float32
    sum; u_ref the same for the reference, except that cuBLAS may reduce 16-bit GEMMs in their own precision where
    torch allows it (``allow_fp16/bf16_reduced_precision_reduction``): u_ref = 2^-11 fp16, 2^-8 bf16; one rounding
    boundary may fall between the two sums: ulp <= 2^-7|v| bf16, 2^-10|v| fp16, 2^-23|v| fp32)."""
    want = int8.int8_linear(x, cb, scb, bias, threshold)
    x2 = x.reshape(-1, x.shape[-1])
    _, _, cols = int8.int8_vectorwise_quant(x2, threshold)
    if cols.numel() == 0:
        assert torch.equal(bits(got), bits(want))
        return
    W = int8.int8_vectorwise_dequant(cb[:, cols], scb).to(x.dtype).double()
    S = (x2[:, cols].double().abs() @ W.abs().T).view(want.shape)
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}[x.dtype]
    mm = torch.backends.cuda.matmul
    u_ref = 2.0**-24
    if x.is_cuda and x.dtype == torch.float16 and mm.allow_fp16_reduced_precision_reduction:
        u_ref = 2.0**-11
    if x.is_cuda and x.dtype == torch.bfloat16 and mm.allow_bf16_reduced_precision_reduction:
        u_ref = 2.0**-8
    tol = (cols.numel() + 1) * (2.0**-24 + u_ref) * S + ulp * want.double().abs() + torch.finfo(x.dtype).tiny
    err = (got.double() - want.double()).abs()
    assert torch.isfinite(got).all() and (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_mixed_mm_matches_reference(dn, threshold):
    """Shapes with and without outlier columns, K not a multiple of the K tile, M past one M tile."""
    dtype = DTYPES[dn]
    for M, K, N in ((3, 64, 16), (20, 96, 24), (2, 30, 8), (40, 200, 40)):
        cb, scb, _ = int8.int8_vectorwise_quant(torch.randn(N, K, device=DEV).half(), 0.0)
        x = (torch.randn(M, K, device=DEV) * 3).to(dtype)
        for bias in (None, torch.randn(N, device=DEV).to(dtype), torch.randn(N, device=DEV).half()):
            assert_int8_matches(km.int8_mixed_mm(x, cb, scb, bias, threshold), x, cb, scb, bias, threshold)
    x = torch.randn(5, 64, device=DEV).to(dtype)  # threshold set, no outlier in the data: bit-identical
    cb, scb, _ = int8.int8_vectorwise_quant(torch.randn(8, 64, device=DEV).half(), 0.0)
    assert torch.equal(bits(km.int8_mixed_mm(x, cb, scb, None, 50.0)), bits(int8.int8_linear(x, cb, scb, None, 50.0)))


@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("M,K,N", [(20, 96, 24), (40, 200, 40)] + ([(300, 512, 72), (1100, 1024, 256)] if CUDA
                                                                   else []))  # both GPU tile shapes
def test_int8_outlier_products_fused_in_the_epilogue(dn, M, K, N):
    """``MMConfig.fuse_outliers`` (the default): the GEMM's epilogue adds the outlier products to the rounded tile in
    registers, with the separate kernel's operations and order: the same bits, with and without outliers and bias,
    with and without the register cap."""
    import dataclasses

    dtype = DTYPES[dn]
    cb, scb, _ = int8.int8_vectorwise_quant(torch.randn(N, K, device=DEV).half(), 0.0)
    x = (torch.randn(M, K, device=DEV) * 3).to(dtype)  # ~0.3 % of the elements >= 6: several outlier columns
    cfg = dataclasses.replace(km.mm_config(M, N, K), fuse_outliers=False)
    fused = dataclasses.replace(cfg, fuse_outliers=True)
    caps = [fused] + ([dataclasses.replace(fused, fused_registers=128)] if fused.fused_registers is None else [])
    for bias in (None, torch.randn(N, device=DEV).to(dtype)):
        for xx, thr in ((x, 6.0), (x, 50.0)):  # 50: a threshold no element reaches, the loop skipped
            want = km.int8_mixed_mm(xx, cb, scb, bias, thr, cfg)
            for f in caps:  # with and without the register cap (MMConfig.fused_registers)
                got = km.int8_mixed_mm(xx, cb, scb, bias, thr, f)
                assert torch.equal(bits(got), bits(want)), f
            assert_int8_matches(got, xx, cb, scb, bias, thr)


@pytest.mark.parametrize("dn", ["fp32", "bf16", "fp16"])
def test_int8_outlier_flags_round_to_half_once(dn):
    """The flag kernel's columns are the reference's: float16 |x| >= threshold in any row, NaN never, inf always; a
    NaN in a column does not hide another row's outlier there; float32 values just under the threshold flag only
    where they round up to it in float16; more rows than one program scans."""
    M, K = 300, 70
    x = torch.randn(M, K, device=DEV)
    x[5, 3], x[200, 3] = float("nan"), 7.0  # NaN and an outlier in one column
    x[9, 4] = float("nan")  # NaN alone
    x[0, 5], x[299, 6] = float("-inf"), float("inf")
    x[150, 7], x[151, 8] = 5.9995, -5.997  # float16: 6.0 (flagged) and 5.996 (not)
    x[17, 69] = -6.0
    x = x.to(DTYPES[dn])
    cb, scb, _ = int8.int8_vectorwise_quant(torch.randn(8, K, device=DEV).half(), 0.0)
    _, _, (_, _, count) = k8._quant_with_outliers(x, cb, scb, 6.0)
    _, _, want = int8.int8_vectorwise_quant(x, 6.0)
    assert 3 in want.tolist() and 4 not in want.tolist() and 69 in want.tolist()
    if dn != "bf16":  # bfloat16 rounds both to 6.0
        assert 7 in want.tolist() and 8 not in want.tolist()
    assert outlier_list(count, K) == want.tolist()


def outlier_list(count, K):
    """The list of outlier columns in the workspace that ``count`` (its last element) is a view of."""
    w = -(-K // 32)
    return count._base[2 * w:2 * w + int(count)].tolist()


def bit_places(count, K):
    """Each column's 1-based place in the list, 0 if none, from the workspace's bit words and prefix counts."""
    ws, w = count._base.cpu(), -(-K // 32)
    words, before = ws[:w].tolist(), ws[w:2 * w].tolist()
    places = []
    for k in range(K):
        word = words[k // 32] & 0xFFFFFFFF
        hit = (word >> (k % 32)) & 1
        places.append(before[k // 32] + bin(word & ((1 << (k % 32)) - 1)).count("1") + 1 if hit else 0)
    return torch.tensor(places, dtype=torch.int32)


def test_int8_outlier_gather():
    """The flag and list kernels' workspace (columns in ascending order, as the reference's ``nonzero``, and
    each column's place) and the gathered activation and weight columns, zero-padded to OUT_PAD."""
    M, K, N = 40, 300, 24
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    x[[0, 5, 39], [7, 150, 299]] = 9.0
    x[3, 8] = -6.0
    x[7, 100] = 5.9  # below the threshold
    cb, scb, _ = int8.int8_vectorwise_quant(torch.randn(N, K, device=DEV).half(), 0.0)
    ca, sca, (xg, wg, count) = k8._quant_with_outliers(x, cb, scb, 6.0)
    want_ca, want_sca, want_cols = int8.int8_vectorwise_quant(x, 6.0)
    assert want_cols.tolist() == [7, 8, 150, 299] and count.tolist() == [4]
    assert outlier_list(count, K) == [7, 8, 150, 299]
    place = torch.zeros(K, dtype=torch.int32)
    place[want_cols.cpu()] = torch.arange(1, 5, dtype=torch.int32)
    assert torch.equal(bit_places(count, K), place)
    assert torch.equal(ca, want_ca) and torch.equal(sca, want_sca)
    assert torch.equal(xg[:, :4], x[:, want_cols]) and not xg[:, 4:128].any()
    assert torch.equal(wg[:, :4], int8.int8_vectorwise_dequant(cb[:, want_cols], scb).to(torch.bfloat16))
    assert not wg[:, 4:128].any()


@pytest.mark.parametrize("K", [1000, 2048, 3000])
def test_int8_outlier_list_spans_blocks(K):
    """Outlier columns in several of the flag kernel's column programs and bit words (bit 0 and bit 31 of a word,
    neighbouring words): the places continue across them."""
    x = torch.zeros(2, K, device=DEV)
    cols = sorted({c for c in (3, 31, 32, 63, 500, 1023, 1024, 2047, 2048, K // 2, K - 1) if c < K})
    x[1, cols] = 7.0
    cb, scb, _ = int8.int8_vectorwise_quant(torch.ones(4, K, device=DEV).half(), 0.0)
    _, _, (_, _, count) = k8._quant_with_outliers(x, cb, scb, 6.0)
    assert count.tolist() == [len(cols)] and outlier_list(count, K) == cols
    places = bit_places(count, K)
    assert places[cols].tolist() == list(range(1, len(cols) + 1)) and int(places.count_nonzero()) == len(cols)


def test_int8_outlier_state_returns_to_zero():
    """The flag kernel's persistent state (bit words, finished-program counter) is zero after every launch, so
    that one state serves launch after launch (the plans keep one per stream): several programs in both grid
    dimensions, a different outlier set each time, none at all, and one program per column block."""
    K = 700
    state = torch.zeros(k8.state_size(K), dtype=torch.int32, device=DEV)
    for rows, cols in ((300, [0, 31, 32, 699]), (300, [5, 400]), (300, []), (3, [64, 65, 66]), (300, [1])):
        x = torch.randn(rows, K, device=DEV) * 0.5  # no element near the threshold by chance
        x[rows - 1, cols] = -8.0
        ws = torch.full((k8.workspace_size(K),), -7, dtype=torch.int32, device=DEV)
        fn, grid, args, kwargs = k8.flag_launch(x, state, ws, 6.0)
        fn[grid](*args, **kwargs)
        want = int8.int8_vectorwise_quant(x, 6.0)[2].tolist()
        assert want == sorted(cols) and outlier_list(ws[k8.count_offset(K):], K) == want
        assert not state.any(), (rows, cols)


@gpu
@pytest.mark.parametrize("shape", FLUX_T5, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("M", [1, 17, 4608, 8192])
def test_int8_flux_t5_shapes(shape, M):
    N, K = shape
    cb, scb, _ = int8.int8_vectorwise_quant(torch.randn(N, K, device=DEV).half(), 0.0)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    x[:, torch.randint(0, K, (8,))] *= 5  # outlier columns, as in LLM activations
    bias = torch.randn(N, device=DEV, dtype=torch.bfloat16)
    for t in (0.0, 6.0):
        got, want = torch.ops.halfbyte.int8_vectorwise_quant(x, t), int8.int8_vectorwise_quant(x, t)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    if M <= 4608:
        for t in (0.0, 6.0):
            assert_int8_matches(torch.ops.halfbyte.int8_mixed_mm(x, cb, scb, bias, t), x, cb, scb, bias, t)
