"""QLoRA training on halfbyte-quantized models (issue 6): peft adapters on a tiny FLUX transformer and a tiny T5
encoder (NF4 and LLM.int8()) drive a loss down on a fixed batch with gradient checkpointing, gradients reach only
the adapters, the base stays quantized and unchanged, and adapters save and reload in peft and diffusers formats."""


import pytest
import torch
from diffusers import FluxPipeline
from lora_helpers import FORMATS, PEFT_TARGETS, flux_inputs, load_transformer, quantized_state, run, same_tensors
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import T5Config, T5EncoderModel

from halfbyte import BitsAndBytesConfig
from halfbyte.testing import (
    tiny_t5_config,
)

# exact comparisons with dense copies on the reference path: see conftest.cpu_machine
pytestmark = pytest.mark.usefixtures("cpu_machine")

# --- training (QLoRA) --------------------------------------------------------------------------------------------

STEPS, LR = 30, 3e-2  # a random target the adapters fit partly: 30 steps reach ~0.36 of the start loss


def train(model, loss_fn, probe: nn.Module) -> list[float]:
    """AdamW on the trainable parameters for STEPS steps on one fixed batch; returns the losses. Checks on the first
    step that gradient checkpointing recomputes ``probe`` and that gradients reach exactly the adapters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    calls, losses = [0], []
    probe.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model.train()
    for step in range(STEPS):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert calls[0] == 2, "gradient checkpointing must run the block's forward again in backward"
            named = dict(model.named_parameters())
            assert {n for n, p in named.items() if p.grad is not None} == {n for n, p in named.items()
                                                                         if p.requires_grad}
            assert all("lora_" in n for n, p in named.items() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("fmt", FORMATS)
def test_qlora_flux_trains_saves_and_reloads(flux_dir, tmp_path, fmt):
    transformer = load_transformer(flux_dir, fmt)
    transformer.enable_gradient_checkpointing()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS + ["proj_mlp"], init_lora_weights="gaussian")
    pm = get_peft_model(transformer, config)
    base = quantized_state(transformer)
    batch = flux_inputs(batch=2, seed=4)
    target = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(5))
    losses = train(pm, lambda: nn.functional.mse_loss(pm(**batch).sample, target),
                   transformer.transformer_blocks[0].attn.to_q)
    assert losses[-1] < 0.5 * losses[0], losses
    assert same_tensors(quantized_state(transformer), base)  # the base stayed quantized and frozen
    y = run(pm)

    pm.save_pretrained(tmp_path / "peft")  # peft format
    again = PeftModel.from_pretrained(load_transformer(flux_dir, fmt), tmp_path / "peft")
    assert torch.equal(run(again), y)

    lora = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    FluxPipeline.save_lora_weights(tmp_path / "diffusers", transformer_lora_layers=lora,  # diffusers format
                                   transformer_lora_adapter_metadata=config.to_dict())
    pipe = FluxPipeline.from_pretrained(flux_dir, transformer=load_transformer(flux_dir, fmt))
    pipe.load_lora_weights(tmp_path / "diffusers")
    assert torch.equal(run(pipe.transformer), y)


@pytest.mark.filterwarnings("ignore:`(gradient|is_gradient)_checkpointing.*deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_qlora_t5_trains_saves_and_reloads(tmp_path, fmt):
    torch.manual_seed(0)
    T5EncoderModel(T5Config(**tiny_t5_config())).save_pretrained(tmp_path / "t5")

    def load():
        return T5EncoderModel.from_pretrained(tmp_path / "t5", quantization_config=BitsAndBytesConfig(**FORMATS[fmt]))

    model = load()
    model.gradient_checkpointing_enable()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o", "wi_0", "wi_1"],
                                          init_lora_weights="gaussian"))
    base = quantized_state(model)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
    losses = train(pm, lambda: nn.functional.mse_loss(pm(input_ids=ids).last_hidden_state, target),
                   model.encoder.block[0].layer[0].SelfAttention.q)
    assert losses[-1] < 0.5 * losses[0], losses
    assert same_tensors(quantized_state(model), base)
    with torch.no_grad():
        y = pm(input_ids=ids).last_hidden_state
    pm.save_pretrained(tmp_path / "peft")
    again = PeftModel.from_pretrained(load(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).last_hidden_state, y)
