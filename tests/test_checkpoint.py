"""halfbyte.save_pretrained / halfbyte.from_pretrained on tiny FLUX (diffusers) and T5 (transformers) models.

Round trips keep every byte; streaming quantization of a floating-point checkpoint gives the bytes ``quantize_``
gives for the loaded model; files are laid out as the libraries lay them out; Hub ids and progress bars; a
streaming load stays within its memory bound (measured in a subprocess). Atomic saves and bad input:
test_checkpoint_errors.py.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from checkpoint_helpers import (
    BF16,
    CFGS,
    FLUX,
    T5,
    assert_same_state,
    files_of,
    flux_out,
    make_flux,
    make_t5,
    t5_out,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import halfbyte
from halfbyte import BitsAndBytesConfig, Linear4bit, Linear8bit, pieces

# --- round trips and streaming quantization ----------------------------------------------------------------


@pytest.mark.parametrize("name", CFGS)
def test_round_trip_same_bytes_same_outputs(saved, name):
    model, d = saved[name]
    loaded = halfbyte.from_pretrained(FLUX, d)
    assert_same_state(model, loaded)
    assert torch.equal(flux_out(model), flux_out(loaded))
    # the recorded config (a private copy) also holds the dtype, for the library's own reload of a saved copy
    want = copy.deepcopy(CFGS[name])
    want._pre_quantization_dtype = loaded.dtype
    assert not loaded.training and halfbyte.convert.quantization_config_of(loaded) == want
    assert loaded.config.quantization_config._pre_quantization_dtype == loaded.dtype
    assert CFGS[name]._pre_quantization_dtype is None  # the caller's object is not touched
    again = d.parent / f"{name}-again"  # what from_pretrained gives, save_pretrained writes identically
    halfbyte.save_pretrained(loaded, again, max_shard_size="20KB")
    a, b = files_of(again), files_of(d)
    assert json.loads(a.pop("config.json")).pop("_name_or_path") == str(d)  # as diffusers records it
    assert a == {k: v for k, v in b.items() if k != "config.json"}


@pytest.mark.parametrize("name", ["nf4-dq", "fp4", "int8"])
def test_streaming_quantization_equals_quantize_of_loaded_model(flux_float, name):
    cfg = CFGS[name]
    streamed = halfbyte.from_pretrained(FLUX, flux_float, quantization_config=cfg, torch_dtype=BF16)
    reference = halfbyte.quantize_(FLUX.from_pretrained(flux_float, torch_dtype=BF16), cfg)
    assert_same_state(reference, streamed)
    assert torch.equal(flux_out(reference), flux_out(streamed))


def test_streaming_casts_float32_checkpoint_like_the_library(tmp_path):
    make_flux(torch.float32).save_pretrained(tmp_path)
    streamed = halfbyte.from_pretrained(FLUX, tmp_path, quantization_config=CFGS["nf4"], torch_dtype=BF16)
    reference = halfbyte.quantize_(FLUX.from_pretrained(tmp_path, torch_dtype=BF16), CFGS["nf4"])
    assert_same_state(reference, streamed)
    assert all(m.dtype == BF16 for m in streamed.modules() if isinstance(m, Linear4bit))


@pytest.mark.parametrize("name, dtype", [("nf4-dq", torch.float16), ("int8", BF16)])
def test_t5_stream_save_reload(tmp_path, name, dtype):
    make_t5().save_pretrained(tmp_path / "float")
    streamed = halfbyte.from_pretrained(T5, tmp_path / "float", quantization_config=CFGS[name], torch_dtype=dtype)
    library = T5.from_pretrained(tmp_path / "float", dtype=dtype)  # dtypes as transformers decides them
    assert_same_state(halfbyte.quantize_(library, CFGS[name]), streamed)
    wo = streamed.encoder.block[0].layer[1].DenseReluDense.wo  # _keep_in_fp32_modules: fp32 only under float16
    assert type(wo) is nn.Linear and wo.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert streamed.shared.weight is streamed.encoder.embed_tokens.weight
    halfbyte.save_pretrained(streamed, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"] == CFGS[name].to_dict() and saved["architectures"] == ["T5EncoderModel"]
    assert "encoder.embed_tokens.weight" not in load_file(tmp_path / "q" / "model.safetensors")  # tied, dropped
    reloaded = halfbyte.from_pretrained(transformers.AutoModelForTextEncoding, tmp_path / "q")
    assert type(reloaded) is T5 and reloaded.shared.weight is reloaded.encoder.embed_tokens.weight
    assert_same_state(streamed, reloaded)
    assert torch.equal(t5_out(streamed), t5_out(reloaded))


def test_pre_quantized_config_supplies_runtime_settings(saved):
    _, d = saved["nf4"]
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    loaded = halfbyte.from_pretrained(diffusers.AutoModel, d, quantization_config=cfg)
    assert type(loaded) is FLUX
    assert {m.compute_dtype for m in loaded.modules() if isinstance(m, Linear4bit)} == {torch.float32}


@pytest.mark.parametrize("quantize", [False, True])
def test_layout_is_the_libraries_own(tmp_path, quantize):
    """Unquantized: byte-identical to diffusers'/transformers' save_pretrained. Quantized: same file names, every
    quantized layer's keys inside one shard, the index covering every file and key."""
    for model, write in ((make_flux(), FLUX.save_pretrained), (make_t5(), T5.save_pretrained)):
        lib, ours = tmp_path / f"{type(model).__name__}-lib", tmp_path / f"{type(model).__name__}-ours"
        write(model, lib, max_shard_size="30KB")
        if quantize:
            halfbyte.quantize_(model, CFGS["nf4-dq"])
        halfbyte.save_pretrained(model, ours, max_shard_size="30KB")
        if not quantize:
            assert files_of(lib) == files_of(ours)
            continue
        index_name = next(p.name for p in ours.iterdir() if p.name.endswith(".index.json"))
        assert index_name in os.listdir(lib)
        index = json.loads((ours / index_name).read_text())
        shards = {p.name for p in ours.glob("*.safetensors")}
        assert set(index["weight_map"].values()) == shards and len(shards) > 1
        assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
        assert all(safe_open(ours / s, "pt").metadata() == {"format": "pt"} for s in shards)
        expected = set(halfbyte.bitsandbytes_state_dict(model)) - {"encoder.embed_tokens.weight"}  # T5: tied
        assert set(index["weight_map"]) == expected
        for name, m in model.named_modules():
            if isinstance(m, Linear4bit):
                files = {f for k, f in index["weight_map"].items() if k.startswith(name + ".")}
                assert len(files) == 1, (name, files)


