"""Stacked matmul: ``x @ w[layer]`` read straight out of a layer-stacked weight.

Why: the model runs its decoder layers with ``lax.scan`` over weights stacked on a leading L axis.
XLA slices each layer's projection matrices out of the stack into fresh buffers before handing
them to cuBLAS; on an H100 those copies were 37% of llama-3.1-8b's decode step. This kernel takes
the whole stack and the (traced) layer index and reads the layer's tiles in place.

Lowering: Pallas with the Triton backend (``plt.CompilerParams``), which also runs in the CPU
interpreter (tests). ``kernel="auto"`` (the model's choice) hands the launches where it measured
faster to the Mosaic GPU kernel in ``stacked_matmul_mgpu`` (see ``mosaic_settings``).

Design:
- ``layer`` arrives as an ``i32[1]`` array (the Triton lowering has no scalar prefetch) and the
  stack as a free reshape ``[L * D_in, D_out]``; each program offsets its weight rows by
  ``layer * D_in``. Nothing is sliced out beforehand.
- grid (T blocks, D_out blocks, K splits), T blocks fastest so the programs that share a weight
  tile run side by side and the second reader finds it in L2. Each program walks its share of
  D_in in ``block_k`` steps, accumulating an f32 ``[block_t, block_n]`` tile.
- Decode is memory-bound: the goal is to stream ``w[layer]`` once at copy bandwidth, which needs
  enough programs to occupy every SM. When ``T blocks * D_out blocks`` of a single-weight launch
  is under one per SM (o and down at decode sizes), D_in is split in two, each half's program
  writing f32 partial sums that XLA adds up afterwards.
- Rows of x past T are masked (read as 0, never stored), so T needs no padding. ``block_n`` and
  ``block_k`` must divide D_out and D_in (no column masks in the streaming loop); the defaults
  are shrunk to the largest power of two that does (576 -> 64).

Fused variant (``stacked_matmul_fused``): on an H100 the host pays ~4 us per kernel launch in a
rolled layer loop, so the projections that share an input go in one launch.
- Several stacks of one D_in (q, k, v): the grid's column axis runs over the column blocks of
  all of them in turn (one ``block_n`` dividing every width); program n finds its weight from
  the static block offsets and runs that weight's loop under ``pl.when``. Each weight has its
  own output, returned as a tuple: one concatenated [T, sum D_out] output would need a copy for
  every slice that feeds another custom call (v goes straight into the KV-cache write).
- ``epilogue="silu_mul"`` for (gate, up): each program loads the x tile once per k step, runs
  the gate and the up tile of the same columns and stores ``silu(gate) * up`` (in f32, from
  the products rounded to the output dtype as the unfused model stores them), so the [T, F]
  gate and up never reach memory. silu cannot apply to partial sums: when a split is asked for
  (fused launches are not split by default), the kernel writes both f32 partials as the unfused
  path would and XLA adds them up and applies the epilogue.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.paged_decode_attention import _next_pow2
from pallas_kernels.stacked_common import (check_epilogue, check_shapes, check_stacks, fit_block,
                                           silu_mul_epilogue, use_interpret)
from pallas_kernels.stacked_matmul_mgpu import mosaic_settings, stacked_matmul_mgpu

# H100 defaults for decode (T of 8..256). block_k is measured (benchmarks/stacked_matmul.py, the
# four fused launches a layer, 2026-11-27): 64 beat 128 at every T and model tried, by 3-4% at
# T 64 and 13-24% at T 128 and 256 (llama-3.1-8b at T 256: 12.8 -> 9.7 ms a scan). The split
# rule and silu_mul's pipeline depth were then measured launch by launch (below); block_t,
# block_n and num_warps won no consistent gain in either sweep.
DEFAULT_BLOCK_T = 128  # covers a whole decode batch up to 128 rows: w is read once per T block
DEFAULT_BLOCK_N = 64  # 128-byte rows of bf16 weight per load, and D_out / 64 programs
DEFAULT_BLOCK_K = 64
DEFAULT_NUM_WARPS = 4
# Triton's smallest tile side: D_in and every D_out must be multiples of it.
MIN_BLOCK = 16
# Split D_in until about one program per SM (132 SMs) runs, at most in two, keeping >= 4 k steps
# per program so the software pipeline has something to overlap, and the f32 partials under half
# the weight's bytes. Measured per launch on an H100 (benchmarks/stacked_matmul.py --variants
# launch, 2026-11-27): two splits beat four (the old rule, up to two programs per SM) on every o
# and down shape tried (llama-3.2-1b at T 128/256, llama-3.1-8b at T 256: 6-22%); the partials
# of four (eight for the 1B's down at T 256: 16 MB a layer) cost more bandwidth than the extra
# programs win. The 8B's q/k/v (192 programs at T 256) was 17% faster unsplit.
_TARGET_PROGRAMS = 132
_MAX_SPLITS = 2
_MIN_K_STEPS = 4
_SMEM_BUDGET = 160 * 1024  # bytes of shared memory the pipelined x and w tiles may use
_PAIRED_STAGES = 3  # pipeline depth of a silu_mul launch (two weight tiles a stage)
KERNELS = ("triton", "mosaic", "auto")


def _check_block(block: int, name: str) -> None:
    if block < MIN_BLOCK or block & (block - 1):
        raise ValueError(f"{name}={block} must be a power of two >= {MIN_BLOCK} (Triton tile "
                         f"rule)")


def _fit_block(requested: int, dim: int, name: str, dim_name: str) -> int:
    """The largest power of two <= requested (and >= 16) that divides dim."""
    _check_block(requested, name)
    return fit_block(requested, dim, MIN_BLOCK, dim_name)


def choose_num_splits(t_blocks: int, n_blocks: int, k_steps: int, num_tokens: int, d_in: int,
                      w_itemsize: int) -> int:
    """K splits (a power of two dividing ``k_steps``) so that small launches still fill the GPU."""
    splits = 1
    while t_blocks * n_blocks * splits < _TARGET_PROGRAMS and splits < _MAX_SPLITS:
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


def _accumulate(x_ref, w_refs, col0, *, rows, row_ok, w_row0, k_first, steps, block_t, block_n,
                block_k) -> tuple[jax.Array, ...]:
    """f32 [BT, BN] tiles ``x[rows, ks] @ w[layer][ks, col0:col0 + BN]`` for each of ``w_refs``
    over ``steps`` k blocks from ``k_first``: the x tile is loaded once per step for all of them."""

    def body(j, accs):
        k0 = (k_first + j) * block_k
        k = k0 + jnp.arange(block_k)  # [BK]
        x = plt.load(x_ref.at[rows[:, None], k[None, :]], mask=row_ok, other=0.0)
        out = []
        for w_ref, acc in zip(w_refs, accs):
            w = w_ref[pl.ds(w_row0 + k0, block_k), pl.ds(col0, block_n)]
            out.append(acc + jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32))
        return tuple(out)

    zeros = tuple(jnp.zeros((block_t, block_n), jnp.float32) for _ in w_refs)
    return jax.lax.fori_loop(0, steps, body, zeros)


def _stacked_matmul_kernel(
    layer_ref,  # i32[1]
    x_ref,  # [T, D_in]
    # The weights [L * D_in, D_out_i], then the outputs: [T, D_out_i] in x.dtype, or
    # f32[splits * T, D_out_i] when split; with silu_mul (gate, up) and one [T, F] output.
    *refs,
    num_tokens: int,
    d_in: int,
    block_t: int,
    block_n: int,
    block_k: int,
    split_steps: int,
    split: bool,
    col_starts: tuple[int, ...],
    silu_mul: bool,
):
    t, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = t * block_t + jnp.arange(block_t)  # [BT] token rows
    row_ok = (rows < num_tokens)[:, None]
    out_rows = s * num_tokens + rows if split else rows
    tile = functools.partial(
        _accumulate, x_ref, rows=rows, row_ok=row_ok,
        w_row0=layer_ref[0] * d_in,  # where this layer's [D_in, D_out] starts in the flat stack
        k_first=s * split_steps, steps=split_steps, block_t=block_t, block_n=block_n,
        block_k=block_k)

    def store(o_ref, col0, value):
        cols = col0 + jnp.arange(block_n)  # [BN] output columns
        plt.store(o_ref.at[out_rows[:, None], cols[None, :]], value.astype(o_ref.dtype),
                  mask=row_ok)

    if silu_mul:  # (gate, up) -> silu(gate) * up, both tiles of the same columns
        (w_gate, w_up), (o_ref,) = refs[:2], refs[2:]
        gate, up = tile((w_gate, w_up), n * block_n)
        store(o_ref, n * block_n, silu_mul_epilogue(gate, up, o_ref.dtype))
        return
    num_weights = len(refs) // 2
    for i, (w_ref, o_ref) in enumerate(zip(refs[:num_weights], refs[num_weights:])):
        def project(w_ref=w_ref, o_ref=o_ref, first=col_starts[i]):
            col0 = (n - first) * block_n
            (acc,) = tile((w_ref,), col0)
            store(o_ref, col0, acc)

        if num_weights == 1:
            project()
        else:  # column block n belongs to weight i when col_starts[i] <= n < col_starts[i + 1]
            pl.when((n >= col_starts[i]) & (n < col_starts[i + 1]))(project)


_TUNING = ("block_t", "block_n", "block_k", "num_splits", "num_warps", "num_stages", "interpret")


def _launch(
    x: jax.Array,  # [T, D_in]
    ws: tuple[jax.Array, ...],  # [L, D_in, D_out_i] each
    layer: jax.Array,
    silu_mul: bool,
    *,
    block_t: int,
    block_n: int,
    block_k: int,
    num_splits: int | None,
    num_warps: int,
    num_stages: int | None,
    interpret: bool | None,
    sum_partials: bool = True,
) -> tuple[jax.Array, ...]:
    """One pallas_call for all of ``ws``: a tuple of [T, D_out_i] in x.dtype, or with
    ``silu_mul`` a 1-tuple of ``silu(x @ ws[0][layer]) * (x @ ws[1][layer])``. A split launch
    with ``sum_partials=False`` (not silu_mul) returns f32 partial sums [splits, T, D_out_i]."""
    check_stacks(x, ws, layer)
    num_tokens, d_in = x.shape
    num_layers = ws[0].shape[0]
    d_outs = [w.shape[2] for w in ws]
    if num_tokens == 0:
        return (jnp.zeros((0, d_outs[0]), x.dtype),) if silu_mul else tuple(
            jnp.zeros((0, d), x.dtype) for d in d_outs)
    _check_block(block_t, "block_t")
    block_t = min(block_t, max(16, _next_pow2(num_tokens)))
    # One block_n for every weight, so that a column block is never shared by two of them.
    block_n = _fit_block(block_n, math.gcd(*d_outs), "block_n",
                         "D_out" if len(ws) == 1 else f"gcd of the D_outs {d_outs}")
    block_k = _fit_block(block_k, d_in, "block_k", "D_in")
    col_blocks = [d // block_n for d in d_outs]
    t_blocks, k_steps = pl.cdiv(num_tokens, block_t), d_in // block_k
    if num_splits is None:
        # A launch of several weights (q/k/v, gate/up) is not split unless asked. silu_mul
        # would lose its fused epilogue (both f32 partials of gate and up reach memory), which
        # measured 21-27% slower at llama-3.2-1b's T 128, the one shape where the old rule split
        # it. q/k/v unsplit measured 17% faster for llama-3.1-8b at T 256, within 3% for
        # llama-3.2-1b at T 256 and 7% slower at its T 128, and saves the launch that adds the
        # partials up (the host enqueues every launch of every layer each step).
        num_splits = 1 if len(ws) > 1 else choose_num_splits(
            t_blocks, sum(col_blocks), k_steps, num_tokens, d_in, ws[0].dtype.itemsize)
    if num_splits < 1 or k_steps % num_splits:
        raise ValueError(f"num_splits={num_splits} must divide D_in / block_k = {k_steps}")
    split = num_splits > 1
    # silu cannot apply to partial sums: a split run returns both partials, epilogue in XLA.
    paired = silu_mul and not split
    if num_stages is None:
        num_stages = _default_num_stages(block_t, (2 if paired else 1) * block_n, block_k,
                                         x.dtype.itemsize, ws[0].dtype.itemsize)
        if paired:  # 3 measured 13-14% faster than 4 at T 256 (llama-3.2-1b and llama-3.1-8b)
            num_stages = min(num_stages, _PAIRED_STAGES)
    kernel = functools.partial(
        _stacked_matmul_kernel,
        num_tokens=num_tokens,
        d_in=d_in,
        block_t=block_t,
        block_n=block_n,
        block_k=block_k,
        split_steps=k_steps // num_splits,
        split=split,
        col_starts=tuple(itertools.accumulate(col_blocks, initial=0)),
        silu_mul=paired,
    )
    if paired:
        out_shape = (jax.ShapeDtypeStruct((num_tokens, d_outs[0]), x.dtype),)
        grid_cols = col_blocks[0]
    else:
        out_shape = tuple(
            jax.ShapeDtypeStruct((num_splits * num_tokens, d), jnp.float32) if split
            else jax.ShapeDtypeStruct((num_tokens, d), x.dtype) for d in d_outs)
        grid_cols = sum(col_blocks)
    name = ("stacked_matmul" if len(ws) == 1 else
            "stacked_matmul_silu_mul" if silu_mul else "stacked_matmul_fused")
    outs = pl.pallas_call(
        kernel,
        grid=(t_blocks, grid_cols, num_splits),
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=use_interpret(interpret),
        name=name,
    )(
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        x,
        *(w.reshape(num_layers * d_in, w.shape[2]) for w in ws),
    )
    if split and not sum_partials and not silu_mul:
        return tuple(o.reshape(num_splits, num_tokens, -1) for o in outs)
    return _add_partials(outs, num_splits, silu_mul, x.dtype) if split else tuple(outs)


def _add_partials(partials: tuple[jax.Array, ...], num_splits: int, silu_mul: bool,
                  dtype: jnp.dtype) -> tuple[jax.Array, ...]:
    """f32[splits * T, D_out_i] partial sums -> [T, D_out_i] (or silu(gate) * up) in dtype."""
    sums = [p.reshape(num_splits, p.shape[0] // num_splits, -1).sum(axis=0) for p in partials]
    if silu_mul:
        return (silu_mul_epilogue(*sums, dtype).astype(dtype),)
    return tuple(s.astype(dtype) for s in sums)


def _mosaic_launch(x, ws, layer, epilogue, kernel, interpret,
                   sum_partials: bool = True) -> tuple | jax.Array | None:
    """The launch through stacked_matmul_mgpu when ``kernel`` asks for it (and, for "auto",
    mosaic_settings has settings for it), else None."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel == "triton" or (kernel == "auto" and use_interpret(interpret)):
        return None
    settings = mosaic_settings(x.shape[0], x.shape[1], [w.shape[2] for w in ws],
                               epilogue == "silu_mul", x.dtype)
    if settings is None and kernel == "auto":
        return None
    interpret_mgpu = interpret if kernel == "mosaic" else False
    return stacked_matmul_mgpu(x, tuple(ws), layer, epilogue=epilogue, interpret=interpret_mgpu,
                               sum_partials=sum_partials, **(settings or {}))


