"""Fill a model whose tensors are on the meta device from a checkpoint, one tensor or quantized layer at a time.

Used by ``halfbyte.from_pretrained``. A floating-point layer weight is read from its memory-mapped shard and
cast + quantized on the target device in row pieces (``Linear4bit.from_linear``), so the float weight never
exists whole in memory; a pre-quantized layer's bitsandbytes tensors (possibly from several shards) go through
``halfbyte.io.bnb.import_layer``; other tensors are cast and copied. Every tensor the model keeps is its own copy
on the target device (never a view of a mapped file), and each shard is unmapped once all its tensors are done.
"""

import ctypes
import ctypes.util
import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import transfer
from ..convert import QUANTIZED_LINEARS
from ..nn import Linear4bit, Linear8bit, release_scratch
from . import bnb
from .safetensors_stream import ShardedReader


def prefixes_of(key: str) -> list[str]:
    """"a.b.weight.absmax" -> ["a.b.weight.", "a.b.", "a."], longest first."""
    return [key[:i + 1] for i in range(len(key) - 1, -1, -1) if key[i] == "."]


def load_tensors(model: nn.Module, reader: ShardedReader, *, pre_quantized: bool, torch_dtype: torch.dtype | None,
                 device: torch.device, fp32_modules: list[str], progress: Callable, config_path: Path) -> list[str]:
    """Assign every tensor of ``model`` (quantized shells from ``quantize_`` on meta) that ``reader`` holds.

    ``pre_quantized``: the quantized layers are stored in bitsandbytes' layout (else as floating-point weights
    to quantize). Floating tensors are cast to ``torch_dtype`` (None: stored dtype), or to float32 for keys
    inside ``fp32_modules``; integer tensors keep their dtype. ``progress(iterable, total)`` wraps the work.
    Returns the model keys that the checkpoint lacks (still on meta); warns about checkpoint keys the model has
    no place for. Raises ValueError naming file and tensor for wrong shapes, dtypes or layer contents.
    """
    state = model.state_dict(keep_vars=True)
    layers = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS) and n}
    by_layer: dict[str, list[str]] = {P: [] for P in layers}
    unexpected: list[str] = []
    for key in reader.keys():
        P = next((p for p in prefixes_of(key) if p in layers), None)
        if P is not None:
            by_layer[P].append(key)
        elif key not in state:
            unexpected.append(key)
    units: list[tuple[str, str, list[str]]] = []
    missing: list[str] = []
    for P, keys in by_layer.items():
        mine = bnb.layer_keys(P, keys)
        unexpected += [k for k in keys if k not in mine]
        if P + "weight" not in mine:
            missing.append(P + "weight")
            continue
        units.append(("layer", P, sorted(mine)))
    for key in state:
        if not any(p in layers for p in prefixes_of(key)):
            if key in reader:
                units.append(("plain", key, [key]))
            else:
                missing.append(key)
    units.sort(key=lambda u: (reader.file_of[u[2][0]], u[2][0]))  # shard by shard, in key order

    load_layer = _load_quantized_layer if pre_quantized else _quantize_layer
    transfer.reserve_device_memory(device, [_final_bytes(t, torch_dtype) for t in state.values()])
    try:
        for what, name, keys in progress(units, len(units)):
            if what == "layer":
                unexpected += load_layer(model, reader, name, layers[name], keys, torch_dtype, device, config_path)
            else:
                _load_plain(model, reader, name, state.pop(name), fp32_modules, torch_dtype, device)
            for k in keys:
                reader.release(k)
            if what == "layer" and not pre_quantized and device.type == "cpu":
                _trim_malloc()
    finally:
        release_scratch()
    if unexpected:
        warnings.warn(f"{reader.source}: {len(unexpected)} tensors have no place in {type(model).__name__} and were "
                      f"ignored, e.g. {sorted(unexpected)[:5]}", stacklevel=3)
    return missing


