"""Inference plans of ``halfbyte.Linear4bit`` (prebuilt launches bound to the layer's device addresses, used by
eager CUDA inference calls): their results are the op's, they are rebuilt or stepped around when the layer's
tensors move, never used while autograd records or a profiler hooks triton, and never pickled. The plan path
exists only on CUDA; the CPU test checks that a CPU forward never creates one."""

import copy
import pickle

import pytest
import torch

import halfbyte

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU tier: needs a CUDA device")


def _layer(N, K, dtype, bias=True, device="cuda", **kw):
    torch.manual_seed(N + K)
    lin = torch.nn.Linear(K, N, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.normal_(0, K ** -0.5)
    return halfbyte.Linear4bit.from_linear(lin, **kw).requires_grad_(False)


def _op(layer, x):
    absmax, nested, ncode, offset = layer.quant_stats()
    return torch.ops.halfbyte.gemm_4bit(x, layer.weight, absmax, nested, ncode, offset, layer.bias,
                                        list(layer.shape), layer.blocksize, layer.quant_type)


def test_cpu_forward_builds_no_plan():
    layer = _layer(32, 64, torch.float32, device="cpu")
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert "_plans" not in layer.__dict__
    pickle.loads(pickle.dumps(layer))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,K,bias", [(3072, 1024, True), (192, 512, False), (96, 320, True), (256, 4096, True)])
@pytest.mark.parametrize("shape", [(1, 1), (1,), (2, 7), (16,)], ids=["gemv3d", "gemv", "3d", "m16"])
def test_plan_equals_the_op(dq, qt, dtype, N, K, bias, shape):
    layer = _layer(N, K, dtype, bias=bias, quant_type=qt, double_quant=dq)
    x = torch.randn(*shape, K, dtype=dtype, device="cuda")
    with torch.no_grad():
        expected = _op(layer, x)
        first = layer(x)  # builds the plan
        assert layer._plans[dtype][1] is not None
        second = layer(x)  # uses it
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert second.shape == (*shape, N) and second.dtype == dtype
    from halfbyte.kernels import gemm_small

    plan, M = layer._plans[dtype][1], x.numel() // K
    if plan._small_args is not None and 2 <= M <= gemm_small.max_m(N, K):
        assert M in plan._small  # the layer bound the small-batch launch itself: its next calls take the plan


@pytest.mark.gpu
@needs_cuda
def test_plan_follows_moved_tensors():
    dtype = torch.bfloat16
    layer = _layer(256, 512, dtype)
    x = torch.randn(4, 512, dtype=dtype, device="cuda")
    with torch.no_grad():
        expected = _op(layer, x)
        assert torch.equal(layer(x), expected)
        old = layer._plans[dtype]
        held = list(layer.state_dict().values())  # kept alive, so that the allocator cannot hand back their places
        layer.cpu().cuda()  # new addresses: the old plan must not be used
        assert torch.equal(layer(x), expected)
        assert layer._plans[dtype][1] is None and layer._plans[dtype][0] != old[0]
        assert torch.equal(layer(x), expected)  # same addresses twice in a row: rebuilt
        assert layer._plans[dtype][1] is not None
        # new weights copied in place keep the addresses: the plan stays and computes with the new bytes
        other = _layer(256, 512, dtype)
        other.bias.add_(1.0)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), _op(other, x))
    del held


