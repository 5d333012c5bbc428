"""LoRA on halfbyte-quantized models (issue 6): diffusers' ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora``,
input-widening (Control) LoRAs, QLoRA training with peft, adapters saved and reloaded, bad input.

Models: the tiny FLUX transformer and T5 encoder of ``halfbyte.testing`` in float32, quantized by halfbyte on load
(NF4, LLM.int8() with its default threshold 6.0). References and tolerances:

* NF4 against a dense copy holding the *dequantized* weights: the same weights and the same float32 operations
  (halfbyte's CPU matmul is ``F.linear`` of the dequantized weight), so equal bits are expected.
* LLM.int8() quantizes activations too, so it never equals a dense model. The unit is what int8 quantization does
  to the same model without adapters, ``max |int8 - dense|``; with adapters the difference must stay within 2 units
  (the adapters add float32 terms computed identically on both sides).
* Fusing re-quantizes: at the layer level the fused bytes must be exactly those of quantizing the float merged
  weight (and within half the widest code gap times the block's absmax of it); at the model level the fused output
  must stay within 2x of what quantizing the model in the first place does to it.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from lora_helpers import (
    ATTN,
    FORMATS,
    PEFT_TARGETS,
    QUANTIZED,
    TARGETS,
    dense_copy,
    flux_inputs,
    flux_lora,
    load_transformer,
    maxdiff,
    quantized_state,
    requantization_bound,
    run,
    same_tensors,
)
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

import halfbyte
from halfbyte import BitsAndBytesConfig, Linear4bit, Linear8bit
from halfbyte.integrations import peft as hb_peft
from halfbyte.integrations.peft import LoraLinear
from halfbyte.testing import (
    tiny_flux_transformer_config,
    tiny_sd3_transformer,
)

# exact comparisons with dense copies on the reference path: see conftest.cpu_machine
pytestmark = pytest.mark.usefixtures("cpu_machine")

# --- inference: load_lora_weights, set_adapters, fuse / unfuse --------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_pipeline_loras_set_adapters_fuse_unfuse(flux_dir, fmt):
    float_model = load_transformer(flux_dir, None)
    transformer = load_transformer(flux_dir, fmt)
    dense = dense_copy(transformer)
    pipe = FluxPipeline.from_pretrained(flux_dir, transformer=transformer)
    y_float, y_q, y_dense = run(float_model), run(transformer), run(dense)
    if fmt == "nf4":
        assert torch.equal(y_q, y_dense)
    unit = max(maxdiff(y_q, y_dense), 1e-6)  # int8 activation quantization (module docstring)

    lora_a, lora_b = flux_lora(transformer, TARGETS, seed=1), flux_lora(transformer, ATTN, rank=8, seed=2)
    pipe.load_lora_weights(lora_a, adapter_name="style")
    pipe.load_lora_weights(lora_b, adapter_name="detail")
    pipe.set_adapters(["style", "detail"], adapter_weights=[1.0, 0.5])
    wrapped = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLinear)}
    assert set(wrapped) == set(TARGETS)
    assert all(isinstance(m.base_layer, QUANTIZED) and m.base_layer.weight.dtype in (torch.uint8, torch.int8)
               for m in wrapped.values())
    assert all(m.lora_A["style"].weight.dtype == torch.float32 for m in wrapped.values())
    for adapter, sd in (("style", lora_a), ("detail", lora_b)):
        dense.load_lora_adapter(sd, prefix="transformer", adapter_name=adapter)
    dense.set_adapters(["style", "detail"], weights=[1.0, 0.5])
    y_lora, y_dense_lora = run(transformer), run(dense)
    assert maxdiff(y_lora, y_q) > 10 * unit, "the LoRAs must change the output well beyond the quantization effect"
    if fmt == "nf4":
        assert torch.equal(y_lora, y_dense_lora)
    else:
        assert maxdiff(y_lora, y_dense_lora) <= 2 * unit

    pipe.disable_lora()
    assert torch.equal(run(transformer), y_q)
    pipe.enable_lora()
    assert torch.equal(run(transformer), y_lora)

    before = quantized_state(transformer)
    pipe.fuse_lora(adapter_names=["style", "detail"])
    fused = quantized_state(transformer)
    assert all(not torch.equal(fused[f"{n}.base_layer.weight"], before[f"{n}.base_layer.weight"]) for n in TARGETS)
    y_fused = run(transformer)
    # fusing rounds the merged weights once more: no worse than quantizing the model did in the first place
    assert maxdiff(y_fused, y_lora) <= 2 * maxdiff(y_q, y_float)
    pipe.unfuse_lora()
    assert same_tensors(quantized_state(transformer), before)  # exactly the original bytes
    assert torch.equal(run(transformer), y_lora)

    pipe.unload_lora_weights()
    assert not any(isinstance(m, LoraLinear) for m in transformer.modules())
    assert torch.equal(run(transformer), y_q)


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq", "fp4", "int8"])
def test_merge_is_quantizing_the_merged_weight_and_unmerge_is_exact(fmt):
    """Layer level: fused bytes == quantize(dequantize(W) + delta); the error bound of one quantization; exact
    unmerge; a warning when a small delta rounds away; a safe_merge that finds NaNs leaves the layer untouched."""
    cfgs = {"nf4": dict(quant_type="nf4"), "nf4-dq": dict(quant_type="nf4", double_quant=True),
            "fp4": dict(quant_type="fp4")}
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    layer = Linear8bit.from_linear(lin, threshold=6.0) if fmt == "int8" else Linear4bit.from_linear(lin, **cfgs[fmt])
    model = nn.Sequential()
    model.add_module("proj", layer)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights="gaussian"))
    lora = pm.base_model.model.proj
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0, 0.02)  # delta ~ 0.3 of the weights (about 0.036)
    original = quantized_state(model)
    with torch.no_grad():
        merged_float = layer.dequantize(torch.float32) + lora.get_delta_weight("default")
    lin.weight.data = merged_float
    expected = (Linear8bit.from_linear(lin, threshold=6.0) if fmt == "int8"
                else Linear4bit.from_linear(lin, **cfgs[fmt]))
    x = torch.randn(5, 256)
    with torch.no_grad():
        y_unmerged = pm(x)
        with pm.disable_adapter():
            y_base = pm(x)
    pm.merge_adapter()
    assert torch.equal(layer.weight, expected.weight.view(layer.weight.shape))
    assert all(torch.equal(b, getattr(expected, n)) for n, b in layer.named_buffers())
    err = (layer.dequantize(torch.float32) - merged_float).abs()
    assert (err <= requantization_bound(layer, merged_float)).all()
    with torch.no_grad():  # the merged layer keeps the adapter's effect
        assert maxdiff(pm(x), y_unmerged) < maxdiff(y_unmerged, y_base) / 2
    pm.unmerge_adapter()
    assert same_tensors(quantized_state(model), original)
    with torch.no_grad():  # a delta far below the quantization step rounds away: merge says so
        lora.lora_B["default"].weight.mul_(1e-3)
    with pytest.warns(UserWarning, match="kept less than half of its change"):
        pm.merge_adapter()
    pm.unmerge_adapter()
    with torch.no_grad():
        lora.lora_B["default"].weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            lora.merge(safe_merge=True)
    assert same_tensors(quantized_state(model), original) and not lora.merged


# --- input-widening (Control) LoRAs ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_control_lora_widens_quantized_x_embedder(flux_dir, fmt):
    """A Control-LoRA-style adapter whose x_embedder lora_A takes 2x the channels (FLUX Control: 64 -> 128; here
    16 -> 32) loads into the quantized model, runs, and unloads back to the original layer."""
    transformer = load_transformer(flux_dir, fmt)
    original = transformer.x_embedder
    dense = dense_copy(transformer)
    y_q, y_dense = run(transformer), run(dense)
    unit = max(maxdiff(y_q, y_dense), 1e-6)
    pipe = FluxPipeline.from_pretrained(flux_dir, transformer=transformer)
    lora = flux_lora(transformer, ["x_embedder"] + ATTN[:4], seed=3, in_features={"x_embedder": 32})
    pipe.load_lora_weights(lora, adapter_name="control")

    widened = transformer.x_embedder
    assert isinstance(widened, LoraLinear) and type(widened.base_layer) is type(original)
    assert widened.base_layer.in_features == 32 and transformer.config.in_channels == 32
    w_old, w_new = original.dequantize(torch.float32), widened.base_layer.dequantize(torch.float32)
    assert torch.equal(w_new[:, 16:], torch.zeros(32, 16))
    padded = torch.cat([w_old, torch.zeros(32, 16)], 1)  # what the layer holds, quantized once more
    assert ((w_new - padded).abs() <= requantization_bound(widened.base_layer, padded)).all()

    # reference: diffusers' own (dense) widening of the same weights, given the widened layer's weight
    dense_pipe = FluxPipeline.from_pretrained(flux_dir, transformer=dense)
    dense_pipe.load_lora_weights(lora, adapter_name="control")
    assert dense.x_embedder.base_layer.weight.shape == (32, 32)
    dense.x_embedder.base_layer.weight.data.copy_(w_new)
    y_wide, y_dense_wide = run(transformer, channels=32), run(dense, channels=32)
    assert y_wide.shape == (1, 16, 16) and maxdiff(y_wide, y_q) > 10 * unit
    if fmt == "nf4":
        assert torch.equal(y_wide, y_dense_wide)
    else:
        assert maxdiff(y_wide, y_dense_wide) <= 2 * unit

    pipe.unload_lora_weights(reset_to_overwritten_params=True)
    assert transformer.x_embedder is original and transformer.config.in_channels == 16
    assert torch.equal(run(transformer), y_q)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_loras_get_clear_errors_and_change_nothing(flux_dir):
    transformer = load_transformer(flux_dir, "nf4")
    pipe = FluxPipeline.from_pretrained(flux_dir, transformer=transformer)
    before, y = quantized_state(transformer), run(transformer)
    good = flux_lora(transformer, ATTN[:2])
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    expected = r"expected lora_A \(r, 32\) and lora_B \(32, r\)"
    for bad_b, got in ((torch.randn(48, 4), r"\(4, 32\) and \(48, 4\)"),  # wrong out_features
                       (torch.randn(32, 8), r"\(4, 32\) and \(32, 8\)")):  # ranks of A and B differ
        with pytest.raises(ValueError, match=rf"transformer_blocks\.0\.attn\.to_q .*{expected}, got {got}"):
            pipe.load_lora_weights({**good, key: bad_b}, adapter_name="bad")

    sd3 = tiny_sd3_transformer()
    sd3.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"))
    sd3_lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(sd3).items()}
    with pytest.raises(ValueError, match=r"does not fit FluxTransformer2DModel: \d+ of its \d+ target modules .*"
                                         r"another architecture"):
        pipe.load_lora_weights(sd3_lora, adapter_name="sd3")

    assert not any(isinstance(m, LoraLinear) for m in transformer.modules())
    assert same_tensors(quantized_state(transformer), before) and torch.equal(run(transformer), y)
    pipe.load_lora_weights(good, adapter_name="good")  # the pipeline is still usable
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, LoraLinear)


def test_peft_bad_input(flux_dir):
    transformer = load_transformer(flux_dir, "int8")
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        get_peft_model(copy.deepcopy(transformer), LoraConfig(r=4, target_modules=["to_q"], init_lora_weights="pissa"))
    pm = get_peft_model(transformer, LoraConfig(r=4, target_modules=["to_q"]))
    wrong = {"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 48)}
    with pytest.raises(RuntimeError, match=r"transformer_blocks\.0\.attn\.to_q\.lora_A.*torch.Size\(\[4, 48\]\).*"
                                           r"torch.Size\(\[4, 32\]\)"):
        set_peft_model_state_dict(pm, wrong)


# --- against bitsandbytes + peft, DoRA, torch.compile, hooks -----------------------------------------------------


def test_matches_bitsandbytes_peft_outputs_and_fused_bytes():
    """The same NF4 model and adapters through bitsandbytes' Linear4bit + peft's bnb LoRA layer (CPU backend): equal
    outputs, and fusing writes the same bytes. Layer widths are multiples of the block size, because bitsandbytes'
    native CPU dequantization mis-indexes blocks in rows shorter than a block (tests/test_hf_transformers.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    config = tiny_flux_transformer_config(attention_head_dim=32, in_channels=64, joint_attention_dim=64,
                                          pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))
    float_model = FluxTransformer2DModel(**config).eval()
    ours = halfbyte.quantize_(copy.deepcopy(float_model), BitsAndBytesConfig(**FORMATS["nf4"]))
    theirs = copy.deepcopy(float_model)
    for parent in list(theirs.modules()):
        for name, lin in list(parent.named_children()):
            if type(lin) is nn.Linear:
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, quant_type="nf4",
                                      compute_dtype=torch.float32, compress_statistics=False)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=False)
                q.bias = lin.bias
                setattr(parent, name, q.to("cpu"))
    theirs.is_loaded_in_4bit = True  # what peft's bitsandbytes dispatch looks for
    targets = PEFT_TARGETS + ["proj_mlp", "x_embedder"]
    pm_ours, pm_theirs = (get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
                          for m in (ours, theirs))
    assert type(pm_theirs.base_model.model.x_embedder).__module__ == "peft.tuners.lora.bnb"
    g = torch.Generator().manual_seed(3)
    adapters = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in pm_ours.state_dict().items() if "lora_" in k}
    for pm in (pm_ours, pm_theirs):
        assert not pm.load_state_dict(adapters, strict=False).unexpected_keys
    g = torch.Generator().manual_seed(4)
    inputs = {**flux_inputs(channels=64), "encoder_hidden_states": torch.randn(1, 8, 64, generator=g),
              "pooled_projections": torch.randn(1, 64, generator=g)}
    with torch.no_grad():
        y_ours, y_theirs = pm_ours(**inputs).sample, pm_theirs(**inputs).sample
    assert torch.equal(y_ours, y_theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' "may get different generations due to rounding errors"
        pm_ours.merge_adapter()
        pm_theirs.merge_adapter()
    for name in ("transformer_blocks.0.attn.to_q", "x_embedder", "single_transformer_blocks.0.proj_mlp"):
        a, b = ours.get_submodule(name).base_layer, theirs.get_submodule(name).base_layer
        assert torch.equal(a.weight.flatten(), b.weight.data.flatten())
        assert torch.equal(a.absmax.view(torch.float32), b.weight.quant_state.absmax)


def test_dora_on_a_quantized_layer():
    """DoRA reads the base weight through ``dequantize()``: same outputs and gradients as on a dense layer holding
    the dequantized weight; merging is quantizing peft's merged weight; unmerge is exact."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    layer = Linear4bit.from_linear(lin, quant_type="nf4")
    dense = nn.Linear(128, 64)
    dense.weight.data, dense.bias.data = layer.dequantize(torch.float32), lin.bias.data.clone()
    models = [nn.Sequential() for _ in range(2)]
    models[0].add_module("proj", layer)
    models[1].add_module("proj", dense)
    pms = [get_peft_model(m, LoraConfig(r=4, target_modules=["proj"], use_dora=True, init_lora_weights="gaussian"))
           for m in models]
    with torch.no_grad():
        pms[0].base_model.model.proj.lora_B["default"].weight.normal_(0, 0.05)
    adapters = {k: v for k, v in pms[0].state_dict().items() if "lora_" in k}
    assert any("lora_magnitude_vector" in k for k in adapters)
    pms[1].load_state_dict(adapters, strict=False)
    x = torch.randn(6, 128)
    ys = [pm(x) for pm in pms]
    assert torch.allclose(ys[0], ys[1], rtol=0, atol=1e-6 * ys[1].abs().max().item())  # float32 rounding
    for y in ys:
        y.square().sum().backward()
    grads = [dict((n, p.grad) for n, p in pm.named_parameters() if p.requires_grad) for pm in pms]
    assert grads[0].keys() == grads[1].keys() and any("magnitude" in n for n in grads[0])
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6) for n in grads[0])

    original = quantized_state(models[0])
    for pm in pms:
        pm.merge_adapter()
    lin.weight.data = dense.weight.data
    assert torch.equal(layer.weight, Linear4bit.from_linear(lin, quant_type="nf4").weight.view(layer.weight.shape))
    pms[0].unmerge_adapter()
    assert same_tensors(quantized_state(models[0]), original)


def test_compiled_lora_on_quantized_block_is_one_graph():
    """A FLUX double block with LoRA on its attention, quantized NF4, compiles with fullgraph=True (aot_eager:
    tracing and the ops' fakes; Inductor on GPU is bench/lora.py's job), forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = halfbyte.quantize_(FluxTransformer2DModel(**tiny_flux_transformer_config()).eval(),
                               BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    get_peft_model(model, LoraConfig(r=4, target_modules=PEFT_TARGETS, init_lora_weights="gaussian"))
    block = model.transformer_blocks[0]
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, 32, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), temb=torch.randn(1, 32, generator=g))
    eager = block(**args)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counter, fullgraph=True)(**args)
    assert counter.frame_count == 1
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    sum(t.sum() for t in compiled).backward()
    adapters = [p for n, p in block.named_parameters() if "lora_" in n]
    assert len(adapters) == 2 * len(PEFT_TARGETS) and all(p.grad is not None for p in adapters)


