"""Which calls the fused 4-bit GEMM (``kernels.gemm_ring``) should serve, and how its persistent launch splits them:
the kernel's tiling as the route sees it, the token rule and the cost model of the fused kernel against dequantize +
cuBLAS, and the tile schedule. Pure arithmetic (no torch, no triton): ``gemm_ring`` re-exports all of it."""

import functools

BT = 256  # tokens per tile (``tile_tokens``: fewer for calls of up to 128 tokens)
BN = 128  # weight rows per tile
S_CHOICES = (1, 2, 3, 4, 6, 8)  # split factors compiled (S is a constexpr): a few specializations per weight
FUSED_MIN_M = 16  # up to this many tokens ``gemm_small`` serves (17-64 where this kernel does not)
# Tokens up to which compiled layers call ``gemm_4bit`` (routed by ``wanted``) rather than dequantize in the graph
# (``ops.fused_gemm_tokens``). 2048 until session 33: with the byte table and the 4-stage ring the kernel beats
# dequantize + cuBLAS at most counts up to 8192, and FLUX's compiled NF4 step (4096-4608 tokens) went from
# 1.041-1.044x bf16 (session 29, dequantized in the graph there) to 1.015-1.024x (BENCHMARKS.md). 16384 covers a
# 2048 x 2048 image's latents (its joint calls of 16896 tokens dequantize in the graph, as every count above does).
MAX_M = 16384
MIN_WORK = 1 << 24  # weight elements from which the kernel serves below MODEL_M tokens (3072 x 3072 lost there)
MODEL_WORK = 3072 * 3072  # ... and from MODEL_M tokens on, where the model decides (the smallest weight fitted)
# ``wanted``'s cost model from MODEL_M tokens on (fitted on an H200 with the byte-table decode, BENCHMARKS.md
# session 32: 56 times of 49 shapes, 640-8192 tokens; session 33's 4-stage 256-token ring re-measured 56 shapes,
# 3072 x 3072 added: route / best 1.004 with these constants, a refit gained < 0.2 %)
MODEL_M = 513
MARGIN = 1.0  # the route whose modelled time is lower (the model's ratio is within 9 % of the measured one)
RATE_FULL = 1.23  # K steps of a 128 x 256 tile per us per SM with every SM busy (the card's power bound)
RATE_ALONE = 1.5  # ... with few busy
LAUNCH_US, FIXUP_US, FIXUP_US_PER_PIECE = 6.0, 2.0, 1.0
DEQUANT_BYTES_PER_US, READ_BYTES_PER_US, CUBLAS_FLOP_PER_US, DC_US = 3.9e6, 2.5e6, 6.95e8, 5.0


def tile_tokens(M: int) -> int:
    """Tokens per tile (the kernel's BT, its wgmma N) for a call of M tokens: the smallest of 64, 128 and ``BT`` that
    holds them. Every tile decodes its weight rows again, so the kernel's K step costs the decode plus a wgmma of BT
    tokens: with 256-token tiles, 17-128 tokens spent 3/4 or more of it on rows past M. On an H200 (BENCHMARKS.md
    session 30) 64-token tiles took 0.41-0.57x the small-batch kernel's time at 64 tokens (six weights from 4096 x
    4096 to 14336 x 4096) and 128-token tiles 0.69-0.79x the 256-token ones' at 128 tokens."""
    return 64 if M <= 64 else 128 if M <= 128 else BT


