"""LLM.int8() through cached plans (``halfbyte.kernels.int8_plan``, the CUDA kernel of ``halfbyte::int8_mixed_mm``):
a plan binds the very launches ``kernels.int8_mm.int8_mixed_mm`` makes (checked everywhere with recorded launches),
gives its bits on the GPU, is built on a key's second sighting only, follows moved tensors by key and steps aside
for calls it cannot serve."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of triton.jit'ed code
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from triton import knobs  # noqa: E402

import halfbyte  # noqa: E402
from halfbyte.formats import int8  # noqa: E402
from halfbyte.kernels import int8 as k8  # noqa: E402
from halfbyte.kernels import int8_mm as km  # noqa: E402
from halfbyte.kernels import int8_plan  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def gpu(fn):
    """GPU tier: the ``gpu`` marker and a skip where no CUDA device is."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="GPU tier: needs a CUDA device")(fn))


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _weights(N, K, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    cb, scb, _ = int8.int8_vectorwise_quant(torch.randn(N, K, generator=g).half(), 0.0)
    return cb.to(device), scb.to(device)


def _input(M, K, dtype, device, outliers=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if outliers:
        x[:, torch.randint(0, K, (5,), generator=g)] *= 9
    return x.to(dtype).to(device)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("M,K,N,bias", [(7, 96, 40, True), (300, 200, 24, False), (1, 4096, 16, True)])
def test_plan_binds_the_launches_int8_mixed_mm_makes(monkeypatch, threshold, M, K, N, bias):
    """Runs everywhere: with the launcher and bind replaced by recorders, a Plan binds the same kernels, grids,
    fixed arguments and constexprs as ``int8_mm.int8_mixed_mm``'s launches, with exactly the per-call tensors left
    free (the flag kernel's state among them: the plan keeps one per stream), at scratch offsets that do not
    overlap."""
    cb, scb = _weights(N, K, "cpu")
    b = torch.randn(N, dtype=torch.bfloat16) if bias else None
    x = _input(M, K, torch.bfloat16, "cpu")
    launched, bound = [], []
    for module in (k8, km):  # the activation kernels, then the GEMM and outlier products
        monkeypatch.setattr(module, "launch", lambda fn, grid, *a, **kw: launched.append((fn, grid, a, kw)))
    monkeypatch.setattr(int8_plan, "bind", lambda fn, grid, a, kw, free: bound.append((fn, grid, a, kw, free)) or 1)
    km.int8_mixed_mm(x, cb, scb, b, threshold)
    plan = int8_plan.Plan(x, cb, scb, b, threshold)
    reuse, bound = bound[len(plan._launches):], bound[:len(plan._launches)]
    if threshold:  # a share's later members: the weight gathers over no rows, then the very same GEMM launch
        assert [r[0] for r in reuse] == [k8._quant_gather_kernel, km._int8_mm_kernel]
        assert tuple(reuse[0][1]) == (-(-N // k8._GATHER_ONLY_TILE[0]),) and reuse[0][2][9] == 0  # grid, M
        assert reuse[1][2] is bound[-1][2] and plan._reuse[1][1] == plan._launches[-1][1]
        wg = [k for k, _ in plan._reuse[0][1]]
        assert int8_plan._WG in wg and int8_plan._STATE not in wg
    else:
        assert not reuse and not plan._reuse
    if threshold:  # the flag kernel's persistent state: the plan's own, one per stream
        state = bound[0][2][1]
        assert bound[0][0] is k8._flag_kernel and state.numel() == k8.state_size(K) and 1 in bound[0][4]
        assert plan._launches[0][1][bound[0][4].index(1)] == (int8_plan._STATE, 0)
    assert [r[0] for r in bound] == [r[0] for r in launched]
    per_call = {id(x)}
    for (fn, grid, a, kw), (bfn, bgrid, ba, bkw, free) in zip(launched, bound):
        assert (tuple(grid), kw) == (tuple(bgrid), bkw), fn
        assert len(a) == len(ba)
        for i, (u, v) in enumerate(zip(a, ba)):
            if i in free:
                assert isinstance(v, torch.Tensor) and u.dtype == v.dtype and u.shape == v.shape, (fn, i)
                per_call.add(id(v))
            elif isinstance(u, torch.Tensor):
                assert u.data_ptr() == v.data_ptr() and u.dtype == v.dtype, (fn, i)  # the weight, scales, bias
            else:
                assert u == v, (fn, i)
    assert all(any(id(v) == id(x) for v in r[2]) for r in bound if r[0] in (k8._flag_kernel, k8._row_quant_kernel))
    # every scratch part lies inside the buffer, and two parts are disjoint or nested (the count sits in ws)
    spans = {(off, off + v.numel() * v.element_size()) for (_, _, a, _, free), (_, spec) in
             zip(bound, plan._launches) for i, (k, off) in zip(free, spec)
             for v in [a[i]] if k == int8_plan._SCRATCH}
    assert all(0 <= s0 < e0 <= plan.act_bytes for s0, e0 in spans)
    wg_spans = {(off, off + v.numel() * v.element_size()) for (_, _, a, _, free), (_, spec) in
                zip(bound, plan._launches) for i, (k, off) in zip(free, spec) for v in [a[i]] if k == int8_plan._WG}
    assert all(0 <= s0 < e0 <= plan.wg_bytes for s0, e0 in wg_spans) and bool(wg_spans) == bool(threshold)
    assert all(e1 <= s2 or e2 <= s1 or (s1 <= s2 and e2 <= e1) or (s2 <= s1 and e1 <= e2)
               for s1, e1 in spans for s2, e2 in spans)


def test_no_plan_off_cuda():
    """Without a plan (here: no CUDA tensors) the kernel entry takes the direct path, with its bits. Triton runs
    CPU tensors only under the interpreter; on a GPU machine the key alone is checked (CPU calls of the op never
    reach this entry there: the dispatcher sends them to the reference)."""
    cb, scb = _weights(16, 64, "cpu")
    x = _input(4, 64, torch.float32, "cpu")
    assert int8_plan.plan_key(x, cb, scb, None, 6.0) is None
    if CUDA:
        return
    plans = len(int8_plan.PLANS.plans)
    for _ in range(2):  # a second sighting builds nothing either
        assert torch.equal(bits(int8_plan.int8_mixed_mm(x, cb, scb, None, 6.0)), bits(km.int8_mixed_mm(x, cb, scb,
                                                                                                        None, 6.0)))
    assert len(int8_plan.PLANS.plans) == plans


@gpu
@pytest.mark.parametrize("dn", DTYPES)
@pytest.mark.parametrize("threshold,outliers", [(0.0, True), (6.0, True), (6.0, False)], ids=["t0", "t6", "t6-none"])
@pytest.mark.parametrize("shape,K,N,bias", [((1, 64), 64, 48, True), ((2, 9, 200), 200, 40, False),
                                            ((4608, 3072), 3072, 3072, True), ((512, 4096), 4096, 10240, True)])
def test_plan_gives_the_direct_paths_bits(dn, threshold, outliers, shape, K, N, bias):
    dtype = DTYPES[dn]
    int8_plan.PLANS.clear()
    cb, scb = _weights(N, K, "cuda")
    b = torch.randn(N, device="cuda").to(dtype) if bias else None
    x = _input(shape[0] * (shape[1] if len(shape) == 3 else 1), K, dtype, "cuda", outliers).view(*shape[:-1], K)
    want = km.int8_mixed_mm(x, cb, scb, b, threshold)
    key = int8_plan.plan_key(x, cb, scb, b, threshold)
    assert key is not None
    first = torch.ops.halfbyte.int8_mixed_mm(x, cb, scb, b, threshold)  # seen once: direct path
    assert key in int8_plan.PLANS.seen and key not in int8_plan.PLANS.plans
    second = torch.ops.halfbyte.int8_mixed_mm(x, cb, scb, b, threshold)  # builds and runs the plan
    third = torch.ops.halfbyte.int8_mixed_mm(x, cb, scb, b, threshold)
    assert key in int8_plan.PLANS.plans
    for got in (first, second, third):
        assert got.shape == (*shape[:-1], N) and got.dtype == dtype
        assert torch.equal(bits(got), bits(want))


@gpu
def test_plan_follows_moved_tensors_and_steps_aside():
    int8_plan.PLANS.clear()
    lin = torch.nn.Linear(256, 96, dtype=torch.bfloat16, device="cuda")
    layer = halfbyte.Linear8bit.from_linear(lin, threshold=6.0).requires_grad_(False)
    x = _input(33, 256, torch.bfloat16, "cuda")
    with torch.no_grad():
        want = layer(x)
        assert torch.equal(layer(x), want) and len(int8_plan.PLANS.plans) == 1
        held = list(layer.state_dict().values())  # kept alive: the allocator cannot hand back their places
        layer.cpu().cuda()  # new addresses: a new key, the old plan is never used for them
        assert torch.equal(layer(x), want) and torch.equal(layer(x), want) and len(int8_plan.PLANS.plans) == 2
        del held
        layer.weight.data.copy_(torch.zeros_like(layer.weight))  # same addresses, new contents: read at call time
        assert torch.equal(layer(x), km.int8_mixed_mm(x, layer.weight, layer.SCB.view(torch.float32), layer.bias,
                                                      6.0))
    scb = layer.SCB.view(torch.float32)
    odd = torch.empty(33 * 256 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(33, 256).copy_(x)
    assert int8_plan.plan_key(odd, layer.weight, scb, layer.bias, 6.0) is None  # misaligned input
    assert int8_plan.plan_key(x.t().contiguous().t(), layer.weight, scb, layer.bias, 6.0) is None  # strided
    wide = torch.cat([x, x], dim=1)[:, :256]  # rows of a wider tensor: unit column stride, row stride 512
    key = int8_plan.plan_key(wide, layer.weight, scb, layer.bias, 6.0)
    assert key is not None and key[4] == 512
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(layer(wide), km.int8_mixed_mm(wide, layer.weight, scb, layer.bias, 6.0))
    assert key in int8_plan.PLANS.plans
    assert int8_plan.plan_key(x, layer.weight, scb, layer.bias.float(), 6.0) is None  # bias in another dtype
    assert int8_plan.plan_key(x.float(), layer.weight, scb, None, 6.0) is not None
    enter = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(enter)
    try:
        assert int8_plan.plan_key(x, layer.weight, scb, layer.bias, 6.0) is None  # a profiler hooks triton
    finally:
        knobs.runtime.launch_enter_hook.remove(enter)


@gpu
def test_plan_cache_is_bounded(monkeypatch):
    int8_plan.PLANS.clear()
    monkeypatch.setattr(int8_plan.PLANS, "max_plans", 2)
    cb, scb = _weights(32, 64, "cuda")
    for M in (1, 2, 3, 4, 5):
        x = _input(M, 64, torch.float16, "cuda")
        for _ in range(2):
            assert torch.equal(torch.ops.halfbyte.int8_mixed_mm(x, cb, scb, None, 6.0),
                               km.int8_mixed_mm(x, cb, scb, None, 6.0))
        assert 1 <= len(int8_plan.PLANS.plans) <= 2


@gpu
def test_plan_gives_its_scratch_back():
    """A plan's call takes its scratch (the quantized input and the outlier products' operands) raw from the
    caching allocator and gives it back once its launches are queued: during three calls the peak is the three
    outputs plus one scratch, and afterwards only the outputs stay allocated; the bits are the direct path's."""
    int8_plan.PLANS.clear()
    M, K, N = 300, 512, 96
    cb, scb = _weights(N, K, "cuda")
    x = _input(M, K, torch.bfloat16, "cuda")
    want = km.int8_mixed_mm(x, cb, scb, None, 6.0)
    key = int8_plan.plan_key(x, cb, scb, None, 6.0)
    for _ in range(2):  # the second call builds the plan
        torch.ops.halfbyte.int8_mixed_mm(x, cb, scb, None, 6.0)
    plan = int8_plan.PLANS.plans[key]
    assert plan.act_bytes + plan.wg_bytes > 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = [torch.ops.halfbyte.int8_mixed_mm(x, cb, scb, None, 6.0) for _ in range(3)]
    torch.cuda.synchronize()
    rounded = lambda n: -(-n // 512) * 512  # noqa: E731  (the allocator's block rounding)
    out_bytes = rounded(M * N * 2)
    assert torch.cuda.memory_allocated() - base == 3 * out_bytes
    assert torch.cuda.max_memory_allocated() - base == 3 * out_bytes + rounded(plan.act_bytes + plan.wg_bytes)
    assert all(torch.equal(o, want) for o in outs)


@gpu
def test_plan_state_per_stream_and_in_graphs():
    """The flag kernel's persistent state is zero after every launch (a different outlier set each call gives the
    direct path's bits), is not shared by launches on two streams running at once, and a CUDA graph captured
    through a plan replays right, with eager calls in between."""
    int8_plan.PLANS.clear()
    cb, scb = _weights(96, 512, "cuda")
    xs = [_input(300, 512, torch.bfloat16, "cuda", seed=s) for s in range(4)]  # other outlier columns each
    wants = [km.int8_mixed_mm(x, cb, scb, None, 6.0) for x in xs]
    assert len({tuple(k8.int8_vectorwise_quant(x, 6.0)[2].tolist()) for x in xs}) == 4
    x = torch.empty_like(xs[0])

    def op(a):
        return torch.ops.halfbyte.int8_mixed_mm(a, cb, scb, None, 6.0)
    for i in (0, 1, 2, 3, 0, 2):
        x.copy_(xs[i])
        assert torch.equal(op(x), wants[i]), i
    assert len(int8_plan.PLANS.plans) == 1
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs = [[], []]
    for _ in range(10):  # both streams' launches interleave on the GPU
        for j, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[j].append(op(xs[1 + j]))
    torch.cuda.synchronize()
    assert all(torch.equal(o, wants[1 + j]) for j in range(2) for o in outs[j])
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(x)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = op(x)
    for i in (1, 3, 0, 2):
        x.copy_(xs[i])
        graph.replay()
        assert torch.equal(out, wants[i]), i
        assert torch.equal(op(xs[3 - i]), wants[3 - i])
