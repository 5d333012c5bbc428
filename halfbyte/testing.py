"""Tiny, randomly initialised checkpoints of real architectures, built offline (for tests and ``halfbyte demo``).

Nothing is downloaded: the weights are random (seeded), and the tokenizers are built in code, a CLIP byte-level
BPE (the 512 byte pieces, a few merged words, the two CLIP specials) and a T5 Unigram (``<pad>``=0, ``</s>``=1,
``<unk>``=2, ``▁``, single characters, a few ``▁word`` pieces). The same seed gives byte-identical files.
diffusers and transformers (>= 5, whose tokenizers take in-memory vocabularies) are imported inside the
functions, and ``import halfbyte`` does not import this module.

What is built (float32 sizes):

* ``save_tiny_flux_pipeline``: a ``FluxPipeline`` directory, about 0.7 MB, laid out like FLUX.1-dev:
  ``transformer`` (``FluxTransformer2DModel``, 1 double + 1 single block, 2 heads of 16, guidance embedding),
  ``text_encoder`` (``CLIPTextModel``, 2 layers, hidden 32), ``text_encoder_2`` (``T5EncoderModel``, T5 v1.1
  gated-gelu, 2 layers, d_model 32), ``tokenizer`` / ``tokenizer_2``, ``vae`` (``AutoencoderKL``, 4 levels of
  8 channels: vae_scale_factor 8, 4 latent channels packed 2x2 into the transformer's 16 input channels) and
  ``scheduler`` (``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's dynamic shifting).
* ``save_tiny_sd3_transformer`` / ``save_tiny_sd3_pipeline``: an SD3.5-medium-like ``SD3Transformer2DModel``
  (2 blocks, the first with dual attention, RMS qk-norm, ``proj_out``) and a ``StableDiffusion3Pipeline``
  around it (two ``CLIPTextModelWithProjection`` of hidden 8 and 16, the same T5, an SD3-scaled VAE).
* ``make_hub_cache``: a local directory laid out as a Hugging Face Hub cache entry, so that a repo id resolves
  offline (``HF_HUB_OFFLINE=1``) through ``from_pretrained`` / ``snapshot_download``.

Both pipelines need ``height`` and ``width`` divisible by 16 (vae_scale_factor 8 times the 2x2 packing or the
SD3 patch size); their defaults (FLUX 1024, SD3 256) work but are slow for a smoke test, so pass e.g. 32.
"""

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "make_hub_cache",
    "save_tiny_flux_pipeline",
    "save_tiny_sd3_pipeline",
    "save_tiny_sd3_transformer",
    "tiny_clip_text_config",
    "tiny_clip_tokenizer",
    "tiny_flux_pipeline",
    "tiny_flux_scheduler_config",
    "tiny_flux_transformer",
    "tiny_flux_transformer_config",
    "tiny_flux_vae_config",
    "tiny_sd3_pipeline",
    "tiny_sd3_scheduler_config",
    "tiny_sd3_transformer",
    "tiny_sd3_transformer_config",
    "tiny_sd3_vae_config",
    "tiny_t5_config",
    "tiny_t5_tokenizer",
]

# Words that get whole-word tokens in both tokenizers, so that prompts like "a photo of a cat" stay short.
WORDS = ("a", "cat", "dog", "photo", "of", "the")

# Files the Hub stores through LFS, whose blob name is the sha256 of the content (others: the git blob sha1).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5")


# --- configs ---------------------------------------------------------------------------------------------------


def tiny_flux_transformer_config(**overrides) -> dict:
    """``FluxTransformer2DModel`` kwargs: FLUX.1-dev's layout (patch 1, guidance embedding) at width 32.

    16 input channels = 4 VAE latent channels packed 2x2; rope axes 4 + 4 + 8 = the head dim 16; text width 32
    = ``tiny_t5_config()['d_model']``, pooled width 32 = ``tiny_clip_text_config()['hidden_size']``.
    """
    return dict(
        patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ) | overrides


