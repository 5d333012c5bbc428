"""The cached launcher of ``halfbyte.kernels.launch``: it must never reuse a compiled kernel for arguments that
triton would have specialized differently (constexprs passed by position, dtypes, pointer alignment, integer
classes). The GPU test runs the real launches; the key tests run everywhere."""

import pytest
import torch

CUDA = torch.cuda.is_available()


def gpu(fn):
    """GPU tier: the ``gpu`` marker (``pytest -m gpu`` selects it) and a skip where no CUDA device is."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="GPU tier: needs a CUDA device")(fn))


@gpu
@pytest.mark.parametrize("misalign", [1, 3])
def test_cached_launcher_respects_alignment_specialization(misalign):
    from halfbyte.formats import fourbit as ref
    from halfbyte.kernels import fourbit
    w = torch.randn(4096, device="cuda")
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    expected = ref.dequantize_4bit(packed, absmax, 64, "nf4", (4096,), torch.float16)
    for off in (0, misalign, 0, misalign):  # alternate: both specializations come from the cache
        buf = torch.zeros(packed.numel() + 16, dtype=torch.uint8, device="cuda")
        buf[off:off + packed.numel()] = packed
        out = fourbit.dequantize(buf[off:off + packed.numel()], absmax, None, None, None, 64, "nf4", 4096,
                                 torch.float16)
        assert torch.equal(out, expected)


@gpu
def test_bound_launch_layouts_agree(monkeypatch):
    """A plan's bound launches (dequantize, GEMV) give the same bytes through triton's C launcher with triton
    3.6's argument layout (``launch.DIRECT``, where this triton is 3.6) and through the compiled kernel's ``run``
    (the layout every other triton version gets)."""
    from halfbyte.formats import fourbit as ref
    from halfbyte.kernels import gemm4bit, launch

    N, K, dtype = 4096, 3072, torch.bfloat16
    w = torch.randn(N, K, device="cuda") / K**0.5
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    bias = torch.randn(N, device="cuda").to(dtype)
    x1, xm = torch.randn(1, K, device="cuda").to(dtype), torch.randn(256, K, device="cuda").to(dtype)
    outs = {}
    for direct in sorted({launch.DIRECT, False}):
        monkeypatch.setattr(launch, "DIRECT", direct)
        plan = gemm4bit.Plan(packed, absmax, None, None, None, bias, N, K, 64, "nf4", dtype)
        outs[direct] = (plan(x1, bias), plan(xm, bias))
    W = ref.dequantize_4bit(packed, absmax, 64, "nf4", (N, K), dtype)
    ref_m = torch.nn.functional.linear(xm, W, bias)
    for one, many in outs.values():
        assert torch.equal(many, ref_m)  # the bound dequantize, then the same cuBLAS GEMM
        assert torch.equal(one, outs[False][0])
    assert (one.float() - (x1.float() @ W.float().T + bias.float())).abs().max() < 0.1


def test_launch_keys_separate_what_triton_specializes():
    from halfbyte.kernels.launch import _arg_key
    assert _arg_key(1) != _arg_key(17) and _arg_key(16) == _arg_key(32) and _arg_key(17) != _arg_key(16)
    assert _arg_key(2**31) != _arg_key(17) and _arg_key(2**31 + 16) != _arg_key(16)
    assert _arg_key(True) != _arg_key(False) and _arg_key(None) is None
    t = torch.zeros(64, dtype=torch.uint8)
    assert _arg_key(t) == _arg_key(t[16:]) != _arg_key(t[1:])
    assert _arg_key(t) != _arg_key(t.view(torch.int8))
    with pytest.raises(TypeError, match="unsupported kernel argument"):
        _arg_key("x")


def test_launch_keys_constexprs_passed_by_position_by_value():
    """The GEMV passes K (a constexpr) by position: two K of one integer class must not share a kernel."""
    from halfbyte.kernels import gemv
    from halfbyte.kernels.launch import cache_key
    fn = gemv._gemv_kernel
    t = torch.zeros(64)
    names = fn.arg_names
    k = names.index("K")
    args = [t] * k + [3072, 4]
    other = [t] * k + [4096, 4]
    assert cache_key(fn, 0, tuple(args), {}) != cache_key(fn, 0, tuple(other), {})
    n = names.index("N")
    bigger_n = list(args)
    bigger_n[n] = 4096  # a runtime int of the same class shares the kernel
    same_class = list(args)
    same_class[n] = 8192
    assert cache_key(fn, 0, tuple(bigger_n), {}) == cache_key(fn, 0, tuple(same_class), {})
    assert cache_key(fn, 0, tuple(args), {"BLOCK_N": 16}) != cache_key(fn, 0, tuple(args), {"BLOCK_N": 32})


def test_compile_lock_leaves_keyword_order_out():
    """Keys that differ only in keyword order (one triton specialization) take one compile lock, so that the second
    thread finds the first one's kernel instead of compiling and loading a copy; other keyword values, and other
    argument classes, take other locks. The cache keys themselves stay apart (each order is its own launch key)."""
    from halfbyte.kernels import gemv
    from halfbyte.kernels.launch import _compile_lock, cache_key
    fn = gemv._gemv_kernel
    t = torch.zeros(64)
    args = tuple([t] * fn.arg_names.index("K") + [3072, 4])
    a = cache_key(fn, 0, args, {"BLOCK_N": 16, "num_warps": 4})
    b = cache_key(fn, 0, args, {"num_warps": 4, "BLOCK_N": 16})
    assert a != b and _compile_lock(a) is _compile_lock(b)
    assert _compile_lock(a) is not _compile_lock(cache_key(fn, 0, args, {"BLOCK_N": 32, "num_warps": 4}))
    misaligned = tuple(t[1:] if isinstance(v, torch.Tensor) else v for v in args)
    assert _compile_lock(a) is not _compile_lock(cache_key(fn, 0, misaligned, {"BLOCK_N": 16, "num_warps": 4}))


def test_plan_cache_builds_on_the_second_sighting_and_empties_when_full():
    pytest.importorskip("triton")
    from halfbyte.kernels.launch import PlanCache

    cache, built = PlanCache(max_plans=2), []

    def build(k):
        return lambda: built.append(k) or f"plan {k}"

    assert cache.get(("a",), build("a")) is None and built == []  # first sighting: nothing built
    assert cache.get(("a",), build("a")) == "plan a" and built == ["a"]
    assert cache.get(("a",), build("a")) == "plan a" and built == ["a"]  # a hit builds nothing
    for k in ("b", "c"):
        cache.get((k,), build(k))
        cache.get((k,), build(k))
    assert len(cache.plans) <= 2 and ("c",) in cache.plans  # full: emptied before the newest was added
    for i in range(8):  # sightings are bounded too
        cache.get((i,), build(i))
    assert len(cache.seen) <= 4 * 2
    cache.clear()
    assert not cache.plans and not cache.seen


class _Loading:
    """A stand-in for triton 3.6's ``CompiledKernel`` with its load order: ``_init_handles`` stores the launcher,
    then loads the module and function (here: the first load waits for ``release`` in between, as another thread's
    ``load_binary`` would; later loads go straight through)."""

    def __init__(self):
        import threading
        self.module = self.function = self._run = None
        self.release, self.storing = threading.Event(), threading.Event()
        self.loads = 0
        self.packed_metadata = "meta"

    def _init_handles(self):
        if self.module is not None:
            return
        self.loads += 1
        n = self.loads
        self._run = f"launcher{n}"
        if n == 1:
            self.storing.set()
            assert self.release.wait(10)
        self.module, self.function = f"module{n}", f"function{n}"

    @property
    def run(self):
        if self._run is None:
            self._init_handles()
        return self._run


def test_launcher_head_waits_for_a_load_that_another_thread_began():
    """A thread that takes a kernel's launcher while another thread is between triton's two stores (launcher, then
    module and function) gets a function, not None (``halfbyte.precompile`` failed so on an H200: "argument 5 must
    be int, not None"). The stand-in's first load holds until the second thread has its head."""
    import threading

    from halfbyte.kernels import launch

    kernel = _Loading()
    other = threading.Thread(target=lambda: kernel.run)  # triton's own path: its launch reads run, then function
    other.start()
    try:
        assert kernel.storing.wait(10)
        assert kernel._run is not None and kernel.function is None  # the window the failure fell in
        _, head = launch.launcher_head(kernel, direct=False)
    finally:
        kernel.release.set()
        other.join(10)
    assert head[0] == "function2" and head[1] == "meta"
    assert kernel.function == "function1" and kernel.loads == 2
    assert launch.loaded(kernel) == "launcher2"  # loaded: no third load (the launcher stored last is kept)
    assert kernel.loads == 2


def test_loaded_raises_the_error_of_a_failed_load():
    """Where triton's load raised (its launcher then raises that error), the head does not come back with no
    function: the load is retried and raises."""
    from halfbyte.kernels import launch

    class Failing(_Loading):
        def _init_handles(self):
            self._run = "raises"
            raise RuntimeError("out of resources: shared memory")

    with pytest.raises(RuntimeError, match="out of resources"):
        launch.loaded(Failing())


@gpu
def test_first_launches_from_threads_that_share_one_compiled_kernel():
    """Eight threads make the first launches of a fresh kernel at once, with keyword orders that are different
    ``launch`` keys for one triton specialization: they take one compile lock (keyword order left out), so one
    thread compiles it and the others find that kernel through ``fn.warmup`` and load it under ``loaded``'s lock
    (triton's own launch reads the launcher and then the function, unlocked, and can see the function None while
    another thread loads). One compiled kernel, loaded once, and every output is right."""
    import itertools
    import threading

    import triton
    import triton.language as tl

    from halfbyte.kernels import launch

    @triton.jit
    def _scale(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) * factor + SHIFT, mask=m)

    n = 5000
    x = torch.randn(n, device="cuda")
    orders = list(itertools.permutations([("BLOCK", 256), ("SHIFT", 3), ("num_warps", 4)]))
    outs = [torch.empty_like(x) for _ in range(8)]
    start, errors = threading.Barrier(len(outs)), []

    def first_launch(i):
        try:
            start.wait(10)
            launch.launch(_scale, (triton.cdiv(n, 256),), x, outs[i], n, float(i), **dict(orders[i % len(orders)]))
        except BaseException as e:  # noqa: BLE001  (reported below, with the thread's index)
            errors.append((i, e))

    threads = [threading.Thread(target=first_launch, args=(i,)) for i in range(len(outs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    torch.cuda.synchronize()
    entries = [hit for key, hit in launch._CACHE.items() if key[0] is _scale]
    # a key per keyword order, one compiled function behind them all
    assert len(entries) == len(orders) and len({hit[1] for hit in entries}) == 1
    for i, out in enumerate(outs):
        # the kernel rounds once (a fused multiply-add), torch's x * i + 3 twice
        torch.testing.assert_close(out, torch.addcmul(torch.full_like(x, 3.0), x, torch.full_like(x, float(i))),
                                   rtol=1.2e-7, atol=1.2e-7, msg=f"thread {i}")
