"""ragged_paged_attention vs its pure-jnp reference (GPU, or the Pallas interpreter on the CPU)."""


import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention import default_tiles, ragged_paged_attention_tuned

from kernel_cases import assert_close, make_paged_cache, poison_device_memory


def run_case(seed, q_lens, kv_lens, group, num_kv_heads, head_dim, block_size, dtype, pad_tokens=3, **tuned):
    """Sequence s brings q_lens[s] new tokens, the last of its kv_lens[s] cache positions."""
    rng = np.random.default_rng(seed)
    k_cache, v_cache, block_tables = make_paged_cache(rng, kv_lens, block_size, num_kv_heads, head_dim, dtype)
    num_tokens = sum(q_lens) + pad_tokens
    q = jnp.asarray(rng.standard_normal((num_tokens, group * num_kv_heads, head_dim)), dtype)
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv = jnp.asarray(kv_lens, jnp.int32)
    poison_device_memory()
    fn = ragged_paged_attention_tuned if tuned else ragged_paged_attention
    out = fn(q, k_cache, v_cache, block_tables, kv, cu_q_lens, **tuned)
    ref = ragged_paged_attention_reference(q, k_cache, v_cache, block_tables, kv, cu_q_lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)
    assert (np.asarray(out, np.float32)[sum(q_lens) :] == 0).all(), "padding rows must be exactly 0"


# A mixed batch: full prefill, chunked prefill / prefix hit (kv > q), decodes of length 1, 16, 17,
# a long prefix hit, and a padded sequence (q_len 0, kv_len 0).
Q_LENS = [17, 5, 1, 1, 1, 9, 0]
KV_LENS = [17, 21, 1, 16, 17, 75, 0]


@pytest.mark.parametrize(
    "group,num_kv_heads,head_dim,dtype",
    [
        (1, 2, 64, jnp.float32),
        (2, 2, 128, jnp.bfloat16),
        (3, 3, 64, jnp.bfloat16),  # SmolLM2: N=9, K=3
        (4, 2, 128, jnp.float32),
        (6, 1, 64, jnp.float32),
        (8, 1, 128, jnp.bfloat16),
    ],
)
def test_matches_reference(group, num_kv_heads, head_dim, dtype):
    run_case(group, Q_LENS, KV_LENS, group, num_kv_heads, head_dim, 16, dtype)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 32), (128, 64)])
def test_tilings(block_m, block_n):
    # Small q-blocks split one sequence over several programs; big ones cover many sequences' slots.
    run_case(11, Q_LENS, KV_LENS, 4, 2, 64, 16, jnp.float32, block_m=block_m, block_n=block_n)


def test_block_size_32_long_prefill():
    run_case(12, [40, 2, 0], [70, 33, 0], 2, 2, 64, 32, jnp.bfloat16, pad_tokens=0)


def test_all_sequences_padded():
    run_case(13, [0, 0], [0, 0], 2, 1, 64, 16, jnp.float32, pad_tokens=5)


def test_sm_scale_and_explicit_interpret():
    rng = np.random.default_rng(14)
    k_cache, v_cache, block_tables = make_paged_cache(rng, [20, 3], 16, 2, 64, jnp.float32)
    q = jnp.asarray(rng.standard_normal((6, 4, 64)), jnp.float32)
    kv, cu = jnp.asarray([20, 3], jnp.int32), jnp.asarray([0, 4, 6], jnp.int32)
    out = ragged_paged_attention(q, k_cache, v_cache, block_tables, kv, cu, sm_scale=0.3, interpret=True)
    ref = ragged_paged_attention_reference(q, k_cache, v_cache, block_tables, kv, cu, sm_scale=0.3)
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("group_pad", [1, 2, 4, 8, 16, 32, 256])
@pytest.mark.parametrize("num_tokens,num_seqs", [(1, 1), (40, 7), (2048, 1), (4096, 8), (8192, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_tiles_are_valid(group_pad, num_tokens, num_seqs, head_dim):
    block_m, block_n, num_stages = default_tiles(num_tokens, num_seqs, group_pad, head_dim)
    assert block_m >= max(16, group_pad) and block_m & (block_m - 1) == 0 and block_m % group_pad == 0
    assert block_n in (64, 128) and num_stages in (2, 3)


@st.composite
def batches(draw):
    num_seqs = draw(st.integers(1, 4))
    q_lens, kv_lens = [], []
    for _ in range(num_seqs):
        kv = draw(st.integers(0, 60))
        q_lens.append(draw(st.integers(min(kv, 1), kv)))
        kv_lens.append(kv)
    return q_lens, kv_lens


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(
    batch=batches(),
    group=st.sampled_from([1, 2, 3, 4, 8]),
    num_kv_heads=st.integers(1, 2),
    block_size=st.sampled_from([16, 32]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    pad_tokens=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_property_random_batches(batch, group, num_kv_heads, block_size, dtype, pad_tokens, seed):
    q_lens, kv_lens = batch
    run_case(seed, q_lens, kv_lens, group, num_kv_heads, 64, block_size, dtype, pad_tokens=pad_tokens)
