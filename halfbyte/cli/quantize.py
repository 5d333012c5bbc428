"""Quantize a checkpoint (a diffusers pipeline or one model) and write a loadable quantized checkpoint.

SRC is a local directory or a Hugging Face Hub id. Weights stream from the safetensors files: one floating-point
tensor at a time is read, quantized and dropped, so the floating-point model never exists in memory. For a
pipeline, the chosen components (default: FLUX's transformer and text_encoder_2, SD3's transformer and
text_encoder_3) are quantized and every other component is copied as it is, so FluxPipeline.from_pretrained(OUT)
loads the result once halfbyte is imported. A single model (SRC with config.json, or --subfolder) becomes a model
directory. OUT is written atomically: a failure leaves no partial OUT.

examples:
  halfbyte quantize black-forest-labs/FLUX.1-dev flux-nf4
  halfbyte quantize black-forest-labs/FLUX.1-dev flux-t5-int8 --component text_encoder_2 --quant int8
  halfbyte quantize black-forest-labs/FLUX.1-dev flux-transformer-nf4 --subfolder transformer --double-quant
"""

import argparse
import gc
import shutil
import time
from pathlib import Path

from ._common import (
    DEFAULT_COMPONENTS,
    NOT_FOUND,
    USAGE,
    CliError,
    add_config_args,
    check_config_flags,
    class_of_model_dir,
    config_for,
    dtype_of,
    file_bytes,
    human_bytes,
    kind_of,
    model_class,
    notice,
    open_source,
    parse_quant_map,
    print_json,
    quiet_hf_libraries,
    resolve_device,
    table,
    weight_files,
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a local directory or a Hub id: a diffusers pipeline or one model")
    p.add_argument("out", metavar="OUT", help="the directory to write (must not exist or be empty, or --overwrite)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--subfolder", help="quantize the one model in this folder of SRC (OUT is a model directory)")
    where.add_argument("--component", action="append", default=[], metavar="NAME",
                       help="pipeline component to quantize (repeatable; default the pipeline's transformer and T5 "
                            "text encoder); the others are copied")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    add_config_args(p, per_component=True)
    p.add_argument("--bitsandbytes-compatible", action="store_true",
                   help="write the quantization config as bitsandbytes does, for loaders without halfbyte")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="dtype of the unquantized tensors and of the weights before quantization (default: as "
                        "stored)")
    p.add_argument("--device", default="auto", help="where to quantize: auto (default), cpu, cuda, cuda:N")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--durable", action="store_true",
                   help="fsync every file before OUT is renamed into place, so that a machine crash or power loss "
                        "cannot leave a half-written OUT either (waits for the disk; without it a failed or "
                        "interrupted run still leaves no partial OUT)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite)
    quiet_hf_libraries(args)
    source = open_source(args.src, args.revision, args.subfolder)
    if source.root.resolve() == out.resolve() or source.root.resolve() in out.resolve().parents \
            or out.resolve() in source.root.resolve().parents:
        raise CliError(f"OUT {out} and SRC {source.root} overlap: write the quantized checkpoint elsewhere", USAGE)
    if source.index is None:
        plan = _single_model_plan(args)
    else:
        plan = plan_components(source, args.component, args.quant)
    check_config_flags(args, {k for k in plan.values() if k})
    device = resolve_device(args.device, args)
    dtype = None if args.dtype == "auto" else dtype_of(args.dtype)

    if source.index is None:
        library, name = class_of_model_dir(source.root)
        cls = model_class(library, name, str(source.root / "config.json"))
        rows = [quantize_model(cls, source.root, out, config_for(plan[""], args), dtype, device, args, name="")]
        copied: list[str] = []
    else:
        rows, copied = quantize_pipeline(source, out, plan, dtype, device, args)
    summary = {"source": args.src, "output": str(out), "kind": "pipeline" if source.index is not None else "model",
               "device": str(device), "components": rows, "copied": copied}
    if args.json:
        print_json(summary)
    else:
        _print_summary(summary)
    return 0


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"OUT {out} exists and is a file", USAGE)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(f"OUT {out} exists and is not empty; pass --overwrite to replace it", USAGE)


def _single_model_plan(args: argparse.Namespace) -> dict[str, str]:
    kind = "nf4"
    for value in args.quant:
        if "=" in value:
            raise CliError(f"--quant {value!r}: COMPONENT=KIND is for pipelines, but {args.src} is a single model "
                           "(no model_index.json); give the format alone", USAGE)
        kind = parse_quant_map([value], ("",))[""]
        if kind is None:
            raise CliError("--quant none: a single model has nothing else to do; choose nf4, fp4 or int8", USAGE)
    return {"": kind}


