"""``halfbyte.testing``: the tiny checkpoints load through the real diffusers/transformers classes and generate,
are byte-identical for a seed, and resolve offline by repo id once laid out as a Hub cache entry."""

import json
import os
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors import safe_open

from halfbyte import testing

FLUX_COMPONENTS = {
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5Tokenizer"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}
REPO_ID = "halfbyte-testing/tiny-flux"


def files_of(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return testing.save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, flux_dir):
    cache = tmp_path_factory.mktemp("hub")
    return cache, testing.make_hub_cache(cache, REPO_ID, flux_dir)


def test_lean_imports():
    """``import halfbyte`` leaves ``halfbyte.testing`` alone, which itself imports neither diffusers nor
    transformers until a builder runs."""
    code = (
        "import sys, halfbyte\n"
        "assert 'halfbyte.testing' not in sys.modules\n"
        "import halfbyte.testing\n"
        "cfg = halfbyte.testing.tiny_clip_text_config()\n"
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('lean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lean" in out.stdout


def test_configs_fit_together():
    """The widths the FLUX pipeline wires together agree, as FLUX.1's do at full size."""
    flux, t5, clip = testing.tiny_flux_transformer_config(), testing.tiny_t5_config(), testing.tiny_clip_text_config()
    vae = testing.tiny_flux_vae_config()
    assert flux["joint_attention_dim"] == t5["d_model"]
    assert flux["pooled_projection_dim"] == clip["hidden_size"]
    assert flux["in_channels"] == 4 * vae["latent_channels"]  # 2x2 packing of the latents
    assert sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # vae_scale_factor, as FLUX's VAE
    sd3 = testing.tiny_sd3_transformer_config()
    assert sd3["joint_attention_dim"] == t5["d_model"] and sd3["in_channels"] == vae["latent_channels"]
    assert len(testing.tiny_t5_tokenizer()) <= t5["vocab_size"]
    assert len(testing.tiny_clip_tokenizer()) == clip["vocab_size"]


def test_tokenizers():
    """CLIP: bos + whole-word pieces + eos, padded to 77; T5: pieces + ``</s>``, padded with 0 to the length the
    pipeline asks for (``max_sequence_length``)."""
    clip = testing.tiny_clip_tokenizer()
    ids = clip("A photo of a cat", padding="max_length", max_length=clip.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id and ids[6] == clip.eos_token_id
    assert clip.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    t5 = testing.tiny_t5_tokenizer()
    ids = t5("a photo of a cat!", padding="max_length", max_length=16, truncation=True).input_ids
    assert t5.convert_ids_to_tokens(ids[:6]) == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "!"]
    assert ids[6:] == [t5.eos_token_id] + [t5.pad_token_id] * 9 and (t5.eos_token_id, t5.pad_token_id) == (1, 0)
    assert t5.unk_token_id not in t5("Zebra 42, x-ray?").input_ids


def test_flux_pipeline_layout(flux_dir):
    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_") and v[0]} == FLUX_COMPONENTS
    assert sum(len(b) for b in files_of(flux_dir).values()) < 2**20
    config = json.loads((flux_dir / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in testing.tiny_flux_transformer_config()} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in testing.tiny_flux_transformer_config().items()
    }


def test_flux_pipeline_generates(flux_dir):
    pipe = diffusers.FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    embeds, pooled, _ = pipe.encode_prompt("a cat", prompt_2=None, max_sequence_length=16)
    assert embeds.shape == (1, 16, 32) and pooled.shape == (1, 32)
    out = pipe(
        prompt="a photo of a cat", height=48, width=32, num_inference_steps=2, guidance_scale=3.5,
        max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0),
    )
    image = out.images
    assert image.shape == (1, 48, 32, 3) and image.dtype == np.float32
    assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1 and image.std() > 0


def test_flux_pipeline_is_seeded(tmp_path, flux_dir):
    """Same seed: the same bytes in every file; another seed: other weights, same configs and tokenizers. The
    caller's RNG is left alone."""
    state = torch.random.get_rng_state()
    again = testing.save_tiny_flux_pipeline(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert files_of(again) == files_of(flux_dir)
    other = files_of(testing.save_tiny_flux_pipeline(tmp_path / "other", seed=1))
    changed = {name for name, data in files_of(flux_dir).items() if other[name] != data}
    assert changed == {
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    }


def test_bfloat16_pipeline(tmp_path):
    """``dtype`` is the stored dtype of every weight, as in the bfloat16 FLUX.1 checkpoints, and it generates."""
    path = testing.save_tiny_flux_pipeline(tmp_path / "bf16", dtype=torch.bfloat16)
    for file in path.rglob("*.safetensors"):
        with safe_open(file, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, file
    pipe = diffusers.FluxPipeline.from_pretrained(path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a cat", height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_sd3_transformer(tmp_path):
    path = testing.save_tiny_sd3_transformer(tmp_path / "sd3", seed=0)
    model = diffusers.SD3Transformer2DModel.from_pretrained(path).eval()
    assert isinstance(model.proj_out, torch.nn.Linear)
    ref = testing.tiny_sd3_transformer(seed=0)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = model(
            hidden_states=torch.randn(2, 4, 8, 6, generator=g),
            encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
            pooled_projections=torch.randn(2, 24, generator=g),
            timestep=torch.tensor([500.0, 10.0]),
        ).sample
    assert out.shape == (2, 4, 8, 6) and torch.isfinite(out).all()


def test_sd3_pipeline_generates(tmp_path):
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(testing.save_tiny_sd3_pipeline(tmp_path / "sd3"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a cat", height=32, width=48, num_inference_steps=2, max_sequence_length=16, output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 48, 3) and np.isfinite(out.images).all()


def test_hub_cache_layout(hub_cache, flux_dir):
    cache, snapshot = hub_cache
    repo = cache / "models--halfbyte-testing--tiny-flux"
    assert snapshot.parent == repo / "snapshots" and (repo / "refs" / "main").read_text() == snapshot.name
    assert files_of(snapshot) == files_of(flux_dir)
    link = snapshot / "transformer" / "diffusion_pytorch_model.safetensors"
    if link.is_symlink():
        assert os.readlink(link) == os.path.join("..", "..", "..", "blobs", link.resolve().name)
        assert len(link.resolve().name) == 64  # LFS file: sha256 etag
        assert len((snapshot / "model_index.json").resolve().name) == 40  # git blob sha1
    assert testing.make_hub_cache(cache, REPO_ID, flux_dir) == snapshot  # same tree, same commit; idempotent


def test_hub_cache_resolves_offline(hub_cache, flux_dir):
    cache, snapshot = hub_cache
    assert snapshot_download(REPO_ID, cache_dir=cache, local_files_only=True) == str(snapshot)
    model = diffusers.FluxTransformer2DModel.from_pretrained(
        REPO_ID, subfolder="transformer", cache_dir=cache, local_files_only=True
    )
    ref = diffusers.FluxTransformer2DModel.from_pretrained(flux_dir / "transformer")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    t5 = transformers.T5EncoderModel.from_pretrained(
        REPO_ID, subfolder="text_encoder_2", cache_dir=cache, local_files_only=True
    )
    assert t5.config.d_model == 32
    pipe = diffusers.FluxPipeline.from_pretrained(REPO_ID, cache_dir=cache, local_files_only=True)
    assert pipe.tokenizer_2("a cat").input_ids == testing.tiny_t5_tokenizer()("a cat").input_ids


def test_hub_cache_via_environment(hub_cache):
    """With ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` set, a plain repo id resolves (fresh process: the hub reads
    both at import)."""
    cache, snapshot = hub_cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    code = f"import huggingface_hub; print(huggingface_hub.snapshot_download({REPO_ID!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snapshot)
