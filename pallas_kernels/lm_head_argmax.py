"""The LM head and the greedy argmax in one launch: ``argmax(round(x @ W))`` without the logits.

A greedy decode step's logits are written by the LM head's GEMM and read back once by the argmax:
at batch 256 and a 128k vocabulary that is 66 MB each way (~45 us of an H100's bandwidth a step,
next to the 0.53 GB of weights the head reads). Here each output tile's epilogue reduces its own
logits to one (maximum, first index) pair a row, and a few XLA ops pick each row's first tile
holding the maximum. The result is the unfused path's: the logits are rounded to x's dtype
before they are compared (as the model's GEMM stores them), ties go to the first index, as
``jnp.argmax``. NaN logits are not treated as maxima.

Lowering: Mosaic GPU (TMA + wgmma, Hopper). The weight is [V, D] (``transposed=True``: a tied
embedding table, read as the B operand transposed in shared memory) or [D, V] (an untied head).
Warp-specialized, as ``stacked_matmul_mgpu``'s ``_kernel_ws``: a memory warpgroup streams x and
weight tiles through ``max_concurrent_steps`` slots, two compute warpgroups each multiply half
of the tile's rows. Persistent programs walk the vocabulary's column blocks (row blocks
fastest), and because the memory warpgroup runs ahead, the next tile's copies land while the
compute warpgroups reduce and store the last one: no pipeline fill between tiles.

``interpret=None`` runs Mosaic GPU's CPU interpreter on a CPU backend (the tests), the real
kernel on a GPU. ``supports`` says which shapes the kernel takes.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.argmax import merge_chunks
from pallas_kernels.mgpu_common import (WGMMA_MIN_COLS, WGMMA_ROWS, interpret_params, num_sms,
                                        round_up, warp_specialized_pipeline)
from pallas_kernels.stacked_common import fit_block

# Tiles (default_tiles), measured on an H100 (benchmarks/lm_head_variants.py, NOTES_kernels
# sixteenth section), 4 copies in flight: 128 x 256 where 256 divides the vocabulary (the
# llama heads: fastest at T 64-256 against 256 x 128 and 128 x 128 with 6 in flight), else
# 256 x 128 (qwen3-0.6b's 151,936: 146 against 158 us for 128 x 128 at T 256).
DEFAULT_BLOCK_K = 64
DEFAULT_STEPS = 4
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(hidden_size: int, vocab_size: int, dtype) -> bool:
    """Whether ``lm_head_argmax`` takes a head of this shape and dtype."""
    return (jnp.dtype(dtype) in _DTYPES and hidden_size % 16 == 0
            and vocab_size % WGMMA_MIN_COLS == 0 and vocab_size < 2 ** 24)


def default_tiles(vocab_size: int) -> tuple[int, int]:
    """(block_m, block_n) where the caller gives none."""
    return (128, 256) if vocab_size % 256 == 0 else (256, 128)


def _kernel(x_gmem, w_gmem, max_gmem, idx_gmem, *, transposed: bool, m_tiles: int,
            n_tiles: int, block_m: int, block_n: int, block_k: int, k_steps: int, steps: int,
            logits_dtype):
    wg_m = block_m // 2  # each compute warpgroup's rows
    delay = 1 if steps > 1 else 0
    w_block = (block_n, block_k) if transposed else (block_k, block_n)

    def make_pipeline(body, compute_context):
        spec = functools.partial(plgpu.BlockSpec, delay_release=delay)
        return warp_specialized_pipeline(
            body, compute_context,
            [spec((block_m, block_k), lambda k: (0, k)),
             spec(w_block, (lambda k: (0, k)) if transposed else (lambda k: (k, 0)))],
            k_steps, steps)

    def ignore(*_, **__):
        return None

    allocations = make_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem)

    @functools.partial(pl.run_scoped, allocations=allocations,
                       max_smem=plgpu.SMEM((2, wg_m), jnp.float32),
                       idx_smem=plgpu.SMEM((2, wg_m), jnp.int32), collective_axes="wg")
    def _scope(allocations, max_smem, idx_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info):
            (t,) = info.index
            mi, nb = lax.rem(t, m_tiles), lax.div(t, m_tiles)
            row0 = mi * block_m + wg * wg_m

            def compute_context(eval_pipeline):
                def acc_scope(acc):
                    eval_pipeline((acc,))
                    # Rounded to the logits' dtype first, as the unfused GEMM stores them.
                    logits = acc[...].astype(logits_dtype).astype(jnp.float32)
                    row_max = logits.max(axis=1)
                    cols = plgpu.broadcasted_iota(jnp.int32, (wg_m, block_n), 1,
                                                  layout=plgpu.Layout.WGMMA)
                    hit = logits == lax.broadcast_in_dim(row_max, logits.shape, (0,))
                    first = jnp.where(hit, cols, block_n).min(axis=1)
                    max_smem[wg] = row_max
                    idx_smem[wg] = first + nb * block_n
                    plgpu.commit_smem()
                    out_rows = pl.ds(row0, wg_m)
                    plgpu.copy_smem_to_gmem(max_smem.at[wg], max_gmem.at[nb, out_rows])
                    plgpu.copy_smem_to_gmem(idx_smem.at[wg], idx_gmem.at[nb, out_rows])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                pl.run_scoped(acc_scope, plgpu.ACC((wg_m, block_n)))

            def body(_, x_smem, w_smem, accs):
                (acc,) = accs
                rows = x_smem.at[pl.ds(wg * wg_m, wg_m)]
                plgpu.wgmma(acc, rows, w_smem.transpose((1, 0)) if transposed else w_smem)
                plgpu.wgmma_wait(delay)
                return accs

            cols = pl.ds(nb * block_n, block_n)
            make_pipeline(body, compute_context)(
                x_gmem.at[pl.ds(mi * block_m, block_m)],
                w_gmem.at[cols] if transposed else w_gmem.at[:, cols],
                allocations=allocations)

    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("transposed", "block_m", "block_n", "block_k",
                                             "max_concurrent_steps", "interpret"))
def lm_head_argmax(
    x: jax.Array,  # [T, D]
    w: jax.Array,  # [V, D] with transposed (a tied embedding table), else [D, V]
    *,
    transposed: bool,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    max_concurrent_steps: int = DEFAULT_STEPS,
    interpret: bool | None = None,
) -> jax.Array:
    """i32[T]: each row's first index of the maximum of ``(x @ W)`` rounded to x's dtype, W
    being ``w.T`` with ``transposed``, else ``w``.

    ``block_m`` (a multiple of 128: two warpgroups of 64-row wgmmas) shrinks to T rounded up to
    128; ``block_n`` and ``block_k`` shrink to the largest power of two dividing V and D.
    ``block_m`` / ``block_n`` None: ``default_tiles``.
    ``max_concurrent_steps``: TMA copies in flight."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x must be [T, D] and w [V, D] or [D, V]; got {x.shape}, {w.shape}")
    vocab, d = w.shape if transposed else w.shape[::-1]
    if x.shape[1] != d:
        raise ValueError(f"x's width {x.shape[1]} != the head's hidden size {d} (w {w.shape}, "
                         f"transposed={transposed})")
    if x.dtype != w.dtype or jnp.dtype(x.dtype) not in _DTYPES:
        raise ValueError(f"x and w must both be bfloat16 or both float16 (wgmma); got "
                         f"{x.dtype}, {w.dtype}")
    if not supports(d, vocab, x.dtype):
        raise ValueError(f"lm_head_argmax needs D % 16 == 0 and V % {WGMMA_MIN_COLS} == 0 "
                         f"(V < 2**24); got D={d}, V={vocab}")
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return jnp.zeros((0,), jnp.int32)
    default_m, default_n = default_tiles(vocab)
    block_m = default_m if block_m is None else block_m
    block_n = default_n if block_n is None else block_n
    row_unit = 2 * WGMMA_ROWS
    if block_m <= 0 or block_m % row_unit:
        raise ValueError(f"block_m={block_m} must be a positive multiple of {row_unit}")
    block_m = min(block_m, round_up(num_tokens, row_unit))
    block_n = fit_block(block_n, vocab, WGMMA_MIN_COLS, "V", "wgmma's N")
    block_k = fit_block(block_k, d, 16, "D", "wgmma's K")
    k_steps = d // block_k
    padded = round_up(num_tokens, block_m)
    x_padded = jnp.pad(x, ((0, padded - num_tokens), (0, 0))) if padded != num_tokens else x
    m_tiles, n_tiles = padded // block_m, vocab // block_n
    kernel = functools.partial(
        _kernel, transposed=transposed, m_tiles=m_tiles, n_tiles=n_tiles, block_m=block_m,
        block_n=block_n, block_k=block_k, k_steps=k_steps,
        steps=min(max_concurrent_steps, k_steps), logits_dtype=x.dtype)
    interp = interpret_params(interpret)
    programs = 4 if interp else num_sms()
    maxima, firsts = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((n_tiles, padded), jnp.float32),
                  jax.ShapeDtypeStruct((n_tiles, padded), jnp.int32)),
        grid=(min(m_tiles * n_tiles, programs),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interp,
        kernel_name=f"lm_head_argmax_{d}x{vocab}",
    )(x_padded, w)
    return merge_chunks(maxima[:, :num_tokens].T, firsts[:, :num_tokens].T)


def lm_head_argmax_reference(x: jax.Array, w: jax.Array, *, transposed: bool,
                             **_) -> jax.Array:
    """The unfused path: logits in x's dtype from an f32-accumulated GEMM, then jnp.argmax."""
    logits = jnp.dot(x, w.T if transposed else w, preferred_element_type=jnp.float32)
    return jnp.argmax(logits.astype(x.dtype).astype(jnp.float32), axis=-1).astype(jnp.int32)
