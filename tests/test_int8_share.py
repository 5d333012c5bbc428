"""LLM.int8() layers that read one input in a row quantize it once (``kernels.share.Share``, ``halfbyte.sharing``):
the same bits as quantizing it per layer, an entry only for the very same unchanged tensor, groups found in FLUX
and T5 blocks. Without a GPU the kernels run under ``TRITON_INTERPRET=1`` through the direct path; with one the
cached plans serve the calls."""

import copy
import os
import pickle

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of triton.jit'ed code
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import halfbyte  # noqa: E402
from halfbyte.kernels import int8_mm as km  # noqa: E402
from halfbyte.kernels import int8_plan  # noqa: E402
from halfbyte.kernels.share import Share  # noqa: E402
from halfbyte.testing import tiny_flux_transformer_config, tiny_t5_config  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
M, K = (300, 512) if CUDA else (24, 96)


def _layers(n: int, dtype=torch.bfloat16) -> list:
    torch.manual_seed(0)
    return [halfbyte.Linear8bit.from_linear(torch.nn.Linear(K, 40 + 8 * i, dtype=dtype), threshold=6.0, device=DEV)
            for i in range(n)]


def _x(dtype=torch.bfloat16) -> torch.Tensor:
    x = torch.randn(M, K, dtype=dtype)
    x[:, [3, 50, K - 1]] *= 8  # outlier columns (|x| >= 6 in some rows)
    return x.to(DEV)


def _mm(layer, x, share=None):
    return int8_plan.int8_mixed_mm(x, layer.weight, layer.SCB.view(torch.float32), layer.bias, layer.threshold,
                                   share=share)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("rounds", [1, 3])
def test_share_gives_the_unshared_bits_and_quantizes_once(monkeypatch, rounds):
    """Three layers on one input: equal outputs, one activation quantization (direct path), the entry dropped
    after the third member. With a GPU, later rounds run through the cached plans (built on a key's second
    sighting)."""
    layers = _layers(3)
    x = _x()
    want = [_mm(layer, x) for layer in layers]
    quantized = []
    real = km._quant_with_outliers
    monkeypatch.setattr(km, "_quant_with_outliers", lambda *a, **k: quantized.append(1) or real(*a, **k))
    share = Share(3)
    for _ in range(rounds):
        quantized.clear()
        got = []
        for i, layer in enumerate(layers):
            got.append(_mm(layer, x, share))
            assert (share._x is x) == (i < 2)  # held for the next members, dropped after the last
        for w, g in zip(want, got):
            assert torch.equal(_bits(w), _bits(g))
        if not CUDA:
            assert len(quantized) == 1


def test_share_serves_only_the_same_unchanged_tensor():
    a, b = _layers(2)
    x = _x()
    share = Share(2)
    _mm(a, x, share)
    y = x.clone()  # equal values, another tensor: quantized again, and the entry now belongs to y
    assert torch.equal(_bits(_mm(b, y, share)), _bits(_mm(b, y)))
    assert share._x is y
    _mm(a, x, share)
    assert share._x is x
    x.mul_(0.5)  # in place between the members: the version counter tells
    assert torch.equal(_bits(_mm(b, x, share)), _bits(_mm(b, x)))
    assert share._x is x  # a new entry, for the changed x
    _mm(a, x.float(), share)  # another dtype: not served (nor fails)
    assert share._x is not x


def test_one_entry_lives_at_a_time():
    """A group whose last member is never called frees its entry when another group stores one."""
    a, b = _layers(2)
    first, second = Share(3), Share(2)
    x, y = _x(), _x()
    _mm(a, x, first)
    assert first._x is x
    _mm(b, y, second)
    assert first._x is None and second._x is y
    assert torch.equal(_bits(_mm(a, x, first)), _bits(_mm(a, x)))  # quantized again, same bits


