"""halfbyte.save_pretrained is atomic (a failed or interrupted save leaves the previous checkpoint or nothing) and
durable; halfbyte.from_pretrained fails on bad checkpoints naming the file and tensor."""

import json
import os
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from checkpoint_helpers import (
    BF16,
    CFGS,
    FLUX,
    assert_same_state,
    files_of,
    make_flux,
)
from safetensors.torch import load_file, save_file

import halfbyte
from halfbyte import BitsAndBytesConfig
from halfbyte.io import safetensors_stream

# --- atomic saves ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_previous_checkpoint(saved, tmp_path, monkeypatch, interrupt):
    target = tmp_path / "ckpt"
    halfbyte.save_pretrained(saved["nf4"][0], target, max_shard_size="20KB")
    (target / "README.md").write_text("mine")
    before = files_of(target)
    real, calls = safetensors_stream.write_shard, []

    def failing(path, tensors, metadata, durable=True):
        if calls:
            raise interrupt
        calls.append(path)
        real(path, tensors, metadata, durable)

    monkeypatch.setattr(safetensors_stream, "write_shard", failing)
    with pytest.raises(type(interrupt)):
        halfbyte.save_pretrained(saved["int8"][0], target, max_shard_size="20KB")
    assert calls and files_of(target) == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left
    with pytest.raises(type(interrupt)):
        halfbyte.save_pretrained(saved["int8"][0], tmp_path / "new", max_shard_size="20KB")
    assert os.listdir(tmp_path) == ["ckpt"]


def test_saved_directory_has_a_plain_directory_mode_and_keeps_the_dtype(saved, tmp_path):
    model = saved["nf4"][0]
    halfbyte.save_pretrained(model, tmp_path / "a")
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "a").stat().st_mode == (tmp_path / "plain").stat().st_mode
    again = halfbyte.from_pretrained(diffusers.FluxTransformer2DModel, tmp_path / "a", torch_dtype=torch.bfloat16)
    assert halfbyte.convert.quantization_config_of(again)._pre_quantization_dtype == torch.bfloat16
    halfbyte.save_pretrained(again, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert cfg["_pre_quantization_dtype"] == "bfloat16"
    assert diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "b").dtype == torch.bfloat16


def test_durable_saves_fsync_every_file_and_default_saves_none(saved, tmp_path, monkeypatch):
    synced = []
    real = safetensors_stream._fsync
    monkeypatch.setattr(safetensors_stream, "_fsync", lambda p: (synced.append(Path(p)), real(p)))
    model = saved["nf4"][0]
    halfbyte.save_pretrained(model, tmp_path / "a", max_shard_size="20KB", durable=True)
    shards = sorted((tmp_path / "a").glob("*.safetensors"))
    assert len(shards) > 1 and all(any(p.name == s.name for p in synced) for s in shards)
    synced.clear()
    halfbyte.save_pretrained(model, tmp_path / "b", max_shard_size="20KB")
    assert synced == [] and files_of(tmp_path / "b") == files_of(tmp_path / "a")


def test_save_replaces_stale_shards_and_keeps_other_files(saved, tmp_path):
    halfbyte.save_pretrained(saved["nf4"][0], tmp_path, max_shard_size="20KB")
    (tmp_path / "README.md").write_text("model card")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("a b")
    halfbyte.save_pretrained(saved["int8"][0], tmp_path)  # one file now: the old shards and index must go
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors",
                                            "tokenizer"]
    assert (tmp_path / "tokenizer" / "vocab.txt").read_text() == "a b"
    assert_same_state(saved["int8"][0], halfbyte.from_pretrained(FLUX, tmp_path))


# --- bad input -------------------------------------------------------------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def single_file(saved, name, tmp_path) -> Path:
    halfbyte.save_pretrained(saved[name][0], tmp_path / name)
    return tmp_path / name / "diffusion_pytorch_model.safetensors"