def test_hooks_can_be_turned_off_and_custom_modules_still_work():
    model = nn.Sequential()
    model.add_module("proj", Linear8bit.from_linear(nn.Linear(32, 16)))
    from peft.tuners.lora.model import LoraModel

    assert LoraModel._create_new_module.__module__ == "halfbyte.integrations.peft"  # installed by import halfbyte
    hb_peft.uninstall()
    try:
        with pytest.raises(ValueError, match="is not supported"):
            get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["proj"]))
        pm = get_peft_model(model, hb_peft.register_custom_modules(LoraConfig(r=2, target_modules=["proj"])))
        assert isinstance(pm.base_model.model.proj, LoraLinear)
    finally:
        import diffusers.loaders.lora_pipeline as lora_pipeline

        assert hb_peft.install_peft_dispatch() and hb_peft.patch_flux_lora_loader(lora_pipeline)
    code = ("import halfbyte, peft, peft.tuners.lora.model as m; "
            "print(m.LoraModel._create_new_module.__module__)")
    env = {**os.environ, "HALFBYTE_LORA_HOOKS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "peft.tuners.lora.model"


def test_bench_script_tiny_smoke(tmp_path):
    """bench/lora.py end to end on the tiny FLUX (CPU, float32; compile with aot_eager): every part runs and
    reports times. The GPU numbers are for BENCHMARKS.md."""
    spec = importlib.util.spec_from_file_location("bench_lora", Path(__file__).parents[1] / "bench" / "lora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lora.json"
    common = ["--tiny", "--out", str(out), "--warmup", "0", "--iters", "1"]
    bench.main(common + ["--libs", "halfbyte", "--parts", "compiled", "train"])
    bench.main(common + ["--libs", "bnb", "--parts", "eager"])  # merged into the same file
    results = json.loads(out.read_text())["results"]
    assert results["halfbyte"]["compiled"]["lora_graph_breaks"] == 0
    assert results["halfbyte"]["train"]["step_ms"] > 0 and results["halfbyte"]["train"]["trainable_params"] > 0
    assert results["bnb"]["eager"]["lora_ms"] > 0
