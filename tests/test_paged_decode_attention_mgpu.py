"""paged_decode_attention_mgpu (Mosaic GPU) against paged_decode_attention_reference: in Mosaic
GPU's CPU interpreter here, as the real kernel on a GPU (JAX_PLATFORMS=cuda); and its lowering
for an H100 at the engine's decode shapes (lowered, not run, from the CPU)."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode_attention_reference
from pallas_kernels.paged_decode_attention_mgpu import paged_decode_attention_mgpu, supported

from kernel_cases import assert_close, lower_for_cuda, make_paged_cache, poison_device_memory

# A padded row, one token, exactly a page, one past a page, exactly a 64-key tile, one past a
# tile, and three tiles with a partial last one (150 = 2 * 64 + 22).
LENGTHS = [0, 1, 16, 17, 64, 65, 150]


def inputs(seed, kv_lens, group, num_kv_heads, head_dim, block_size=16, dtype=jnp.bfloat16,
           unused_columns=None):
    rng = np.random.default_rng(seed)
    k_cache, v_cache, block_tables = make_paged_cache(
        rng, kv_lens, block_size, num_kv_heads, head_dim, dtype)
    if unused_columns is not None:
        # Block-table entries past a sequence's pages: "other pages" names pages that other
        # sequences own (finite, so a use would show as a wrong result, not only as NaN);
        # "out of range" names no page at all.
        pages = -(-np.asarray(kv_lens) // block_size)
        table = np.asarray(block_tables).copy()
        unused = np.arange(table.shape[1])[None, :] >= pages[:, None]
        num_pages = k_cache.shape[0]
        table[unused] = (rng.integers(0, num_pages, size=int(unused.sum()))
                         if unused_columns == "other pages" else num_pages + 1000)
        block_tables = jnp.asarray(table)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), group * num_kv_heads, head_dim)), dtype)
    return q, k_cache, v_cache, block_tables, jnp.asarray(kv_lens, jnp.int32)


def check(args, sm_scale=None, **tuning):
    poison_device_memory()
    out = paged_decode_attention_mgpu(*args, sm_scale=sm_scale, **tuning)
    ref = paged_decode_attention_reference(*args, sm_scale=sm_scale)
    q, kv_lens = args[0], args[-1]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, jnp.bfloat16)
    padded = np.asarray(kv_lens) == 0
    assert (np.asarray(out, np.float32)[padded] == 0).all(), "padded rows must be exactly 0"


@pytest.mark.parametrize("group,num_kv_heads,head_dim", [
    (1, 2, 64),
    (2, 2, 128),
    (4, 2, 64),  # llama-3.2-1b's group (32 query / 8 kv heads), head dim 64
    (4, 1, 128),  # llama-3.1-8b's group, head dim 128
    (8, 1, 64),
])
def test_matches_reference(group, num_kv_heads, head_dim):
    check(inputs(group, LENGTHS, group, num_kv_heads, head_dim))


@pytest.mark.parametrize("tuning", [
    dict(stages=1),  # no tile in flight behind the one computed
    dict(stages=2),
    dict(stages=6),  # more slots than any sequence has tiles
    dict(block_n=128),  # 8 pages a tile
    dict(block_n=128, stages=3),
])
def test_tuning_variants(tuning):
    check(inputs(11, [150, 3, 0, 129, 64], 4, 2, 64), **tuning)


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(kv_lens=st.lists(st.integers(0, 200), min_size=1, max_size=4),
                  group=st.sampled_from([1, 2, 4, 8]), num_kv_heads=st.integers(1, 2),
                  head_dim=st.sampled_from([64, 128]), block_size=st.sampled_from([16, 32]),
                  stages=st.integers(1, 4))
def test_property_shapes(kv_lens, group, num_kv_heads, head_dim, block_size, stages):
    """Each example also lowers for the GPU: the interpreter runs shapes that may not."""
    args = inputs(sum(kv_lens), kv_lens, group, num_kv_heads, head_dim, block_size=block_size)
    check(args, stages=stages)
    fn = functools.partial(paged_decode_attention_mgpu, stages=stages, interpret=False)
    assert "mosaic_gpu" in lower_for_cuda(fn, *args)


@pytest.mark.parametrize("unused_columns", ["other pages", "out of range"])
def test_block_table_entries_past_the_end_may_be_anything(unused_columns):
    check(inputs(12, [5, 16, 33, 100, 0], 2, 2, 64, unused_columns=unused_columns), stages=3)


@pytest.mark.parametrize("block_size", [8, 32, 64])
def test_other_block_sizes(block_size):
    check(inputs(13, [1, 31, 64, 97, 0], 2, 2, 64, block_size=block_size), stages=2)


def test_float16_and_sm_scale():
    check(inputs(14, [7, 70], 4, 2, 128, dtype=jnp.float16), sm_scale=0.3)


def test_no_races_in_the_interpreter():
    if jax.default_backend() != "cpu":
        pytest.skip("the race detector is the CPU interpreter's")
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races  # private
    check(inputs(15, [150, 1, 0], 4, 2, 64), stages=2, detect_races=True)
    assert not get_races().races_found


def test_one_compile_for_any_lengths():
    run = jax.jit(functools.partial(paged_decode_attention_mgpu, stages=2))
    *args, _ = inputs(20, [130, 64, 40], 2, 2, 64)
    for kv_lens in ([3, 0, 40], [130, 64, 1], [0, 0, 0]):
        kv_lens = jnp.asarray(kv_lens, jnp.int32)
        assert_close(run(*args, kv_lens), paged_decode_attention_reference(*args, kv_lens),
                     jnp.bfloat16)
    assert run._cache_size() == 1


@pytest.mark.parametrize("change,match", [
    (dict(dtype=jnp.float32), "bfloat16 or all float16"),
    (dict(head_dim=96), "head dim H must be one of"),
    (dict(block_size=12), "block size B=12"),
    (dict(group=80), "at most 64 per kv head"),
    (dict(block_n=96), "block_n=96"),
    (dict(block_size=128), "block_n=64 must be a positive multiple of 64 .* B=128"),
    (dict(stages=0), "stages=0"),
    (dict(stages=8, block_n=256, head_dim=128), "need .* bytes of shared memory"),
])
def test_rejects_what_it_cannot_do(change, match):
    shape = dict(group=2, head_dim=64, block_size=16, dtype=jnp.bfloat16)
    tuning = {key: change.pop(key) for key in ("block_n", "stages") if key in change}
    shape.update(change)
    q = jax.ShapeDtypeStruct((3, 2 * shape["group"], shape["head_dim"]), shape["dtype"])
    cache = jax.ShapeDtypeStruct((4, shape["block_size"], 2, shape["head_dim"]), shape["dtype"])
    tables, lens = jax.ShapeDtypeStruct((3, 2), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32)
    with pytest.raises(ValueError, match=match):
        supported(q, cache, cache, tables, lens, **tuning)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_mgpu.trace(q, cache, cache, tables, lens, **tuning)


def test_rejects_mismatched_caches_and_tables():
    q, k_cache, v_cache, block_tables, kv_lens = inputs(0, [3, 5], 2, 2, 64)
    with pytest.raises(ValueError, match="k_cache, v_cache"):
        supported(q, k_cache, v_cache[:, :, :1], block_tables, kv_lens)
    with pytest.raises(ValueError, match="kv_lens"):
        supported(q, k_cache, v_cache, block_tables, kv_lens[:1])
    supported(q, k_cache, v_cache, block_tables, kv_lens)


# The engine's decode launches: (N, K, H) of llama-3.2-1b and llama-3.1-8b, at batch 256 with
# a 640-token block-table bucket (40 pages of 16) and a pool of 4096 pages.
MODELS = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128)}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("tuning", [{}, dict(stages=1), dict(block_n=128)])
def test_lowers_for_an_h100_at_the_engine_shapes(model, tuning):
    """Lowered through Mosaic GPU's layout inference and dialect lowering for CUDA, without a
    GPU (ptxas and the launch are not exercised)."""
    num_heads, num_kv_heads, head_dim = MODELS[model]
    q = jax.ShapeDtypeStruct((256, num_heads, head_dim), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4096, 16, num_kv_heads, head_dim), jnp.bfloat16)
    tables = jax.ShapeDtypeStruct((256, 40), jnp.int32)
    lens = jax.ShapeDtypeStruct((256,), jnp.int32)
    fn = functools.partial(paged_decode_attention_mgpu, interpret=False, **tuning)
    text = lower_for_cuda(fn, q, cache, cache, tables, lens)
    assert "mosaic_gpu" in text
