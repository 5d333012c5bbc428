"""Host-to-GPU copies at the pinned-memory rate, for loaders that read weights from (memory-mapped) host memory.

A copy from pageable memory runs at about a third of the pinned rate (H100: ~8 GB/s against ~25 GB/s) and is
synchronous. Here the data travels in pieces through two alternating pinned buffers per thread and dtype: the
host fills one while the GPU receives the other. Each buffer remembers the CUDA event of the last copy out of
it, and the host waits on that event before writing into it again, across calls too.
"""

import threading

import torch
from torch import Tensor

#: elements of a staging buffer piece (per dtype; 8 MiB for 2-byte dtypes)
PIECE_BYTES = 8 << 20

_local = threading.local()


class _Slot:
    __slots__ = ("buffer", "event")

    def __init__(self, numel: int, dtype: torch.dtype):
        self.buffer = torch.empty(numel, dtype=dtype, pin_memory=True)
        self.event = None

    def acquire(self, numel: int) -> Tensor:
        """The buffer's first ``numel`` elements, once the last copy out of it has finished."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.buffer[:numel]

    def release(self) -> None:
        self.event = torch.cuda.Event()
        self.event.record()


def _slots(dtype: torch.dtype, numel: int) -> list[_Slot]:
    table = getattr(_local, "slots", None)
    if table is None:
        table = _local.slots = {}
    slots = table.get(dtype)
    if slots is None or slots[0].buffer.numel() < numel:
        if slots is not None:
            for s in slots:
                s.acquire(0)  # the old buffers may still be read by a pending copy
        slots = table[dtype] = [_Slot(numel, dtype) for _ in range(2)]
    return slots


def uses_staging(t: Tensor, device: torch.device) -> bool:
    return t.device.type == "cpu" and torch.device(device).type == "cuda"


def row_pieces_to(w: Tensor, pieces: list[tuple[int, int]], device: torch.device, dtype: torch.dtype):
    """Yield ``(r0, r1, w[r0:r1] on device in dtype)`` for each row range of the 2-D ``w``; from host memory to a
    CUDA device through the pinned staging buffers (the piece is consumed on the current stream, in order)."""
    if not uses_staging(w, device) or not pieces:
        for r0, r1 in pieces:
            yield r0, r1, w[r0:r1].to(device, dtype)
        return
    K = w.shape[1]
    slots = _slots(w.dtype, max(r1 - r0 for r0, r1 in pieces) * K)
    for i, (r0, r1) in enumerate(pieces):
        slot = slots[i % 2]
        buf = slot.acquire((r1 - r0) * K)
        buf.copy_(w[r0:r1].reshape(-1))
        piece = buf.to(device, non_blocking=True)
        slot.release()
        yield r0, r1, piece.view(r1 - r0, K).to(dtype)


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t.to(device)``; a host tensor bound for a CUDA device goes through the pinned staging buffers."""
    device = torch.device(device)
    if not uses_staging(t, device) or t.numel() * t.element_size() < (1 << 20):
        return t.to(device)
    src = t.contiguous().reshape(-1)
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    dst = out.view(-1)
    step = max(1, PIECE_BYTES // t.element_size())
    slots = _slots(t.dtype, step)
    for i, s in enumerate(range(0, src.numel(), step)):
        slot = slots[i % 2]
        n = min(step, src.numel() - s)
        buf = slot.acquire(n)
        buf.copy_(src[s:s + n])
        dst[s:s + n].copy_(buf, non_blocking=True)
        slot.release()
    return out


#: Requests above this size come from the caching allocator's large pool (smaller ones from its small pool).
_LARGE_POOL_MIN = 1 << 20


def reserve_device_memory(device: torch.device, sizes: list[int]) -> None:
    """Before a load allocates long-lived tensors of ``sizes`` bytes on a CUDA ``device``, make the caching
    allocator hold one free segment of their total large-pool size, so that they are carved from it.

    Why: a request above 10 MB otherwise gets its own segment rounded up to 2 MB, and a block is not split when
    less than 1 MiB would remain, so up to 1 MiB per large tensor stays allocated as slack (~40-60 MB for a FLUX
    transformer, BENCHMARKS.md). Splitting one big free block wastes nothing. The reservation is freed at once, so
    its momentary allocation never exceeds the tensors the load is about to allocate anyway; it is skipped when
    the device lacks the room.
    """
    if device.type != "cuda":
        return
    total = sum(n for n in sizes if n > _LARGE_POOL_MIN)
    if total < (64 << 20):
        return
    free, _ = torch.cuda.mem_get_info(device)
    if total > free:
        return
    try:
        torch.empty(total, dtype=torch.uint8, device=device)  # dropped at once: cached as one free block
    except torch.OutOfMemoryError:
        pass