def test_missing_and_truncated_shards(saved, tmp_path):
    d = copy_dir(saved["nf4"][1], tmp_path / "missing")
    shards = sorted(p.name for p in d.glob("*-of-*.safetensors"))
    (d / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json names shard {shards[1]}, but .* does not exist"):
        halfbyte.from_pretrained(FLUX, d)
    d = copy_dir(saved["nf4"][1], tmp_path / "truncated")
    (d / shards[2]).write_bytes((d / shards[2]).read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shards[2]}: not a readable safetensors file \(truncated or corrupt"):
        halfbyte.from_pretrained(FLUX, d)


def test_not_a_checkpoint_and_no_config(tmp_path, flux_float):
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_bytes((flux_float / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"config_only holds no safetensors checkpoint"):
        halfbyte.from_pretrained(FLUX, tmp_path / "config_only", quantization_config=CFGS["nf4"])
    with pytest.raises(ValueError, match=r"no quantization_config given and .*float/config\.json has none"):
        halfbyte.from_pretrained(FLUX, flux_float)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        halfbyte.from_pretrained(FLUX, tmp_path / "absent")


@pytest.mark.parametrize("key, value, error", [
    ("transformer_blocks.0.attn.to_q.weight.quant_state.bitsandbytes__nf4",
     torch.tensor(list(b'{"quant_type": "nf4", "blocksi'), dtype=torch.uint8),
     r"diffusion_pytorch_model\.safetensors: .*bitsandbytes__nf4: corrupted quant-state JSON"),
    ("transformer_blocks.0.attn.to_q.weight", torch.zeros(100, 1, dtype=torch.uint8),
     r"\.safetensors: transformer_blocks\.0\.attn\.to_q\.weight: 100 packed bytes, expected 512 for shape \[32, 32\]"),
    ("norm_out.linear.weight.absmax", torch.zeros(3),
     r"\.safetensors: norm_out\.linear\.weight\.absmax: shape \(3,\), expected \(32,\)"),
])
def test_corrupt_quantized_tensors_name_file_and_tensor(saved, tmp_path, key, value, error):
    path = single_file(saved, "nf4", tmp_path)
    rewrite(path, lambda sd: sd.__setitem__(key, value))
    with pytest.raises(ValueError, match=error):
        halfbyte.from_pretrained(FLUX, path.parent)


def test_missing_tensors_and_wrong_shapes(saved, tmp_path, flux_float):
    path = single_file(saved, "int8", tmp_path)
    original = load_file(path)
    rewrite(path, lambda sd: sd.pop("transformer_blocks.0.ff.net.2.SCB"))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: .*transformer_blocks\.0\.ff\.net\.2"
                                         r"\.SCB"):
        halfbyte.from_pretrained(FLUX, path.parent)
    rewrite(path, lambda sd: (sd.update(original), sd.pop("x_embedder.bias")))
    with pytest.raises(ValueError, match=r"\.safetensors: the checkpoint lacks x_embedder\.bias, unlike the model"):
        halfbyte.from_pretrained(FLUX, path.parent)
    rewrite(path, lambda sd: (sd.update(original), sd.pop("transformer_blocks.0.attn.norm_q.weight")))
    with pytest.raises(ValueError, match=r"has no tensors for 1 model entries, e\.g\. "
                                         r"\['transformer_blocks\.0\.attn\.norm_q\.weight'\]"):
        halfbyte.from_pretrained(FLUX, path.parent)
    for key in ("context_embedder.weight", "norm_out.linear.bias"):  # a layer to quantize, a plain tensor
        d = copy_dir(flux_float, tmp_path / key)
        shard = d / json.loads((d / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"][key]
        rewrite(shard, lambda sd: sd.__setitem__(key, torch.zeros(5, 7, dtype=BF16)))
        with pytest.raises(ValueError, match=rf"{shard.name}: {key} has shape \[5, 7\], .* expects \[\d+(, \d+)?\]"):
            halfbyte.from_pretrained(FLUX, d, quantization_config=CFGS["nf4"])


def test_quantization_config_errors(saved, tmp_path):
    d = copy_dir(saved["nf4"][1], tmp_path / "gptq")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gptq/config\.json: quantization_config has quant_method 'gptq'"):
        halfbyte.from_pretrained(FLUX, d)
    conflicting = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    with pytest.raises(ValueError, match=r"conflicts with .*config\.json: bnb_4bit_quant_type: given 'fp4', "
                                         r"checkpoint 'nf4'"):
        halfbyte.from_pretrained(FLUX, saved["nf4"][1], quantization_config=conflicting)
    with pytest.raises(ValueError, match=r"load_in_4bit: given False, checkpoint True"):
        halfbyte.from_pretrained(FLUX, saved["nf4"][1], quantization_config=CFGS["int8"])
    halfbyte.from_pretrained(FLUX, saved["nf4"][1], quantization_config=CFGS["nf4"])  # equal: fine


def test_float_checkpoint_holding_quantized_tensors_and_meta_models(saved, tmp_path):
    d = copy_dir(saved["nf4"][1], tmp_path / "noconfig")
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\.safetensors: .*weight\.absmax is bitsandbytes quantization data, but "
                                         r".*config\.json has no quantization_config"):
        halfbyte.from_pretrained(FLUX, d, quantization_config=CFGS["nf4"])
    with torch.device("meta"):
        shell = halfbyte.quantize_(make_flux(), CFGS["nf4"])
    with pytest.raises(ValueError, match=r"cannot save: .* is on the meta device"):
        halfbyte.save_pretrained(shell, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