def test_share_copies_and_pickles_empty():
    layers = _layers(2)
    x = _x()
    share = Share(2)
    for layer in layers:
        layer.share = share
    _mm(layers[0], x, share)
    pair = copy.deepcopy(torch.nn.ModuleList(layers))
    assert pair[0].share is pair[1].share and pair[0].share is not share
    assert pair[0].share._x is None and pair[0].share.members == 2
    assert pickle.loads(pickle.dumps(share))._x is None
    with pytest.raises(ValueError, match="at least 2 members"):
        Share(1)


def _outputs(model, inputs):
    with torch.inference_mode():
        return model(**inputs)


def test_flux_and_t5_blocks_get_their_groups():
    """quantize_ gives every FLUX block's q/k/v (and single blocks' proj_mlp with them) and every T5 block's q/k/v
    and gated wi_0/wi_1 one share per group; 4-bit models and threshold 0 get none; outputs match the unshared
    model's bits (on the GPU through the shared kernels)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(**tiny_flux_transformer_config(num_layers=2, num_single_layers=3))
    flux = flux.to(torch.bfloat16).eval()
    cfg8 = halfbyte.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    q = halfbyte.quantize_(copy.deepcopy(flux), cfg8, device=DEV)
    blocks = list(q.transformer_blocks) + list(q.single_transformer_blocks)
    assert all(isinstance(blk.attn.to_q.share, Share) for blk in blocks)
    assert len({id(blk.attn.to_q.share) for blk in blocks}) == 5
    single = q.single_transformer_blocks[0]
    assert single.proj_mlp.share is single.attn.to_k.share and single.attn.to_q.share.members == 4
    double = q.transformer_blocks[0]
    assert double.attn.add_q_proj.share is double.attn.add_v_proj.share is not double.attn.to_q.share
    assert halfbyte.share_int8_inputs(q) == 2 * 2 + 3
    cfg0 = halfbyte.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    off = halfbyte.quantize_(copy.deepcopy(flux), cfg0, device=DEV)
    assert all(m.share is None for m in off.modules() if isinstance(m, halfbyte.Linear8bit))  # threshold 0

    t5 = transformers.T5EncoderModel(transformers.T5Config(**tiny_t5_config())).eval()
    t5q = halfbyte.quantize_(copy.deepcopy(t5).to(DEV), cfg8)  # whole model: quantize_ moves only the linears
    groups = halfbyte.share_int8_inputs(t5q)
    assert groups == 2 * 2  # q/k/v and wi_0/wi_1 in each of 2 blocks
    ids = {"input_ids": torch.randint(2, 128, (2, 7), device=DEV)}
    got = _outputs(t5q, ids).last_hidden_state
    assert halfbyte.share_int8_inputs(t5q, enable=False) == groups
    assert all(m.share is None for m in t5q.modules() if isinstance(m, halfbyte.Linear8bit))
    assert torch.equal(got, _outputs(t5q, ids).last_hidden_state)


def test_regional_compile_keeps_one_graph_per_block_class():
    """diffusers' regional compilation (one compiled forward per block class, shared by its instances) is not split
    per instance by the layers' shares: traced code never reads them. (The first single block recompiles once in
    any case: its input arrives with other strides.)"""
    diffusers = pytest.importorskip("diffusers")
    from lora_helpers import flux_inputs
    from torch._dynamo.testing import CompileCounterWithBackend

    frames = []
    for share in (False, True):
        torch.manual_seed(0)
        model = diffusers.FluxTransformer2DModel(**tiny_flux_transformer_config(num_layers=2, num_single_layers=3))
        cfg = halfbyte.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        model = halfbyte.quantize_(model.eval(), cfg)
        assert halfbyte.share_int8_inputs(model, enable=share) == 2 * 2 + 3
        torch._dynamo.reset()
        backend = CompileCounterWithBackend("eager")
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
        with torch.no_grad():
            for seed in (0, 1):
                model(**flux_inputs(seed=seed))
        frames.append(backend.frame_count)
    assert frames[1] == frames[0] <= 3
