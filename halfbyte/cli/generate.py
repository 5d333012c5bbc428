"""Generate an image with a FLUX or SD3 pipeline whose big components are quantized while loading.

--model is a local pipeline directory or a Hub id. The components named by --quant (default: FLUX's transformer
and text_encoder_2, SD3's transformer and text_encoder_3, in nf4) are quantized while streaming from their
safetensors files; components that are already quantized (halfbyte or bitsandbytes checkpoints) load as they are.
The PNG is written atomically, with the prompt, seed and settings in its metadata (text chunks "prompt", "seed",
"settings" as JSON). Prints the seconds per denoising step and the peak GPU memory. On a GPU (without --offload) the
kernels of a step's quantized layers compile ahead, side by side (``halfbyte.precompile``), before the steps.

examples:
  halfbyte generate --model black-forest-labs/FLUX.1-dev --prompt "a photo of a cat" -o cat.png
  halfbyte generate --model flux-nf4 --prompt "a cat" --steps 4 --offload model -o cat.png
  halfbyte generate --model black-forest-labs/FLUX.1-dev --quant transformer=nf4 --quant text_encoder_2=int8 ...
"""

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

from ._common import (
    NOT_FOUND,
    USAGE,
    CliError,
    add_config_args,
    atomic_write,
    check_config_flags,
    config_for,
    dtype_of,
    human_bytes,
    is_quantized_dir,
    model_class,
    notice,
    open_source,
    print_json,
    quiet_hf_libraries,
    resolve_device,
)
from .quantize import plan_components

PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="ID_OR_DIR", help="a FLUX or SD3 pipeline: Hub id or directory")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("-o", "--output", required=True, metavar="IMAGE.png", help="where to write the PNG")
    add_config_args(p, per_component=True)
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's, 28)")
    g.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 16 (default 1024)")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 16 (default 1024)")
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the pipeline's: FLUX 3.5, SD3 7.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    g.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 prompt tokens (default: the pipeline's: FLUX 512, SD3 256)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (default: CUDA if available, else the CPU), cpu, cuda, "
                                                    "cuda:N")
    r.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="dtype of the unquantized tensors and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    r.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                   help="keep components on the CPU and move them to the GPU when used: whole models (model) or "
                        "layer by layer (sequential); needs a GPU")
    r.add_argument("--compile", action="store_true", help="torch.compile the transformer (fullgraph)")
    r.add_argument("--fp8-compute", action="store_true",
                   help="4-bit components run calls over 64 tokens on the fp8 tensor cores (halfbyte.set_fp8_compute: "
                        "faster than bf16 on Ada/Hopper GPUs, less precise than bitsandbytes; on the CPU emulated)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")


def _check_args(args: argparse.Namespace) -> Path:
    out = Path(args.output).expanduser()
    if out.suffix.lower() != ".png":
        raise CliError(f"-o {args.output}: halfbyte generate writes PNG files; name it *.png", USAGE)
    if not out.parent.is_dir():
        raise CliError(f"-o {args.output}: the directory {out.parent} does not exist", NOT_FOUND)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % 16:
            raise CliError(f"{flag} {value}: must be a positive multiple of 16 (the VAE's factor 8 times the "
                           "transformer's 2x2 patches)", USAGE)
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps {args.steps}: at least 1 step", USAGE)
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise CliError(f"--max-sequence-length {args.max_sequence_length}: at least 1", USAGE)
    return out