@functools.partial(jax.jit, static_argnames=("kernel", "sum_partials") + _TUNING)
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
    kernel: str = "triton",
    sum_partials: bool = True,
) -> jax.Array:  # [T, D_out] in x.dtype; see sum_partials
    """``x @ w[layer]`` with f32 accumulation, reading ``w[layer]`` in place.

    ``block_t`` shrinks to T's next power of two (at least 16); ``block_n`` / ``block_k`` shrink
    to the largest power of two dividing D_out / D_in. ``num_splits`` (D_in split across
    programs) and ``num_stages`` (Triton pipeline depth) are chosen from the shapes when None.
    A layer index outside [0, L) is not checked (it would read out of bounds), as with
    ``lax.dynamic_slice`` it is the caller's scan index. ``interpret``: None runs the Pallas
    interpreter on a CPU backend only, True always, False never. ``kernel``: "triton" (this
    module's kernel), "mosaic" (``stacked_matmul_mgpu``, with ``mosaic_settings`` where it has
    them, the tuning arguments apart from ``interpret`` ignored), or "auto" (Mosaic GPU where
    ``mosaic_settings`` has settings for the shapes and the backend is a GPU, else Triton).
    ``sum_partials=False``: where the launch splits D_in, its f32 partial sums [S, T', D_out]
    (T' >= T: Mosaic GPU's rows padded to its tile, padding past T) instead of their sum, for
    ``pallas_kernels.add_rms_norm`` to add; an unsplit launch returns [T, D_out] as usual."""
    mosaic = _mosaic_launch(x, (w,), layer, None, kernel, interpret, sum_partials)
    if mosaic is not None:
        return mosaic[0]
    (out,) = _launch(x, (w,), layer, False, block_t=block_t, block_n=block_n, block_k=block_k,
                     num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                     interpret=interpret, sum_partials=sum_partials)
    return out