def wanted(M: int, N: int, K: int, programs: int = 132) -> bool:
    """Whether a call of M tokens should take this kernel rather than dequantize + cuBLAS, on a device of
    ``programs`` SMs (or than the small-batch kernel, up to 64 tokens): from 17 tokens, weights of ``MIN_WORK``
    elements or more, and from ``MODEL_M`` tokens on only where ``fused_us`` is below ``MARGIN`` x
    ``dequantize_cublas_us``. From 17 tokens its 64-token tiles beat the small-batch kernel, which decodes the
    weight again for every 16 or 32 tokens (H200, BENCHMARKS.md session 30: 0.41-0.95x its time at 24-64 tokens
    of 4096 x 4096 to 14336 x 4096 weights; at 16 tokens it lost, 1.1-1.5x). Up to 512 tokens the dequantize (a
    fixed cost per call) is 25-45 % of the layer and the kernel takes 0.55-0.97x its time at every FLUX/T5 width
    (H100 and H200, sessions 24-31). Past that its schedule decides: 72 tiles on 132 SMs (640 tokens at 3072 x
    12288) leave 60 SMs idle (1.35x), and a last token tile that holds few tokens computes more than the tokens need;
    the model catches those. With the byte-table decode (session 32) the kernel takes 0.83-1.03x the time of
    dequantize + cuBLAS at 1024-8192 tokens of 3072 x 12288 to 14336 x 4096 weights (H200), so M has no upper
    bound. A 3072 x 3072 weight (under ``MIN_WORK``) has too few tiles to feed the SMs at up to 512 tokens (1.16x at
    512) and lost at most counts above; with 4 ring stages at 256-token tiles (session 33) it wins where its tiles
    make near-whole rounds (0.95-0.96x at 1024, 4096 and 8192 tokens) and the model routes it from ``MODEL_M`` on."""
    if M <= FUSED_MIN_M:
        return False
    if M < MODEL_M:
        return N * K >= MIN_WORK
    return N * K >= MODEL_WORK and _modelled(M, N, K, programs)


@functools.lru_cache(maxsize=4096)
def _modelled(M: int, N: int, K: int, programs: int) -> bool:
    return fused_us(M, N, K, programs) < MARGIN * dequantize_cublas_us(M, N, K)


def fused_us(M: int, N: int, K: int, programs: int = 132) -> float:
    """The kernel's modelled time (us) for M tokens of an (N, K) weight: the full rounds of 128 x 256 tiles at the
    card's throughput under full load (``RATE_FULL`` K steps per us per SM: bound by power, not by SM count, so a
    tail on fewer SMs runs faster per SM, up to ``RATE_ALONE``), the tail pieces, the split's fix-up and the
    launch. Fitted on 56 H200 times of 49 shapes from 640 to 8192 tokens (3.1 % rms; BENCHMARKS.md session 32).
    (Session 27's H100 fit, for the ``prmt`` decode, had RATE_FULL 1.25 and a larger fix-up.)"""
    n_tiles, k_steps = -(-M // tile_tokens(M)) * (N // BN), K // 64
    _, full, S = schedule(n_tiles, k_steps, programs)
    cap = RATE_FULL * programs
    t = LAUNCH_US + full * k_steps / RATE_FULL
    tail = n_tiles - full * programs
    if tail:
        t += tail * k_steps / min(cap, tail * S * RATE_ALONE) + (FIXUP_US + FIXUP_US_PER_PIECE * S if S > 1 else 0)
    return t


def dequantize_cublas_us(M: int, N: int, K: int) -> float:
    """The other path's modelled time (us): the dequantize (0.5 byte read and 2 written per weight at
    ``DEQUANT_BYTES_PER_US``) and cuBLAS's bf16 GEMM (its FLOPs at ``CUBLAS_FLOP_PER_US``, or the bf16 weight's read
    where that is longer), plus ``DC_US`` for the two launches. Fitted with ``fused_us`` on the H200 (4.0 % rms; the
    H100 fit of session 27 had the dequantize at 2.6e6 bytes/us and cuBLAS at 7.6e8 FLOP/us: the H200 dequantizes
    faster and its cuBLAS ran slower at 3072-8192 tokens)."""
    gemm = max(2.0 * M * N * K / CUBLAS_FLOP_PER_US, 2.0 * N * K / READ_BYTES_PER_US)
    return N * K * 2.5 / DEQUANT_BYTES_PER_US + gemm + DC_US


@functools.lru_cache(maxsize=1024)
def schedule(n_tiles: int, k_steps: int, programs: int) -> tuple[int, int, int]:
    """(grid, full rounds, S): every program runs ``full_rounds`` whole tiles; then the tiles left over (fewer
    than a round, or all of them when there are fewer tiles than programs) are split along K into S pieces of
    whole step pairs, one per program. S is the largest of ``S_CHOICES`` that the programs allow and at most
    k_steps / 8, so that every piece keeps at least 4 step pairs. Cached: every call of a layer asks it."""
    full = n_tiles // programs
    tail = n_tiles - full * programs
    S = 1
    if tail:  # the pieces (tail * S) must fit the programs
        S = max(s for s in S_CHOICES if s <= max(1, min(programs // tail, k_steps // 8)))
    grid = programs if full else tail * S
    return grid, full, S
