"""``halfbyte::int8_mixed_mm``'s CUDA kernel: LLM.int8() calls through prebuilt launches (``Plan``), cached by the
calls' device addresses and shapes.

Through ``int8_mm.int8_mixed_mm`` an LLM.int8() call costs ~600 Python function calls on the host (five launches'
keys, six allocations, argument checks): on an H100's host a FLUX step's 504 int8 calls outran the GPU inside
compiled regions (host 190 ms against 136 ms of GPU work) and left gaps in eager steps; a T5-XXL encode ran
host-bound (BENCHMARKS.md). A plan binds the launches of one call shape (``launch.Bound``): a call is then
two allocations (the output, one scratch buffer for the workspace, codes, scales and gathered outlier columns)
and three bound launches (two without a threshold; four with ``MMConfig.fuse_outliers`` off): the same kernels
with the same arguments as ``int8_mm.int8_mixed_mm``, hence its bits. The outlier flag kernel's persistent state
(a few hundred bytes, zero between launches) is the plan's own, one per stream; that path makes a zeroed one per
call. With a ``Share`` (eager layers of a group reading one input), the first member's call keeps its activation
scratch in the share and the others run two bound launches (the weight's outlier-column gathers, the GEMM) on it.

Plans are cached here, not in the layers, so that calls from compiled graphs (which reach this kernel through the
op with plain tensors) use them too. A plan holds no tensor of a call, only the addresses, shapes and dtypes it was
built for, and the cache key is exactly those of the call: a plan found for a call is by construction the plan of
that call, whatever tensor now sits at an address. A key gets a plan the second time it is seen (a one-off call
shape does not pay the build), and the cache is emptied when full.
"""

import torch
from torch import Tensor

from . import int8 as k8
from . import int8_mm as km
from .common import INTERPRET, scratch_alloc, scratch_free
from .launch import PlanCache, bind, hooks_installed
from .share import Share

