"""Quantizing a weight piece by piece: row ranges of bounded size, a private CUDA memory pool for the temporaries,
and double quantization of the absmax in pieces (``halfbyte.nn``'s ``from_linear`` and the loaders)."""

import contextlib
import math

import torch
from torch import Tensor

from .formats import blockwise
from .formats.codebooks import dynamic_map

#: Weights are quantized in row pieces of about this many elements (on the CPU; ``QUANT_PIECE_NUMEL_DEVICE`` on
#: accelerators). The reference kernels make several float32 temporaries of their input, and a memory-mapped
#: weight, or one in another dtype, is read and cast piece by piece: quantizing a layer never holds more than one
#: piece's worth of extra memory beside its result. On the CPU pieces are small (1 MiB as float32) because glibc
#: keeps freed temporaries of a few MiB resident; accelerators' caching allocators reuse blocks, and bigger pieces
#: there save kernel launches. Pieces cover whole 4-bit blocks (blocks never straddle rows of different pieces),
#: so the bytes equal those of quantizing the weight at once.
QUANT_PIECE_NUMEL = 1 << 18
QUANT_PIECE_NUMEL_DEVICE = 1 << 22


def piece_numel(device: torch.device) -> int:
    return QUANT_PIECE_NUMEL if device.type == "cpu" else QUANT_PIECE_NUMEL_DEVICE


def row_pieces(rows: int, cols: int, device: torch.device, multiple: int = 1) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of about ``piece_numel(device)`` elements; all but the last hold a multiple of
    ``multiple`` elements."""
    step = multiple // math.gcd(cols, multiple) if cols else 1
    per = max(step, piece_numel(device) // max(cols, 1) // step * step)
    return [(r, min(r + per, rows)) for r in range(0, rows, per)]


_SCRATCH: dict[int, object] = {}  # CUDA device index -> MemPool


@contextlib.contextmanager
def scratch(device: torch.device):
    """Allocate a quantization's temporaries (pieces of the float weight, per-piece results) from a private CUDA
    memory pool, apart from the layers' long-lived tensors.

    Why: the caching allocator hands a request a free block whole when splitting it would leave less than 1 MiB,
    and that slack stays allocated for the block's lifetime. Loading ~500 layers interleaves temporaries and
    results of many sizes, so results landing in blocks freed by temporaries kept 40-100 MB of slack beyond the
    model's bytes after a FLUX load (H200, BENCHMARKS.md) and raised the load's peak. With the temporaries in
    their own pool the results pack tightly. ``release_scratch()`` returns the pool's memory (loaders call it).
    """
    if device.type != "cuda" or not hasattr(torch.cuda, "use_mem_pool"):
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    pool = _SCRATCH.get(index)
    if pool is None:
        pool = _SCRATCH[index] = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool, device=index):
        yield


def release_scratch() -> None:
    """Give the quantization scratch pools' memory back to the devices (the end of a load)."""
    _SCRATCH.clear()  # a MemPool returns its cached blocks to the device when it is destroyed


def double_quantize(absmax: Tensor, codes: Tensor, nested: Tensor) -> Tensor:
    """(B,) float32 absmax -> codes (B,) uint8 and nested absmax (ceil(B/256),) float32 written into the given
    tensors; returns offset (1,) float32.

    bitsandbytes' ``compress_statistics``: ``absmax - mean(absmax)`` quantized blockwise (256) over the dynamic
    map, in pieces of whole nested blocks (the reference search keeps ~80 bytes of temporaries per value).
    """
    nb = blockwise.NESTED_BLOCKSIZE
    offset = absmax.mean().reshape(1)
    code = dynamic_map(absmax.device)
    per = max(nb, piece_numel(absmax.device) // 16 // nb * nb)
    for s in range(0, absmax.numel(), per):
        q, a = torch.ops.halfbyte.quantize_blockwise(absmax[s:s + per] - offset, code, nb)
        codes[s:s + q.numel()] = q
        nested[s // nb:s // nb + a.numel()] = a
    return offset