def test_bitsandbytes_compatible_directory(saved, tmp_path):
    model, _ = saved["nf4-dq"]
    halfbyte.save_pretrained(model, tmp_path, bitsandbytes_compatible=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == CFGS["nf4-dq"].to_bitsandbytes_dict()
    assert config["_class_name"] == "FluxTransformer2DModel"
    on_disk = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    expected = halfbyte.bitsandbytes_state_dict(model)
    assert set(on_disk) == set(expected)
    assert all(torch.equal(on_disk[k], expected[k].cpu()) for k in expected)
    assert_same_state(model, halfbyte.from_pretrained(FLUX, tmp_path))
    bnb = pytest.importorskip("bitsandbytes")
    P = "transformer_blocks.0.ff.net.2.weight"  # in_features 128 (bnb's CPU dequant is off for rows < blocksize)
    p = bnb.nn.Params4bit.from_prequantized(on_disk[P], {k: v for k, v in on_disk.items() if k.startswith(P + ".")},
                                            device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state),
                       model.transformer_blocks[0].ff.net[2].dequantize())


def test_bitsandbytes_compatible_refuses_what_diffusers_cannot_read(tmp_path):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
    model = halfbyte.quantize_(make_flux(), cfg)
    with pytest.raises(ValueError, match=r"layer time_text_embed\.timestep_embedder\.linear_1: "
                                         r"bnb_4bit_quant_storage=bfloat16"):
        halfbyte.save_pretrained(model, tmp_path / "x", bitsandbytes_compatible=True)
    assert not (tmp_path / "x").exists()
    halfbyte.save_pretrained(model, tmp_path / "native")  # halfbyte itself reads it
    assert_same_state(model, halfbyte.from_pretrained(FLUX, tmp_path / "native"))


