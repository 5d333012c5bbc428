"""Quantized models as Hugging Face checkpoint directories: atomic ``save_pretrained``, streaming ``from_pretrained``.

``save_pretrained`` writes the directory the model's own ``save_pretrained`` would write (``config.json`` through
the model's config machinery, ``diffusion_pytorch_model*.safetensors`` / ``model*.safetensors`` + index) with the
tensors in bitsandbytes' layout (docs/bnb-format.md §3.2, §5.6) and the quantization config in ``config.json``
(§6.2), into a temporary sibling that replaces the target only once complete.

``from_pretrained`` builds the model with its parameters on the meta device, swaps in quantized shells
(``quantize_``), then fills it one tensor (one quantized layer) at a time from memory-mapped shards: floating-point
weights are cast and quantized on the target device in row pieces, pre-quantized layers (halfbyte or bitsandbytes
checkpoints, read without bitsandbytes) are translated layer by layer. Host and device memory peak near the
quantized model plus one floating-point tensor; the floating-point model never exists.
"""

import concurrent.futures
import contextlib
import copy
import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import BitsAndBytesConfig
from ..convert import QUANTIZED_LINEARS, is_skipped, quantization_config_of, quantize_
from ..nn import Linear4bit, Linear8bit
from . import bnb
from . import safetensors_stream as st
from .streaming import load_tensors, prefixes_of

_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model", None: "model"}
_OWN_FILES = re.compile(r"(config|halfbyte_config|generation_config)\.json|"
                        r"(diffusion_pytorch_model|model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
                        r"|(diffusion_pytorch_model|model|pytorch_model)\.(safetensors|bin)\.index\.json")
_CONFIG_FIELDS = set(BitsAndBytesConfig().to_dict()) | {"load_in_4bit", "load_in_8bit"}
_progress_enabled = True


def disable_progress_bars() -> None:
    """Turn off halfbyte's progress bars (also: environment variable ``HALFBYTE_NO_PROGRESS=1``)."""
    global _progress_enabled
    _progress_enabled = False


def enable_progress_bars() -> None:
    global _progress_enabled
    _progress_enabled = True


def _progress(iterable, total: int, desc: str, unit: str = "tensor"):
    """tqdm over ``iterable``, hidden when stderr is not a terminal, after ``disable_progress_bars()``, or with
    ``HALFBYTE_NO_PROGRESS`` set (to anything but "0")."""
    from tqdm.auto import tqdm

    hidden = not _progress_enabled or os.environ.get("HALFBYTE_NO_PROGRESS", "") not in ("", "0") \
        or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=hidden)


def library_of(cls: type) -> str | None:
    """"diffusers" for a ModelMixin subclass, "transformers" for a PreTrainedModel subclass, else None."""
    for base in getattr(cls, "__mro__", ()):
        if base.__name__ == "ModelMixin" and base.__module__.startswith("diffusers."):
            return "diffusers"
        if base.__name__ == "PreTrainedModel" and base.__module__.startswith("transformers."):
            return "transformers"
    return None


