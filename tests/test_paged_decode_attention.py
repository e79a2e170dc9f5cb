"""paged_decode_attention vs its pure-jnp reference (GPU, or the Pallas interpreter on the CPU)."""


import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.paged_decode_attention import (apply_rotate_half, default_block_n,
                                                   paged_decode_attention_tuned)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

from kernel_cases import assert_close, make_paged_cache, poison_device_memory, rope_tables_for


def run_case(seed, kv_lens, group, num_kv_heads, head_dim, block_size, dtype, **tuned):
    rng = np.random.default_rng(seed)
    k_cache, v_cache, block_tables = make_paged_cache(rng, kv_lens, block_size, num_kv_heads, head_dim, dtype)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), group * num_kv_heads, head_dim)), dtype)
    kv = jnp.asarray(kv_lens, jnp.int32)
    poison_device_memory()
    if tuned:
        out = paged_decode_attention_tuned(q, k_cache, v_cache, block_tables, kv, **tuned)
    else:
        out = paged_decode_attention(q, k_cache, v_cache, block_tables, kv)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, kv)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)
    padded = np.asarray(kv_lens) == 0
    assert (np.asarray(out, np.float32)[padded] == 0).all(), "padded rows must be exactly 0"
    return q, k_cache, v_cache, block_tables, kv, out


# Lengths: one token, exactly a block, one past a block, long, and a padded row.
LENGTHS_16 = [1, 16, 17, 83, 0]


@pytest.mark.parametrize(
    "group,num_kv_heads,head_dim,dtype",
    [
        (1, 2, 64, jnp.float32),
        (2, 2, 128, jnp.bfloat16),
        (3, 3, 64, jnp.bfloat16),  # SmolLM2: N=9, K=3
        (3, 3, 64, jnp.float32),
        (4, 2, 128, jnp.float32),
        (5, 1, 64, jnp.bfloat16),
        (8, 1, 128, jnp.bfloat16),
        (16, 1, 64, jnp.float32),
    ],
)
def test_matches_reference(group, num_kv_heads, head_dim, dtype):
    run_case(group, LENGTHS_16, group, num_kv_heads, head_dim, 16, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_kv_splits_merge(num_splits):
    # Splits past a sequence's end are empty and must weigh nothing in the merge.
    run_case(7, [1, 33, 150, 0], 4, 2, 64, 16, jnp.float32, num_splits=num_splits, block_n=16)


@pytest.mark.parametrize("num_splits", [3, 8])
def test_splits_share_the_longest_row_not_the_table(num_splits):
    """A table far wider than the rows (as a long max_model_len makes it): the splits divide the
    step's longest row between them (150 tokens: 8 splits of 32), not the table's 3,360 slots,
    and the merge is exact."""
    rng = np.random.default_rng(11)
    kv_lens = [150, 7, 0, 64]
    k_cache, v_cache, tables = make_paged_cache(rng, kv_lens, 16, 2, 64, jnp.float32,
                                                extra_cols=200)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), 8, 64)), jnp.float32)
    lens = jnp.asarray(kv_lens, jnp.int32)
    poison_device_memory()
    out = paged_decode_attention_tuned(q, k_cache, v_cache, tables, lens, num_splits=num_splits,
                                       block_n=16)
    assert_close(out, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens),
                 jnp.float32)
    assert (np.asarray(out)[2] == 0).all(), "padded rows must be exactly 0"


def test_default_tile_by_head_dim_and_its_override(monkeypatch):
    monkeypatch.delenv("JAXPAGED_DECODE_BLOCK_N", raising=False)
    assert (default_block_n(64), default_block_n(128)) == (32, 64)
    monkeypatch.setenv("JAXPAGED_DECODE_BLOCK_N", "128")
    assert default_block_n(64) == 128
    monkeypatch.setenv("JAXPAGED_DECODE_BLOCK_N", "48")
    with pytest.raises(ValueError, match="JAXPAGED_DECODE_BLOCK_N"):
        default_block_n(64)


def test_overridden_tile_matches_reference(monkeypatch):
    # 64 keys a tile at head dim 64 (the default there is 32): lengths across tiles and pages.
    monkeypatch.setenv("JAXPAGED_DECODE_BLOCK_N", "64")
    run_case(5, [1, 64, 65, 150, 0], group=4, num_kv_heads=2, head_dim=64, block_size=16,
             dtype=jnp.bfloat16)


