"""LLM.int8() layers that read the same input one after another, in the blocks of the models halfbyte serves: each
group quantizes that input once per call of its block (``kernels.share.Share``; the other members run only
their weight-column gathers and GEMM). A FLUX single block feeds one 4608 x 3072 activation to ``proj_mlp`` and the
attention's q, k and v: four quantizations of the same tensor per block and step before.

``GROUPS`` names, per block class, the member paths of each group. Each was read in the block's code (diffusers
0.42 ``transformer_flux``, transformers 5 ``modeling_t5``): the members are called on the very same tensor, and
nothing between their calls writes it in place. That is the condition: a share serves a later member only the same
tensor object (address, shape, strides, dtype, threshold, stream, and version counter where the tensor has one),
but an inference tensor changed in place between two members' calls would not be noticed.
"""

from torch import nn

from .kernels.share import Share
from .nn import Linear8bit

#: block class name -> groups of member paths (relative to the block) called on one tensor in a row
GROUPS = {
    # diffusers FluxTransformerBlock -> FluxAttention: to_q/k/v(norm_hidden_states), add_*_proj(norm_encoder_...)
    "FluxTransformerBlock": (("attn.to_q", "attn.to_k", "attn.to_v"),
                             ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    # proj_mlp(norm_hidden_states), then attn(norm_hidden_states) -> to_q/k/v
    "FluxSingleTransformerBlock": (("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"),),
    # transformers T5Block: self-attention q/k/v(normed_hidden_states); gated feed-forward wi_0/wi_1
    "T5Block": (("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v"),
                ("layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1")),
}


def _member(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def share_int8_inputs(model: nn.Module, enable: bool = True) -> int:
    """Give each group of ``GROUPS`` in ``model`` whose members are all ``Linear8bit`` layers with a threshold (the
    same one, the same input width) one ``Share``; ``enable=False`` removes them. Returns the number of groups.
    Called by ``quantize_`` and the diffusers / transformers loaders; eager CUDA inference uses the shares,
    torch.compile and autograd ignore them. Other models keep one quantization per layer."""
    groups = 0
    for block in model.modules():
        for paths in GROUPS.get(type(block).__name__, ()):
            members = [_member(block, p) for p in paths]
            if not all(isinstance(m, Linear8bit) and m.threshold > 0 for m in members):
                continue
            if len({(m.threshold, m.in_features) for m in members}) != 1:
                continue
            share = Share(len(members)) if enable else None
            for m in members:
                m.share = share
            groups += 1
    return groups
