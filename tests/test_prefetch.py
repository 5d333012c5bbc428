"""The side-stream dequantize of ``halfbyte.kernels.prefetch`` and the cached launcher of
``halfbyte.kernels.launch``. The prefetch tests need a CUDA device (GPU tier); a prefetched weight must give the
very bytes of the synchronous path, whatever happens to the layers between steps."""

import pytest
import torch
from torch import nn

import halfbyte

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="GPU tier: needs a CUDA device")

SHAPES = [(256, 512), (512, 256), (256, 256), (256, 768), (768, 256), (256, 256)]


def _chain(seed, double_quant=False, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    layers = []
    for i, (k, n) in enumerate(SHAPES):
        lin = nn.Linear(k, n, device="cuda", dtype=dtype)
        layers.append(halfbyte.Linear4bit.from_linear(lin, quant_type="nf4" if i % 2 else "fp4",
                                                      double_quant=double_quant and i % 3 == 0))
    return nn.Sequential(*layers)


def _run(model, x, on):
    from halfbyte.kernels import prefetch
    prefetch.set_enabled(on)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        torch.cuda.synchronize()


@pytest.fixture
def prefetch_mod():
    from halfbyte.kernels import prefetch
    yield prefetch
    prefetch.set_enabled(True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_prefetched_weights_give_the_same_bytes(prefetch_mod, dq):
    model = _chain(0, dq)
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16)
    ref = _run(model, x, False)
    prefetch_mod.set_enabled(True)
    for _ in range(3):  # the first pass learns the order, the next ones read prefetched slots
        assert torch.equal(_run(model, x, True), ref)
    pf = prefetch_mod._PREFETCHERS[x.device]
    assert pf.hits >= 2 * (len(SHAPES) - 1)  # every layer but the first of a pass is prefetched from pass 2 on
    half = _run(model, x.half(), True)  # another dtype: other keys, no stale slot
    assert torch.equal(half, _run(model, x.half(), False))


@gpu
@pytest.mark.gpu
def test_in_place_rewrite_and_new_model_are_not_served_stale(prefetch_mod):
    model = _chain(0)
    x = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        _run(model, x, True)
    other = _chain(1)
    with torch.no_grad():  # re-quantize layer 3 in place (what fuse_lora does): same pointers, new versions
        for name in ("weight", "absmax"):
            getattr(model[3], name).copy_(getattr(other[3], name))
    expected = _run(model, x, False)
    prefetch_mod.set_enabled(True)
    for _ in range(2):
        assert torch.equal(_run(model, x, True), expected)
    del model
    fresh = _chain(2)  # may land on the freed memory of the old layers
    expected = _run(fresh, x, False)
    prefetch_mod.set_enabled(True)
    for _ in range(2):
        assert torch.equal(_run(fresh, x, True), expected)


@gpu
@pytest.mark.gpu
def test_cuda_graph_capture_runs_synchronously(prefetch_mod):
    model = _chain(0)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    ref = _run(model, x, False)
    prefetch_mod.set_enabled(True)
    _run(model, x, True)
    _run(model, x, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        model(x)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        y = model(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref)


@gpu
@pytest.mark.gpu
def test_disabling_frees_the_slots(prefetch_mod):
    model = _chain(0)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    _run(model, x, True)
    _run(model, x, True)
    assert any(s.buf is not None for s in prefetch_mod._PREFETCHERS[x.device].slots)
    prefetch_mod.set_enabled(False)
    assert not prefetch_mod._PREFETCHERS


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("misalign", [0, 1, 3])
def test_cached_launcher_respects_alignment_specialization(misalign):
    """The cached launcher must not reuse a kernel compiled for 16-byte aligned pointers on a misaligned one."""
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


def test_launch_keys_separate_what_triton_specializes():
    from halfbyte.kernels.launch import _arg_key
    keys = {_arg_key(v) for v in (1, 16, 17, 32, 2**31, 2**40, -1)}
    assert _arg_key(1) != _arg_key(17) and _arg_key(16) == _arg_key(32) and _arg_key(17) != _arg_key(16)
    assert _arg_key(2**31) != _arg_key(17) and len(keys) >= 4
    t = torch.zeros(64, dtype=torch.uint8)
    assert _arg_key(t) == _arg_key(t[16:]) != _arg_key(t[1:])
    assert _arg_key(t) != _arg_key(t.view(torch.int8))
    with pytest.raises(TypeError, match="unsupported kernel argument"):
        _arg_key("x")