def _final_bytes(t: Tensor, torch_dtype: torch.dtype | None) -> int:
    """Bytes the (meta) model tensor ``t`` will hold once loaded (floating tensors in ``torch_dtype``)."""
    size = torch_dtype.itemsize if torch_dtype is not None and t.is_floating_point() else t.element_size()
    return t.numel() * size


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def _trim_malloc() -> None:
    """Give the heap memory freed by the quantizer's temporaries back to the OS (glibc only; elsewhere a no-op).

    glibc raises its mmap threshold after the first large free, so later piece-sized temporaries come from its
    heaps and may stay resident once freed (measured: 20-30 MB kept after a 67 M-parameter load whose result is
    35 MB); ``malloc_trim(0)`` returns them, at a cost of well under a millisecond per layer.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _quantize_layer(model, reader, P, shell, keys, torch_dtype, device, config_path) -> list[str]:
    """Quantize the floating-point ``P.weight`` (+ ``P.bias``) into a layer like ``shell``; returns ignored keys."""
    wkey, bkey = P + "weight", P + "bias"
    path = reader.path_of(wkey)
    stats = [k for k in keys if k not in (wkey, bkey)]
    if stats:
        raise ValueError(f"{reader.path_of(stats[0])}: {stats[0]} is bitsandbytes quantization data, but "
                         f"{config_path} has no quantization_config to say how the checkpoint was quantized")
    want = (shell.out_features, shell.in_features)
    _check_shape(reader, wkey, want, "the model's quantized layer")
    if not reader.is_floating(wkey):
        raise ValueError(f"{path}: {wkey} is stored as {reader.get(wkey).dtype}, but a floating-point weight is "
                         f"needed to quantize ({config_path} has no quantization_config)")
    ignored = []
    if shell.bias is None and bkey in keys:
        ignored.append(bkey)
    if shell.bias is not None:
        if bkey not in keys:
            return ignored  # left on meta: reported as missing
        _check_shape(reader, bkey, (shell.out_features,), "the model's quantized layer")
    lin = nn.Linear(shell.in_features, shell.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(reader.get(wkey), requires_grad=False)  # mapped file pages, read piece by piece
    if shell.bias is not None:
        b = reader.get(bkey)
        lin.bias = nn.Parameter(b.to(device, torch_dtype or b.dtype, copy=True),
                                requires_grad=shell.bias.requires_grad)
    if isinstance(shell, Linear4bit):
        layer = Linear4bit.from_linear(lin, quant_type=shell.quant_type, blocksize=shell.blocksize,
                                       double_quant=shell.double_quant, compute_dtype=shell.compute_dtype,
                                       quant_storage=shell.quant_storage, device=device, dtype=torch_dtype)
    else:
        layer = Linear8bit.from_linear(lin, threshold=shell.threshold, device=device, dtype=torch_dtype)
    model.set_submodule(P[:-1], layer)
    return ignored


def _load_quantized_layer(model, reader, P, shell, keys, torch_dtype, device, config_path) -> list[str]:
    """Rebuild the layer at ``P`` from its bitsandbytes tensors (format from the checkpoint)."""
    where = ", ".join(sorted({str(reader.path_of(k)) for k in keys}))
    tensors = {k: reader.get(k) for k in keys}
    try:
        layer, native = bnb.import_layer(P, shell, tensors)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: {e.args[0]}") from None
    if (layer.bias is None) != (shell.bias is None):
        state = "lacks" if layer.bias is None else "has"
        raise ValueError(f"{where}: the checkpoint {state} {P}bias, unlike the model's layer")
    own: dict[str, Tensor] = {}
    for k, t in native.items():
        dtype = (torch_dtype or t.dtype) if t.is_floating_point() else t.dtype  # only the bias is floating
        own[k[len(P):]] = _to(t, device, dtype)
    layer.load_state_dict(own, strict=True, assign=True)
    if isinstance(layer, Linear8bit) and torch_dtype is not None:
        layer.dtype = torch_dtype  # bitsandbytes' int8 state does not record the original dtype
    model.set_submodule(P[:-1], layer)
    return []


def _load_plain(model, reader, key, placeholder, fp32_modules, torch_dtype, device) -> None:
    _check_shape(reader, key, tuple(placeholder.shape), "the model")
    t = reader.get(key)
    if t.is_floating_point() != placeholder.is_floating_point():
        raise ValueError(f"{reader.path_of(key)}: {key} is stored as {t.dtype}, the model expects a "
                         f"{placeholder.dtype} tensor")
    if t.is_floating_point():
        keep32 = any(f".{m}." in f".{key}." for m in fp32_modules)
        dtype = torch.float32 if keep32 else (torch_dtype or t.dtype)
    else:
        dtype = t.dtype
    value = _to(t, device, dtype)
    prefix, _, name = key.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if name in module._parameters:
        grad = module._parameters[name].requires_grad and value.is_floating_point()
        module._parameters[name] = nn.Parameter(value, requires_grad=grad)
    else:
        module._buffers[name] = value


def _to(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A copy of the (memory-mapped) ``t`` on ``device`` in ``dtype``, never a view of the file; host-to-GPU
    copies go through the pinned staging buffers (``halfbyte.transfer``: ~3x the pageable rate)."""
    if transfer.uses_staging(t, device):
        return transfer.to_device(t, device).to(dtype)
    return t.to(device, dtype, copy=True)


def _check_shape(reader: ShardedReader, key: str, want: tuple[int, ...], owner: str) -> None:
    got = reader.shape(key)
    if got != tuple(want):
        raise ValueError(f"{reader.path_of(key)}: {key} has shape {list(got)}, {owner} expects {list(want)}")
