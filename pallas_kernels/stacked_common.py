"""What the stacked matmul kernels (Triton and Mosaic GPU) share: argument checks, block fitting,
the interpreter choice and the silu_mul epilogue's arithmetic."""

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


def use_interpret(interpret: bool | None) -> bool:
    """None: the interpreter exactly when running on the CPU. False forces the GPU lowering,
    which lets a CPU host lower (not run) a kernel for a GPU target, as the tests do."""
    return jax.default_backend() == "cpu" if interpret is None else interpret


def fit_block(requested: int, dim: int, smallest: int, dim_name: str, why: str = "") -> int:
    """The largest power of two <= requested (and >= smallest) that divides dim."""
    block = requested
    while block >= smallest and dim % block:
        block //= 2
    if block < smallest:
        raise ValueError(f"{dim_name}={dim} must be a multiple of {smallest}" + (
            f" ({why})" if why else ""))
    return block


def silu_mul_epilogue(gate: jax.Array, up: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """silu(gate) * up in f32 from f32 products first rounded to `dtype`, as the unfused model
    stores gate_proj's and up_proj's outputs (so bf16 results match it, and Hugging Face)."""
    gate = gate.astype(dtype).astype(jnp.float32)
    up = up.astype(dtype).astype(jnp.float32)
    return gate * jax.nn.sigmoid(gate) * up  # jax.nn.silu's own formula, spelled out for Mosaic