def test_float_layers_join_the_skip_list_and_plain_modules(tmp_path):
    model = halfbyte.quantize_(make_flux(), CFGS["int8"])
    model.norm_out.linear = nn.Linear(32, 64).to(BF16)  # kept in floating point; the config would quantize it
    halfbyte.save_pretrained(model, tmp_path / "f")
    qc = json.loads((tmp_path / "f" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["norm_out.linear"]
    assert_same_state(model, halfbyte.from_pretrained(FLUX, tmp_path / "f"))
    model.proj_out = nn.Linear(32, 4).to(BF16)  # "proj_out" would also skip the quantized blocks' proj_out
    with pytest.raises(ValueError, match=r"proj_out is kept in floating point, but the skip entry 'proj_out' .*"
                                         r"single_transformer_blocks\.0\.proj_out"):
        halfbyte.save_pretrained(model, tmp_path / "g")
    plain = halfbyte.quantize_(nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8)), CFGS["nf4"])
    halfbyte.save_pretrained(plain, tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == ["halfbyte_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "p" / "halfbyte_config.json").read_text()) == {
        "quantization_config": CFGS["nf4"].to_dict()}
    with torch.device("meta"):
        shell = halfbyte.quantize_(nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8)), CFGS["nf4"])
    halfbyte.load_bitsandbytes_state_dict(shell, load_file(tmp_path / "p" / "model.safetensors"))
    assert_same_state(plain, shell)


def test_row_pieces_give_the_bytes_of_one_shot_quantization(monkeypatch):
    monkeypatch.setattr(pieces, "QUANT_PIECE_NUMEL", 256)  # 100 columns: pieces of 16 rows (1600 = 25 blocks)
    lin = nn.Linear(100, 37).to(BF16)
    q = Linear4bit.from_linear(lin, double_quant=True)
    packed, absmax = torch.ops.halfbyte.quantize_4bit(lin.weight.detach(), 64, "nf4")
    assert torch.equal(q.weight.reshape(-1), packed)
    monkeypatch.setattr(pieces, "QUANT_PIECE_NUMEL", 1 << 30)
    assert_same_state(q, Linear4bit.from_linear(lin, double_quant=True))
    wide = nn.Linear(64, 9000)  # 9000 blocks: 36 nested pieces of 256 below
    big = Linear4bit.from_linear(wide, double_quant=True)
    monkeypatch.setattr(pieces, "QUANT_PIECE_NUMEL", 4096)
    assert_same_state(big, Linear4bit.from_linear(wide, double_quant=True))
    q8 = Linear8bit.from_linear(lin)
    assert torch.equal(q8.weight, torch.ops.halfbyte.int8_vectorwise_quant(lin.weight.detach().half(), 0.0)[0])


# --- Hub cache, progress -----------------------------------------------------------------------------------------


