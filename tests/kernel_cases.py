"""Shared inputs and checks of the kernel tests: NaN-poisoned shuffled page pools, tolerances,
lowering for the GPU from any host."""

import math

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}  # ||out - ref|| / ||ref||


def make_paged_cache(rng, kv_lens, block_size, num_kv_heads, head_dim, dtype, extra_cols=1):
    """Caches whose pages are shuffled over the pool; every slot no sequence owns is NaN.

    Returns k_cache, v_cache [P, B, K, H] and block_tables i32[S, max_blocks] padded with the
    null block 0 (itself NaN), so any read past kv_len shows up as NaN in the output.
    """
    pages = [math.ceil(n / block_size) for n in kv_lens]
    max_blocks = max(pages + [1]) + extra_cols
    num_pages = 1 + sum(pages) + 2  # null block + used pages + two never-used pages
    shape = (num_pages, block_size, num_kv_heads, head_dim)
    k = rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    owned = np.zeros((num_pages, block_size), bool)
    ids = rng.permutation(np.arange(1, num_pages))
    block_tables = np.zeros((len(kv_lens), max_blocks), np.int32)
    used = 0
    for s, (n, count) in enumerate(zip(kv_lens, pages)):
        block_tables[s, :count] = ids[used : used + count]
        used += count
        flat = owned[block_tables[s, :count]].reshape(-1)
        flat[:n] = True
        owned[block_tables[s, :count]] = flat.reshape(count, block_size)
    k[~owned], v[~owned] = np.nan, np.nan
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(block_tables)


def assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(out).any(), "NaN leaked into the output"
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def poison_device_memory():
    """On a GPU, leave NaN in freed memory so an unwritten output row would show up."""
    if jax.default_backend() != "cpu":
        jnp.full((1 << 24,), jnp.nan, jnp.float32).block_until_ready().delete()


def rope_tables_for(positions, head_dim: int, theta: float = 10000.0):
    """cos, sin f32[T, H] of rotate-half RoPE at ``positions`` (the model's layout)."""
    from jaxpaged.models.llama import rope_tables

    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    return rope_tables(jnp.asarray(positions, jnp.int32), jnp.asarray(inv_freq))


def lower_for_cuda(fn, *args) -> str:
    """``fn`` jitted and lowered for CUDA from any host, as text: the kernel's own lowering runs
    (Mosaic GPU's layout inference included, which rejects shapes its CPU interpreter runs), not
    ptxas or a launch. ``args``: arrays or ShapeDtypeStructs, in pytrees."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