def test_block_size_32_and_tile_spanning_pages():
    run_case(3, [1, 32, 33, 97], 3, 3, 64, 32, jnp.bfloat16, block_n=64)
    run_case(4, [1, 16, 17, 70], 2, 2, 64, 16, jnp.float32, block_n=64)


def test_sm_scale_and_explicit_interpret():
    rng = np.random.default_rng(5)
    k_cache, v_cache, block_tables = make_paged_cache(rng, [20, 3], 16, 2, 64, jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    kv = jnp.asarray([20, 3], jnp.int32)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, kv, sm_scale=0.3, interpret=True)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, kv, sm_scale=0.3)
    assert_close(out, ref, jnp.float32)


def test_agrees_with_ragged_kernel_on_decodes():
    q, k_cache, v_cache, block_tables, kv, out = run_case(9, [5, 16, 17, 40], 3, 3, 64, 16, jnp.float32)
    cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    ragged = ragged_paged_attention(q, k_cache, v_cache, block_tables, kv, cu_q_lens)
    assert_close(ragged, out, jnp.float32)


def test_sequences_fastest_grid_matches_reference():
    run_case(11, LENGTHS_16, 4, 2, 64, 16, jnp.bfloat16, heads_fastest=False)


@pytest.mark.parametrize("head_dim,dtype,num_splits", [(64, jnp.bfloat16, 1), (128, jnp.float32, 2)])
def test_rope_inside_the_kernel(head_dim, dtype, num_splits):
    """q rotated in the kernel = the reference with rope = the kernel on q rotated by XLA."""
    rng = np.random.default_rng(12)
    kv_lens = [1, 16, 17, 83, 0]
    k_cache, v_cache, block_tables = make_paged_cache(rng, kv_lens, 16, 2, head_dim, dtype)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), 8, head_dim)), dtype)
    kv = jnp.asarray(kv_lens, jnp.int32)
    rope = rope_tables_for(np.maximum(np.asarray(kv_lens) - 1, 0) * 7, head_dim)
    out = paged_decode_attention_tuned(q, k_cache, v_cache, block_tables, kv, rope,
                                       num_splits=num_splits)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, kv, rope)
    assert_close(out, ref, dtype)
    pre_rotated = paged_decode_attention(apply_rotate_half(q, *rope), k_cache, v_cache,
                                         block_tables, kv)
    assert_close(out, pre_rotated, dtype)
    unrotated = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, kv)
    assert not np.allclose(np.asarray(ref, np.float32), np.asarray(unrotated, np.float32), atol=1e-2)


def test_rejects_rope_tables_of_the_wrong_shape():
    rng = np.random.default_rng(13)
    k_cache, v_cache, block_tables = make_paged_cache(rng, [20, 3], 16, 2, 64, jnp.float32)
    q = jnp.zeros((2, 4, 64), jnp.float32)
    cos, sin = rope_tables_for([0, 1, 2], 64)
    with pytest.raises(ValueError, match="rope"):
        paged_decode_attention(q, k_cache, v_cache, block_tables, jnp.asarray([20, 3], jnp.int32),
                               (cos, sin))


