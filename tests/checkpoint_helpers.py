"""Tiny FLUX / T5 models, configs and fixtures shared by the checkpoint tests (test_checkpoint*.py)."""

from pathlib import Path

import diffusers
import torch
import transformers
from torch import nn

from halfbyte import BitsAndBytesConfig

BF16 = torch.bfloat16
CFGS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=BF16),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}
FLUX = diffusers.FluxTransformer2DModel
T5 = transformers.T5EncoderModel


def make_flux(dtype=BF16) -> nn.Module:
    torch.manual_seed(0)
    return FLUX(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                axes_dims_rope=[4, 6, 6]).to(dtype).eval()


def flux_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    with torch.no_grad():
        return model(hidden_states=torch.randn(2, 16, 4, generator=g).to(BF16),
                     encoder_hidden_states=torch.randn(2, 8, 32, generator=g).to(BF16),
                     pooled_projections=torch.randn(2, 32, generator=g).to(BF16),
                     timestep=torch.full((2,), 0.5, dtype=BF16), img_ids=img_ids, txt_ids=torch.zeros(8, 3),
                     return_dict=False)[0]


def make_t5() -> nn.Module:
    torch.manual_seed(0)
    return T5(transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval()


def t5_out(model) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def files_of(d: Path) -> dict[str, bytes]:  # name -> content
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}