# --- saving ---------------------------------------------------------------------------------------------------


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, bitsandbytes_compatible: bool = False,
                    max_shard_size: int | str = "5GB", safe_serialization: bool = True, durable: bool = False) -> None:
    """Write ``model`` (quantized by halfbyte) as a checkpoint directory, atomically.

    Layout: what the model's library writes (diffusers ModelMixin: ``config.json`` +
    ``diffusion_pytorch_model.safetensors``; transformers PreTrainedModel: ``config.json`` [+
    ``generation_config.json``] + ``model.safetensors``; sharded past ``max_shard_size`` as
    ``<stem>-00001-of-0000N.safetensors`` + ``<stem>.safetensors.index.json``). A plain ``nn.Module`` gets
    ``model.safetensors`` and ``halfbyte_config.json`` (``{"quantization_config": {...}}``). Tensors are always in
    bitsandbytes' layout and key names (``halfbyte.bitsandbytes_state_dict``), with safetensors metadata
    ``{"format": "pt"}``; a quantized layer's keys always share one shard. ``config.json`` holds the quantization
    config under ``quantization_config``: halfbyte's own dict, or with ``bitsandbytes_compatible=True`` the dict
    diffusers/transformers + bitsandbytes write, for loaders without halfbyte. Linear layers that the config
    would quantize but the model keeps in floating point are added to the written ``llm_int8_skip_modules``, so
    any loader rebuilds the same model. A model without halfbyte layers is saved without a quantization config.

    The files go to a temporary sibling directory and replace ``save_directory`` only when all are written; files
    there that halfbyte does not write (README, tokenizer, .git) are carried over. An error, an interrupt or a
    killed process leaves the previous checkpoint untouched. ``durable=True`` also survives a crash of the machine
    or a power loss: every file is fsynced before the rename, which waits for the disk (on the H100 host of
    BENCHMARKS.md 1.35-1.61x the time of diffusers' save, which, like transformers', safetensors and torch.save,
    returns once the data are in the page cache; the default does the same). Raises
    ValueError for tensors on the meta device, for layers that disagree with the quantization config, and
    (``bitsandbytes_compatible``) for what bitsandbytes' loaders cannot read.
    """
    if not safe_serialization:
        raise ValueError("halfbyte writes safetensors checkpoints only; safe_serialization=False is not supported")
    limit = st.parse_size(max_shard_size)
    library = library_of(type(model))
    meta = [k for k, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save: {meta[0]} (and {len(meta) - 1} more) is on the meta device, i.e. was never "
                         "loaded")
    cfg = quantization_config_of(model)
    qdict = None
    if cfg is not None:
        cfg = _config_as_built(model, cfg)
        if bitsandbytes_compatible:
            _check_bitsandbytes_readable(model)
        qdict = cfg.to_bitsandbytes_dict() if bitsandbytes_compatible else cfg.to_dict()

    sd = bnb.bitsandbytes_state_dict(model)
    for k in _tied_duplicates(model, library):
        sd.pop(k, None)
    _check_no_shared_storage(sd)
    sizes = {k: t.numel() * t.element_size() for k, t in sd.items()}
    files = st.plan_shards(_layer_groups(model, sd), sizes, limit, _STEMS[library])

    own = _OWN_FILES.fullmatch
    with st.atomic_directory(save_directory, replaced=lambda name: own(name) is not None, durable=durable) as tmp:
        _write_config(model, library, qdict, tmp)
        # One writer thread serialises and fsyncs shard i while this thread gathers shard i + 1 from the device:
        # the fsync that makes the save durable then costs little more than the write itself. At most two shards
        # are on the host at once.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="halfbyte-save") as writer:
            pending = None
            for name, keys in _progress(files.items(), len(files), "Writing shards", "shard"):
                shard = {k: sd[k].detach().to("cpu").contiguous() for k in keys}
                if pending is not None:
                    pending.result()  # raises the writer's error here
                pending = writer.submit(st.write_shard, tmp / name, shard, {"format": "pt"}, durable)
                del shard
            if pending is not None:
                pending.result()
        if len(files) > 1:
            extra = {"total_parameters": _logical_parameters(model)} if library == "transformers" else None
            st.write_text(tmp / f"{_STEMS[library]}.safetensors.index.json", st.index_json(files, sizes, extra))


def _config_as_built(model: nn.Module, cfg: BitsAndBytesConfig) -> BitsAndBytesConfig:
    """``cfg``, checked against the model's layers, with kept floating-point Linears added to the skip list."""
    skip = list(cfg.llm_int8_skip_modules or [])
    rules = skip + [m for m in (getattr(model, "_keep_in_fp32_modules", None) or []) if m not in skip]
    kept: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = prefix + name
            if isinstance(child, QUANTIZED_LINEARS):
                if is_skipped(name, path, rules):
                    raise ValueError(f"layer {path} is quantized, but the quantization config skips it "
                                     f"(llm_int8_skip_modules / _keep_in_fp32_modules {rules}): a loader would "
                                     "expect it in floating point")
                if isinstance(child, Linear8bit) != cfg.load_in_8bit:
                    raise ValueError(f"layer {path} is a {type(child).__name__}, but the quantization config is "
                                     f"{'8' if cfg.load_in_8bit else '4'}-bit")
            elif isinstance(child, nn.Linear) and not is_skipped(name, path, rules):
                kept.append(path)
            else:
                visit(child, path + ".")

    visit(model, "")
    if not kept:
        return cfg
    for path, m in model.named_modules():  # a kept layer's entry must not catch a quantized layer too
        if isinstance(m, QUANTIZED_LINEARS):
            hit = next((k for k in kept if is_skipped(path.rpartition(".")[2], path, [k])), None)
            if hit is not None:
                raise ValueError(f"{hit} is kept in floating point, but the skip entry {hit!r} that says so would "
                                 f"also skip the quantized layer {path} (skip entries match module names anywhere); "
                                 "quantize it, or list it in llm_int8_skip_modules before quantizing")
    return BitsAndBytesConfig.from_dict(cfg.to_dict(), llm_int8_skip_modules=skip + kept)