#: Alignment of the scratch buffer's parts: bound launches were compiled for 16-byte aligned pointers.
_ALIGN = 256
#: The cached plans (one per layer and token count in use; a FLUX step uses 504), keyed by ``plan_key``.
PLANS = PlanCache()
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_A, _OUT, _SCRATCH, _STATE, _WG = 0, 1, 2, 3, 4  # per-call base addresses (the state: per stream)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Plan:
    """The launches of ``int8_mm.int8_mixed_mm`` for one call shape, bound to the weight's addresses.

    Built from a call's own tensors: A2 (M, K) float with unit column stride, CB (N, K) int8 and SCB (N,) float32
    contiguous, bias (N,) in A2's dtype or None, threshold >= 0. ``plan(A2)`` runs it for an input of the same
    shape, row stride, dtype and 16-byte alignment on the current stream and returns (M, N) in A2's dtype; with a
    ``Share`` (threshold > 0) the activation side comes from, or goes to, the share.

    Scratch: the activation part (workspace, codes, scales, gathered activation columns; ``act_bytes``) then the
    weight's gathered columns (``wg_bytes``), one allocation per call; a call that starts a share allocates the
    two apart and leaves the first in the share, and a call served by one allocates only the second.
    """

    __slots__ = ("out_shape", "dtype", "device", "index", "act_bytes", "wg_bytes", "state_size", "_states",
                 "_launches", "_reuse")

    def __init__(self, A2: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None, threshold: float):
        M, K = A2.shape
        N = CB.shape[0]
        dev = A2.device
        self.out_shape, self.dtype, self.device, self.index = (M, N), A2.dtype, dev, dev.index
        kp, es, thr = k8.padded_width(K), A2.element_size(), threshold > 0
        sizes = {"ws": 4 * k8.workspace_size(K) if thr else 4, "ca": M * K, "sca": 4 * M,
                 "xg": M * kp * es if thr else 0}
        offs, total = {}, 0
        for name, size in sizes.items():
            offs[name], total = total, total + _aligned(size)
        self.act_bytes, self.wg_bytes = total, _aligned(N * kp * es if thr else 0)
        scratch = torch.empty(self.act_bytes, dtype=torch.uint8, device=dev)
        wgs = torch.empty(self.wg_bytes, dtype=torch.uint8, device=dev)

        def part(name, dtype, *shape):
            n = sizes[name] // dtype.itemsize
            return scratch[offs[name]:offs[name] + sizes[name]].view(dtype)[:n].view(shape)

        out = torch.empty((M, N), dtype=A2.dtype, device=dev)
        ws = part("ws", torch.int32, sizes["ws"] // 4)
        ca, sca = part("ca", torch.int8, M, K), part("sca", torch.float32, M)
        where = {id(A2): (_A, 0), id(out): (_OUT, 0), id(ws): (_SCRATCH, offs["ws"]), id(ca): (_SCRATCH, offs["ca"]),
                 id(sca): (_SCRATCH, offs["sca"])}
        cfg = km.mm_config(M, N, K)
        self.state_size = k8.state_size(K) if thr else 0
        self._states = {}
        reuse = []
        if thr:
            xg, wg = part("xg", A2.dtype, M, kp), wgs.view(A2.dtype)[:N * kp].view(N, kp)
            count = ws[k8.count_offset(K):]
            state = torch.zeros(self.state_size, dtype=torch.int32, device=dev)
            A0 = A2[:0]  # no rows: the weight gathers alone, for a share's later members
            where.update({id(xg): (_SCRATCH, offs["xg"]), id(wg): (_WG, 0), id(A0): (_A, 0),
                          id(count): (_SCRATCH, offs["ws"] + 4 * k8.count_offset(K)), id(state): (_STATE, 0)})
            mm = km.mm_launches(ca, CB, sca, SCB, bias, out, cfg, (xg, wg, count))
            launches = [k8.flag_launch(A2, state, ws, threshold),
                        k8.quant_gather_launch(A2, ca, sca, ws, xg, CB, SCB, wg, threshold), *mm]
            reuse = [k8.quant_gather_launch(A0, ca, sca, ws, xg, CB, SCB, wg, threshold), *mm]
        else:
            launches = [k8.row_quant_launch(A2, ca, sca, ws, threshold),  # flags unread without a threshold
                        km.mm_launch(ca, CB, sca, SCB, bias, out, cfg)]
        self._launches, self._reuse = self._bind(launches, where), self._bind(reuse, where)

    @staticmethod
    def _bind(launches, where) -> list:
        bound_launches = []
        for fn, grid, args, kwargs in launches:
            free = tuple(i for i, a in enumerate(args) if id(a) in where)
            bound = bind(fn, grid, args, kwargs, free)
            if bound is None:
                raise RuntimeError("kernels.int8_plan.Plan: launches cannot be bound here (interpreter, launch hooks)")
            bound_launches.append((bound, tuple(where[id(args[i])] for i in free)))
        return bound_launches

    def _state(self, stream: int) -> Tensor | None:
        """The flag kernel's persistent state for launches on ``stream`` (None without a threshold): one per
        stream, so that launches on two streams never share one; zero between launches. While a CUDA graph is
        being captured nothing runs, so a state made then would stay unzeroed outside the graph: a capture gets a
        fresh state, zeroed by a node of the graph on each replay (a temporary of the graph, like the scratch)."""
        if not self.state_size:
            return None
        if torch._C._cuda_isCurrentStreamCapturing():
            return torch.zeros(self.state_size, dtype=torch.int32, device=self.device)
        state = self._states.get(stream)
        if state is None:
            state = self._states[stream] = torch.zeros(self.state_size, dtype=torch.int32, device=self.device)
        return state

    def __call__(self, A2: Tensor, share: Share | None = None, threshold: float = 0.0) -> Tensor:
        out = torch.empty(*self.out_shape, dtype=self.dtype, device=self.device)  # (ints: ~1 us less than a tuple)
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        # the call's temporaries come raw from the caching allocator, stream-ordered, and go back once the launches
        # are queued (later work on this stream may reuse them); the quantized input a share keeps is a tensor
        if share is not None and self.state_size and not torch._C._cuda_isCurrentStreamCapturing():
            key = Share.key(A2, threshold, stream, "plan")
            act = share.take(A2, key)
            wg_base = scratch_alloc(self.wg_bytes, stream)
            try:
                if act is not None:
                    bases = (A2.data_ptr(), out.data_ptr(), act.data_ptr(), 0, wg_base)
                    for bound, spec in self._reuse:
                        bound(stream, *[bases[k] + off for k, off in spec])
                    return out
                act = torch.empty(self.act_bytes, dtype=torch.uint8, device=self.device)
                share.put(A2, key, act)
                self._launch(stream, A2, out, act.data_ptr(), wg_base)
            finally:
                scratch_free(wg_base)
            return out
        act_base = scratch_alloc(self.act_bytes + self.wg_bytes, stream)
        try:
            self._launch(stream, A2, out, act_base, act_base + self.act_bytes)
        finally:
            scratch_free(act_base)
        return out

    def _launch(self, stream: int, A2: Tensor, out: Tensor, act_base: int, wg_base: int) -> None:
        state = self._state(stream)
        bases = (A2.data_ptr(), out.data_ptr(), act_base, 0 if state is None else state.data_ptr(), wg_base)
        for bound, spec in self._launches:
            bound(stream, *[bases[k] + off for k, off in spec])


def _rows(A: Tensor, K: int) -> Tensor | None:
    """A as (rows, K) without a copy, with unit column stride (any row stride), else None."""
    if A.is_contiguous():
        return A.view(-1, K)
    try:
        A2 = A.view(-1, K)  # e.g. a slice of a wider tensor; a view only where the leading dims merge
    except RuntimeError:
        return None
    return A2 if A2.stride(1) == 1 else None


def plan_key(A: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None, threshold: float) -> tuple | None:
    """The cache key of a call that a plan can serve (the addresses, shapes, row stride and dtypes it would be
    bound to), or None where the call must take ``int8_mm.int8_mixed_mm`` (interpreter, profiler hooks on triton's
    launches, rows without unit column stride, misaligned input, a bias in another dtype, tensors not on the
    current device, bad arguments, which that path reports)."""
    if INTERPRET or type(A) is not Tensor or not A.is_cuda or A.dtype not in _FLOATS or A.dim() == 0:
        return None
    K = A.shape[-1]
    if (CB.dtype != torch.int8 or SCB.dtype != torch.float32 or CB.dim() != 2 or CB.shape[1] != K or K == 0
            or A.numel() == 0 or not 0 < CB.shape[0] == SCB.numel() or threshold < 0):
        return None
    if not (CB.is_contiguous() and SCB.is_contiguous()) or A.data_ptr() % 16:
        return None
    A2 = _rows(A, K)
    if A2 is None:
        return None
    dev = A.get_device()
    if CB.get_device() != dev or SCB.get_device() != dev or dev != torch._C._cuda_getDevice():
        return None
    if bias is not None and (bias.dtype != A.dtype or not bias.is_contiguous() or bias.get_device() != dev
                             or bias.numel() != CB.shape[0]):
        return None
    if hooks_installed():
        return None
    return (A.dtype, A2.shape[0], CB.shape[0], K, A2.stride(0), CB.data_ptr(), SCB.data_ptr(),
            0 if bias is None else bias.data_ptr(), float(threshold), dev)


def int8_mixed_mm(A: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None, threshold: float,
                  share: Share | None = None) -> Tensor:
    """CUDA kernel of ``halfbyte::int8_mixed_mm`` (contract in ``int8_mm.int8_mixed_mm``): through a cached plan
    when the call allows one, else ``int8_mm.int8_mixed_mm``; both give the same bits. ``share``: the quantized
    activations of A shared with the other layers of a group (``Share``; eager calls of ``nn.Linear8bit`` only)."""
    key = plan_key(A, CB, SCB, bias, threshold)
    if key is None:
        return km.int8_mixed_mm(A, CB, SCB, bias, threshold, share=share)
    plan = PLANS.get(key, lambda: Plan(_rows(A, key[3]), CB, SCB, bias, threshold))
    if plan is None:  # first sighting
        return km.int8_mixed_mm(A, CB, SCB, bias, threshold, share=share)
    return plan(A, share, threshold).view(*A.shape[:-1], key[2])

