"""Argument checks shared by the stacked matmul kernels (Triton and Mosaic GPU)."""

import jax
import jax.numpy as jnp


def check_shapes(x: jax.Array, w: jax.Array, layer: jax.Array) -> None:
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x must be [T, D_in] and w [L, D_in, D_out]; got x {x.shape}, w {w.shape}")
    if jnp.ndim(layer) > 1 or jnp.size(layer) != 1:
        raise ValueError(f"layer must be an int32 scalar (or [1]); got shape {jnp.shape(layer)}")


def check_stacks(x: jax.Array, ws: tuple[jax.Array, ...], layer: jax.Array) -> None:
    for w in ws:
        check_shapes(x, w, layer)
    if len({w.shape[0] for w in ws}) > 1:
        raise ValueError(f"the stacks' layer counts differ: {[w.shape[0] for w in ws]}")


def check_epilogue(ws: tuple, epilogue: str | None) -> None:
    if not isinstance(ws, (tuple, list)) or not ws:
        raise ValueError(f"ws must be a non-empty tuple of [L, D_in, D_out] stacks; got {type(ws)}")
    if epilogue not in (None, "silu_mul"):
        raise ValueError(f"epilogue={epilogue!r}; allowed: None, 'silu_mul'")
    if epilogue == "silu_mul" and (len(ws) != 2 or ws[0].shape != ws[1].shape):
        raise ValueError("epilogue='silu_mul' takes exactly two stacks of one shape (gate, up); "
                         f"got {[w.shape for w in ws]}")
