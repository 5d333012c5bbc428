"""Translation between halfbyte's in-memory state dict and bitsandbytes' serialized layout (pure dict -> dict).

bitsandbytes keys per quantized Linear with prefix ``P.`` (docs/bnb-format.md §3.2, §3.3, §5.6), in this order:
4-bit: ``P.weight`` (uint8 ((n+1)//2, 1), or viewed as quant_storage), ``P.bias``, ``P.weight.absmax``,
``P.weight.quant_map``, [``P.weight.nested_absmax``, ``P.weight.nested_quant_map``],
``P.weight.quant_state.bitsandbytes__<nf4|fp4>`` (JSON bytes as uint8);
8-bit: ``P.weight`` (int8 (N, K)), ``P.bias``, ``P.SCB`` (float32), ``P.weight_format`` (uint8 scalar 0 = "row").
"""

import json
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..convert import QUANTIZED_LINEARS
from ..formats import fourbit
from ..formats.blockwise import NESTED_BLOCKSIZE
from ..formats.codebooks import code_4bit, dynamic_map
from ..nn import Linear4bit, Linear8bit, _f32_bits

_QS_PREFIX = "weight.quant_state.bitsandbytes__"
_4BIT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_LAYER_KEYS = ("weight", "bias", "SCB", "weight_format")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quant_state_json(layer: Linear4bit) -> bytes:
    """The JSON blob bitsandbytes packs into ``weight.quant_state.bitsandbytes__<type>`` (json.dumps defaults)."""
    d = {"quant_type": layer.quant_type, "blocksize": layer.blocksize, "dtype": _dtype_str(layer.dtype),
         "shape": [layer.out_features, layer.in_features]}
    if layer.double_quant:
        d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                 nested_offset=layer.offset.view(torch.float32).item())
    return json.dumps(d).encode("utf-8")


def _export_4bit(P: str, q: Linear4bit) -> dict[str, Tensor]:
    data = q.weight.detach().reshape(-1, 1)
    if q.quant_storage != torch.uint8:
        size = torch.empty(0, dtype=q.quant_storage).element_size()
        if data.numel() % size:
            raise ValueError(f"{P}weight: {data.numel()} packed bytes do not fill whole {q.quant_storage} elements")
        data = data.reshape(-1).view(q.quant_storage).reshape(-1, 1)
    out = {P + "weight": data}
    if q.bias is not None:
        out[P + "bias"] = q.bias.detach()
    dev = data.device
    if q.double_quant:
        out[P + "weight.absmax"] = q.absmax.detach()
        out[P + "weight.quant_map"] = code_4bit(q.quant_type, dev)
        out[P + "weight.nested_absmax"] = q.nested_absmax.detach().view(torch.float32)
        out[P + "weight.nested_quant_map"] = dynamic_map(dev)
    else:
        out[P + "weight.absmax"] = q.absmax.detach().view(torch.float32)
        out[P + "weight.quant_map"] = code_4bit(q.quant_type, dev)
    blob = quant_state_json(q)
    out[P + _QS_PREFIX + q.quant_type] = torch.tensor(list(blob), dtype=torch.uint8, device=dev)
    return out