def tiny_t5_config(**overrides) -> dict:
    """``transformers.T5Config`` kwargs: a 2-block T5 v1.1 (gated-gelu, untied head) encoder, d_model 32.

    Ids match ``tiny_t5_tokenizer()`` (pad 0, eos 1); its 128 embedding rows cover the tokenizer's pieces.
    """
    config = dict(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return config | overrides


def tiny_clip_text_config(**overrides) -> dict:
    """``transformers.CLIPTextConfig`` kwargs: a 2-layer CLIP text tower of hidden 32 (CLIP-L's activation and
    77 positions), its vocabulary and special-token ids those of ``tiny_clip_tokenizer()``."""
    vocab, _ = _clip_vocab_and_merges()
    config = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return config | overrides


def tiny_flux_vae_config(**overrides) -> dict:
    """``AutoencoderKL`` kwargs: FLUX's VAE layout (4 levels, so vae_scale_factor 8; no quant convs; its scaling
    and shift factors) with 8 channels per level and 4 latent channels."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ) | overrides


def tiny_sd3_vae_config(**overrides) -> dict:
    """``AutoencoderKL`` kwargs: ``tiny_flux_vae_config()`` with SD3's scaling and shift factors."""
    return tiny_flux_vae_config(scaling_factor=1.5305, shift_factor=0.0609) | overrides


def tiny_flux_scheduler_config(**overrides) -> dict:
    """``FlowMatchEulerDiscreteScheduler`` kwargs, as in FLUX.1-dev's ``scheduler_config.json``."""
    return dict(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    ) | overrides


def tiny_sd3_scheduler_config(**overrides) -> dict:
    """``FlowMatchEulerDiscreteScheduler`` kwargs, as in SD3's ``scheduler_config.json``."""
    return dict(num_train_timesteps=1000, shift=3.0) | overrides


def tiny_sd3_transformer_config(**overrides) -> dict:
    """``SD3Transformer2DModel`` kwargs: SD3.5-medium's layout (patch 2, dual attention in block 0, RMS qk-norm)
    with 2 blocks of 4 heads of 8.

    4 input channels = the VAE's latent channels; text width 32 = ``tiny_t5_config()['d_model']``; pooled width
    24 = the two CLIP projections (8 + 16) of ``tiny_sd3_pipeline``; positions up to 32x32 patches (512 px).
    """
    return dict(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24, out_channels=4,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    ) | overrides


# --- tokenizers ------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which CLIP's byte-level BPE uses."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary order (bytes, bytes + ``</w>``, merge results, the two specials) on a tiny scale."""
    chars = list(_bytes_to_unicode().values())
    pieces = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        current = word[0]
        for i, ch in enumerate(word[1:], start=2):
            nxt = ch + "</w>" if i == len(word) else ch
            merges.append((current, nxt))
            current += nxt
            pieces.append(current)
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    return {p: i for i, p in enumerate(pieces)}, merges


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer`` (byte-level BPE, lower-casing, bos/eos added, padded with ``<|endoftext|>``) over 525
    pieces: every byte, every byte ending a word, and whole-word merges for ``WORDS``."""
    import transformers

    vocab, merges = _clip_vocab_and_merges()
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (Unigram + metaspace, ``</s>`` appended; no sentinel ``<extra_id_*>`` tokens) over 78
    pieces: ``<pad>``, ``</s>``, ``<unk>``, ``▁``, ASCII letters, digits, ``.,!?'-`` and ``▁word`` for ``WORDS``."""
    import string

    import transformers

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + w, -3.0) for w in WORDS]
    # In transformers 5, T5TokenizerFast is T5Tokenizer and takes the (piece, log-prob) list directly.
    return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# --- models ----------------------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int):
    """Run the block with the CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _init(factory, seed: int, dtype: torch.dtype):
    """Build a model from ``factory()`` under ``seed``, in eval mode and ``dtype``."""
    with _seeded(seed):
        model = factory()
    # nn.Module.to, since diffusers' override warns on every dtype cast (even with nothing to keep in float32).
    return torch.nn.Module.to(model, dtype).eval()


def tiny_flux_transformer(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random ``FluxTransformer2DModel`` of ``tiny_flux_transformer_config()`` (the pipeline's, same seed)."""
    import diffusers

    return _init(lambda: diffusers.FluxTransformer2DModel(**tiny_flux_transformer_config()), seed, dtype)


