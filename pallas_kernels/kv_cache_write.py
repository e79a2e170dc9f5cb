"""KV-cache write: scatter this step's new K and V rows into their cache slots.

Lowering: Pallas with the Triton backend, the caches passed through ``input_output_aliases`` so
the kernel writes only the T new rows into the same buffers. Under donation (the model's jitted
forward donates its cache) no copy of the cache is made, also when the cache is a ``lax.scan``
carry; without donation XLA has to copy the cache first to keep the caller's array intact.
With ``rope`` the new keys are rotated (rotate-half RoPE) on their way into the cache, so the
model launches no separate RoPE kernel for k. The reference is the equivalent XLA scatter,
which XLA also updates in place under donation; benchmarks/NOTES_kernels.md compares the two.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.paged_decode_attention import (_check_rope, _next_pow2, _use_interpret,
                                                   apply_rotate_half, rotate_half_in_kernel)


def _write_kernel(
    slot_ref,  # i32[T]
    k_ref,  # [T*K, H]
    v_ref,  # [T*K, H]
    *refs,  # [cos, sin f32[T, H] with rope], caches in (aliased), caches out [P*B*K, H]
    rope: bool,
    num_tokens: int,
    num_kv_heads: int,
    kv_pad: int,
    block_t: int,
):
    cos_ref, sin_ref, _k_in, _v_in, k_cache_ref, v_cache_ref = refs if rope else (None, None, *refs)
    head_dim = k_ref.shape[-1]
    cols = jnp.arange(head_dim)[None, :]
    r = jnp.arange(block_t * kv_pad)
    t = pl.program_id(0) * block_t + jax.lax.div(r, kv_pad)
    kh = jax.lax.rem(r, kv_pad)
    in_range = t < num_tokens
    slot = plt.load(slot_ref.at[t], mask=in_range, other=-1)
    ok = in_range & (kh < num_kv_heads) & (slot >= 0)
    src = (t * num_kv_heads + kh)[:, None]
    # Skipped rows point past the end: never touched on the GPU (masked) and dropped by the
    # interpreter's scatter, so they can never collide with a real destination row.
    dst = jnp.where(ok, slot * num_kv_heads + kh, k_cache_ref.shape[0])[:, None]
    def load_k(c):
        return plt.load(k_ref.at[src, c], mask=ok[:, None], other=0.0)

    v = plt.load(v_ref.at[src, cols], mask=ok[:, None], other=0.0)
    if rope:  # the new keys at their token's position
        at_t = (t[:, None] + jnp.zeros_like(cols), cols + jnp.zeros_like(t)[:, None])
        k = rotate_half_in_kernel(load_k, cols, plt.load(cos_ref.at[at_t], mask=ok[:, None], other=0.0),
                                  plt.load(sin_ref.at[at_t], mask=ok[:, None], other=0.0), k_ref.dtype)
    else:
        k = load_k(cols)
    plt.store(k_cache_ref.at[dst, cols], k.astype(k_cache_ref.dtype), mask=ok[:, None])
    plt.store(v_cache_ref.at[dst, cols], v.astype(v_cache_ref.dtype), mask=ok[:, None])


def _check(k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array, slot_mapping: jax.Array) -> None:
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [T, K, H]; got {k.shape} and {v.shape}")
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [P, B, K, H]; got {k_cache.shape} and {v_cache.shape}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k rows {k.shape[1:]} do not match cache rows (K, H) = {k_cache.shape[2:]}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be i32[T={k.shape[0]}]; got shape {slot_mapping.shape}")


@functools.partial(jax.jit, static_argnames=("interpret", "block_t", "num_warps"))
def write_kv_cache_tuned(
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slot_mapping: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    *,
    interpret: bool = False,
    block_t: int = 16,
    num_warps: int = 4,
) -> tuple[jax.Array, jax.Array]:
    """``write_kv_cache`` with its launch parameters exposed (for benchmarks)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_rope(rope, num_tokens, head_dim)
    if head_dim & (head_dim - 1):
        raise ValueError(f"head dim H={head_dim} must be a power of two (Triton tile rule)")
    kernel = functools.partial(
        _write_kernel,
        rope=rope is not None,
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
        kv_pad=_next_pow2(num_kv_heads),
        block_t=block_t,
    )
    flat = (-1, head_dim)
    tables = () if rope is None else (rope[0].astype(jnp.float32), rope[1].astype(jnp.float32))
    k_out, v_out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_t),),
        out_shape=(
            jax.ShapeDtypeStruct((k_cache.size // head_dim, head_dim), k_cache.dtype),
            jax.ShapeDtypeStruct((v_cache.size // head_dim, head_dim), v_cache.dtype),
        ),
        input_output_aliases={3 + len(tables): 0, 4 + len(tables): 1},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=_use_interpret(interpret),
        name="write_kv_cache",
    )(
        slot_mapping.astype(jnp.int32),
        k.reshape(flat),
        v.reshape(flat),
        *tables,
        k_cache.reshape(flat),
        v_cache.reshape(flat),
    )
    return k_out.reshape(k_cache.shape), v_out.reshape(v_cache.shape)


def write_kv_cache(
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    k_cache: jax.Array,  # [P, B, K, H]
    v_cache: jax.Array,  # [P, B, K, H]
    slot_mapping: jax.Array,  # i32[T], block * B + offset, -1 = skip
    rope: tuple[jax.Array, jax.Array] | None = None,  # cos, sin f32[T, H]
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Caches with row ``slot_mapping[t]`` set to ``k[t]`` / ``v[t]``; in place when the caches
    are donated. With ``rope`` the keys are rotated first (``apply_rotate_half``), in the kernel."""
    return write_kv_cache_tuned(k, v, k_cache, v_cache, slot_mapping, rope, interpret=interpret)


def write_kv_cache_reference(
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slot_mapping: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """XLA scatter; -1 is sent out of range (jnp would wrap it to the last slot) and dropped."""
    del interpret
    _check(k, v, k_cache, v_cache, slot_mapping)
    _check_rope(rope, k.shape[0], k.shape[-1])
    if rope is not None:
        k = apply_rotate_half(k, *rope)
    num_pages, block_size, num_kv_heads, head_dim = k_cache.shape
    num_slots = num_pages * block_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)
    rows = (num_slots, num_kv_heads, head_dim)
    k_new = k_cache.reshape(rows).at[slots].set(k.astype(k_cache.dtype), mode="drop")
    v_new = v_cache.reshape(rows).at[slots].set(v.astype(v_cache.dtype), mode="drop")
    return k_new.reshape(k_cache.shape), v_new.reshape(v_cache.shape)