@pytest.mark.gpu
@needs_cuda
def test_no_plan_while_autograd_records_or_profiler_hooks():
    from triton import knobs
    dtype = torch.bfloat16
    layer = _layer(128, 256, dtype)
    layer.bias.requires_grad_(True)
    x = torch.randn(8, 256, dtype=dtype, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    assert "_plans" not in layer.__dict__ and x.grad is not None and layer.bias.grad is not None
    calls = []

    def hook(metadata):
        calls.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert calls, "a profiler hook must see the launch"
    with torch.no_grad():
        assert torch.equal(out, layer(x))


@pytest.mark.gpu
@needs_cuda
def test_misaligned_gemv_input_takes_the_dequantize_path():
    dtype = torch.float16
    layer = _layer(512, 256, dtype)
    buf = torch.randn(257, dtype=dtype, device="cuda")
    x = buf[1:]  # 2-byte offset: the bound GEMV was specialized for 16-byte aligned rows
    with torch.no_grad():
        layer(buf[:256].clone())  # builds the plan
        out = layer(x)
    W = layer.dequantize(dtype)
    assert torch.equal(out, torch.nn.functional.linear(x, W, layer.bias))


@pytest.mark.gpu
@needs_cuda
def test_layer_with_plan_pickles_and_copies():
    layer = _layer(64, 128, torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        expected = layer(x)
        assert layer._plans
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert "_plans" not in clone.__dict__
            assert torch.equal(clone(x), expected)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("N,K,bias", [(3072, 1024, True), (256, 4096, False), (96, 320, True), (16, 8192, True)])
def test_plan_binds_the_launches_gemm_4bit_makes(monkeypatch, dq, N, K, bias):
    """Runs everywhere: with triton's launch and bind replaced by recorders, a Plan binds the same kernels,
    grids, arguments and constexprs as ``gemm_4bit``'s GEMV and dequantize launches, except the per-call input
    and output addresses (the free positions)."""
    from halfbyte.kernels import fourbit, gemm4bit, gemv

    layer = _layer(N, K, torch.float32, bias=bias, device="cpu", double_quant=dq)
    args = (layer.weight, *layer.quant_stats(), layer.bias)
    launched, bound = [], []
    monkeypatch.setattr(gemv, "launch", lambda fn, grid, *a, **kw: launched.append((fn, grid, a, kw)))
    monkeypatch.setattr(fourbit, "launch", lambda fn, grid, *a, **kw: launched.append((fn, grid, a, kw)))
    monkeypatch.setattr(gemm4bit, "bind", lambda fn, grid, a, kw, free: bound.append((fn, grid, a, kw, free)) or 1)
    gemm4bit.gemm_4bit(torch.zeros(1, K), *args, [N, K], 64, "nf4")  # GEMV
    gemm4bit.gemm_4bit(torch.zeros(3, K), *args, [N, K], 64, "nf4")  # dequantize + linear
    plan = gemm4bit.Plan(*args, N, K, 64, "nf4", torch.float32)
    assert plan._atomic == (N == 16)
    assert [b[0] for b in bound] == [fourbit._dequant_words_kernel, gemv._gemv_kernel]  # N K % 8 == 0
    for (fn, grid, a, kw), (bfn, bgrid, ba, bkw, free) in zip(launched[::-1], bound):
        assert (fn, tuple(grid), kw) == (bfn, tuple(bgrid), bkw)
        assert len(a) == len(ba)
        unread = {7} if fn is gemv._gemv_kernel and not bias else set()  # bias slot: HAS_BIAS is off
        for i, (x, y) in enumerate(zip(a, ba)):
            if i in free or i in unread:
                assert isinstance(y, torch.Tensor) and x.dtype == y.dtype, i
            elif isinstance(x, torch.Tensor):
                assert x.data_ptr() == y.data_ptr() and x.dtype == y.dtype, i
            else:
                assert x == y, i


def test_op_plan_key_off_cuda():
    from halfbyte.kernels import gemm4bit

    layer = _layer(32, 64, torch.float32, device="cpu")
    assert gemm4bit.plan_key(torch.randn(3, 64), layer.weight, *layer.quant_stats(), layer.bias, 32, 64, 64,
                             "nf4") is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", [(1, 1024), (7, 1024), (2, 3, 1024)], ids=["gemv", "m7", "3d"])
def test_op_calls_use_cached_plans(dq, shape):
    """Calls of the op itself (compiled graphs, direct kernel calls) look plans up by their addresses: the first
    sighting takes the direct path, the second builds a plan, and all give the same bits."""
    from halfbyte.kernels import gemm4bit

    gemm4bit.PLANS.clear()
    layer = _layer(3072, 1024, torch.bfloat16, double_quant=dq)
    x = torch.randn(*shape, dtype=torch.bfloat16, device="cuda")
    absmax, nested, ncode, offset = layer.quant_stats()
    key = gemm4bit.plan_key(x, layer.weight, absmax, nested, ncode, offset, layer.bias, 3072, 1024, 64, "nf4")
    assert key is not None
    with torch.no_grad():
        outs = [_op(layer, x) for _ in range(3)]
    assert key in gemm4bit.PLANS.plans
    assert all(torch.equal(o, outs[0]) for o in outs) and outs[0].shape == (*shape[:-1], 3072)
    assert gemm4bit.plan_key(x, layer.weight, absmax, nested, ncode, offset, layer.bias.float(), 3072, 1024, 64,
                             "nf4") is None  # a bias in another dtype takes the direct path


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_dequantize_after_uses_cached_bound_launches(dq):
    """``dequantize_4bit_after`` (the weight of a compiled layer) binds its launch on a weight's second call, keyed by
    addresses: every call returns the direct dequantize's bytes, with the statistics as float32 or as the layer
    stores them (int32 bits); an input in another dtype than the weight's takes the direct path."""
    from halfbyte.kernels import fourbit as kf
    from halfbyte.kernels import gemm4bit

    gemm4bit.DEQUANT_PLANS.clear()
    layer = _layer(3072, 1024, torch.bfloat16, double_quant=dq)
    x = torch.randn(70, 1024, dtype=torch.bfloat16, device="cuda")
    absmax, nested, ncode, offset = layer.quant_stats()
    want = kf.dequantize(layer.weight, absmax, nested, ncode, offset, 64, "nf4", 3072 * 1024, torch.bfloat16)
    for stats in ((absmax, nested, ncode, offset), (layer.absmax, layer.nested_absmax, ncode, layer.offset)):
        outs = [torch.ops.halfbyte.dequantize_4bit_after(x, layer.weight, *stats, 64, "nf4", [3072, 1024],
                                                         torch.bfloat16) for _ in range(3)]
        key = gemm4bit.plan_key(x, layer.weight, *stats, None, 3072, 1024, 64, "nf4")
        assert key in gemm4bit.DEQUANT_PLANS.plans
        assert all(o.shape == (3072, 1024) and torch.equal(o.view(-1), want) for o in outs)
    n = len(gemm4bit.DEQUANT_PLANS.plans)
    for _ in range(3):
        W = torch.ops.halfbyte.dequantize_4bit_after(x.half(), layer.weight, absmax, nested, ncode, offset, 64, "nf4",
                                                     [3072, 1024], torch.bfloat16)
        assert torch.equal(W.view(-1), want)
    assert len(gemm4bit.DEQUANT_PLANS.plans) == n


@pytest.mark.gpu
@needs_cuda
def test_compiled_layer_uses_cached_plans():
    from halfbyte.kernels import gemm4bit

    gemm4bit.PLANS.clear()
    layer = _layer(512, 256, torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = layer(x)
        got = [compiled(x) for _ in range(3)]
    assert len(gemm4bit.PLANS.plans) == 1
    assert all(torch.equal(g, want) for g in got)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,K,bias", [(4096, 4096, False), (3072, 12288, True), (3072, 3072, True), (96, 320, True)])
def test_plan_checks_lists_the_checks_a_plan_runs(monkeypatch, dq, dtype, N, K, bias):
    """``gemm4bit.plan_checks`` (what ``halfbyte.precompile`` starts ahead) names exactly the device checks that
    building the plan consults, with the arguments it passes (all verdicts stubbed to record their calls)."""
    from halfbyte.kernels import gemm4bit, gemm_ring, gemm_small, gemv_mma, gemv_ring

    seen = {}
    monkeypatch.setattr(gemm_ring, "verdict", lambda device, nested=False, has_bias=True, dtype=torch.bfloat16:
                        seen.setdefault(("gemm_ring", device, nested, dtype), has_bias) is not None)
    monkeypatch.setattr(gemv_ring, "verdict", lambda device, dtype, nested=False: not seen.setdefault(
        ("gemv_ring", device, dtype, nested), None))
    monkeypatch.setattr(gemv_mma, "layout_ok", lambda device: not seen.setdefault(("gemv_mma", device), None))
    monkeypatch.setattr(gemm_small, "layout_ok", lambda device: not seen.setdefault(("gemm_small", device), None))
    layer = _layer(N, K, dtype, bias=bias, quant_type="nf4", double_quant=dq)
    listed = gemm4bit.plan_checks(N, K, 64, "nf4", dtype, dq, bias, layer.weight.device)
    with torch.no_grad():
        layer(torch.randn(2, K, dtype=dtype, device="cuda"))  # builds the plan
    assert layer._plans[dtype][1] is not None
    assert set(seen) == set(listed)
    key = ("gemm_ring", layer.weight.device, dq, dtype)
    if key in seen:
        assert seen[key] == bias  # the check runs the calls' bias flag
        assert listed[key].args == (layer.weight.device, dq, bias, dtype)


def test_plan_checks_follow_the_kernels_static_rules(monkeypatch):
    """Runs everywhere (the fused GEMM's device rule stubbed): which device checks ``plan_checks`` lists for a
    weight, by dtype, width and size; the GPU test above compares them with what a plan consults."""
    from halfbyte.kernels import gemm4bit, gemm_ring

    monkeypatch.setattr(gemm_ring, "INTERPRET", False)
    monkeypatch.setattr(gemm_ring, "device_ok", lambda device: True)
    dev = torch.device("cpu")  # (the ring GEMV's own rule wants a CUDA device: not listed here)
    checks = gemm4bit.plan_checks(4096, 4096, 64, "nf4", torch.bfloat16, False, False, dev)
    ring = ("gemm_ring", dev, False, torch.bfloat16)
    assert set(checks) == {("gemv_mma", dev), ("gemm_small", dev), ring}
    assert checks[ring].args == (dev, False, False, torch.bfloat16)  # the calls' bias flag goes to the check
    f16 = set(gemm4bit.plan_checks(4096, 4096, 64, "nf4", torch.float16, True, True, dev))
    assert f16 == {("gemv_mma", dev), ("gemm_small", dev), ("gemm_ring", dev, True, torch.float16)}  # its own check
    assert gemm4bit.plan_checks(4096, 4096, 64, "nf4", torch.float32, True, True, dev) == {}
    # 3072 x 3072: the fused GEMM from MODEL_M tokens where its model says so; K % 2048 != 0: no tensor-core GEMV
    # in bf16 (it is in fp16); 2048 x 3072: under the fused GEMM's sizes
    assert set(gemm4bit.plan_checks(3072, 3072, 64, "nf4", torch.bfloat16, True, True, dev)) == {
        ("gemm_small", dev), ("gemm_ring", dev, True, torch.bfloat16)}
    assert set(gemm4bit.plan_checks(2048, 3072, 64, "nf4", torch.bfloat16, True, True, dev)) == {("gemm_small", dev)}
    assert set(gemm4bit.plan_checks(3072, 3072, 64, "nf4", torch.float16, True, True, dev)) == {
        ("gemv_mma", dev), ("gemm_small", dev), ("gemm_ring", dev, True, torch.float16)}
    assert set(gemm4bit.plan_checks(3072, 3072, 128, "nf4", torch.float16, True, True, dev)) == {
        ("gemv_mma", dev), ("gemm_small", dev)}
    assert gemm4bit.plan_checks(3072, 3070, 64, "nf4", torch.bfloat16, False, True, dev) == {}  # K % 64: none