@functools.partial(jax.jit, static_argnames=("epilogue", "kernel") + _TUNING)
def stacked_matmul_fused(
    x: jax.Array,  # [T, D_in]
    ws: tuple[jax.Array, ...],  # [L, D_in, D_out_i] each, one D_in and L
    layer: jax.Array,  # i32 scalar, may be traced
    *,
    epilogue: str | None = None,
    block_t: int = DEFAULT_BLOCK_T,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    num_splits: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int | None = None,
    interpret: bool | None = None,
    kernel: str = "triton",
) -> tuple[jax.Array, ...] | jax.Array:
    """``x @ w[layer]`` for every ``w`` in ``ws`` in one launch (q/k/v, or gate/up).

    epilogue=None: a tuple of [T, D_out_i] in x.dtype. epilogue="silu_mul" with ws = (gate, up)
    of one shape: the single [T, F] array ``silu(x @ gate[layer]) * (x @ up[layer])``, computed
    in f32; each program then streams the gate and the up tile of the same columns. ``block_n``
    shrinks to the largest power of two dividing every D_out_i; the other arguments are as for
    ``stacked_matmul``, with one ``num_splits`` for all the weights (a silu_mul split sums the
    two partials and applies the epilogue in XLA), and ``kernel`` as there."""
    check_epilogue(ws, epilogue)
    mosaic = _mosaic_launch(x, ws, layer, epilogue, kernel, interpret)
    if mosaic is not None:
        return mosaic
    outs = _launch(x, tuple(ws), layer, epilogue == "silu_mul", block_t=block_t,
                   block_n=block_n, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret)
    return outs[0] if epilogue == "silu_mul" else outs