def run(args: argparse.Namespace) -> int:
    out = _check_args(args)
    device = resolve_device(args.device, args)
    if args.offload != "none" and device.type != "cuda":
        raise CliError(f"--offload {args.offload} moves components between the CPU and a GPU, but the device is "
                       f"{device}; use --offload none on the CPU", USAGE)
    dtype = dtype_of(args.dtype) if args.dtype != "auto" else dtype_of("bfloat16" if device.type == "cuda"
                                                                        else "float32")
    quiet_hf_libraries(args)
    import torch

    source = open_source(args.model, args.revision)
    if source.index is None:
        raise CliError(f"--model {args.model}: a single model (config.json, no model_index.json); generate needs a "
                       f"pipeline ({', '.join(PIPELINES)})", USAGE)
    pipeline_name = source.index.get("_class_name")
    if pipeline_name not in PIPELINES:
        raise CliError(f"--model {args.model} is a {pipeline_name}; halfbyte generate runs {', '.join(PIPELINES)}",
                       USAGE)
    plan = plan_components(source, [], args.quant, allow_none=True)  # --quant none: the unquantized baseline
    check_config_flags(args, {k for k in plan.values() if k})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    pipe, formats = _load(source, plan, dtype, device, args)
    loaded = time.perf_counter()
    if device.type == "cuda":
        load_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    if args.fp8_compute:
        _fp8_compute(pipe, device, args)
    defaults = inspect.signature(type(pipe).__call__).parameters
    steps = args.steps or defaults["num_inference_steps"].default
    guidance = args.guidance if args.guidance is not None else defaults["guidance_scale"].default
    max_len = args.max_sequence_length or defaults["max_sequence_length"].default
    ahead = None
    if device.type == "cuda" and args.offload == "none":
        # Triton compiles each kernel at its first launch, one after another (10-30 s on a fresh machine): compile
        # what a step's quantized layers run, side by side, before it (halfbyte.precompile; with --offload the
        # weights are not on the GPU between calls, so they are left to compile on first use)
        from ..precompiler import precompile

        with torch.inference_mode():
            ahead = precompile(pipe, prompt=args.prompt, height=args.height, width=args.width, num_inference_steps=1,
                               guidance_scale=guidance, max_sequence_length=max_len, output_type="latent",
                               generator=torch.Generator("cpu").manual_seed(args.seed))
        notice(args, f"compiled the kernels of {ahead['distinct']} distinct quantized-layer calls ahead in "
                     f"{ahead['seconds']:.1f} s")
    if args.compile:
        notice(args, "compiling the transformer (the first step includes the compilation)")
        pipe.transformer.compile(fullgraph=True)

    settings = {
        "model": args.model, "pipeline": pipeline_name, "steps": steps, "height": args.height, "width": args.width,
        "seed": args.seed, "guidance": guidance, "max_sequence_length": max_len,
        "quantized": formats, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "offload": args.offload, "compile": args.compile, "fp8_compute": args.fp8_compute,
    }
    stamps: list[float] = []

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels are done: its time is real
        stamps.append(time.perf_counter())
        return callback_kwargs

    pipe.set_progress_bar_config(disable=args.quiet or not sys.stderr.isatty(), desc="Denoising")
    begin = time.perf_counter()
    with torch.inference_mode():
        image = pipe(prompt=args.prompt, height=args.height, width=args.width,
                     num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                     max_sequence_length=settings["max_sequence_length"],
                     generator=torch.Generator("cpu").manual_seed(args.seed), callback_on_step_end=on_step_end,
                     ).images[0]
    done = time.perf_counter()
    _write_png(image, out, args.prompt, args.seed, settings)

    # The first step pays warm-up (and compilation): seconds per step are measured from the first step's end.
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else stamps[0] - begin
    result = {"output": str(out), "settings": settings, "load_seconds": round(loaded - started, 3),
              "precompile_seconds": None if ahead is None else round(ahead["seconds"], 3),
              "generate_seconds": round(done - begin, 3), "first_step_seconds": round(stamps[0] - begin, 3),
              "seconds_per_step": round(per_step, 4),
              "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
              "peak_gpu_memory_load_bytes": load_peak if device.type == "cuda" else None,
              "peak_host_memory_bytes": _peak_rss()}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {out} ({args.width}x{args.height}, {settings['steps']} steps, seed {args.seed}); "
              f"quantized: {', '.join(f'{k} {v}' for k, v in formats.items()) or 'nothing'}")
        print(f"{per_step:.3f} s/step ({settings['steps']} steps in {done - begin:.1f} s; "
              f"loading took {loaded - started:.1f} s)")
        if device.type == "cuda":
            print(f"peak GPU memory: {human_bytes(result['peak_gpu_memory_bytes'])} while generating, "
                  f"{human_bytes(load_peak)} while loading")
        else:
            rss = result["peak_host_memory_bytes"]
            print(f"peak GPU memory: none (ran on the CPU); peak host memory {human_bytes(rss) if rss else '?'}")
    return 0


def _load(source, plan: dict, dtype, device, args) -> tuple:
    """The pipeline with its quantized components built by halfbyte's streaming loader, placed per --offload.
    Returns (pipeline, {component: format})."""
    import halfbyte

    from ..convert import quantization_config_of
    from ._common import kind_of

    explicit = {v.rpartition("=")[0].strip() for v in args.quant if "=" in v}
    bare = any("=" not in v for v in args.quant)
    load_device = device if args.offload == "none" else "cpu"
    components, formats = {}, {}
    for name, (library, cls_name) in source.components.items():
        directory = source.component_dir(name)
        pre = is_quantized_dir(directory)
        if not plan.get(name) and not pre:
            continue
        # A pre-quantized component keeps its format; a --quant for it is checked against the checkpoint.
        given = plan.get(name) and (not pre or name in explicit or bare)
        cfg = config_for(plan[name], args) if given else None
        cls = model_class(library, cls_name, str(source.root / "model_index.json"))
        notice(args, f"loading {name} ({cls_name})" + (f" -> {plan[name]}" if given and not pre else
                                                        " (pre-quantized)" if pre else ""))
        model = halfbyte.from_pretrained(cls, directory, quantization_config=cfg, torch_dtype=dtype,
                                         device=load_device)
        components[name] = model
        formats[name] = kind_of(quantization_config_of(model))
    pipeline_cls = model_class("diffusers", source.index["_class_name"], str(source.root / "model_index.json"))
    pipe = pipeline_cls.from_pretrained(source.root, dtype=dtype, **components)
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe, formats


def _fp8_compute(pipe, device, args) -> None:
    """--fp8-compute: ``halfbyte.set_fp8_compute`` on every model of the pipeline; an error if no layer takes it."""
    import torch

    import halfbyte

    switched = []
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            try:
                switched += [f"{name}.{layer}" for layer in halfbyte.set_fp8_compute(component)]
            except ValueError as e:
                raise CliError(f"--fp8-compute: {e}", USAGE) from e
    if not switched:
        raise CliError("--fp8-compute: no 4-bit layer here can compute in fp8 (it needs 4-bit components, --quant "
                       "nf4 or fp4, whose layers have in_features a multiple of the blocksize and of 16)", USAGE)
    notice(args, f"fp8 compute in {len(switched)} 4-bit layers" + (" (emulated on the CPU: slower, same numbers)"
                                                                     if device.type != "cuda" else ""))


def _write_png(image, out: Path, prompt: str, seed: int, settings: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    from .. import __version__

    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    info.add_text("settings", json.dumps(settings, sort_keys=True))
    info.add_text("Software", f"halfbyte {__version__}")
    atomic_write(out, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _peak_rss() -> int | None:
    """Peak resident memory of this process in bytes (Linux and macOS), or None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