def plan_components(source, chosen: list[str], quant: list[str], allow_none: bool = False) -> dict[str, str | None]:
    """{component: kind or None} for a pipeline: ``chosen`` (--component) or the pipeline's defaults, then the
    ``--quant`` values. Every named component must exist and be a model; unless ``allow_none``, one must be
    quantized."""
    cls_name = source.index.get("_class_name", "")
    defaults = tuple(chosen) or DEFAULT_COMPONENTS.get(cls_name) \
        or (("transformer",) if "transformer" in source.components else ())
    if not defaults and not any("=" in q for q in quant):
        raise CliError(f"{source.text}: no default components to quantize for a {cls_name or 'pipeline'}; name them "
                       f"with --component (components: {', '.join(source.components)})", USAGE)
    plan = parse_quant_map(quant, defaults)
    for name, kind in plan.items():
        source.component_dir(name)
        library, cls = source.components[name]
        if kind is not None and not _is_model(library, cls):
            raise CliError(f"{source.text}: component {name!r} is a {library} {cls}, not a model; only models are "
                           "quantized", USAGE)
    if not any(plan.values()) and not allow_none:
        raise CliError("--quant leaves every component in floating point: nothing to quantize", USAGE)
    return plan


def _is_model(library: str, cls_name: str) -> bool:
    if library not in ("diffusers", "transformers"):
        return False
    cls = getattr(__import__(library), cls_name, None)
    base = "ModelMixin" if library == "diffusers" else "PreTrainedModel"
    return cls is not None and any(b.__name__ == base for b in cls.__mro__)


def quantize_pipeline(source, out: Path, plan: dict[str, str | None], dtype, device, args) -> tuple[list, list]:
    """Write ``source`` (a pipeline) to ``out`` with the components of ``plan`` quantized, the others copied;
    atomically. Returns (one summary dict per quantized component, names of copied components)."""
    from ..io.safetensors_stream import atomic_directory

    rows, copied = [], []
    with atomic_directory(out, replaced=lambda name: True, durable=args.durable) as tmp:
        shutil.copy2(source.root / "model_index.json", tmp / "model_index.json")
        todo = [n for n in source.components if plan.get(n)]
        for i, name in enumerate(todo, 1):
            library, cls_name = source.components[name]
            cls = model_class(library, cls_name, str(source.root / "model_index.json"))
            notice(args, f"[{i}/{len(todo)}] {name} ({cls_name}) -> {plan[name]}")
            rows.append(quantize_model(cls, source.component_dir(name), tmp / name, config_for(plan[name], args),
                                       dtype, device, args, name=name))
        for name in source.components:
            if not plan.get(name):
                directory = source.root / name
                if not directory.is_dir():
                    raise CliError(f"{source.text}: model_index.json lists {name!r}, but {directory} does not "
                                   "exist", NOT_FOUND)
                shutil.copytree(directory, tmp / name)  # follows the Hub cache's symlinks: real files in OUT
                copied.append(name)
    return rows, copied


def quantize_model(cls, directory: Path, dest: Path, config, dtype, device, args, name: str) -> dict:
    """Stream-quantize the model in ``directory`` with ``config`` and save it to ``dest``; a summary dict."""
    import torch

    import halfbyte

    from ..convert import QUANTIZED_LINEARS

    if not weight_files(directory):
        raise CliError(f"{directory} holds no safetensors weights (diffusion_pytorch_model*.safetensors or "
                       "model*.safetensors); halfbyte reads safetensors only", NOT_FOUND)
    start = time.perf_counter()
    model = halfbyte.from_pretrained(cls, directory, quantization_config=config, torch_dtype=dtype, device=device)
    loaded = time.perf_counter()
    # Record the floating-point dtype, so that a library's from_pretrained(OUT) without torch_dtype restores it
    # (diffusers would otherwise pick float16).
    config = halfbyte.BitsAndBytesConfig.from_dict(
        {**config.to_dict(), "_pre_quantization_dtype": str(model.dtype).removeprefix("torch.")})
    model._halfbyte_config = config
    halfbyte.save_pretrained(model, dest, bitsandbytes_compatible=args.bitsandbytes_compatible,
                             max_shard_size=args.max_shard_size, durable=args.durable and not name)
    row = {"component": name or None, "class": cls.__name__, "format": kind_of(config),
           "quantization_config": config.to_bitsandbytes_dict() if args.bitsandbytes_compatible else config.to_dict(),
           "layers_quantized": sum(isinstance(m, QUANTIZED_LINEARS) for m in model.modules()),
           "source_bytes": file_bytes(weight_files(directory)), "output_bytes": file_bytes(weight_files(dest)),
           "quantize_seconds": round(loaded - start, 3), "save_seconds": round(time.perf_counter() - loaded, 3)}
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _print_summary(summary: dict) -> None:
    rows = [[r["component"] or "(model)", r["class"], r["format"], str(r["layers_quantized"]),
             human_bytes(r["source_bytes"]), human_bytes(r["output_bytes"]),
             f"{r['source_bytes'] / max(r['output_bytes'], 1):.2f}x", f"{r['quantize_seconds']:.1f} s"]
            for r in summary["components"]]
    print(table(rows, ["component", "class", "format", "layers", "source", "quantized", "smaller", "time"],
                right={3, 4, 5, 6, 7}))
    if summary["copied"]:
        print(f"copied as is: {', '.join(summary['copied'])}")
    print(f"wrote {summary['output']}")
