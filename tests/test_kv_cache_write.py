"""write_kv_cache vs its XLA-scatter reference (GPU, or the Pallas interpreter on the CPU)."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import write_kv_cache, write_kv_cache_reference
from pallas_kernels.paged_decode_attention import apply_rotate_half

from kernel_cases import rope_tables_for

PAD_SLOT_ID = -1


def make_case(seed, num_tokens, num_pages, block_size, num_kv_heads, head_dim, dtype, skip_every=3):
    """Distinct random slots (every skip_every-th token padded with -1) over a random cache."""
    rng = np.random.default_rng(seed)
    slots = rng.permutation(num_pages * block_size)[:num_tokens].astype(np.int32)
    slots[::skip_every] = PAD_SLOT_ID
    k = rng.standard_normal((num_tokens, num_kv_heads, head_dim), dtype=np.float32)
    v = rng.standard_normal((num_tokens, num_kv_heads, head_dim), dtype=np.float32)
    cache_shape = (num_pages, block_size, num_kv_heads, head_dim)
    k_cache = rng.standard_normal(cache_shape, dtype=np.float32)
    v_cache = rng.standard_normal(cache_shape, dtype=np.float32)
    as_dtype = functools.partial(jnp.asarray, dtype=dtype)
    return (*map(as_dtype, (k, v, k_cache, v_cache)), jnp.asarray(slots))


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize(
    "num_tokens,num_kv_heads,head_dim,block_size,dtype",
    [
        (7, 3, 64, 16, jnp.bfloat16),  # SmolLM2 kv heads: not a power of two
        (33, 2, 128, 16, jnp.float32),
        (1, 1, 64, 32, jnp.bfloat16),
        (20, 8, 128, 16, jnp.bfloat16),
    ],
)
def test_matches_reference(num_tokens, num_kv_heads, head_dim, block_size, dtype):
    k, v, k_cache, v_cache, slots = make_case(num_tokens, num_tokens, 6, block_size, num_kv_heads, head_dim, dtype)
    got = write_kv_cache(k, v, k_cache, v_cache, slots)
    want = write_kv_cache_reference(k, v, k_cache, v_cache, slots)
    assert_same(got, want)
    written = np.asarray(slots) >= 0
    flat = np.asarray(got[0], np.float32).reshape(-1, num_kv_heads, head_dim)
    np.testing.assert_array_equal(flat[np.asarray(slots)[written]], np.asarray(k, np.float32)[written])


@pytest.mark.parametrize("head_dim,dtype", [(64, jnp.bfloat16), (128, jnp.float32)])
def test_rope_on_the_way_into_the_cache(head_dim, dtype):
    """Keys rotated in the kernel = the reference with rope = the plain write of keys rotated by
    XLA; values are never rotated."""
    k, v, k_cache, v_cache, slots = make_case(3, 9, 4, 16, 3, head_dim, dtype)
    rope = rope_tables_for(np.arange(9) * 5 + 3, head_dim)
    got = write_kv_cache(k, v, k_cache, v_cache, slots, rope)
    # The rotation's f32 arithmetic may round differently (fused multiply-adds): one bf16 ulp.
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for want in (write_kv_cache_reference(k, v, k_cache, v_cache, slots, rope),
                 write_kv_cache(apply_rotate_half(k, *rope), v, k_cache, v_cache, slots)):
        np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), **tol)
        np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    written = np.asarray(slots) >= 0
    flat = np.asarray(got[0], np.float32).reshape(-1, 3, head_dim)
    assert not np.allclose(flat[np.asarray(slots)[written]], np.asarray(k, np.float32)[written])


def test_all_padding_leaves_cache_untouched():
    k, v, k_cache, v_cache, slots = make_case(0, 5, 2, 16, 2, 64, jnp.float32)
    got = write_kv_cache(k, v, k_cache, v_cache, jnp.full_like(slots, PAD_SLOT_ID))
    assert_same(got, (k_cache, v_cache))


def test_casts_new_rows_to_cache_dtype_and_explicit_interpret():
    k, v, k_cache, v_cache, slots = make_case(1, 9, 3, 16, 2, 64, jnp.bfloat16)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    got = write_kv_cache(k32, v32, k_cache, v_cache, slots, interpret=True)
    assert_same(got, write_kv_cache_reference(k32, v32, k_cache, v_cache, slots))


def test_in_scan_carry_with_donation():
    """The model writes each layer's rows inside lax.scan with the cache as a donated carry."""
    num_layers, num_pages = 3, 4
    k, v, k_cache, v_cache, slots = make_case(2, 10, num_layers * num_pages, 16, 3, 64, jnp.bfloat16)
    layer_slots = jnp.stack([slots] * num_layers)
    layer_slots = jnp.where(layer_slots >= 0, layer_slots % (num_pages * 16), PAD_SLOT_ID)
    layer_slots = layer_slots + jnp.where(layer_slots >= 0, jnp.arange(num_layers)[:, None] * num_pages * 16, 0)
    xs = (jnp.stack([k * (i + 1) for i in range(num_layers)]), jnp.stack([v] * num_layers), layer_slots)

    def run(write, caches, xs):
        def body(caches, x):
            return write(x[0], x[1], *caches, x[2]), None

        return jax.lax.scan(body, caches, xs)[0]

    want = run(write_kv_cache_reference, (k_cache, v_cache), xs)
    got = jax.jit(functools.partial(run, write_kv_cache), donate_argnums=(0,))((k_cache, v_cache), xs)
    assert_same(got, want)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(
    num_tokens=st.integers(1, 40),
    num_kv_heads=st.integers(1, 5),
    block_size=st.sampled_from([16, 32]),
    skip_every=st.integers(1, 5),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_random_slots(num_tokens, num_kv_heads, block_size, skip_every, dtype, seed):
    num_pages = -(-num_tokens // block_size) + 1
    k, v, k_cache, v_cache, slots = make_case(seed, num_tokens, num_pages, block_size, num_kv_heads, 64, dtype, skip_every)
    assert_same(write_kv_cache(k, v, k_cache, v_cache, slots), write_kv_cache_reference(k, v, k_cache, v_cache, slots))
