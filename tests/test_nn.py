"""Layers: outputs vs bitsandbytes (CUDA goldens and its CPU layers), gradients, device/dtype rules."""

import pytest
import torch
from torch import nn

from halfbyte import Linear4bit, Linear8bit

DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _linear(goldens, dtype):
    lin = nn.Linear(160, 64).to(dtype)
    lin.weight.data = goldens["lin.w"].to(dtype)
    lin.bias.data = goldens["lin.bias"].to(dtype)
    return lin


@pytest.mark.parametrize("dn", DT)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_linear4bit_matches_cuda_layer(goldens, dn, qt, dq):
    dt = DT[dn]
    q = Linear4bit.from_linear(_linear(goldens, dt), quant_type=qt, double_quant=dq, compute_dtype=dt)
    out = q(goldens["lin.x"].to(dt))
    gold = goldens[f"lin4.{qt}.{dn}" + (".dq" if dq else "")]
    if dt == torch.bfloat16:
        assert torch.equal(out, gold)
    else:  # same weight bytes; cuBLAS and the CPU sum K=160 fp16 products in another order: a few output ulps
        tol = 4 * torch.finfo(dt).eps * gold.float().abs().max()
        assert (out.float() - gold.float()).abs().max() <= tol


@pytest.mark.parametrize("dn", DT)
@pytest.mark.parametrize("th", [0, 6])
def test_linear8bit_matches_cuda_layer(goldens, dn, th):
    dt = DT[dn]
    q = Linear8bit.from_linear(_linear(goldens, dt), threshold=float(th))
    assert torch.equal(q(goldens["lin.x"].to(dt)), goldens[f"lin8.{dn}.t{th}"])