def test_loads_offline_from_the_hub_cache(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--tiny-org--tiny-flux"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "transformer"
    snapshot.mkdir(parents=True)
    for p in saved["fp4"][1].iterdir():  # the cache stores blobs by hash and links them into the snapshot
        blob = repo / "blobs" / f"blob-{p.name}"
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(p.read_bytes())
        (snapshot / p.name).symlink_to(blob)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    loaded = halfbyte.from_pretrained(FLUX, "tiny-org/tiny-flux", subfolder="transformer")
    assert_same_state(saved["fp4"][0], loaded)
    with pytest.raises(FileNotFoundError, match="'tiny-org/absent' is not a local directory"):
        halfbyte.from_pretrained(FLUX, "tiny-org/absent", subfolder="transformer")


def test_progress_bar_switches(monkeypatch):
    from halfbyte.io import checkpoint

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not checkpoint._progress([], 0, "x").disable
    monkeypatch.setenv("HALFBYTE_NO_PROGRESS", "1")
    assert checkpoint._progress([], 0, "x").disable
    monkeypatch.delenv("HALFBYTE_NO_PROGRESS")
    halfbyte.io.disable_progress_bars()
    try:
        assert checkpoint._progress([], 0, "x").disable
    finally:
        halfbyte.io.enable_progress_bars()


# --- memory bound --------------------------------------------------------------------------------------------

# A FLUX-shaped model of 134 MB in bfloat16 (67 M parameters; largest tensor: context_embedder, 8192 x 1024 =
# 16.8 MB), loaded with NF4 + double quantization in a fresh interpreter while a thread samples RssAnon (anonymous
# resident memory: the mapped checkpoint pages are file-backed and do not count) every 0.2 ms. Bound: the quantized
# model (memory_footprint) + the largest floating-point tensor, + 10 %, + the stated constant.
MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, ctypes.util, json, sys, threading, time
    import torch, diffusers, halfbyte
    from torch import nn
    def anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))
    # not the load's: diffusers' lazy import of the model module (~115 MB of Python objects), op registration
    # and the reciprocal table the quantizer builds once per process (8 MB)
    cls = diffusers.FluxTransformer2DModel
    halfbyte.Linear4bit.from_linear(nn.Linear(64, 64), double_quant=True)
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # baseline without free heap memory to reuse
    base, peak, done = anon(), [0], []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0002)
    thread = threading.Thread(target=sample)
    thread.start()
    cfg = halfbyte.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = halfbyte.from_pretrained(cls, sys.argv[1], quantization_config=cfg, torch_dtype=torch.bfloat16)
    done.append(1)
    thread.join()
    print(json.dumps({"peak": peak[0] - base, "end": anon() - base, "final": halfbyte.memory_footprint(model)}))
""")


def test_streaming_load_memory_bound(tmp_path):
    with torch.device("meta"):
        meta = FLUX(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                    num_attention_heads=8, joint_attention_dim=8192, pooled_projection_dim=768)
    meta.save_config(tmp_path)
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(t.shape, generator=g) * 0.02).to(BF16) for k, t in meta.state_dict().items()}
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    del tensors
    path = [str(Path(halfbyte.__file__).parent.parent), os.environ.get("PYTHONPATH")]  # keep the caller's path too
    env = dict(os.environ, HALFBYTE_NO_PROGRESS="1", PYTHONPATH=os.pathsep.join(p for p in path if p))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    # Allowance beyond the bound's 10 % for interpreter and allocator noise: the reference quantizer's float32
    # temporaries for one row piece are ~16 bytes x QUANT_PIECE_NUMEL = 4 MiB (covered by the largest-tensor
    # allowance), but glibc may keep a few freed pieces resident between two malloc_trim calls (after each layer);
    # allow four pieces' worth (16 MiB), which also covers the load's Python objects (~2 MiB). Measured peaks on
    # this model: 30-45 MiB, against a bound of ~57 MiB before this allowance.
    constant = 4 * 16 * pieces.QUANT_PIECE_NUMEL
    bound = 1.1 * (measured["final"] + largest) + constant
    assert measured["peak"] <= bound, (measured, largest, bound)


def test_models_from_the_streaming_loader_work_with_the_libraries_own_methods(tmp_path):
    """A model from halfbyte.from_pretrained saves, dequantizes and refuses dtype casts through its library's own
    methods, exactly as one loaded through the library with a quantization_config."""
    from diffusers import AutoModel

    from halfbyte.testing import tiny_flux_transformer

    tiny_flux_transformer(seed=0).save_pretrained(tmp_path / "fp")
    cfg = halfbyte.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = halfbyte.from_pretrained(AutoModel, str(tmp_path / "fp"), quantization_config=cfg)
    model.save_pretrained(tmp_path / "q")  # the library's save: bitsandbytes layout, halfbyte config
    again = AutoModel.from_pretrained(str(tmp_path / "q"))  # on the GPU where there is one (halfbyte's: the CPU)
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].cpu()) for k in sa)
    with pytest.raises(ValueError, match="dtype"):
        model.to(torch.float16)
    model.dequantize()
    assert not any(isinstance(m, (halfbyte.Linear4bit, halfbyte.Linear8bit)) for m in model.modules())