def _export_8bit(P: str, q: Linear8bit) -> dict[str, Tensor]:
    out = {P + "weight": q.weight.detach()}
    if q.bias is not None:
        out[P + "bias"] = q.bias.detach()
    out[P + "SCB"] = q.SCB.detach().view(torch.float32)
    out[P + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
    return out


def bitsandbytes_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict bitsandbytes' layers would save for ``model``: same keys, order, dtypes, shapes, JSON."""
    quantized = {f"{n}." if n else "": m for n, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, _, local = key.rpartition(".")
        P = prefix + "." if prefix else ""
        q = quantized.get(P)
        if q is None:
            out[key] = value
        elif P + "weight" not in out:  # first key of this layer: emit its whole bitsandbytes block
            out.update(_export_4bit(P, q) if isinstance(q, Linear4bit) else _export_8bit(P, q))
    return out


def _parse_quant_state(P: str, sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    blobs = [k for k in (P + _QS_PREFIX + "nf4", P + _QS_PREFIX + "fp4") if k in sd]
    if len(blobs) != 1:
        raise ValueError(f"{P}weight: expected exactly one {P}{_QS_PREFIX}nf4|fp4 entry, found {len(blobs)}")
    raw = sd[blobs[0]]
    try:
        meta = json.loads(bytes(raw.to("cpu", torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{blobs[0]}: corrupted quant-state JSON ({e})") from None
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{blobs[0]}: quant-state JSON lacks {field!r}: {meta}")
    if meta["quant_type"] != blobs[0].rsplit("__", 1)[1]:
        raise ValueError(f"{blobs[0]}: key says {blobs[0].rsplit('__', 1)[1]} but JSON says {meta['quant_type']!r}")
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"{blobs[0]}: unsupported dtype {meta['dtype']!r}")
    return blobs[0], meta


def _import_4bit(P: str, shell: nn.Module, sd: Mapping[str, Tensor]) -> tuple[Linear4bit, dict[str, Tensor]]:
    blob_key, meta = _parse_quant_state(P, sd)
    N, K = meta["shape"] if len(meta["shape"]) == 2 else (None, None)
    if (N, K) != (shell.out_features, shell.in_features):
        raise ValueError(f"{blob_key}: weight shape {meta['shape']} does not match the model's layer "
                         f"({shell.out_features}, {shell.in_features})")
    dq = P + "weight.nested_absmax" in sd
    layer = Linear4bit(K, N, P + "bias" in sd, quant_type=meta["quant_type"], blocksize=meta["blocksize"],
                       double_quant=dq, compute_dtype=getattr(shell, "compute_dtype", None),
                       dtype=_DTYPES[meta["dtype"]], quant_storage=sd[P + "weight"].dtype, device="meta")
    data = sd[P + "weight"]
    data = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data
    if data.numel() != fourbit.packed_numel(N * K):
        raise ValueError(f"{P}weight: {data.numel()} packed bytes, expected {fourbit.packed_numel(N * K)} for "
                         f"shape [{N}, {K}]")
    qmap = sd.get(P + "weight.quant_map")
    if qmap is not None and not torch.equal(qmap.to("cpu", torch.float32), code_4bit(meta["quant_type"])):
        raise ValueError(f"{P}weight.quant_map differs from the standard {meta['quant_type']} table")
    native = {P + "weight": data.reshape(layer.weight.shape)}
    absmax = sd[P + "weight.absmax"]
    if dq:
        if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise ValueError(f"{blob_key}: nested_blocksize {meta['nested_blocksize']} is not {NESTED_BLOCKSIZE}")
        nmap = sd.get(P + "weight.nested_quant_map")
        if nmap is not None and not torch.equal(nmap.to("cpu", torch.float32), dynamic_map()):
            raise ValueError(f"{P}weight.nested_quant_map differs from bitsandbytes' dynamic map")
        if "nested_offset" not in meta:
            raise ValueError(f"{blob_key}: double-quantized state lacks 'nested_offset'")
        native[P + "absmax"] = absmax
        native[P + "nested_absmax"] = _f32_bits(sd[P + "weight.nested_absmax"])
        native[P + "offset"] = _f32_bits(torch.tensor([meta["nested_offset"]], dtype=torch.float32))
    else:
        native[P + "absmax"] = _f32_bits(absmax)
    for name in ("absmax", "nested_absmax"):
        want, got = getattr(layer, name), native.get(P + name)
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{P}weight.{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if P + "bias" in sd:
        native[P + "bias"] = sd[P + "bias"]
    return layer, native


def _import_8bit(P: str, shell: nn.Module, sd: Mapping[str, Tensor]) -> tuple[Linear8bit, dict[str, Tensor]]:
    w, scb = sd[P + "weight"], sd[P + "SCB"]
    fmt = sd.get(P + "weight_format")
    if fmt is not None and int(fmt) != 0:
        raise ValueError(f"{P}weight_format is {int(fmt)}: only the row-major int8 layout (0) is supported")
    if w.dtype != torch.int8 or tuple(w.shape) != (shell.out_features, shell.in_features):
        raise ValueError(f"{P}weight: expected int8 ({shell.out_features}, {shell.in_features}), "
                         f"got {w.dtype} {tuple(w.shape)}")
    if tuple(scb.shape) != (shell.out_features,):
        raise ValueError(f"{P}SCB: shape {tuple(scb.shape)}, expected ({shell.out_features},)")
    bias = sd.get(P + "bias")
    layer = Linear8bit(shell.in_features, shell.out_features, bias is not None,
                       threshold=getattr(shell, "threshold", 0.0), dtype=getattr(shell, "dtype", torch.float16),
                       device="meta")
    native = {P + "weight": w, P + "SCB": _f32_bits(scb)}
    if bias is not None:
        native[P + "bias"] = bias
    return layer, native


def layer_keys(P: str, keys) -> set[str]:
    """The bitsandbytes keys among ``keys`` that belong to the quantized layer at prefix ``P`` ("name.")."""
    return {k for k in keys if k.startswith(P) and (k[len(P):] in _LAYER_KEYS or k.startswith(P + "weight."))}


def import_layer(P: str, shell: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    """One quantized layer from its bitsandbytes tensors.

    ``shell``: the model's Linear4bit/Linear8bit at prefix ``P`` ("name."); ``state_dict`` holds at least the
    layer's keys (``layer_keys``). Returns a new layer on the meta device, in the checkpoint's format, and its
    tensors by full native name, for ``load_state_dict(assign=True)``. Raises ValueError naming the key when a
    tensor does not fit, KeyError when one is missing.
    """
    if P + "weight" not in state_dict:
        raise KeyError(f"{P}weight is missing from the state dict")
    try:
        if isinstance(shell, Linear4bit):
            if P + "SCB" in state_dict:
                raise ValueError(f"{P}: the checkpoint holds an 8-bit layer but the model has a 4-bit one")
            if not any(k.startswith(P + _QS_PREFIX) for k in layer_keys(P, state_dict)):
                raise ValueError(f"{P}weight is not a bitsandbytes 4-bit tensor (no {P}{_QS_PREFIX}* entry)")
            return _import_4bit(P, shell, state_dict)
        if P + "SCB" not in state_dict:
            raise ValueError(f"{P}: the model has an 8-bit layer but the checkpoint has no {P}SCB")
        return _import_8bit(P, shell, state_dict)
    except KeyError as e:
        raise KeyError(f"{e.args[0]} is missing (the quantized layer {P[:-1]} needs it)") from None


def load_bitsandbytes_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """Fill ``model`` (quantized by ``quantize_``, typically on the meta device) from a bitsandbytes state dict.

    Each quantized layer takes its format (quant type, blocksize, double quantization, dtype) from the checkpoint;
    the model decides which layers are quantized and their compute dtype / threshold. Tensors are assigned, not
    copied, so meta shells become real. Returns ``load_state_dict``'s (missing_keys, unexpected_keys).
    """
    quantized = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS) and n}
    native: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for P, shell in quantized.items():
        if P + "weight" not in state_dict and not strict:
            continue
        layer, tensors = import_layer(P, shell, state_dict)
        model.set_submodule(P[:-1], layer)
        native.update(tensors)
        consumed |= layer_keys(P, state_dict)
    for k, v in state_dict.items():
        if k not in consumed:
            native[k] = v
    return model.load_state_dict(native, strict=strict, assign=True)