# NF4 only: bnb's CPU backend breaks FP4 ties unlike CUDA (spec §1.3), so its FP4 weights are not the reference;
# FP4 layer outputs are pinned bit-exactly against the CUDA goldens above.
@pytest.mark.parametrize("qt", ["nf4"])
@pytest.mark.parametrize("dq", [False, True])
def test_linear4bit_matches_bitsandbytes_cpu_layer(qt, dq):
    bnb = pytest.importorskip("bitsandbytes")
    lin = nn.Linear(128, 48).to(torch.bfloat16)
    ref = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.bfloat16, compress_statistics=dq, quant_type=qt)
    ref.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=dq,
                                   quant_type=qt)
    ref.bias = nn.Parameter(lin.bias.data.clone())
    ref = ref.to("cpu")
    q = Linear4bit.from_linear(lin, quant_type=qt, double_quant=dq, compute_dtype=torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ours, theirs = q(x), ref(x)
    # Same weight on random data (CPU backend = CUDA here except FP4 ties); bf16 GEMM: a couple of ulps.
    torch.testing.assert_close(ours, theirs, rtol=2 ** -6, atol=2 ** -6 * theirs.abs().max().item())


@pytest.mark.parametrize("th", [0.0, 6.0])
def test_linear8bit_matches_bitsandbytes_cpu_layer(th):
    bnb = pytest.importorskip("bitsandbytes")
    lin = nn.Linear(128, 48).half()
    ref = bnb.nn.Linear8bitLt(128, 48, has_fp16_weights=False, threshold=th)
    ref.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    ref.bias = nn.Parameter(lin.bias.data.clone())
    ref = ref.to("cpu")
    q = Linear8bit.from_linear(lin, threshold=th)
    x = torch.randn(7, 128).half() * 2
    x[0, 5] = 9.0
    # bnb's CPU backend divides exactly and uses a mistyped 1/16129: CB/CA may differ by one unit in rare places.
    ours, theirs = q(x).float(), ref(x).float()
    assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max()


def test_gradients_reach_input_and_bias_not_weight():
    for q in (Linear4bit.from_linear(nn.Linear(32, 16)), Linear8bit.from_linear(nn.Linear(32, 16), threshold=6.0)):
        x = torch.randn(4, 32, requires_grad=True)
        q(x).square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert q.bias.grad is not None and q.bias.grad.abs().sum() > 0
        assert not q.weight.requires_grad and q.weight.grad is None


def test_adapter_on_frozen_4bit_layer_learns():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(32, 32), quant_type="nf4", double_quant=True)
    down, up = nn.Linear(32, 4, bias=False), nn.Linear(4, 32, bias=False)
    nn.init.zeros_(up.weight)
    x, target = torch.randn(64, 32), torch.randn(64, 32)
    opt = torch.optim.Adam(list(down.parameters()) + list(up.parameters()), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = (base(x) + up(down(x)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_forward_does_not_mutate_state():
    q = Linear4bit.from_linear(nn.Linear(32, 16).to(torch.bfloat16), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(torch.randn(2, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_compute_dtype_none_follows_input():
    q = Linear4bit.from_linear(nn.Linear(32, 16))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert q(torch.randn(2, 32, dtype=dt)).dtype == dt


def test_non_float_input_gets_a_clear_error():
    """T5's feed-forward casts activations to ``wo.weight.dtype``: with a 4-bit wo that would be uint8."""
    for q in (Linear4bit.from_linear(nn.Linear(32, 16)), Linear8bit.from_linear(nn.Linear(32, 16))):
        for dt in (torch.uint8, torch.int8):
            with pytest.raises(TypeError, match=r"\(32 -> 16\) got a torch\.u?int8 input.*unquantized"):
                q(torch.ones(2, 32, dtype=dt))


def test_input_on_another_device_gets_a_clear_error():
    devices = [("cpu", "meta")] + ([("cuda", "cpu"), ("cpu", "cuda")] if torch.cuda.is_available() else [])
    for wdev, xdev in devices:  # on a GPU machine a CUDA layer would otherwise hand a host pointer to triton
        for q in (Linear4bit.from_linear(nn.Linear(64, 16), device=wdev),
                  Linear8bit.from_linear(nn.Linear(64, 16), device=wdev)):
            with pytest.raises(RuntimeError, match=rf"\(64 -> 16\) holds its weight on {wdev}.* input on {xdev}"):
                q(torch.ones(2, 64, device=xdev))


def test_dtype_cast_of_quantized_layer_raises_but_device_move_works():
    q = Linear4bit.from_linear(nn.Linear(32, 16))
    for call in (lambda: q.to(torch.float16), q.half, q.bfloat16, q.float, lambda: q.to("cpu", torch.bfloat16)):
        with pytest.raises(TypeError, match="cannot change dtype"):
            call()
    w = q.weight
    assert q.to("cpu") is q and q.weight is w  # no re-quantization
    q8 = Linear8bit.from_linear(nn.Linear(32, 16))
    with pytest.raises(TypeError, match="cannot change dtype"):
        q8.half()
    m = q8.to("meta")
    assert m.weight.is_meta and m.SCB.is_meta


def test_state_dict_keys_are_real_names_and_stats_survive_model_casts():
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 32), double_quant=True),
                          Linear8bit.from_linear(nn.Linear(32, 8)), nn.LayerNorm(8))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(sd) == {"0.weight", "0.bias", "0.absmax", "0.nested_absmax", "0.offset", "1.weight", "1.bias",
                       "1.SCB", "2.weight", "2.bias"}
    for k in sd:  # every key is an attribute path
        mod, _, name = k.rpartition(".")
        assert isinstance(getattr(model.get_submodule(mod), name), torch.Tensor)
    model.to(torch.bfloat16)
    after = model.state_dict()
    for k in ("0.absmax", "0.nested_absmax", "0.offset", "1.SCB", "0.weight", "1.weight"):
        assert after[k].dtype == sd[k].dtype and torch.equal(after[k], sd[k])
    assert after["0.bias"].dtype == torch.bfloat16 and after["2.weight"].dtype == torch.bfloat16


def test_load_state_dict_accepts_float32_stats():
    q = Linear4bit.from_linear(nn.Linear(64, 32))
    sd = q.state_dict()
    sd["absmax"] = sd["absmax"].view(torch.float32).clone()
    fresh = Linear4bit(64, 32)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.absmax, q.absmax)


def test_odd_out_features_and_meta_shell():
    q = Linear4bit.from_linear(nn.Linear(33, 7))
    assert q.weight.shape == ((33 * 7 + 1) // 2,)
    torch.testing.assert_close(q(torch.ones(1, 33)), q(torch.ones(1, 33)))
    with torch.device("meta"):
        shell = Linear4bit.from_linear(nn.Linear(64, 32), double_quant=True)
    assert shell.weight.is_meta and shell.weight.shape == (16, 64) and shell.absmax.shape == (32,)


def test_tables_are_cached_where_layers_reach_a_device():
    """A 4-bit layer's forward reads device copies of its code table and (double quantization) the dynamic map
    (``halfbyte.tables``). They are cached when a layer is built, moved or loaded, not by its first call: a first
    call traced by torch.compile that inserted them would leave the graph guarded on their absence, and the next
    call would compile again (seen on CUDA, session 23). Here the loaders' paths (a meta shell filled by
    ``load_state_dict(assign=True)``, or by the integrations' ``assign``) on the CPU, whose compiled forward reads the
    dynamic map."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from halfbyte import tables
    from halfbyte.integrations._layers import assign

    src = Linear4bit.from_linear(nn.Linear(128, 64), quant_type="fp4", double_quant=True)
    tables._TABLES.clear()
    layer = Linear4bit(128, 64, quant_type="fp4", double_quant=True, device="meta")
    assert not tables._TABLES
    layer.load_state_dict(src.state_dict(), assign=True)
    assert set(tables._TABLES) == {("fp4", torch.device("cpu")), ("dynamic", torch.device("cpu"))}
    tables._TABLES.clear()
    nn.Sequential(layer).to("cpu")  # moved (here: to where it is)
    assert set(tables._TABLES) == {("fp4", torch.device("cpu")), ("dynamic", torch.device("cpu"))}
    tables._TABLES.clear()  # the transformers/diffusers integrations' path: tensors written into a meta shell
    shell = Linear4bit(128, 64, quant_type="fp4", double_quant=True, device="meta")
    assign(shell, {k: v for k, v in src.state_dict().items() if k != "bias"})
    assert set(tables._TABLES) == {("fp4", torch.device("cpu")), ("dynamic", torch.device("cpu"))}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    with torch.no_grad():
        for m in (3, 5):
            x = torch.randn(m, 128)
            torch._dynamo.mark_dynamic(x, 0)
            assert torch.equal(compiled(x), layer(x))
    assert counter.frame_count == 1
