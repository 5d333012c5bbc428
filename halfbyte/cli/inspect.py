"""Show what a checkpoint holds: per component and per layer the format, bytes, skipped modules, config.

PATH_OR_ID is a local directory or a Hub id: a diffusers pipeline or one model, saved by halfbyte, by
diffusers/transformers + bitsandbytes, or in floating point. Only config.json and the safetensors headers are read
(plus each 4-bit layer's small quant-state JSON, for its shape), never the weights. Totals compare the bytes on
disk with the same model in bfloat16. For a Hub id, files in the local cache are read; otherwise JSON files are
downloaded and the headers read remotely.

examples:
  halfbyte inspect flux-nf4
  halfbyte inspect hf-internal-testing/flux.1-dev-nf4-pkg --summary
  halfbyte inspect flux-nf4 --json | jq '.components[0].layers[:3]'
"""

import argparse
import json
from pathlib import Path

from ._common import FAILED, NOT_FOUND, CliError, human_bytes, open_source, print_json, read_json, table, weight_files

_FLOAT = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}
_4BIT_PARTS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_QS = "weight.quant_state.bitsandbytes__"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH_OR_ID", help="a checkpoint directory or Hub id (pipeline or model)")
    p.add_argument("--subfolder", help="inspect only the model in this folder")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--summary", action="store_true", help="per component totals only, no per-layer rows")
    p.add_argument("--json", action="store_true", help="print everything as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    source = open_source(args.path, args.revision, args.subfolder, weights=False)
    components, others = [], {}
    if source.index is None:
        components.append(inspect_model(source, source.root, None))
    else:
        for name, (library, cls) in source.components.items():
            directory = source.root / name
            row = inspect_model(source, directory, name) if (directory / "config.json").is_file() else None
            if row is not None:
                components.append(row)
            else:
                others[name] = f"{library}.{cls}"
    total = sum(c["bytes"] for c in components)
    bf16 = sum(c["bf16_bytes"] for c in components)
    report = {"source": args.path, "kind": "pipeline" if source.index is not None else "model",
              "class": (source.index or {}).get("_class_name"), "components": components,
              "other_components": others, "total": {"bytes": total, "bf16_bytes": bf16}}
    if args.json:
        print_json(report)
    else:
        _print_report(report, args.summary)
    return 0


# --- reading --------------------------------------------------------------------------------------------------------


class _LocalFile:
    """A safetensors file on disk: its header, and small tensors' bytes on demand."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > min(_MAX_HEADER, size - 8):
                raise CliError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in a file of "
                               f"{size})")
            try:
                self.tensors = json.loads(f.read(n))
            except ValueError as e:
                raise CliError(f"{path}: corrupt safetensors header ({e})") from None
        self.tensors.pop("__metadata__", None)
        self.data_start = 8 + n
        end = max((t["data_offsets"][1] for t in self.tensors.values()), default=0)
        if self.data_start + end > size:
            raise CliError(f"{path}: truncated: the header places tensors up to byte {self.data_start + end}, the "
                           f"file has {size}")

    def read(self, key: str) -> bytes:
        begin, end = self.tensors[key]["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            return f.read(end - begin)


class _RemoteFile:
    """A safetensors file on the Hub that is not in the cache: its header, read with range requests."""

    def __init__(self, repo_id: str, filename: str, revision: str | None):
        from huggingface_hub import HfApi

        try:
            meta = HfApi().parse_safetensors_file_metadata(repo_id, filename, revision=revision)
        except Exception as e:  # offline, unknown file, network errors
            raise CliError(f"{repo_id}: {filename} is not in the Hugging Face cache and its header could not be "
                           f"read from the Hub ({type(e).__name__}: {str(e).splitlines()[0]})", NOT_FOUND) from e
        self.path = Path(filename)
        self.tensors = {k: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
                        for k, t in meta.tensors.items()}

    def read(self, key: str) -> None:  # tensor data stays remote: 4-bit layers are shown without their shape
        return None


def _open_files(source, directory: Path) -> list:
    files = weight_files(directory)
    if source.repo_id is None:
        return [_LocalFile(f) for f in files]
    from huggingface_hub import try_to_load_from_cache

    index_names = files or [directory / f"{stem}.safetensors" for stem in ("diffusion_pytorch_model", "model")]
    opened = []
    for path in index_names:
        name = source.repo_path(path)
        cached = try_to_load_from_cache(source.repo_id, name, revision=source.revision)
        if isinstance(cached, str):
            opened.append(_LocalFile(Path(cached)))
        elif files:  # named by an index: it must exist
            opened.append(_RemoteFile(source.repo_id, name, source.revision))
        else:  # a single file of either stem: the first that exists
            try:
                opened.append(_RemoteFile(source.repo_id, name, source.revision))
                break
            except CliError:
                continue
    return opened


# --- analysis -------------------------------------------------------------------------------------------------------


def inspect_model(source, directory: Path, name: str | None) -> dict | None:
    """One model directory: config, format, per-layer rows and totals (see the module docstring). None for a
    pipeline component without safetensors weights (NOT_FOUND for a single model)."""
    config = read_json(directory / "config.json")
    files = _open_files(source, directory)
    if not files and name is not None:
        return None
    if not files:
        raise CliError(f"{directory} holds no safetensors weights (diffusion_pytorch_model*.safetensors or "
                       "model*.safetensors)", NOT_FOUND)
    tensors, owner = {}, {}
    for f in files:
        for key, info in f.tensors.items():
            tensors[key], owner[key] = info, f
    qc = config.get("quantization_config")
    layers, other = _layers(tensors, owner)
    quantized = [r for r in layers if r["quantized"]]
    method = qc.get("quant_method", "bitsandbytes") if isinstance(qc, dict) else None
    formats = sorted({r["format"] for r in quantized})
    if qc is not None and not quantized:
        raise CliError(f"{directory / 'config.json'} has a quantization_config, but the safetensors files hold no "
                       "quantized layer", FAILED)
    row = {
        "component": name, "class": config.get("_class_name") or (config.get("architectures") or [None])[0],
        "path": str(directory), "files": [str(f.path) for f in files],
        "format": f"{method} {'/'.join(formats)}" if quantized else "float " + "/".join(
            sorted({r["format"] for r in layers}) or ["-"]),
        "quantization_config": qc,
        "skip_modules": list((qc or {}).get("llm_int8_skip_modules") or []),
        # matrices a quantized checkpoint keeps in floating point: skipped Linears (skip list, the model's
        # _keep_in_fp32_modules), embeddings, convolutions
        "float_matrices": [r["name"] for r in layers if not r["quantized"] and len(r["shape"]) >= 2] if quantized
        else [],
        "layers_quantized": len(quantized), "layers_float": len(layers) - len(quantized),
        "bytes": sum(r["bytes"] for r in layers) + other["bytes"],
        "bf16_bytes": sum(r["bf16_bytes"] for r in layers) + other["bf16_bytes"],
        "layers": layers, "other_tensors": other,
    }
    return row


def _nbytes(info: dict) -> int:
    begin, end = info["data_offsets"]
    return end - begin


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bf16(info: dict) -> int:
    """Bytes of a stored tensor once in bfloat16 (integer tensors stay as they are)."""
    return _numel(info["shape"]) * 2 if info["dtype"] in _FLOAT else _nbytes(info)


def _layers(tensors: dict, owner: dict) -> tuple[list[dict], dict]:
    """Rows for each module with a ``weight`` (quantized 4-bit/8-bit in bitsandbytes' layout, or floating point)
    and a total for the other tensors."""
    used: set[str] = set()
    rows = []
    for key in tensors:
        prefix, sep, rest = key.partition(_QS)
        if sep and rest in ("nf4", "fp4") and prefix + "weight" in tensors:
            rows.append(_four_bit(prefix, rest, tensors, owner, used))
        elif (key == "SCB" or key.endswith(".SCB")) and tensors.get(key[:-3] + "weight", {}).get("dtype") == "I8":
            rows.append(_eight_bit(key[:-3], tensors, used))
    for key, info in tensors.items():
        if key.endswith("weight") and key not in used:
            P = key[:-len("weight")]
            parts = [k for k in (key, P + "bias") if k in tensors]
            used.update(parts)
            rows.append({"name": P.rstrip("."), "format": _FLOAT.get(info["dtype"], info["dtype"].lower()),
                         "quantized": False, "shape": info["shape"],
                         "bytes": sum(_nbytes(tensors[k]) for k in parts),
                         "bf16_bytes": sum(_bf16(tensors[k]) for k in parts)})
    rest = [k for k in tensors if k not in used]
    other = {"tensors": len(rest), "bytes": sum(_nbytes(tensors[k]) for k in rest),
             "bf16_bytes": sum(_bf16(tensors[k]) for k in rest)}
    return sorted(rows, key=lambda r: r["name"]), other


def _four_bit(P: str, quant_type: str, tensors: dict, owner: dict, used: set) -> dict:
    qs_key = P + _QS + quant_type
    parts = [P + "weight", P + "bias", qs_key, *(P + p for p in _4BIT_PARTS)]
    parts = [k for k in parts if k in tensors]
    used.update(parts)
    state = None
    blob = owner[qs_key].read(qs_key)
    if blob is not None:
        try:
            state = json.loads(blob)
        except ValueError:
            raise CliError(f"{owner[qs_key].path}: {qs_key} is not valid JSON (a corrupt quant state)") from None
    numel = _numel(state["shape"]) if state else 2 * _numel(tensors[P + "weight"]["shape"])
    bias = [P + "bias"] if P + "bias" in tensors else []
    return {"name": P.rstrip("."), "format": quant_type + ("+dq" if P + "weight.nested_absmax" in tensors else ""),
            "quantized": True, "shape": state["shape"] if state else None,
            "blocksize": state.get("blocksize") if state else None, "dtype": state.get("dtype") if state else None,
            "bytes": sum(_nbytes(tensors[k]) for k in parts),
            "bf16_bytes": numel * 2 + sum(_bf16(tensors[k]) for k in bias)}


def _eight_bit(P: str, tensors: dict, used: set) -> dict:
    parts = [k for k in (P + "weight", P + "bias", P + "SCB", P + "weight_format") if k in tensors]
    used.update(parts)
    shape = tensors[P + "weight"]["shape"]
    bias = [P + "bias"] if P + "bias" in tensors else []
    return {"name": P.rstrip("."), "format": "int8", "quantized": True, "shape": shape,
            "bytes": sum(_nbytes(tensors[k]) for k in parts),
            "bf16_bytes": _numel(shape) * 2 + sum(_bf16(tensors[k]) for k in bias)}


# --- printing -------------------------------------------------------------------------------------------------------


def _ratio(size: int, bf16: int) -> str:
    if not size or not bf16:
        return "-"
    return f"{bf16 / size:.2f}x smaller than bf16" if size <= bf16 else f"{size / bf16:.2f}x larger than bf16"


def _config_line(qc: dict) -> str:
    """The fields of a quantization_config that matter for its format (halfbyte or bitsandbytes dicts)."""
    four = bool(qc.get("load_in_4bit", qc.get("_load_in_4bit")))
    keys = ["bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_blocksize", "bnb_4bit_compute_dtype",
            "bnb_4bit_quant_storage"] if four else ["llm_int8_threshold"]
    head = [f"quant_method={qc.get('quant_method', 'bitsandbytes')}", f"load_in_{4 if four else 8}bit=True"]
    return ", ".join(head + [f"{k}={qc[k]}" for k in keys if k in qc])


def _print_report(report: dict, summary: bool) -> None:
    for c in report["components"]:
        title = c["component"] or report["source"]
        print(f"== {title}: {c['class']} ({c['format']}), {len(c['files'])} file(s)")
        qc = c["quantization_config"]
        if qc:
            print(f"   config: {_config_line(qc)}")
            kept = c["float_matrices"]
            print(f"   {c['layers_quantized']} quantized layers; skip list: {', '.join(c['skip_modules']) or 'none'}; "
                  f"{len(kept)} matrices in floating point" + (f" ({', '.join(kept[:4])}{', ...' * (len(kept) > 4)})"
                                                              if kept else ""))
        if not summary:
            rows = [[r["name"], r["format"], "x".join(map(str, r["shape"])) if r["shape"] else "?",
                     human_bytes(r["bytes"]), human_bytes(r["bf16_bytes"])] for r in c["layers"]]
            o = c["other_tensors"]
            if o["tensors"]:
                rows.append([f"(other tensors: {o['tensors']})", "", "", human_bytes(o["bytes"]),
                             human_bytes(o["bf16_bytes"])])
            print("\n".join("   " + line for line in table(rows, ["layer", "format", "shape", "bytes", "bf16"],
                                                              right={3, 4}).splitlines()))
        print(f"   total: {human_bytes(c['bytes'])} (bf16: {human_bytes(c['bf16_bytes'])}; "
              f"{_ratio(c['bytes'], c['bf16_bytes'])})")
    if report["other_components"]:
        print("== not models: " + ", ".join(f"{k} ({v})" for k, v in report["other_components"].items()))
    t = report["total"]
    print(f"total: {human_bytes(t['bytes'])} on disk; bf16: {human_bytes(t['bf16_bytes'])} "
          f"({_ratio(t['bytes'], t['bf16_bytes'])})")
