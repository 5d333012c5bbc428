"""The ``halfbyte`` command: every subcommand run as ``python -m halfbyte`` in a subprocess on tiny local
checkpoints (``halfbyte.testing``), offline, with a repo id resolved from the test Hub cache; its results checked
against what the library gives in this process. Error paths run ``halfbyte.cli.main`` in-process (the same code,
without a second interpreter start per case) and check exit status and message."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import halfbyte
from halfbyte.cli import _common, main
from halfbyte.testing import make_hub_cache, save_tiny_flux_pipeline, save_tiny_sd3_pipeline

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "halfbyte-cli/tiny-flux"
BNB_NF4 = ROOT / "tests" / "data" / "diffusers_bnb" / "nf4"
QUANTIZED = (halfbyte.Linear4bit, halfbyte.Linear8bit)


def halfbyte_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m halfbyte ARGS`` with this checkout first on the path, offline, on the test Hub cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HALFBYTE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "halfbyte", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``halfbyte ARGS`` in this process: (exit status, stdout, stderr); argparse's own exits included."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def count(model, cls=QUANTIZED) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = save_tiny_flux_pipeline(tmp_path_factory.mktemp("cli") / "flux")
    make_hub_cache(os.environ["HF_HUB_CACHE"], REPO_ID, path)
    return path


@pytest.fixture(scope="module")
def quantized(flux_dir, tmp_path_factory):
    """``halfbyte quantize REPO_ID OUT --json`` of the tiny FLUX pipeline: (OUT, the printed summary)."""
    out = tmp_path_factory.mktemp("cli-out") / "flux-nf4"
    proc = halfbyte_cli("quantize", REPO_ID, str(out), "--json")
    return out, json.loads(proc.stdout)


def test_help():
    proc = halfbyte_cli("--help")
    assert all(name in proc.stdout for name in ("quantize", "generate", "inspect", "bench", "demo"))
    for code in (_common.USAGE, _common.NOT_FOUND, _common.NO_DEVICE):
        assert f"  {code}  " in proc.stdout  # the exit codes are listed


@pytest.mark.parametrize("command", ["quantize", "generate", "inspect", "bench", "demo"])
def test_subcommand_help(capsys, command):
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0 and f"usage: halfbyte {command}" in out and "exit codes:" in out
    if command in ("quantize", "generate"):  # the config flags, one to one
        for flag in ("--quant", "--double-quant", "--compute-dtype", "--blocksize", "--threshold", "--skip"):
            assert flag in out


def test_quantize_pipeline(flux_dir, quantized):
    """A Hub id in, a pipeline directory out that plain ``FluxPipeline.from_pretrained`` loads and runs: the
    transformer and T5 encoder in NF4 with the bytes ``quantize_`` gives in memory, everything else copied."""
    out, summary = quantized
    rows = {r["component"]: r for r in summary["components"]}
    assert set(rows) == {"transformer", "text_encoder_2"} and {r["format"] for r in rows.values()} == {"nf4"}
    assert sorted(summary["copied"]) == ["scheduler", "text_encoder", "tokenizer", "tokenizer_2", "vae"]
    for name in summary["copied"]:
        src = {p.relative_to(flux_dir / name): p.read_bytes() for p in (flux_dir / name).rglob("*") if p.is_file()}
        assert {p.relative_to(out / name): p.read_bytes() for p in (out / name).rglob("*") if p.is_file()} == src
    pipe = diffusers.FluxPipeline.from_pretrained(out)  # no torch_dtype: the dtype recorded with the config
    ref = diffusers.FluxPipeline.from_pretrained(flux_dir)
    for name in rows:
        loaded, expected = getattr(pipe, name), getattr(ref, name)
        assert count(loaded, halfbyte.Linear4bit) == rows[name]["layers_quantized"] > 0
        halfbyte.quantize_(expected, halfbyte.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
        want = halfbyte.bitsandbytes_state_dict(expected)
        got = halfbyte.bitsandbytes_state_dict(loaded)
        # (loaded onto the GPU where there is one; the reference stays on the CPU)
        assert got.keys() == want.keys() and all(torch.equal(got[k].cpu(), want[k]) for k in want), name
        assert rows[name]["output_bytes"] < rows[name]["source_bytes"]
    assert pipe.transformer.dtype == pipe.text_encoder_2.dtype == torch.float32  # as stored, not float16
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                 output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_quantize_one_model_bitsandbytes_compatible(flux_dir, tmp_path, capsys):
    """--subfolder: one model out, here int8 with the bitsandbytes config and a skipped layer; what halfbyte's
    loader reads back equals quantizing in memory. (In-process: the fixture above runs quantize as a command.)"""
    out = tmp_path / "t5-int8"
    code, stdout, err = run_main(capsys, "quantize", str(flux_dir), str(out), "--subfolder", "text_encoder_2",
                                 "--quant", "int8", "--threshold", "4", "--skip", "q", "--bitsandbytes-compatible")
    assert code == 0, err
    assert "T5EncoderModel" in stdout and "int8" in stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] and qc["llm_int8_threshold"] == 4.0
    import transformers

    model = halfbyte.from_pretrained(transformers.T5EncoderModel, out)
    ref = transformers.T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2")
    halfbyte.quantize_(ref, halfbyte.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0,
                                                        llm_int8_skip_modules=["q"]))
    assert count(model, halfbyte.Linear8bit) == count(ref, halfbyte.Linear8bit) > 0
    assert isinstance(model.encoder.block[0].layer[0].SelfAttention.q, torch.nn.Linear)
    want, got = halfbyte.bitsandbytes_state_dict(ref), halfbyte.bitsandbytes_state_dict(model)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _reference_image(flux_dir, seed: int) -> np.ndarray:
    """What ``generate --quant transformer=nf4 --quant text_encoder_2=int8`` should produce, built here."""
    import transformers

    nf4 = halfbyte.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    parts = {"transformer": halfbyte.from_pretrained(diffusers.FluxTransformer2DModel, flux_dir,
                                                     subfolder="transformer", quantization_config=nf4,
                                                     torch_dtype=torch.float32),
             "text_encoder_2": halfbyte.from_pretrained(transformers.T5EncoderModel, flux_dir,
                                                        subfolder="text_encoder_2", torch_dtype=torch.float32,
                                                        quantization_config=halfbyte.BitsAndBytesConfig(
                                                            load_in_8bit=True))}
    pipe = diffusers.FluxPipeline.from_pretrained(flux_dir, dtype=torch.float32, **parts)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe("a photo of a cat", height=32, width=48, num_inference_steps=3, guidance_scale=3.5,
                           max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(seed)).images[0])


def test_generate(flux_dir, tmp_path):
    """Per-component formats on the fly from a Hub id; the PNG is the image the library makes for the same
    settings and seed, and carries prompt, seed and settings; seconds per step and memory are reported."""
    png = tmp_path / "cat.png"
    # the reference image is made on the CPU in float32; on a GPU the command would run in bfloat16 there
    on_cpu = ["--device", "cpu"] if torch.cuda.is_available() else []
    proc = halfbyte_cli("generate", "--model", REPO_ID, "--prompt", "a photo of a cat", "-o", str(png),
                        "--quant", "transformer=nf4", "--quant", "text_encoder_2=int8", "--steps", "3",
                        "--height", "32", "--width", "48", "--seed", "7", "--max-sequence-length", "16", "--json",
                        *on_cpu)
    result = json.loads(proc.stdout)
    assert result["settings"]["quantized"] == {"transformer": "nf4", "text_encoder_2": "int8"}
    assert result["seconds_per_step"] > 0 and result["generate_seconds"] > 0
    if not torch.cuda.is_available():
        assert "no CUDA GPU found; running on the CPU" in proc.stderr
        assert result["peak_gpu_memory_bytes"] is None and result["peak_host_memory_bytes"] > 0
    image = Image.open(png)
    assert image.text["prompt"] == "a photo of a cat" and image.text["seed"] == "7"
    settings = json.loads(image.text["settings"])
    assert settings == result["settings"] and settings["steps"] == 3 and settings["guidance"] == 3.5
    np.testing.assert_array_equal(np.asarray(image), _reference_image(flux_dir, seed=7))
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]  # no temporary file left


def test_generate_sd3_prequantized(tmp_path, capsys):
    """SD3: quantize the default components (transformer, text_encoder_3), then generate from that directory,
    where they load pre-quantized; the human-readable report names s/step and peak memory."""
    sd3 = save_tiny_sd3_pipeline(tmp_path / "sd3")
    code, out, err = run_main(capsys, "quantize", str(sd3), str(tmp_path / "sd3-q"), "--quiet", "--json")
    assert code == 0, err
    assert {r["component"] for r in json.loads(out)["components"]} == {"transformer", "text_encoder_3"}
    code, out, err = run_main(capsys, "generate", "--model", str(tmp_path / "sd3-q"), "--prompt", "a dog", "-o",
                              str(tmp_path / "dog.png"), "--steps", "2", "--height", "32", "--width", "32",
                              "--max-sequence-length", "16", "--device", "cpu")
    assert code == 0, err
    assert "s/step" in out and "peak GPU memory" in out and "transformer nf4" in out
    assert "(pre-quantized)" in err
    assert Image.open(tmp_path / "dog.png").size == (32, 32)


def test_generate_compile_is_accepted(quantized, tmp_path, capsys, monkeypatch):
    """--compile compiles the transformer with fullgraph=True (here with the eager backend: dynamo traces the
    quantized FLUX transformer as one graph, without Inductor's minute of C++ compilation on a CPU)."""
    calls = []
    original = torch.nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        calls.append((type(self).__name__, kwargs))
        return original(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    code, _, err = run_main(capsys, "generate", "--model", str(quantized[0]), "--prompt", "a cat", "-o",
                            str(tmp_path / "c.png"), "--steps", "2", "--height", "32", "--width", "32",
                            "--max-sequence-length", "16", "--compile", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert calls == [("FluxTransformer2DModel", {"fullgraph": True})]


def test_inspect(quantized, flux_dir):
    """Per component and layer: format, shape and bytes from the headers alone, matching the loaded model; totals
    against bf16."""
    out, summary = quantized
    report = json.loads(halfbyte_cli("inspect", str(out), "--json").stdout)
    comps = {c["component"]: c for c in report["components"]}
    assert set(comps) == {"transformer", "text_encoder_2", "text_encoder", "vae"}
    assert set(report["other_components"]) == {"scheduler", "tokenizer", "tokenizer_2"}
    pipe = diffusers.FluxPipeline.from_pretrained(out, dtype=torch.float32)
    for name in ("transformer", "text_encoder_2"):
        c, model = comps[name], getattr(pipe, name)
        assert c["format"] == "halfbyte nf4" and c["quantization_config"]["quant_method"] == "halfbyte"
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED)}
        rows = {r["name"]: r for r in c["layers"] if r["quantized"]}
        assert {n: r["shape"] for n, r in rows.items()} == {n: [m.out_features, m.in_features]
                                                            for n, m in layers.items()}
        files = [out / name / f for f in os.listdir(out / name) if f.endswith(".safetensors")]
        header = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
        assert c["bytes"] == sum(f.stat().st_size for f in files) - header
        assert c["bf16_bytes"] > c["bytes"]
    t5 = comps["text_encoder_2"]  # T5 keeps its `wo` layers (_keep_in_fp32_modules) and embeddings dense
    assert any(n.endswith("DenseReluDense.wo") for n in t5["float_matrices"])
    vae = comps["vae"]  # float32 on disk: exactly twice its bf16 size
    assert vae["format"] == "float float32" and vae["bytes"] == 2 * vae["bf16_bytes"]
    assert report["total"]["bytes"] == sum(c["bytes"] for c in comps.values())


def test_inspect_bitsandbytes_checkpoint(capsys):
    """A checkpoint diffusers + bitsandbytes wrote (on an H100): the format from its headers and quant states."""
    code, out, _ = run_main(capsys, "inspect", str(BNB_NF4), "--json")
    assert code == 0
    c = json.loads(out)["components"][0]
    assert c["format"] == "bitsandbytes nf4" and c["class"] == "FluxTransformer2DModel"
    model = diffusers.FluxTransformer2DModel.from_config(diffusers.FluxTransformer2DModel.load_config(BNB_NF4))
    linears = {n: [m.out_features, m.in_features] for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert {r["name"]: r["shape"] for r in c["layers"] if r["quantized"]} == linears
    assert all(r["blocksize"] == 64 for r in c["layers"] if r["quantized"])
    code, out, _ = run_main(capsys, "inspect", str(BNB_NF4), "--summary")
    assert code == 0 and "bitsandbytes nf4" in out and "smaller than bf16" in out


def test_inspect_hub_reads_headers_remotely(quantized, tmp_path, capsys, monkeypatch):
    """A Hub id whose weights are not in the cache: only the JSON files are fetched and the safetensors headers
    are read remotely (here: huggingface_hub's header reader answered from the local files), never the weights."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

    out = quantized[0]
    jsons = tmp_path / "jsons"
    for f in out.rglob("*.json"):
        (jsons / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, jsons / f.relative_to(out))
    make_hub_cache(os.environ["HF_HUB_CACHE"], "halfbyte-cli/json-only", jsons)
    asked = []

    def header(self, repo_id, filename, revision=None, **kwargs):
        raw = (out / filename).read_bytes()  # a missing file raises, as the Hub answers 404
        asked.append(filename)
        head = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        head.pop("__metadata__", None)
        return SafetensorsFileMetadata({}, {k: TensorInfo(v["dtype"], v["shape"], tuple(v["data_offsets"]))
                                            for k, v in head.items()})

    monkeypatch.setattr(HfApi, "parse_safetensors_file_metadata", header)
    code, stdout, err = run_main(capsys, "inspect", "halfbyte-cli/json-only", "--json")
    assert code == 0, err
    remote = {c["component"]: c for c in json.loads(stdout)["components"]}
    code, stdout, _ = run_main(capsys, "inspect", str(out), "--json")
    local = {c["component"]: c for c in json.loads(stdout)["components"]}
    assert set(asked) == {f"{name}/{f.name}" for name in local for f in (out / name).glob("*.safetensors")}
    for name, c in local.items():  # the same, except the 4-bit shapes that live in the (unread) quant states
        assert (remote[name]["bytes"], remote[name]["bf16_bytes"]) == (c["bytes"], c["bf16_bytes"])
        assert [r["format"] for r in remote[name]["layers"]] == [r["format"] for r in c["layers"]]
    assert all(r["shape"] is None for r in remote["transformer"]["layers"] if r["quantized"])


def test_bench():
    proc = halfbyte_cli("bench", "--device", "cpu", "--tokens", "4", "--scale", "16", "--warmup", "0",
                        "--repeat", "1", "--formats", "nf4", "int8", "--json")
    report = json.loads(proc.stdout)
    shapes = {(r["in_features"], r["out_features"]) for r in report["results"]}
    assert shapes == {(k // 16, n // 16) for k, n, _ in halfbyte.cli.bench.LAYERS}
    formats = {r["format"] for r in report["results"]}
    assert {"bf16", "nf4", "int8"} <= formats
    assert ("bnb nf4" in formats) == (report["bitsandbytes"] is not None)
    assert all(r["ms"] > 0 and r["tokens"] == 4 for r in report["results"])


def test_bench_fp8_format(capsys, monkeypatch):
    """"nf4+fp8": the NF4 layers with the opt-in fp8 compute, timed beside plain NF4 (80 tokens: the fp8 path)."""
    import halfbyte.ops_fp8

    calls = []
    forward = halfbyte.ops_fp8.forward
    monkeypatch.setattr(halfbyte.ops_fp8, "forward", lambda *a: calls.append(1) or forward(*a))
    code, out, err = run_main(capsys, "bench", "--device", "cpu", "--tokens", "80", "--scale", "16", "--warmup",
                              "0", "--repeat", "1", "--formats", "nf4", "nf4+fp8", "--no-bitsandbytes", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    fp8 = [r for r in rows if r["format"] == "nf4+fp8"]
    assert len(fp8) == len(halfbyte.cli.bench.LAYERS) and all(r["ms"] > 0 for r in fp8)
    assert len(calls) >= len(fp8)


def test_bench_transformer(capsys):
    """The whole-model mode: a FLUX-architecture transformer (widths / 24), one forward per format."""
    code, out, err = run_main(capsys, "bench", "transformer", "--device", "cpu", "--scale", "24", "--blocks", "1", "1",
                              "--tokens", "16", "--text-tokens", "8", "--warmup", "0", "--repeat", "1", "--json")
    assert code == 0, err
    rows = {r["format"]: r for r in json.loads(out)["results"]}
    assert {"bf16", "nf4", "nf4+dq", "int8"} <= set(rows) and all(r["ms"] > 0 for r in rows.values())
    # 4-bit with 8-bit statistics < 4-bit < 8-bit < bf16
    assert rows["nf4+dq"]["bytes"] < rows["nf4"]["bytes"] < rows["int8"]["bytes"] < rows["bf16"]["bytes"]


def test_demo(tmp_path, capsys):
    """The README's first command (run as a console script in a fresh environment by test_readme_commands.py);
    here with --out and --json, checked against the checkpoints it leaves."""
    code, out, err = run_main(capsys, "demo", "--out", str(tmp_path), "--size", "32", "--steps", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["quantized_layers"] == {"transformer": 30, "text_encoder_2": 12} and not result["problems"]
    pipe = diffusers.FluxPipeline.from_pretrained(tmp_path / "flux-tiny-nf4")
    tiny = {r["component"]: r for r in result["tiny_pipeline"]}
    assert tiny["transformer"]["quantized_bytes"] == halfbyte.memory_footprint(pipe.transformer)
    assert Image.open(result["image"]).size == (32, 32)
    full = {r["component"]: r for r in result["flux1_dev"]}
    assert full["transformer"]["parameters"] > 11e9 and full["transformer"]["format"] == "nf4"
    # 4 bits per weight plus a float32 absmax per 64: 0.28x of bf16 for the Linear weights that dominate
    assert 0.27 < full["transformer"]["quantized_bytes"] / full["transformer"]["bf16_bytes"] < 0.3


@pytest.mark.parametrize("args, code, message", [
    (["quantize", "halfbyte-cli/no-such-model", "{tmp}/o"], _common.NOT_FOUND, "HF_HUB_OFFLINE"),
    (["quantize", "{flux}", "{tmp}/o", "--subfolder", "nope"], _common.NOT_FOUND, "no subfolder 'nope'"),
    (["quantize", "{flux}", "{tmp}/o", "--component", "nope"], _common.NOT_FOUND, "no component 'nope'"),
    (["generate", "--model", "{flux}", "--prompt", "a", "-o", "{tmp}/x.png", "--quant", "unet=nf4"],
     _common.NOT_FOUND, "no component 'unet'"),
    (["inspect", "{tmp}/missing"], _common.NOT_FOUND, "no such directory"),
    (["quantize", "{flux}", "{tmp}/o", "--component", "tokenizer"], _common.USAGE, "not a model"),
    (["quantize", "{flux}", "{tmp}/o", "--quant", "none"], _common.USAGE, "nothing to quantize"),
    (["quantize", "{flux}", "{tmp}/o", "--quant", "int8", "--double-quant"], _common.USAGE, "4-bit formats"),
    (["quantize", "{flux}", "{tmp}/o", "--threshold", "3"], _common.USAGE, "--threshold applies to int8"),
    (["quantize", "{flux}/vae", "{tmp}/o", "--quant", "vae=nf4"], _common.USAGE, "COMPONENT=KIND is for pipelines"),
    (["quantize", "{flux}", "{flux}/transformer"], _common.USAGE, "not empty"),
    (["quantize", "{flux}", "{tmp}/o", "--subfolder", "vae", "--component", "vae"], _common.USAGE, "not allowed"),
    (["generate", "--model", "{flux}", "--prompt", "a", "-o", "{tmp}/x.jpg"], _common.USAGE, "PNG"),
    (["generate", "--model", "{flux}", "--prompt", "a", "-o", "{tmp}/x.png", "--height", "40"], _common.USAGE,
     "multiple of 16"),
    (["generate", "--model", "{flux}", "--prompt", "a", "-o", "{tmp}/x.png", "--offload", "model",
      "--device", "cpu"], _common.USAGE, "--offload none on the CPU"),
    (["generate", "--model", "{flux}/transformer", "--prompt", "a", "-o", "{tmp}/x.png"], _common.USAGE,
     "needs a pipeline"),
    (["generate", "--model", "{flux}", "--prompt", "a", "-o", "{tmp}/no/x.png"], _common.NOT_FOUND,
     "does not exist"),
])
def test_errors(capsys, tmp_path, flux_dir, args, code, message):
    args = [a.format(tmp=tmp_path, flux=flux_dir) for a in args]
    got, out, err = run_main(capsys, *args)
    assert got == code and message in err, (got, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", [["bench"],
                                     ["generate", "--model", "{flux}", "--prompt", "a", "-o", "{tmp}/x.png"]])
def test_cuda_refused_without_gpu(capsys, tmp_path, flux_dir, command):
    args = [a.format(tmp=tmp_path, flux=flux_dir) for a in command]
    code, _, err = run_main(capsys, *args, "--device", "cuda")
    assert code == _common.NO_DEVICE and "no CUDA GPU is available" in err


def test_failed_quantize_leaves_nothing(flux_dir, tmp_path, capsys):
    """A truncated shard: exit status FAILED naming the file; no OUT and no temporary directory are left."""
    src = tmp_path / "src"
    shutil.copytree(flux_dir, src)
    shard = src / "transformer" / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    code, _, err = run_main(capsys, "quantize", str(src), str(tmp_path / "out"))
    assert code == _common.FAILED and str(shard) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    code, _, err = run_main(capsys, "inspect", str(src / "transformer"))
    assert code == _common.FAILED and "truncated" in err


def test_atomic_write(tmp_path):
    target = tmp_path / "image.png"
    target.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        _common.atomic_write(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["image.png"]
    _common.atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["image.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() would create it, not private


@pytest.mark.parametrize("mode", ["model", "pipeline"])
def test_quantize_durable_fsyncs_every_file_and_default_none(flux_dir, tmp_path, capsys, monkeypatch, mode):
    """--durable: every file of OUT reaches the disk before OUT is renamed into place; the default, like the
    libraries' own saves, leaves that to the OS (OUT is atomic against failures either way)."""
    from halfbyte.io import safetensors_stream

    synced = []
    real = safetensors_stream._fsync
    monkeypatch.setattr(safetensors_stream, "_fsync", lambda p: (synced.append(Path(p).name), real(p)))
    where = ["--subfolder", "text_encoder_2"] if mode == "model" else ["--component", "text_encoder_2"]
    code, _, err = run_main(capsys, "quantize", str(flux_dir), str(tmp_path / "a"), *where, "--quant", "nf4")
    assert code == 0, err
    assert synced == []
    code, _, err = run_main(capsys, "quantize", str(flux_dir), str(tmp_path / "b"), *where, "--quant", "nf4",
                            "--durable")
    assert code == 0, err
    written = {p.name for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert written and written <= set(synced)


def test_generate_fp8_compute(quantized, tmp_path, capsys, monkeypatch):
    """--fp8-compute switches the pipeline's 4-bit layers to fp8 compute (``halfbyte.set_fp8_compute``; on the CPU
    its reference runs). At 144x128 the image stream has 72 tokens, so the eligible layers (in_features 128: the
    feed-forward down projections) take the fp8 path; where no layer can, the command stops before generating."""
    import halfbyte.ops_fp8

    calls = []
    forward = halfbyte.ops_fp8.forward
    monkeypatch.setattr(halfbyte.ops_fp8, "forward", lambda *a: calls.append(a[0].shape) or forward(*a))
    args = ("generate", "--model", str(quantized[0]), "--prompt", "a cat", "--steps", "1", "--height", "144",
            "--width", "128", "--max-sequence-length", "16", "--fp8-compute", "--device", "cpu", "--json")
    code, out, err = run_main(capsys, *args, "-o", str(tmp_path / "c.png"))
    assert code == 0, err
    assert json.loads(out)["settings"]["fp8_compute"] is True and calls
    assert "fp8 compute in" in err and "emulated on the CPU" in err
    monkeypatch.setattr(halfbyte, "set_fp8_compute", lambda model: [])
    code, _, err = run_main(capsys, *args, "-o", str(tmp_path / "d.png"))
    assert code == _common.USAGE and "--fp8-compute: no 4-bit layer here can compute in fp8" in err
    assert not (tmp_path / "d.png").exists()
