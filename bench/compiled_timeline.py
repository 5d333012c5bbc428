"""Where a FLUX step's GPU waits for the host: block by block, host issue time against GPU time.

    python bench/compiled_timeline.py [--compile] [--variants bf16 hb-nf4 ...] [--cprofile hb-nf4 ...]

Runs ``bench/step.py``'s FLUX step (same model, variants and method), and after each variant's timed steps records
one more step with a mark before and after every transformer block and every other child of the model (embedders,
rotary table, output norm and projection): the host's clock (``perf_counter``) and a CUDA event. Both clocks start
together after a synchronize, when the GPU is idle, so for each mark ``lag = GPU time - host time`` is how far the
GPU runs behind the host's launches. While the lag stays large the host is ahead and its cost is hidden; where it
falls to ~0 the GPU has caught up and waits for each launch. Per module it prints the host's time to issue it, the
GPU's time between its marks, the lag at its start and the GPU's time at its start; then the totals by block
class. ``--cprofile`` also prints a cProfile of one step of those variants (host-side Python: where the issue time
goes); ``--profile`` (bench/step.py's) the top CUDA kernels.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step  # noqa: E402
from benchutil import print_cprofile  # noqa: E402

CPROFILE: set[str] = set()


class _Marked(nn.Module):
    """Calls ``inner`` between two marks (host clock + CUDA event); outside any compiled region."""

    def __init__(self, inner: nn.Module, name: str, marks: list):
        super().__init__()
        self.inner, self.name, self.marks = inner, name, marks

    def forward(self, *args, **kwargs):
        self._mark("start")
        out = self.inner(*args, **kwargs)
        self._mark("end")
        return out

    def _mark(self, what: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.marks.append((self.name, what, time.perf_counter(), ev))


def _plain_steps(call, n: int = 5) -> str:
    """``n`` unmarked steps: each one's wall time (synchronize to synchronize) / GPU span (events at its ends), ms."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        ev0.record()
        call()
        ev1.record()
        torch.cuda.synchronize()
        out.append(f"{(time.perf_counter() - t0) * 1e3:.1f}/{ev0.elapsed_time(ev1):.1f}")
    return " ".join(out)


def probe(kind: str, model: nn.Module, call, label: str) -> None:
    before = _plain_steps(call)
    marks: list = []
    lists = [(n, getattr(model, n)) for n in ("transformer_blocks", "single_transformer_blocks")
             if isinstance(getattr(model, n, None), nn.ModuleList)]
    saved = {n: list(ml) for n, ml in lists}
    for n, ml in lists:
        for i, blk in enumerate(saved[n]):
            ml[i] = _Marked(blk, f"{'double' if n == 'transformer_blocks' else 'single'}{i}", marks)
    # the model's other children (embedders, rotary table, output norm and projection), called one after another
    children = {n: m for n, m in model.named_children() if not isinstance(m, nn.ModuleList)}
    for n, m in children.items():
        setattr(model, n, _Marked(m, n, marks))
    try:
        call()  # the wrappers sit outside the compiled blocks: no recompile, but one warm call all the same
        rows = []
        for _ in range(3):
            marks.clear()
            torch.cuda.synchronize()
            ev0 = torch.cuda.Event(enable_timing=True)
            ev0.record()
            h0 = time.perf_counter()
            call()
            h_end = time.perf_counter()
            ev_end = torch.cuda.Event(enable_timing=True)
            ev_end.record()
            torch.cuda.synchronize()
            rows.append(_rows(marks, ev0, h0) + [("step", (h_end - h0) * 1e3, ev0.elapsed_time(ev_end), 0.0, 0.0)])
    finally:
        for n, ml in lists:
            for i, blk in enumerate(saved[n]):
                ml[i] = blk
        for n, m in children.items():
            setattr(model, n, m)
    print(f"\n### unmarked steps {label} {kind}, wall / GPU ms: before the marked ones {before}; after them "
          f"{_plain_steps(call)}")
    # median over the three steps, per block
    names = [r[0] for r in rows[0]]
    med = [(n, *(statistics.median(r[i][k] for r in rows) for k in (1, 2, 3, 4))) for i, n in enumerate(names)]
    print(f"\n### timeline {label} {kind}: module, host issue ms, GPU ms (between its marks), lag at start ms, "
          f"GPU ms at start")
    for n, host, gpu, lag, at in med:
        print(f"  {n:24s} {host:7.3f} {gpu:7.3f} {lag:7.2f} {at:8.3f}")
    for cls in ("double", "single"):
        sel = [r for r in med if r[0].startswith(cls)]
        if sel:
            host = sum(r[1] for r in sel)
            gpu = sum(r[2] for r in sel)
            starved = sum(1 for r in sel if r[3] < 0.2)
            print(f"  {cls}: {len(sel)} blocks, host {host:.1f} ms, GPU {gpu:.1f} ms, mean host/GPU per block "
                  f"{host / len(sel):.3f} / {gpu / len(sel):.3f}, blocks starting with lag < 0.2 ms: {starved}")
    if kind in CPROFILE:
        print_cprofile(call, 1, f"cProfile, one step, {label} {kind}", limit=40)


def _rows(marks, ev0, h0) -> list[tuple]:
    """(module, host ms from its start mark to its end mark, GPU ms between them, lag at its start, GPU ms from the
    step's start to its start)."""
    out = []
    for (name, what, h, ev), (name2, what2, h2, ev2) in zip(marks[::2], marks[1::2]):
        assert (name, what, what2) == (name2, "start", "end"), (name, what, name2, what2)
        g, g2 = ev0.elapsed_time(ev), ev0.elapsed_time(ev2)
        out.append((name, (h2 - h) * 1e3, g2 - g, g - (h - h0) * 1e3, g))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", nargs="*", default=["bf16", "hb-nf4"])
    ap.add_argument("--cprofile", nargs="*", default=[], help="variants whose step is also cProfiled")
    ap.add_argument("--profile", nargs="*", default=[], help="variants whose step's kernels are profiled")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    CPROFILE.update(a.cprofile)
    step.PROFILE.update(a.profile)
    step.ROUNDS = a.rounds
    step.AFTER_STEPS.append(probe)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    print(step.table(step.flux(a.variants, a.compile)))


if __name__ == "__main__":
    main()
