"""Paged decode attention through Mosaic GPU: TMA page copies and wgmma (Hopper).

Same contract as ``pallas_kernels.paged_decode_attention`` (whose pure-jnp reference,
``paged_decode_attention_reference``, it is tested against): each sequence's one new query token
attends to its ``kv_lens[s]`` cached positions, position p living at page
``block_tables[s, p // B]``, slot ``p % B``.

Why a second kernel: the Triton kernel gathers keys with per-thread loads and keeps one 64-key
tile in flight per program; at head dim 64 it stalls on those loads. Here the Tensor Memory
Accelerator copies whole pages, several tiles ahead, into a shared-memory ring that one
warpgroup consumes with wgmma.

Measured on an H100 (benchmarks/NOTES_kernels.md, eleventh session): correct (the same error
against the XLA reference as the Triton kernel) but slower at the engine's batch-256 shapes:
llama-3.2-1b 163-182 us a layer against Triton's 149, llama-3.1-8b 263-272 against 254. Nsight
Compute: 128 registers and 92 KB of shared memory a program leave 12% occupancy and 69% of DRAM
bandwidth (Triton: 80%). Nothing calls it yet (the engine uses the Triton kernel); it is the
Hopper-native starting point (warp specialisation, P in registers, a persistent grid are next).

Design:
- One program (one warpgroup, 128 threads) per (sequence, kv head). The caches are viewed as
  [P*B, K*H] (a free reshape): the box of (page, kv head kh) is rows page*B .. +B, columns
  kh*H .. +H, one strided 2-D TMA copy. A tile of ``block_n`` keys is block_n / B pages: that
  many copies for K, landing on the slot's K barrier, and as many for V on its V barrier.
- The trip count is dynamic (the tiles of ``kv_lens[s]``), so the ring is managed by hand: the
  prologue issues the first ``stages`` tiles; tile j waits for its K, runs Q K^T, refills its K
  half with tile j + stages, runs the softmax, waits for its V, runs P V and refills its V half.
  A page past the sequence's last is never read: its copy is skipped and a plain arrival on the
  barrier stands in for it. The block-table entries of tile j + stages are read from global
  memory at the top of iteration j, so their latency hides behind the wait and Q K^T.
- wgmma's M is 64 rows: the G = N / K query rows of (s, kh) are rows 0..G-1 of the tile, the
  rest are zeros and never stored (rows of a matmul and of a row-wise softmax are independent).
  A TMA box into swizzled shared memory must start on an 8-row tile, so Q arrives in an
  unswizzled buffer and is copied (through registers) into the swizzled operand; the output
  leaves the same way. Both operands of each wgmma are in shared memory, P included: Mosaic
  GPU's CPU interpreter (the tests) only simulates wgmma on shared-memory operands.
- Scores are in base 2 (sm_scale * log2(e) folded into one multiply, then exp2); keys past
  kv_len are masked to -inf. Unused cache slots may hold anything, NaN included, and a masked
  key gives p = 0 but 0 * NaN = NaN in P V: on a partial last tile the V rows past kv_len (the
  tail of the last page, and stale rows of skipped pages) are zeroed in shared memory first.
- kv_lens[s] == 0 (a padded row) runs no tile and leaves l == 0: its output is written as 0.

``interpret=None`` runs Mosaic GPU's CPU interpreter on a CPU backend (the tests), the real
kernel on a GPU. ``supported`` raises ValueError for inputs the kernel cannot take, so that a
caller can fall back to the Triton kernel.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import interpret_params

LOG2E = math.log2(math.e)
WGMMA_ROWS = 64  # a warpgroup's wgmma covers 64 rows: the G query rows, padded
DEFAULT_BLOCK_N = 64
# Default stages: as many as keep the K and V rings within this many bytes (4 at H 64 and
# block_n 64, 2 at H 128), so that two or more programs still fit on an SM. Not yet measured.
_RING_BYTES = 64 * 1024
_SMEM_BYTES = 227 * 1024  # an H100 block's shared memory
_HEAD_DIMS = (64, 128)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# 128-byte rows (64 16-bit elements) in 8-row swizzled tiles: wgmma's operand layout, and the
# one TMA writes; H=128 is two such column tiles.
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def default_stages(block_n: int, head_dim: int, itemsize: int = 2) -> int:
    return max(2, _RING_BYTES // (2 * block_n * head_dim * itemsize))


def _smem_bytes(block_n: int, stages: int, head_dim: int, itemsize: int) -> int:
    ring = 2 * stages * block_n * head_dim  # K and V
    return (ring + 3 * WGMMA_ROWS * head_dim + WGMMA_ROWS * block_n) * itemsize


def supported(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
              kv_lens: jax.Array, *, block_n: int = DEFAULT_BLOCK_N,
              stages: int | None = None) -> None:
    """Raises ValueError, naming the argument and what is allowed, for inputs or tuning this
    kernel cannot take; returns None where it can (then the Triton kernel is the fallback)."""
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need q [S, N, H] and k_cache, v_cache [P, B, K, H] of one shape; got "
                         f"q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs or kv_lens.shape != (num_seqs,):
        raise ValueError(f"need block_tables [S, max_blocks] and kv_lens [S] with S={num_seqs}; "
                         f"got block_tables {block_tables.shape}, kv_lens {kv_lens.shape}")
    dtypes = {jnp.dtype(a.dtype) for a in (q, k_cache, v_cache)}
    if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        raise ValueError(f"q, k_cache and v_cache must all be bfloat16 or all float16 (wgmma); "
                         f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if head_dim != cache_head_dim or head_dim not in _HEAD_DIMS:
        raise ValueError(f"head dim H must be one of {_HEAD_DIMS} in q and the caches; got "
                         f"q H={head_dim}, caches H={cache_head_dim}")
    if num_heads % num_kv_heads or num_heads // num_kv_heads > WGMMA_ROWS:
        raise ValueError(f"query heads N={num_heads} must be a multiple of kv heads "
                         f"K={num_kv_heads}, with at most {WGMMA_ROWS} per kv head (wgmma rows)")
    if block_size % 8:
        raise ValueError(f"block size B={block_size} must be a multiple of 8 (a TMA box into "
                         "swizzled shared memory covers whole 8-row tiles)")
    if block_n <= 0 or block_n % 64 or block_n % block_size:
        raise ValueError(f"block_n={block_n} must be a positive multiple of 64 (swizzled wgmma "
                         f"tiles) and of the block size B={block_size}")
    stages = default_stages(block_n, head_dim, q.dtype.itemsize) if stages is None else stages
    if stages < 1:
        raise ValueError(f"stages={stages} must be at least 1")
    smem = _smem_bytes(block_n, stages, head_dim, q.dtype.itemsize)
    if smem > _SMEM_BYTES:
        raise ValueError(f"block_n={block_n}, stages={stages} at H={head_dim} need {smem} bytes "
                         f"of shared memory; at most {_SMEM_BYTES}")


def _online_softmax(scores, acc, m, l):
    """One tile's base-2 online-softmax update: scores f32[64, block_n] (masked keys -inf),
    acc f32[64, H], running max m and sum l f32[64]. Returns p and the rescaled acc, m, l."""
    m_new = jnp.maximum(m, scores.max(axis=1))
    alpha = jnp.exp2(m - m_new)  # 0 on the first tile (m = -inf), whose keys are not all masked
    p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return p, acc, m_new, l * alpha + p.sum(axis=1)


# One function for the whole program: its closures share the program's refs, scalars and ring.
def _kernel(q_gmem, k_gmem, v_gmem, bt_gmem, lens_gmem, o_gmem,
            qo_smem, q_smem, p_smem, k_smem, v_smem, q_bar, k_bars, v_bars, *,
            sm_scale: float, group: int, num_kv_heads: int, block_size: int, max_blocks: int,
            block_n: int, stages: int):
    # q_gmem, o_gmem [S*N, H]; k_gmem, v_gmem [P*B, K*H]; bt_gmem i32[S, max_blocks];
    # lens_gmem i32[S]; qo_smem (unswizzled), q_smem [64, H]; p_smem [64, block_n];
    # k_smem, v_smem [stages, block_n, H]
    s, kh = lax.axis_index("s"), lax.axis_index("kh")
    head_dim = q_smem.shape[-1]
    pages_per_tile = block_n // block_size
    q_row = (s * num_kv_heads + kh) * group
    plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(q_row, group)], qo_smem.at[pl.ds(0, group)], q_bar)
    kv_len = lens_gmem[s]
    num_tiles = lax.div(kv_len + (block_n - 1), block_n)

    def tile_pages(tile):
        # Block-table reads are clamped in bounds; the pages they name past the end go unread.
        return [bt_gmem[s, jnp.minimum(tile * pages_per_tile + i, max_blocks - 1)]
                for i in range(pages_per_tile)]

    def issue(cache_gmem, ring, bars, tile, slot, pages):
        bar = bars.at[slot]
        for i, page in enumerate(pages):
            needed = (tile * pages_per_tile + i) * block_size < kv_len

            @pl.when(needed)
            def _copy(page=page, i=i):
                plgpu.copy_gmem_to_smem(
                    cache_gmem.at[pl.ds(page * block_size, block_size),
                                  pl.ds(kh * head_dim, head_dim)],
                    ring.at[slot, pl.ds(i * block_size, block_size)], bar)

            pl.when(jnp.logical_not(needed))(lambda: plgpu.barrier_arrive(bar))

    for t in range(min(stages, pl.cdiv(max_blocks, pages_per_tile))):
        pages = tile_pages(t)

        @pl.when(t < num_tiles)
        def _prologue(t=t, pages=pages):
            issue(k_gmem, k_smem, k_bars, t, t, pages)
            issue(v_gmem, v_smem, v_bars, t, t, pages)

    plgpu.barrier_wait(q_bar)
    # Rows past G are zeros, so every row of every matmul stays finite.
    row = plgpu.broadcasted_iota(jnp.int32, q_smem.shape, 0)
    q_smem[...] = jnp.where(row < group, qo_smem[...], jnp.zeros((), q_smem.dtype))
    plgpu.commit_smem()
    qk_scale = sm_scale * LOG2E

    def body(j, carry):
        acc, m, l = carry
        slot = lax.rem(j, stages)
        refill = j + stages < num_tiles
        next_pages = tile_pages(j + stages)
        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
            return acc_ref[...]

        scores = pl.run_scoped(qk, plgpu.ACC((WGMMA_ROWS, block_n), jnp.float32))
        pl.when(refill)(lambda: issue(k_gmem, k_smem, k_bars, j + stages, slot, next_pages))

        key = j * block_n + plgpu.broadcasted_iota(
            jnp.int32, scores.shape, 1, layout=plgpu.Layout.WGMMA)
        scores = jnp.where(key < kv_len, scores * qk_scale, -jnp.inf)
        p, acc, m, l = _online_softmax(scores, acc, m, l)
        p_smem[...] = p.astype(p_smem.dtype)
        plgpu.barrier_wait(v_bars.at[slot])

        @pl.when((j == num_tiles - 1) & (lax.rem(kv_len, block_n) != 0))
        def _zero_v_past_kv_len():
            v_row = j * block_n + plgpu.broadcasted_iota(jnp.int32, (block_n, head_dim), 0)
            v_smem[slot] = jnp.where(v_row < kv_len, v_smem[slot], jnp.zeros((), v_smem.dtype))

        plgpu.commit_smem()

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
            return acc_ref[...]

        acc = acc + pl.run_scoped(pv, plgpu.ACC((WGMMA_ROWS, head_dim), jnp.float32))
        pl.when(refill)(lambda: issue(v_gmem, v_smem, v_bars, j + stages, slot, next_pages))
        return acc, m, l

    rows_layout = plgpu.Layout.WGMMA.reduce(1)
    init = (
        plgpu.layout_cast(jnp.zeros((WGMMA_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((WGMMA_ROWS,), -jnp.inf, jnp.float32), rows_layout),
        plgpu.layout_cast(jnp.zeros((WGMMA_ROWS,), jnp.float32), rows_layout),
    )
    acc, _, l = lax.fori_loop(0, num_tiles, body, init)
    l = jnp.where(l == 0.0, 1.0, l)  # no tile (a padded row): write 0, never 0/0
    qo_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(qo_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem.at[pl.ds(0, group)], o_gmem.at[pl.ds(q_row, group)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_n", "stages",
                                             "detect_races"))
def paged_decode_attention_mgpu(
    q: jax.Array,  # [S, N, H]
    k_cache: jax.Array,  # [P, B, K, H]
    v_cache: jax.Array,  # [P, B, K, H]
    block_tables: jax.Array,  # i32[S, max_blocks]
    kv_lens: jax.Array,  # i32[S], 0 for padded rows
    *,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    stages: int | None = None,
    detect_races: bool = False,
) -> jax.Array:  # [S, N, H] in q.dtype
    """Attention of each sequence's one new token over its ``kv_lens[s]`` cached positions.

    ``block_n``: keys per tile (a multiple of 64 and of B). ``stages``: tiles in flight, the
    slots of the K and V rings (None: ``default_stages``). ``detect_races``: the interpreter's
    race detector (tests only)."""
    supported(q, k_cache, v_cache, block_tables, kv_lens, block_n=block_n, stages=stages)
    num_seqs, num_heads, head_dim = q.shape
    num_pages, block_size, num_kv_heads, _ = k_cache.shape
    if stages is None:
        stages = default_stages(block_n, head_dim, q.dtype.itemsize)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    kernel = functools.partial(
        _kernel, sm_scale=float(sm_scale), group=num_heads // num_kv_heads,
        num_kv_heads=num_kv_heads, block_size=block_size, max_blocks=block_tables.shape[1],
        block_n=block_n, stages=stages)
    pages_per_tile = block_n // block_size
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((num_seqs * num_heads, head_dim), q.dtype),
        grid=(num_seqs, num_kv_heads),
        grid_names=("s", "kh"),
        scratch_types=(
            plgpu.SMEM((WGMMA_ROWS, head_dim), q.dtype),  # Q in, O out: unswizzled
            plgpu.SMEM((WGMMA_ROWS, head_dim), q.dtype, transforms=_SWIZZLED),
            plgpu.SMEM((WGMMA_ROWS, block_n), q.dtype, transforms=_SWIZZLED),
            plgpu.SMEM((stages, block_n, head_dim), q.dtype, transforms=_SWIZZLED),
            plgpu.SMEM((stages, block_n, head_dim), q.dtype, transforms=_SWIZZLED),
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=pages_per_tile, num_barriers=stages),
            plgpu.Barrier(num_arrivals=pages_per_tile, num_barriers=stages),
        ),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(interpret, detect_races),
        kernel_name="paged_decode_attention_mgpu",
    )(
        q.reshape(num_seqs * num_heads, head_dim),
        k_cache.reshape(num_pages * block_size, num_kv_heads * head_dim),
        v_cache.reshape(num_pages * block_size, num_kv_heads * head_dim),
        block_tables.astype(jnp.int32),
        kv_lens.astype(jnp.int32),
    )
    return out.reshape(q.shape)