def tiny_sd3_transformer(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random ``SD3Transformer2DModel`` of ``tiny_sd3_transformer_config()`` (the pipeline's, same seed)."""
    import diffusers

    return _init(lambda: diffusers.SD3Transformer2DModel(**tiny_sd3_transformer_config()), seed, dtype)


def _t5_encoder(seed: int, dtype: torch.dtype):
    import transformers

    return _init(lambda: transformers.T5EncoderModel(transformers.T5Config(**tiny_t5_config())), seed, dtype)


def _clip_text(cls_name: str, seed: int, dtype: torch.dtype, **overrides):
    import transformers

    cls = getattr(transformers, cls_name)
    return _init(lambda: cls(transformers.CLIPTextConfig(**tiny_clip_text_config(**overrides))), seed, dtype)


def _vae(config: dict, seed: int, dtype: torch.dtype):
    import diffusers

    return _init(lambda: diffusers.AutoencoderKL(**config), seed, dtype)


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random in-memory ``FluxPipeline`` (the components listed in the module docstring).

    Each model is initialised from ``seed`` on its own, so e.g. its transformer equals
    ``tiny_flux_transformer(seed)``. Generate with ``height``/``width`` divisible by 16.
    """
    import diffusers

    return diffusers.FluxPipeline(
        transformer=tiny_flux_transformer(seed, dtype),
        text_encoder=_clip_text("CLIPTextModel", seed, dtype),
        text_encoder_2=_t5_encoder(seed, dtype),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_t5_tokenizer(),
        vae=_vae(tiny_flux_vae_config(), seed, dtype),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**tiny_flux_scheduler_config()),
    )


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random in-memory ``StableDiffusion3Pipeline``: ``tiny_sd3_transformer``, CLIP-L-like and CLIP-G-like
    ``CLIPTextModelWithProjection`` (hidden 8 and 16, so their concatenation 24 is zero-padded up to T5's 32 as
    in SD3), the tiny T5, the tiny CLIP tokenizer twice, the T5 tokenizer, an SD3-scaled VAE and SD3's scheduler.
    Generate with ``height``/``width`` divisible by 16 and at most 512."""
    import diffusers

    clip_l = dict(hidden_size=8, intermediate_size=16, projection_dim=8)
    clip_g = dict(hidden_size=16, intermediate_size=32, projection_dim=16)
    return diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed, dtype),
        text_encoder=_clip_text("CLIPTextModelWithProjection", seed, dtype, **clip_l),
        text_encoder_2=_clip_text("CLIPTextModelWithProjection", seed, dtype, **clip_g),
        text_encoder_3=_t5_encoder(seed, dtype),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer(),
        vae=_vae(tiny_sd3_vae_config(), seed, dtype),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**tiny_sd3_scheduler_config()),
    )


# --- on disk ---------------------------------------------------------------------------------------------------


def save_tiny_flux_pipeline(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``tiny_flux_pipeline(seed, dtype)`` to ``path`` (``model_index.json`` plus one folder per component,
    weights as safetensors), the directory ``FluxPipeline.from_pretrained(path)`` loads. Returns ``Path(path)``."""
    path = Path(path)
    tiny_flux_pipeline(seed, dtype).save_pretrained(path)
    return path


def save_tiny_sd3_pipeline(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``tiny_sd3_pipeline(seed, dtype)`` to ``path``, the directory
    ``StableDiffusion3Pipeline.from_pretrained(path)`` loads. Returns ``Path(path)``."""
    path = Path(path)
    tiny_sd3_pipeline(seed, dtype).save_pretrained(path)
    return path


def save_tiny_sd3_transformer(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``tiny_sd3_transformer(seed, dtype)`` to ``path`` (``config.json`` and
    ``diffusion_pytorch_model.safetensors``), as ``SD3Transformer2DModel.from_pretrained(path)`` reads it."""
    path = Path(path)
    tiny_sd3_transformer(seed, dtype).save_pretrained(path)
    return path


# --- Hub cache -------------------------------------------------------------------------------------------------


def _blob_name(file: Path) -> str:
    """The Hub's etag for ``file``: sha256 of the content for LFS files, else the git blob sha1."""
    data = file.read_bytes()
    if file.name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    src_dir: str | os.PathLike,
    revision: str = "main",
    repo_type: str = "model",
) -> Path:
    """Copy ``src_dir`` into ``cache_dir`` as the Hub cache entry of ``repo_id`` at ``revision``; return the
    snapshot folder.

    Layout (huggingface_hub's, e.g. for ``org/name``)::

        cache_dir/models--org--name/blobs/<etag>                      file contents (etag: see ``_blob_name``)
        cache_dir/models--org--name/refs/<revision>                   the commit hash (unless revision is one)
        cache_dir/models--org--name/snapshots/<commit>/<rel path>     relative symlink to ../../blobs/<etag>

    The commit hash is the sha1 of the file list and etags, so the same tree gives the same snapshot. Where
    symlinks are not allowed the snapshot holds copies, as huggingface_hub does. With ``HF_HUB_OFFLINE=1`` and
    ``HF_HUB_CACHE=cache_dir`` (or ``cache_dir=`` / ``local_files_only=True``), ``from_pretrained(repo_id, ...)``
    and ``snapshot_download(repo_id)`` then resolve offline.
    """
    src_dir = Path(src_dir)
    repo = Path(cache_dir) / "--".join([f"{repo_type}s", *repo_id.split("/")])
    files = sorted(p for p in src_dir.rglob("*") if p.is_file())
    etags = {f.relative_to(src_dir).as_posix(): _blob_name(f) for f in files}
    is_commit = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    tree = "".join(f"{rel}\0{etag}\n" for rel, etag in etags.items()).encode()
    commit = revision if is_commit else hashlib.sha1(tree).hexdigest()

    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file, (rel, etag) in zip(files, etags.items()):
        blob = repo / "blobs" / etag
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
    if not is_commit:
        ref = repo / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return snapshot
