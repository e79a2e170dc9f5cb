"""Row argmax of a decode step's logits, split over many programs: the greedy sampler's token.

At batch 256 the logits of a 128k vocabulary are [256, 128256]; XLA's argmax of them is one
reduction fusion whose 256 rows keep it below the copy bandwidth (2.05 TB/s on an H100,
benchmarks/NOTES_engine.md). Here a grid of (row block, column chunk) programs each walk their
chunk in tiles, keeping a running maximum and its first index per row; a few XLA ops then take
the first chunk holding each row's maximum. The result is jnp.argmax's: the first index of the
maximum (of the values widened to f32; NaN is not treated as a maximum).

Lowering: Pallas with the Triton backend; ``interpret=None`` runs the Pallas interpreter on a
CPU backend. Loads use integer-array indexers with masks, as the other Triton kernels here.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.stacked_common import use_interpret

DEFAULT_BLOCK_ROWS = 4
DEFAULT_BLOCK_COLS = 1024
DEFAULT_CHUNKS = 32
DEFAULT_NUM_WARPS = 4


def _kernel(x_ref, m_ref, i_ref, *, num_rows: int, vocab: int, block_rows: int,
            block_cols: int, tiles: int, chunks: int):
    chunk = pl.program_id(1)
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    row_ok = rows < num_rows
    start = chunk * tiles * block_cols

    def tile(j, carry):
        best, best_at = carry
        cols = start + j * block_cols + jnp.arange(block_cols)
        ok = row_ok[:, None] & (cols < vocab)[None, :]
        x = plt.load(x_ref.at[rows[:, None], cols[None, :]], mask=ok,
                     other=-jnp.inf).astype(jnp.float32)
        m = jnp.max(x, axis=1)
        at = jnp.min(jnp.where(x == m[:, None], cols[None, :], vocab), axis=1)
        better = m > best  # strictly: an equal maximum in a later tile keeps the earlier index
        return jnp.where(better, m, best), jnp.where(better, at, best_at)

    init = (jnp.full((block_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((block_rows,), jnp.int32))
    best, best_at = jax.lax.fori_loop(0, tiles, tile, init)
    out_at = rows * chunks + chunk  # the partials are [num_rows * chunks], row-major
    plt.store(m_ref.at[out_at], best, mask=row_ok)
    plt.store(i_ref.at[out_at], best_at.astype(jnp.int32), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols", "chunks", "num_warps",
                                             "interpret"))
def argmax_rows(
    logits: jax.Array,  # [R, V], any float dtype
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
    chunks: int = DEFAULT_CHUNKS,
    num_warps: int = DEFAULT_NUM_WARPS,
    interpret: bool | None = None,
) -> jax.Array:  # i32[R]
    """The first index of each row's maximum, as ``jnp.argmax(logits, axis=-1)``.
    ``block_rows`` x ``block_cols``: the tile a program loads at a time (powers of two);
    ``chunks``: column chunks a row is split into, one program each (fewer where V is small)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [R, V]; got {list(logits.shape)}")
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two")
    if chunks < 1:
        raise ValueError(f"chunks={chunks} must be >= 1")
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return jnp.zeros((0,), jnp.int32)
    if vocab == 0:
        raise ValueError("logits have no columns: argmax of an empty row")
    tiles = pl.cdiv(pl.cdiv(vocab, chunks), block_cols)  # a chunk's tiles
    chunks = pl.cdiv(vocab, tiles * block_cols)  # no chunk wholly past the end
    partial = jax.ShapeDtypeStruct((num_rows * chunks,), jnp.float32)
    best, best_at = pl.pallas_call(
        functools.partial(_kernel, num_rows=num_rows, vocab=vocab, block_rows=block_rows,
                          block_cols=block_cols, tiles=tiles, chunks=chunks),
        grid=(pl.cdiv(num_rows, block_rows), chunks),
        out_shape=(partial, jax.ShapeDtypeStruct((num_rows * chunks,), jnp.int32)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=use_interpret(interpret),
        name="argmax_rows",
    )(logits)
    return merge_chunks(best.reshape(num_rows, chunks), best_at.reshape(num_rows, chunks))


def merge_chunks(best: jax.Array, best_at: jax.Array) -> jax.Array:
    """Each row's argmax from its column chunks' maxima f32[R, C] and their first indices
    i32[R, C]: the index held by the first chunk holding the row maximum (jnp.argmax takes the
    first of equal maxima, so ties keep the smallest index)."""
    first = jnp.argmax(best, axis=1)
    return jnp.take_along_axis(best_at, first[:, None], axis=1)[:, 0]


def argmax_rows_reference(logits: jax.Array, **tuning) -> jax.Array:
    """Pure jnp: ``jnp.argmax`` of the logits widened to f32. ``tuning`` takes (and ignores)
    the kernel's keyword arguments."""
    del tuning
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