def test_rejects_more_query_rows_than_sequences():
    rng = np.random.default_rng(6)
    k_cache, v_cache, block_tables = make_paged_cache(rng, [20, 3], 16, 2, 64, jnp.float32)
    q = jnp.zeros((3, 4, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k_cache, v_cache, block_tables, jnp.asarray([20, 3], jnp.int32))


@hypothesis.settings(max_examples=5, deadline=None, derandomize=True)
@hypothesis.given(
    kv_lens=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    group=st.sampled_from([1, 2, 3, 4, 6, 8]),
    num_kv_heads=st.integers(1, 2),
    block_size=st.sampled_from([16, 32]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(kv_lens, group, num_kv_heads, block_size, dtype, seed):
    run_case(seed, kv_lens, group, num_kv_heads, 64, block_size, dtype)


def _fused_write_case(seed, kv_lens, frozen, head_dim, dtype, num_kv_heads=2, group=4,
                      block_size=16, extra_cols=1):
    """Caches, tables, q, lengths, rope tables and this step's (k, v, slots): the slot of each
    sequence's last position, -1 for padded rows and for the rows in ``frozen`` (which read their
    last position from the cache). The slots to be written hold NaN, so a kernel that read
    them instead of its registers would show it."""
    rng = np.random.default_rng(seed)
    k_cache, v_cache, block_tables = make_paged_cache(rng, kv_lens, block_size, num_kv_heads,
                                                      head_dim, dtype, extra_cols)
    lens = np.asarray(kv_lens)
    last = np.maximum(lens - 1, 0)
    slots = np.asarray(block_tables)[np.arange(len(lens)), last // block_size] * block_size + last % block_size
    slots = np.where((lens > 0) & ~np.isin(np.arange(len(lens)), frozen), slots, -1).astype(np.int32)
    written = slots[slots >= 0]
    k_cache = k_cache.reshape(-1, num_kv_heads, head_dim).at[written].set(jnp.nan).reshape(k_cache.shape)
    v_cache = v_cache.reshape(-1, num_kv_heads, head_dim).at[written].set(jnp.nan).reshape(v_cache.shape)
    q = jnp.asarray(rng.standard_normal((len(lens), group * num_kv_heads, head_dim)), dtype)
    k_new, v_new = (jnp.asarray(rng.standard_normal((len(lens), num_kv_heads, head_dim)), dtype)
                    for _ in range(2))
    rope = rope_tables_for(last * 3, head_dim)
    return (q, k_cache, v_cache, block_tables, jnp.asarray(lens, jnp.int32), rope,
            (k_new, v_new, jnp.asarray(slots)))


@pytest.mark.parametrize("head_dim,dtype,with_rope,num_splits,extra_cols", [
    (64, jnp.bfloat16, True, 1, 1), (128, jnp.float32, False, 1, 1), (64, jnp.float32, True, 3, 1),
    (128, jnp.bfloat16, True, 5, 1), (64, jnp.float32, True, 4, 60)])
def test_write_inside_the_kernel_matches_write_then_attend(head_dim, dtype, with_rope, num_splits,
                                                           extra_cols):
    # Last positions: first of a page, last of a page, mid-page, deep in a long sequence (and in
    # different splits); a frozen row (no slot, reads its cache); a padded row. extra_cols: a
    # table far wider than the rows, whose splits share the longest row.
    q, k_cache, v_cache, tables, lens, rope, write = _fused_write_case(
        21, [1, 16, 17, 83, 40, 0], frozen=[4], head_dim=head_dim, dtype=dtype,
        extra_cols=extra_cols)
    rope = rope if with_rope else None
    poison_device_memory()
    out, k_out, v_out = paged_decode_attention_tuned(q, k_cache, v_cache, tables, lens, rope, write,
                                                     num_splits=num_splits)
    ref, k_ref, v_ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, rope,
                                                         write)
    assert_close(out, ref, dtype)
    assert (np.asarray(out, np.float32)[5] == 0).all(), "padded rows must be exactly 0"
    # The caches: every written row as the reference writes it (the rotation's f32 arithmetic
    # may round differently there, fused multiply-adds: one ulp), every other row untouched.
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(k_out, np.float32), np.asarray(k_ref, np.float32), **tol)
    np.testing.assert_array_equal(np.asarray(v_out, np.float32), np.asarray(v_ref, np.float32))
    untouched = np.ones(k_out.shape[:2], bool).reshape(-1)
    untouched[np.asarray(write[2])[np.asarray(write[2]) >= 0]] = False
    for got, before in ((k_out, k_cache), (v_out, v_cache)):
        np.testing.assert_array_equal(np.asarray(got, np.float32).reshape(-1, *got.shape[2:])[untouched],
                                      np.asarray(before, np.float32).reshape(-1, *got.shape[2:])[untouched])
    assert not np.isnan(np.asarray(k_out, np.float32)[np.asarray(tables)[0, 0], 0]).any()


def test_write_inside_the_kernel_public_entry_and_bad_shapes():
    q, k_cache, v_cache, tables, lens, rope, (k, v, slots) = _fused_write_case(
        22, [5, 33, 0], frozen=[], head_dim=64, dtype=jnp.float32)
    out, k_out, _ = paged_decode_attention(q, k_cache, v_cache, tables, lens, rope, (k, v, slots))
    ref, k_ref, _ = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, rope,
                                                     (k, v, slots))
    assert_close(out, ref, jnp.float32)
    np.testing.assert_allclose(np.asarray(k_out), np.asarray(k_ref), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="write's k and v"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, rope, (k[:2], v[:2], slots))
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, rope, (k, v, slots[:2]))