def _check_bitsandbytes_readable(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit) and m.quant_storage != torch.uint8:
            raise ValueError(f"layer {name}: bnb_4bit_quant_storage={str(m.quant_storage).removeprefix('torch.')}; "
                             "diffusers' bitsandbytes loader reads only uint8 storage (docs/bnb-format.md §6.4): "
                             "quantize with bnb_4bit_quant_storage='uint8' or save with bitsandbytes_compatible=False")


def _tied_duplicates(model: nn.Module, library: str | None) -> set[str]:
    """Keys transformers drops from a state dict because they alias a tied parameter (safetensors refuses aliases)."""
    if library != "transformers":
        return set()
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    native = model.state_dict()
    return set(native) - set(remove_tied_weights_from_state_dict(dict(native), model))


def _check_no_shared_storage(sd: dict[str, Tensor]) -> None:
    seen: dict[tuple, str] = {}
    for k, t in sd.items():
        if t.numel() == 0:
            continue
        ident = (t.device, t.untyped_storage().data_ptr())
        if ident in seen:
            raise ValueError(f"{seen[ident]} and {k} share memory, which safetensors cannot store; give each its "
                             "own tensor (e.g. .clone()) before saving")
        seen[ident] = k


def _layer_groups(model: nn.Module, sd: dict[str, Tensor]) -> list[list[str]]:
    """Keys of ``sd`` in order, grouped so that each quantized layer's keys form one group."""
    prefixes = {f"{n}." for n, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS) and n}
    groups: list[list[str]] = []
    last = None
    for k in sd:
        owner = next((p for p in prefixes_of(k) if p in prefixes), None)
        if owner is not None and owner == last:
            groups[-1].append(k)
        else:
            groups.append([k])
        last = owner
    return groups


