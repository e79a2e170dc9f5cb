"""Residual add + RMSNorm in one launch: the junction between a decoder layer's projections.

After the o projection and after the down projection a Llama layer adds the projection's output
to the residual stream and normalises the sum for the next projection. The projections' kernels
can leave their output as f32 partial sums over a split D_in (``stacked_matmul(...,
sum_partials=False)``); XLA then adds the partials, the residual and the norm in fusions of its
own, and at a decode step of llama-3.2-1b it made three launches a layer of them, reading each
down projection's partials twice (benchmarks/NOTES_engine.md, thirteenth session). Here one
program a row reads the partials and the residual once and writes the new residual and its
normalised form.

Rounding follows the model's unfused path (and Hugging Face's): the projection's output is
rounded to the residual's dtype, added to the residual in that dtype, the sum normalised in f32
and rounded, then multiplied by the norm's scale in that dtype.

Lowering: Pallas with the Triton backend, one program per ``block_t`` rows holding whole rows
(D a power of two); ``interpret=None`` runs the Pallas interpreter on a CPU backend.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.stacked_common import use_interpret

DEFAULT_BLOCK_T = 1
DEFAULT_NUM_WARPS = 4


def _kernel(res_ref, y_ref, scale_ref, index_ref, new_res_ref, normed_ref, *, eps: float,
            splits: int):
    dtype = res_ref.dtype
    if splits:  # f32 partial sums [S, block_t, D] -> the projection's output in the model dtype
        y = y_ref[0].astype(jnp.float32)
        for s in range(1, splits):
            y = y + y_ref[s].astype(jnp.float32)
    else:
        y = y_ref[...]
    h = (res_ref[...].astype(jnp.float32) + y.astype(dtype).astype(jnp.float32)).astype(dtype)
    new_res_ref[...] = h
    h32 = h.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    normed = (h32 * inv).astype(dtype).astype(jnp.float32)
    scale = scale_ref[pl.ds(index_ref[0], 1), :].astype(jnp.float32)  # [1, D]
    normed_ref[...] = (scale * normed).astype(dtype)


def _check(residual: jax.Array, y: jax.Array, scale: jax.Array) -> None:
    """scale is [D], or a stack [L, D] (then an index picks the row)."""
    num_tokens, dim = residual.shape
    if y.ndim == 2 and y.shape != residual.shape:
        raise ValueError(f"y [T, D] must have the residual's shape {list(residual.shape)}; got "
                         f"{list(y.shape)}")
    if y.ndim == 3 and (y.shape[-1] != dim or y.shape[1] < num_tokens):
        raise ValueError(f"partial sums [S, T', D] need D = {dim} and T' >= T = {num_tokens}; "
                         f"got {list(y.shape)}")
    if y.ndim == 3 and (y.dtype != jnp.float32 or y.shape[0] & (y.shape[0] - 1)):
        raise ValueError(f"partial sums [S, T', D] must be float32 with S a power of two; got "
                         f"{y.dtype}{list(y.shape)}")
    if y.ndim not in (2, 3):
        raise ValueError(f"y must be [T, D] or f32 partial sums [S, T', D]; got {y.ndim} dims")
    if scale.shape[-1:] != (dim,) or scale.ndim not in (1, 2):
        raise ValueError(f"scale must be [D] or [L, D] with D = {dim}; got {list(scale.shape)}")


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Pure jnp RMSNorm as Hugging Face rounds it: normalised in f32, cast back to x's dtype,
    then times ``scale`` (the model's norm, and this kernel's reference)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype)


def supports(dim: int) -> bool:
    """Whether the kernel takes rows of ``dim`` elements (whole rows in a power-of-two block)."""
    return dim >= 16 and dim & (dim - 1) == 0


@functools.partial(jax.jit, static_argnames=("eps", "block_t", "num_warps", "interpret"))
def add_rms_norm(
    residual: jax.Array,  # [T, D]
    y: jax.Array,  # [T, D], or f32 partial sums [S, T', D] (T' >= T; rows past T unread)
    scale: jax.Array,  # [D], or a stack [L, D] of which scale_index picks the row
    scale_index: jax.Array | int = 0,  # i32 scalar, may be traced; only with a stack
    *,
    eps: float,
    block_t: int = DEFAULT_BLOCK_T,
    num_warps: int = DEFAULT_NUM_WARPS,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:  # (residual + y, RMSNorm(residual + y) * scale), [T, D] each
    """The residual stream after adding a projection's output ``y``, and its RMSNorm times
    ``scale`` (or ``scale[scale_index]``), both in ``residual``'s dtype; see
    ``add_rms_norm_reference``. A stack of scales is read in place at the index, as the
    stacked projections read their weights: a slice of it taken outside would be copied into
    a buffer of its own before the launch (on an H100, one extra copy kernel a launch)."""
    _check(residual, y, scale)
    num_tokens, dim = residual.shape
    if not supports(dim):
        raise ValueError(f"D={dim} must be a power of two >= 16 (whole rows in one block)")
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t={block_t} must be a power of two")
    if num_tokens == 0:
        return residual, residual
    splits = y.shape[0] if y.ndim == 3 else 0
    rows = pl.BlockSpec((block_t, dim), lambda i: (i, 0))
    y_spec = pl.BlockSpec((splits, block_t, dim), lambda i: (0, i, 0)) if splits else rows
    scales = scale.reshape(-1, dim)  # [L, D] (L = 1 for one scale)
    out = jax.ShapeDtypeStruct((num_tokens, dim), residual.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, splits=splits),
        grid=(pl.cdiv(num_tokens, block_t),),
        in_specs=[rows, y_spec, pl.BlockSpec(scales.shape, lambda i: (0, 0)),
                  pl.BlockSpec((1,), lambda i: (0,))],
        out_specs=(rows, rows),
        out_shape=(out, out),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=use_interpret(interpret),
        name="add_rms_norm",
    )(residual, y, scales, jnp.reshape(scale_index, (1,)).astype(jnp.int32))


def add_rms_norm_reference(residual: jax.Array, y: jax.Array, scale: jax.Array,
                           scale_index: jax.Array | int = 0, *, eps: float,
                           **tuning) -> tuple[jax.Array, jax.Array]:
    """Pure jnp: y (or the sum of its f32 partials) rounded to the residual's dtype and added
    to it; that sum normalised in f32 (x * rsqrt(mean(x^2) + eps)), rounded, times ``scale``.
    ``tuning`` takes (and ignores) the kernel's keyword arguments."""
    del tuning
    _check(residual, y, scale)
    if scale.ndim == 2:
        scale = scale[scale_index]
    if y.ndim == 3:
        y = y[:, :residual.shape[0]].sum(axis=0)
    h = residual + y.astype(residual.dtype)
    return h, rms_norm(h, scale, eps)
