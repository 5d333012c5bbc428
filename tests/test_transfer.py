"""``halfbyte.transfer.reserve_device_memory``: the decision of what to reserve before a load (the effect on the
allocator, exact model bytes after a FLUX-sized load, is measured on the GPU in BENCHMARKS.md)."""

import torch

from halfbyte import transfer

MB = 1 << 20


def _spy(monkeypatch, free_bytes):
    calls = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            calls.append(args[0])
            return real_empty(0)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes))
    return calls


def test_reserves_the_large_pool_total_once(monkeypatch):
    calls = _spy(monkeypatch, free_bytes=10_000 * MB)
    sizes = [40 * MB, 30 * MB + 123, MB, 512 * 1024, 7]  # tensors up to 1 MiB come from the small pool
    transfer.reserve_device_memory(torch.device("cuda", 0), sizes)
    assert calls == [70 * MB + 123]


def test_skips_cpu_small_totals_and_too_little_free_memory(monkeypatch):
    calls = _spy(monkeypatch, free_bytes=100 * MB)
    transfer.reserve_device_memory(torch.device("cpu"), [500 * MB])
    transfer.reserve_device_memory(torch.device("cuda", 0), [20 * MB, 30 * MB])  # under 64 MB: no reservation
    transfer.reserve_device_memory(torch.device("cuda", 0), [200 * MB])  # more than the device has free
    assert calls == []


def test_streaming_loader_counts_final_dtype_bytes():
    from halfbyte.io.streaming import _final_bytes
    t = torch.empty(3, 4, device="meta", dtype=torch.float32)
    assert _final_bytes(t, torch.bfloat16) == 24 and _final_bytes(t, None) == 48
    q = torch.empty(10, device="meta", dtype=torch.uint8)
    assert _final_bytes(q, torch.bfloat16) == 10