def _logical_parameters(model: nn.Module) -> int:
    """Parameters as the unquantized model had them (a quantized weight counts out * in)."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, QUANTIZED_LINEARS):
            total += m.out_features * m.in_features - m.weight.numel()
    return total


def _write_config(model: nn.Module, library: str | None, qdict: dict | None, tmp: Path) -> None:
    if library == "diffusers":
        d = json.loads(model.to_json_string())  # the text diffusers' save_config writes, from the model's config
        d.pop("quantization_config", None)
        d.pop("_pre_quantization_dtype", None)
        if qdict is not None:
            d["quantization_config"] = qdict
        st.write_text(tmp / "config.json", json.dumps(d, indent=2, sort_keys=True) + "\n")
    elif library == "transformers":
        config = copy.deepcopy(model.config)  # transformers' save_pretrained stamps these on the live config
        config.architectures = [type(model).__name__]
        config.dtype = str(model.dtype).removeprefix("torch.")
        if qdict is not None:
            config.quantization_config = qdict
        elif hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    elif qdict is not None:
        st.write_text(tmp / "halfbyte_config.json",
                      json.dumps({"quantization_config": qdict}, indent=2, sort_keys=True) + "\n")


# --- loading --------------------------------------------------------------------------------------------------


def from_pretrained(cls: type, path_or_id: str | os.PathLike, subfolder: str | None = None,
                    quantization_config: BitsAndBytesConfig | None = None, torch_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, revision: str | None = None) -> nn.Module:
    """Load a quantized model, streaming: floating-point, halfbyte and bitsandbytes checkpoints alike.

    ``cls``: a diffusers ModelMixin class (``diffusers.AutoModel`` resolves through ``_class_name``) or a
    transformers PreTrainedModel class (auto classes resolve through the config). ``path_or_id``: a local
    directory, or a Hub repo id (``huggingface_hub.snapshot_download`` of ``subfolder``'s json and safetensors
    files at ``revision``; works offline from the cache). The kind of checkpoint comes from ``quantization_config``
    in its ``config.json``: none -> a floating-point checkpoint, quantized while loading with
    ``quantization_config`` (required); quant_method "halfbyte" or "bitsandbytes" -> pre-quantized, read without
    bitsandbytes; the checkpoint then fixes the format and skip list, and a given ``quantization_config`` must
    agree on the format (4/8-bit, quant type, double quantization, halfbyte's block size) and supplies only the
    runtime settings (``bnb_4bit_compute_dtype``, ``llm_int8_threshold``).

    ``torch_dtype``: dtype of floating-point tensors (``_keep_in_fp32_modules`` stay float32, as the libraries
    decide) and of weights before quantization; None keeps each tensor's stored dtype. ``device``: where
    everything lands and quantization runs (default CPU). Returns the model in eval mode, nothing left on meta,
    tied weights tied, its quantization config recorded (``model.config.quantization_config``), so
    ``halfbyte.save_pretrained`` can write it again. Errors name the file and tensor: missing or truncated shards,
    corrupt quant states, wrong shapes, missing tensors, unknown or conflicting quantization configs.
    """
    directory = _resolve_directory(path_or_id, subfolder, revision)
    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path} does not exist: not a model checkpoint directory") from None
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    library, cls = _resolve_class(cls, raw, directory)
    ckpt_cfg, kind = _checkpoint_config(raw, config_path)
    cfg = _effective_config(ckpt_cfg, kind, quantization_config, config_path)
    device = torch.device(device if device is not None else "cpu")

    with st.ShardedReader(directory, (_STEMS[library], "model", "diffusion_pytorch_model")) as reader:
        model = _build_on_meta(cls, library, directory, torch_dtype)
        quantize_(model, cfg)
        missing = load_tensors(model, reader, pre_quantized=ckpt_cfg is not None, torch_dtype=torch_dtype,
                               device=device, fp32_modules=_fp32_modules(model, library, torch_dtype),
                               progress=lambda it, n: _progress(it, n, f"Loading {cls.__name__}"),
                               config_path=config_path)
    if library == "transformers":  # ties the weights a checkpoint stores once (T5: shared / embed_tokens)
        if "missing_keys" in inspect.signature(model.tie_weights).parameters:
            model.tie_weights(missing_keys=set(missing), recompute_mapping=False)
        else:
            model.tie_weights()
    left = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise ValueError(f"{reader.source} has no tensors for {len(left)} model entries, e.g. {left[:5]} "
                         "(an incomplete or mismatched checkpoint)")
    for module in model.modules():  # buffers built at construction (non-persistent ones) join the loaded tensors
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    if library == "diffusers":
        cfg = copy.deepcopy(cfg)  # a private copy (never the caller's object) records the dtype loaded in, which
        cfg._pre_quantization_dtype = model.dtype  # a saved copy's reload restores (diffusers' update_torch_dtype)
        model.register_to_config(quantization_config=cfg, _name_or_path=str(path_or_id))
    elif library == "transformers":
        model.config.quantization_config = cfg
        model.config.name_or_path = str(path_or_id)
    model._halfbyte_config = cfg
    if library in ("diffusers", "transformers"):
        from ..integrations import attach_quantizer

        attach_quantizer(model, cfg, library)
    return model.eval()


def _resolve_directory(path_or_id, subfolder: str | None, revision: str | None) -> Path:
    text = os.fspath(path_or_id)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is a file; from_pretrained takes a checkpoint directory")
        root = local
    elif local.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{text}: no such directory")
    else:
        from huggingface_hub import snapshot_download

        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        try:
            root = Path(snapshot_download(text, revision=revision,
                                          allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"]))
        except Exception as e:  # offline without a cached snapshot, unknown repo, network errors
            raise FileNotFoundError(f"{text!r} is not a local directory, and the Hugging Face Hub (or its cache) "
                                    f"could not provide it: {type(e).__name__}: {e}") from e
    directory = root / subfolder if subfolder else root
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (subfolder={subfolder!r})")
    return directory


def _resolve_class(cls: type, raw: dict, directory: Path) -> tuple[str, type]:
    library = library_of(cls)
    if library is not None:
        return library, cls
    module = getattr(cls, "__module__", "")
    if module.startswith("diffusers.") and cls.__name__ == "AutoModel":
        import diffusers

        name = raw.get("_class_name")
        target = getattr(diffusers, name, None) if isinstance(name, str) else None
        if target is None or library_of(target) != "diffusers":
            raise ValueError(f"{directory / 'config.json'}: _class_name {name!r} is not a diffusers model class")
        return "diffusers", target
    if module.startswith("transformers.") and hasattr(cls, "_model_mapping"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(directory)
        try:
            target = cls._model_mapping[type(config)]
        except KeyError:
            raise ValueError(f"{cls.__name__} has no model class for {type(config).__name__} "
                             f"({directory / 'config.json'})") from None
        return "transformers", target[0] if isinstance(target, (list, tuple)) else target
    raise TypeError(f"from_pretrained builds diffusers ModelMixin or transformers PreTrainedModel classes, "
                    f"got {cls!r}")


def _checkpoint_config(raw: dict, config_path: Path) -> tuple[BitsAndBytesConfig | None, str | None]:
    """The config a pre-quantized checkpoint was written with, and "halfbyte" / "bitsandbytes"; (None, None) if
    config.json has no quantization_config."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None, None
    if not isinstance(qc, dict):
        raise ValueError(f"{config_path}: quantization_config must be a JSON object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "halfbyte":
        kind = "halfbyte"
    elif method == "bitsandbytes" or (method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit"))):
        kind = "bitsandbytes"
    else:
        raise ValueError(f"{config_path}: quantization_config has quant_method {method!r}; halfbyte loads "
                         "'halfbyte' and 'bitsandbytes' checkpoints (or floating-point ones)")
    try:
        cfg = BitsAndBytesConfig.from_dict({k: v for k, v in qc.items()
                                            if k in _CONFIG_FIELDS and k != "quant_method"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: invalid {kind} quantization_config: {e}") from None
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        raise ValueError(f"{config_path}: quantization_config has neither load_in_4bit nor load_in_8bit set")
    return cfg, kind


def _effective_config(ckpt: BitsAndBytesConfig | None, kind: str | None, user: BitsAndBytesConfig | None,
                      config_path: Path) -> BitsAndBytesConfig:
    if user is not None and not isinstance(user, BitsAndBytesConfig):
        raise TypeError(f"quantization_config must be a halfbyte.BitsAndBytesConfig, got {type(user).__name__}")
    if ckpt is None:
        if user is None:
            raise ValueError(f"no quantization_config given and {config_path} has none (a floating-point "
                             "checkpoint): pass quantization_config=halfbyte.BitsAndBytesConfig(...)")
        return user
    if user is None:
        return ckpt
    fields = ["load_in_4bit", "load_in_8bit"]
    if ckpt.load_in_4bit:
        fields += ["bnb_4bit_quant_type", "bnb_4bit_use_double_quant"]
        fields += ["bnb_4bit_blocksize"] if kind == "halfbyte" else []  # bitsandbytes' dict does not record it
    conflicts = [f"{f}: given {getattr(user, f)!r}, checkpoint {getattr(ckpt, f)!r}"
                 for f in fields if getattr(user, f) != getattr(ckpt, f)]
    if conflicts:
        raise ValueError(f"quantization_config conflicts with the pre-quantized checkpoint {config_path}: "
                         + "; ".join(conflicts))
    return BitsAndBytesConfig.from_dict(ckpt.to_dict(), bnb_4bit_compute_dtype=user.bnb_4bit_compute_dtype,
                                        llm_int8_threshold=user.llm_int8_threshold)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every parameter on the meta device while buffers stay real: buffers computed at construction (and
    not saved, e.g. rotary tables) keep their values, as with accelerate's ``init_empty_weights()``. Patches
    ``nn.Module.register_parameter`` for the duration (not thread-safe, like accelerate's)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_on_meta(cls: type, library: str, directory: Path, torch_dtype: torch.dtype | None) -> nn.Module:
    if library == "diffusers":
        config = dict(cls.load_config(directory))
        config.pop("quantization_config", None)  # recorded after loading, as diffusers' hidden config entry
        with _parameters_on_meta():
            return cls.from_config(config)
    from transformers import AutoConfig

    config = (getattr(cls, "config_class", None) or AutoConfig).from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _parameters_on_meta():
        return cls._from_config(config, **({"dtype": torch_dtype} if torch_dtype is not None else {}))


def _fp32_modules(model: nn.Module, library: str, torch_dtype: torch.dtype | None) -> list[str]:
    """Module names whose floating tensors load in float32: diffusers keeps ``_keep_in_fp32_modules`` in float32
    whenever a dtype is given; transformers only for float16 (and ``_keep_in_fp32_modules_strict`` for bfloat16)."""
    if torch_dtype is None:
        return []
    if library == "transformers" and hasattr(model, "_get_dtype_plan"):
        return list(model._get_dtype_plan(torch_dtype))
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])