def stacked_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    layer: jax.Array,
    **tuning,
) -> jax.Array:
    """Pure-jnp ``x @ w[layer]``: f32 products at full precision, result in x's dtype.
    ``tuning`` takes (and ignores) the kernel's keyword arguments, so either can be passed."""
    del tuning
    return _matmul_f32(x, w, layer).astype(x.dtype)


def stacked_matmul_fused_reference(
    x: jax.Array,
    ws: tuple[jax.Array, ...],
    layer: jax.Array,
    *,
    epilogue: str | None = None,
    **tuning,
) -> tuple[jax.Array, ...] | jax.Array:
    """Pure-jnp ``stacked_matmul_fused``: each product in f32 at full precision, the silu_mul
    epilogue in f32 on the products rounded to x's dtype, results in x's dtype. ``tuning`` is
    ignored."""
    del tuning
    check_epilogue(ws, epilogue)
    outs = [_matmul_f32(x, w, layer) for w in ws]
    if epilogue == "silu_mul":
        return silu_mul_epilogue(*outs, x.dtype).astype(x.dtype)
    return tuple(o.astype(x.dtype) for o in outs)


def _matmul_f32(x: jax.Array, w: jax.Array, layer: jax.Array) -> jax.Array:
    check_shapes(x, w, layer)
    w_layer = jax.lax.dynamic_index_in_dim(w, jnp.reshape(layer, ()), axis=0, keepdims=False)
    return jnp.dot(x.astype(jnp.float32), w_layer.astype(jnp.float32), precision="highest")
