"""Dequantize the next 4-bit weight on a side stream while the current layer's GEMM runs.

For M > 1 ``gemm_4bit`` dequantizes the whole weight and calls cuBLAS; the dequantize kernel is ~6 % of a FLUX
step's GPU time and ~40 % of a T5 layer's at 512 tokens. A model calls its layers in the same order every step, so
this module learns which weight follows which (the first step runs synchronously) and, when layer i runs,
dequantizes layer i+1's weight on a second stream into one of two workspace slots, overlapping the memory-bound
dequantize with layer i's compute-bound GEMM (docs/kernel-notes.md §2, plan 2). Layer i+1 then waits on an event
instead of dequantizing.

Correctness never depends on the prediction: a slot is used only when it holds exactly the weight asked for
(same data pointers, same version counters, same format and dtype); otherwise the weight is dequantized on the
spot as before. Both paths run the same kernel, so the bytes are identical. A slot keeps strong references to
the statistics it was dequantized from (so their memory cannot be reused under its key) and a weak reference to
the packed weight, which must be the very tensor asked for. The successor table holds the packed weights weakly:
a freed model's entries go with it. Two slots of the largest weight seen stay allocated until ``release()`` or
``set_enabled(False)`` (FLUX: 2 x 75 MB in bf16); the synchronous path's per-call temporary goes away.

Ordering: the side stream first waits for everything issued on the caller's stream so far (the slot it overwrites
was last read by an earlier GEMM, and weights may just have been written), then dequantizes; the consumer waits
on the slot's event. Off during CUDA graph capture (a side-stream fork would have to join inside the graph), and
when ``HALFBYTE_PREFETCH=0`` or after ``set_enabled(False)``.
"""

import functools
import os
import weakref

import torch

_enabled = os.environ.get("HALFBYTE_PREFETCH", "1") != "0"
#: CUDA priority of the side stream (lower is more urgent; torch's default streams have 0).
PRIORITY = 0

#: (tensors, static, out) -> None: dequantizes into ``out`` on the current stream; set by ``gemm4bit``.
DEQUANT_INTO = None


def set_enabled(on: bool) -> None:
    """Turn the side-stream dequantize on or off for later calls (process-wide); off also frees the slots."""
    global _enabled
    _enabled = bool(on)
    if not on:
        for pf in _PREFETCHERS.values():
            pf.release()
        _PREFETCHERS.clear()


def enabled() -> bool:
    return _enabled


def _version(t) -> int:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter: their weights are never prefetched
        return -1


def _key(tensors, static) -> tuple:
    """Identity of a dequantized weight: its tensors' data pointers and versions, and the static arguments."""
    return tuple(None if t is None else (t.data_ptr(), _version(t)) for t in tensors) + static


class _Call:
    """Enough to dequantize a weight again later: a weak reference to the packed weight (the layer's parameter,
    whose death removes the entry through ``on_dead``), strong ones to its small statistics, the static
    arguments and the key the call had."""

    __slots__ = ("ref", "stats", "static", "key")

    def __init__(self, tensors, static, key, on_dead):
        self.ref = weakref.ref(tensors[0], on_dead)
        self.stats, self.static, self.key = tensors[1:], static, key

    def tensors(self):
        B = self.ref()
        return None if B is None else (B, *self.stats)


class _Slot:
    __slots__ = ("buf", "key", "ref", "stats", "ready")

    def __init__(self):
        self.buf = None  # uint8 workspace, allocated on the caller's stream
        self.key = None  # key of the weight it holds
        self.ref = None  # weak reference to that packed weight: it must be the very tensor asked for
        self.stats = None  # strong references to its statistics: their memory cannot be reused under the key
        self.ready = torch.cuda.Event()  # recorded on the side stream after the write

    def holds(self, key, B) -> bool:
        return self.key == key and self.ref() is B


class Prefetcher:
    """Per CUDA device: the successor table, two slots, the side stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device, priority=PRIORITY)
        self.fork = torch.cuda.Event()
        self.slots = (_Slot(), _Slot())
        self.next_of: dict[tuple, _Call] = {}
        self.prev = None  # key of the previous call
        self.turn = 0
        self.hits = self.misses = 0

    def release(self) -> None:
        """Empty both slots (their memory returns to the allocator) and forget the order."""
        main = torch.cuda.current_stream(self.device)
        for s in self.slots:
            main.wait_event(s.ready)  # no workspace is freed while the side stream may still write it
            s.buf = s.key = s.ref = s.stats = None
        self.next_of.clear()
        self.prev = None

    def _forget(self, prev, ref) -> None:
        call = self.next_of.get(prev)
        if call is not None and call.ref is ref:
            del self.next_of[prev]

    def take(self, tensors: tuple, static: tuple, dtype: torch.dtype, numel: int, dequant):
        """The (numel,) ``dtype`` weight of this call (``tensors[0]`` the packed weight, then its statistics):
        a prefetched slot, else ``dequant()`` now. Starts dequantizing the predicted next weight on the side
        stream before returning."""
        key = _key(tensors, static)
        prev, self.prev = self.prev, key
        if prev is not None and prev != key:
            known = self.next_of.get(prev)
            if known is None or known.key != key or known.ref() is not tensors[0]:
                self.next_of[prev] = _Call(tensors, static, key, functools.partial(self._forget, prev))
        main = torch.cuda.current_stream(self.device)
        current = None
        for i, s in enumerate(self.slots):
            if s.holds(key, tensors[0]):
                main.wait_event(s.ready)
                current = i
                break
        self._prefetch_next(key, main, current)
        if current is None:
            self.misses += 1
            return dequant()
        self.hits += 1
        return self.slots[current].buf[:numel * dtype.itemsize].view(dtype)

    def _prefetch_next(self, key, main, current) -> None:
        call = self.next_of.get(key)
        if call is None:
            return
        tensors = call.tensors()
        if tensors is None:  # the next layer is gone
            del self.next_of[key]
            return
        nkey = call.key
        if nkey == key or self.slots[0].holds(nkey, tensors[0]) or self.slots[1].holds(nkey, tensors[0]):
            return
        if _key(tensors, call.static) != nkey:  # rewritten in place since: learn it again
            del self.next_of[key]
            return
        if current is None:
            self.turn ^= 1
            idx = self.turn
        else:
            idx = 1 - current
        s = self.slots[idx]
        dtype, numel = call.static[-2], call.static[-1]
        nbytes = numel * dtype.itemsize
        if s.buf is None or s.buf.numel() < nbytes:
            main.wait_event(s.ready)  # the old workspace's last write precedes any reuse of its memory on main
            s.buf = None
            s.buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.fork.record(main)
        self.stream.wait_event(self.fork)
        DEQUANT_INTO(tensors, call.static, s.buf[:nbytes].view(dtype), self.stream)
        s.key, s.ref, s.stats = nkey, call.ref, tensors[1:]
        s.ready.record(self.stream)


_PREFETCHERS: dict[torch.device, Prefetcher] = {}


def prefetcher(device: torch.device) -> Prefetcher | None:
    """The device's prefetcher, or None when prefetching is off or the current stream is being captured."""
    if not _enabled or torch.cuda.is_current_stream_capturing():
        return None
    pf = _PREFETCHERS.get(device)
    if pf is None:
        pf = _PREFETCHERS[device] = Prefetcher(device)
    return pf
