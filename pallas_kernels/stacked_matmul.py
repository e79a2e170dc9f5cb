"""Stacked matmul: ``x @ w[layer]`` read straight out of a layer-stacked weight.

Why: the model runs its decoder layers with ``lax.scan`` over weights stacked on a leading L axis.
XLA slices each layer's projection matrices out of the stack into fresh buffers before handing
them to cuBLAS; on an H100 those copies were 37% of llama-3.1-8b's decode step. This kernel takes
the whole stack and the (traced) layer index and reads the layer's tiles in place.

Lowering: Pallas with the Triton backend (``plt.CompilerParams``), which also runs in the CPU
interpreter (tests).

Design:
- ``layer`` arrives as an ``i32[1]`` array (the Triton lowering has no scalar prefetch) and the
  stack as a free reshape ``[L * D_in, D_out]``; each program offsets its weight rows by
  ``layer * D_in``. Nothing is sliced out beforehand.
- grid (T blocks, D_out blocks, K splits), T blocks fastest so the programs that share a weight
  tile run side by side and the second reader finds it in L2. Each program walks its share of
  D_in in ``block_k`` steps, accumulating an f32 ``[block_t, block_n]`` tile.
- Decode is memory-bound: the goal is to stream ``w[layer]`` once at copy bandwidth, which needs
  enough programs to occupy every SM. When ``T blocks * D_out blocks`` is small (narrow k/v
  projections, small T), D_in is split across ``num_splits`` programs that write f32 partial
  sums, added up by XLA afterwards.
- Rows of x past T are masked (read as 0, never stored), so T needs no padding. ``block_n`` and
  ``block_k`` must divide D_out and D_in (no column masks in the streaming loop); the defaults
  are shrunk to the largest power of two that does (576 -> 64).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# H100 defaults for decode (T of 8..256); guesses to be confirmed by benchmarks/stacked_matmul.py.
DEFAULT_BLOCK_T = 128  # covers a whole decode batch up to 128 rows: w is read once per T block
DEFAULT_BLOCK_N = 64  # 128-byte rows of bf16 weight per load, and D_out / 64 programs
DEFAULT_BLOCK_K = 128
DEFAULT_NUM_WARPS = 4
# Split D_in until about two programs per SM (132 SMs) run, keeping >= 4 k steps per program so
# the software pipeline has something to overlap, and the f32 partials under half the weight's
# bytes.
_TARGET_PROGRAMS = 264
_MIN_K_STEPS = 4
_SMEM_BUDGET = 160 * 1024  # bytes of shared memory the pipelined x and w tiles may use


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _use_interpret(interpret: bool | None) -> bool:
    # None: the interpreter exactly when running on the CPU. False forces the Triton lowering,
    # which lets a CPU host lower (not run) the kernel for a GPU target, as the tests do.
    return jax.default_backend() == "cpu" if interpret is None else interpret


def _check_block(block: int, name: str) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"{name}={block} must be a power of two >= 16 (Triton tile rule)")


def _fit_block(requested: int, dim: int, name: str, dim_name: str) -> int:
    """The largest power of two <= requested (and >= 16) that divides dim."""
    _check_block(requested, name)
    block = requested
    while block >= 16 and dim % block:
        block //= 2
    if block < 16:
        raise ValueError(f"{dim_name}={dim} must be a multiple of 16")
    return block


def _check_shapes(x: jax.Array, w: jax.Array, layer: jax.Array) -> None:
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x must be [T, D_in] and w [L, D_in, D_out]; got x {x.shape}, w {w.shape}")
    if jnp.ndim(layer) > 1 or jnp.size(layer) != 1:
        raise ValueError(f"layer must be an int32 scalar (or [1]); got shape {jnp.shape(layer)}")


def choose_num_splits(t_blocks: int, n_blocks: int, k_steps: int, num_tokens: int, d_in: int,
                      w_itemsize: int) -> int:
    """K splits (a power of two dividing ``k_steps``) so that small launches still fill the GPU."""
    splits = 1
    while t_blocks * n_blocks * splits < _TARGET_PROGRAMS:
        more = 2 * splits
        # Per output column: the f32 partials (more * T values) vs the weight's D_in values.
        partial_bytes, weight_bytes = more * num_tokens * 4, d_in * w_itemsize
        if k_steps % more or k_steps // more < _MIN_K_STEPS or 2 * partial_bytes > weight_bytes:
            break
        splits = more
    return splits


def _default_num_stages(block_t: int, block_n: int, block_k: int, x_itemsize: int,
                        w_itemsize: int) -> int:
    per_stage = block_k * (block_t * x_itemsize + block_n * w_itemsize)
    return max(2, min(4, _SMEM_BUDGET // per_stage))


def _stacked_matmul_kernel(
    layer_ref,  # i32[1]
    x_ref,  # [T, D_in]
    w_ref,  # [L * D_in, D_out]
    o_ref,  # [T, D_out] in x.dtype, or f32[splits * T, D_out] when split
    *,
    num_tokens: int,
    d_in: int,
    block_t: int,
    block_n: int,
    block_k: int,
    split_steps: int,
    split: bool,
):
    t, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    rows = t * block_t + jnp.arange(block_t)  # [BT] token rows
    row_ok = (rows < num_tokens)[:, None]
    cols = n * block_n + jnp.arange(block_n)  # [BN] output columns
    w_row0 = layer * d_in  # where this layer's [D_in, D_out] starts in the flat stack
    k_first = s * split_steps

    def body(j, acc):
        k = (k_first + j) * block_k + jnp.arange(block_k)  # [BK]
        x = plt.load(x_ref.at[rows[:, None], k[None, :]], mask=row_ok, other=0.0)
        w = w_ref[pl.ds(w_row0 + (k_first + j) * block_k, block_k), pl.ds(n * block_n, block_n)]
        return acc + jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, split_steps, body, jnp.zeros((block_t, block_n), jnp.float32))
    out_rows = s * num_tokens + rows if split else rows
    plt.store(o_ref.at[out_rows[:, None], cols[None, :]], acc.astype(o_ref.dtype), mask=row_ok)


@functools.partial(
    jax.jit,
    static_argnames=("block_t", "block_n", "block_k", "num_splits", "num_warps", "num_stages",
                     "interpret"),
)
def stacked_matmul(
    x: jax.Array,  # [T, D_in]
    w: jax.Array,  # [L, D_in, D_out]
    layer: jax.Array,  # i32 scalar, may be traced
    *,
    block_t: int = DEFAULT_BLOCK_T,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    num_splits: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [T, D_out] in x.dtype
    """``x @ w[layer]`` with f32 accumulation, reading ``w[layer]`` in place.

    ``block_t`` shrinks to T's next power of two (at least 16); ``block_n`` / ``block_k`` shrink
    to the largest power of two dividing D_out / D_in. ``num_splits`` (D_in split across
    programs) and ``num_stages`` (Triton pipeline depth) are chosen from the shapes when None.
    A layer index outside [0, L) is not checked (it would read out of bounds), as with
    ``lax.dynamic_slice`` it is the caller's scan index. ``interpret``: None runs the Pallas
    interpreter on a CPU backend only, True always, False never."""
    _check_shapes(x, w, layer)
    num_tokens, d_in = x.shape
    num_layers, _, d_out = w.shape
    if num_tokens == 0:
        return jnp.zeros((0, d_out), x.dtype)
    _check_block(block_t, "block_t")
    block_t = min(block_t, max(16, _next_pow2(num_tokens)))
    block_n = _fit_block(block_n, d_out, "block_n", "D_out")
    block_k = _fit_block(block_k, d_in, "block_k", "D_in")
    t_blocks, n_blocks, k_steps = pl.cdiv(num_tokens, block_t), d_out // block_n, d_in // block_k
    if num_splits is None:
        num_splits = choose_num_splits(t_blocks, n_blocks, k_steps, num_tokens, d_in,
                                       w.dtype.itemsize)
    if num_splits < 1 or k_steps % num_splits:
        raise ValueError(f"num_splits={num_splits} must divide D_in / block_k = {k_steps}")
    if num_stages is None:
        num_stages = _default_num_stages(block_t, block_n, block_k, x.dtype.itemsize,
                                         w.dtype.itemsize)
    split = num_splits > 1
    kernel = functools.partial(
        _stacked_matmul_kernel,
        num_tokens=num_tokens,
        d_in=d_in,
        block_t=block_t,
        block_n=block_n,
        block_k=block_k,
        split_steps=k_steps // num_splits,
        split=split,
    )
    out_shape = (jax.ShapeDtypeStruct((num_splits * num_tokens, d_out), jnp.float32) if split
                 else jax.ShapeDtypeStruct((num_tokens, d_out), x.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(t_blocks, n_blocks, num_splits),
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_use_interpret(interpret),
        name="stacked_matmul",
    )(
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        x,
        w.reshape(num_layers * d_in, d_out),
    )
    if not split:
        return out
    return out.reshape(num_splits, num_tokens, d_out).sum(axis=0).astype(x.dtype)


def stacked_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array,
    **tuning,
) -> jax.Array:
    """Pure-jnp ``x @ w[layer]``: f32 products at full precision, result in x's dtype.
    ``tuning`` takes (and ignores) the kernel's keyword arguments, so either can be passed."""
    del tuning
    _check_shapes(x, w, layer)
    w_layer = jax.lax.dynamic_index_in_dim(w, jnp.reshape(layer, ()), axis=0, keepdims=False)
    out = jnp.dot(x.astype(jnp.float32), w_layer.astype(jnp.float32), precision="highest")
    return out.astype(x.dtype)
