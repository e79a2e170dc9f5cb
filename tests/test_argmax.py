"""argmax_rows (the greedy sampler's row argmax over (row block, column chunk) programs) against
jnp.argmax, in the Pallas interpreter here (on a GPU, the real kernel); its lowering for an
H100; and the sampler's greedy tokens through it."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.sampler import SamplingRow, build_sampling_metadata, sample
from jaxpaged.sampling_params import SamplingParams
from pallas_kernels import argmax_rows, argmax_rows_reference


def tied_logits(seed: int, rows: int, vocab: int, dtype, levels: int = 7) -> jax.Array:
    """Few distinct values, so every row's maximum is tied many times over: only the first
    index of the maximum is right."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(-levels, levels, (rows, vocab)), dtype)


def check(logits, **tuning):
    got = np.asarray(argmax_rows(logits, **tuning))
    want = np.asarray(argmax_rows_reference(logits))
    assert got.dtype == np.int32 and got.shape == (logits.shape[0],)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_first_index_of_tied_maxima(dtype):
    # 9 rows (a partial last row block), 1000 columns (no chunk or tile divides it).
    check(tied_logits(0, 9, 1000, dtype))


@pytest.mark.parametrize("tuning", [
    dict(block_rows=1, block_cols=64, chunks=1),  # one program a row, many tiles
    dict(block_rows=2, block_cols=128, chunks=7),  # tiles hang past the vocabulary
    dict(block_rows=16, block_cols=32, chunks=64),  # more chunks than tiles need: trimmed
    dict(block_rows=4, block_cols=1024, chunks=32, num_warps=8),  # one tile covers everything
])
def test_tuning_variants(tuning):
    check(tied_logits(1, 11, 777, jnp.bfloat16), **tuning)


def test_maximum_at_the_edges_and_in_the_last_chunk():
    logits = np.array(tied_logits(2, 4, 1000, jnp.float32, levels=3))
    logits[0, 0] = logits[1, 999] = logits[2, 500] = 100.0  # first, last, middle column
    logits[3, 998:] = 100.0  # a tie inside the last tile of the last chunk
    check(jnp.asarray(logits), block_cols=64, chunks=8)


def test_suppressed_and_infinite_logits():
    """-inf where the sampler suppressed ids; a row all -inf gives 0, as jnp.argmax does."""
    logits = np.array(tied_logits(3, 3, 300, jnp.float32))
    logits[0, :] = -np.inf
    logits[1, ::2] = -np.inf
    logits[2, 17] = np.inf
    check(jnp.asarray(logits, jnp.bfloat16), block_cols=32, chunks=4)


def test_no_rows():
    assert argmax_rows(jnp.zeros((0, 50), jnp.bfloat16)).shape == (0,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_rows=3), "block_rows=3"),
    (dict(block_cols=100), "block_cols=100"),
    (dict(chunks=0), "chunks=0"),
])
def test_rejects_bad_tuning(kwargs, match):
    with pytest.raises(ValueError, match=match):
        argmax_rows(jnp.zeros((2, 8), jnp.float32), **kwargs)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[R, V\]"):
        argmax_rows(jnp.zeros((8,), jnp.float32))
    with pytest.raises(ValueError, match="no columns"):
        argmax_rows(jnp.zeros((2, 0), jnp.float32))


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(rows=st.integers(1, 20), vocab=st.integers(1, 700),
                  levels=st.integers(1, 50), block_rows=st.sampled_from([1, 2, 8]),
                  block_cols=st.sampled_from([16, 64, 256]), chunks=st.integers(1, 40))
def test_property_shapes(rows, vocab, levels, block_rows, block_cols, chunks):
    check(tied_logits(rows * vocab, rows, vocab, jnp.bfloat16, levels),
          block_rows=block_rows, block_cols=block_cols, chunks=chunks)


def test_lowers_for_an_h100():
    """A batch-256 step's logits of a 128k vocabulary, lowered to Triton for an (abstract) H100
    without a GPU."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
    fn = functools.partial(argmax_rows, interpret=False)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=h100)):
        text = jax.jit(fn).trace(jax.ShapeDtypeStruct((256, 128256), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "argmax_rows" in text


@pytest.mark.parametrize("penalties", [False, True])
def test_sampler_greedy_tokens_through_the_kernel(monkeypatch, penalties):
    """The sampler's greedy rows (with and without penalties, beside a random row) give the same
    tokens through the kernel as through jnp.argmax, on logits full of ties."""
    vocab = 300
    logits = tied_logits(4, 5, vocab, jnp.bfloat16)
    penalty = dict(repetition_penalty=1.3, presence_penalty=0.5) if penalties else {}
    rows = [SamplingRow(SamplingParams(temperature=0.0, **penalty), seed=i,
                        token_ids=list(range(i, i + 6)), num_prompt_tokens=3)
            for i in range(4)]
    rows.append(SamplingRow(SamplingParams(temperature=0.8, seed=5), seed=5,
                            token_ids=[1, 2, 3], num_prompt_tokens=3))
    md = build_sampling_metadata(rows, 8, vocab, 64)
    logits = jnp.pad(logits, ((0, 3), (0, 0)))
    tokens = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("JAXPAGED_ARGMAX_KERNEL", setting)
        # A new function each time: JAX's trace cache would hand the second jit the first's
        # program, whatever the switch says.
        fresh = lambda x, m: sample(x, m)  # noqa: E731
        assert ("argmax_rows" in str(jax.make_jaxpr(fresh)(logits, md))) == (setting == "1")
        tokens[setting] = np.asarray(jax.jit(fresh)(logits, md).sampled_token_ids)
    np.testing.assert_array_equal(tokens["1"], tokens["0"])


def test_the_switch(monkeypatch):
    """Unset: on only for a process with one GPU (here, a CPU: off); 1 / 0 force it; anything
    else is an error naming the variable."""
    from jaxpaged.sampler import use_argmax_kernel

    monkeypatch.delenv("JAXPAGED_ARGMAX_KERNEL", raising=False)
    assert use_argmax_kernel() is (jax.default_backend() == "gpu" and jax.device_count() == 1)
    monkeypatch.setenv("JAXPAGED_ARGMAX_KERNEL", "1")
    assert use_argmax_kernel()
    monkeypatch.setenv("JAXPAGED_ARGMAX_KERNEL", "0")
    assert not use_argmax_kernel()
    monkeypatch.setenv("JAXPAGED_ARGMAX_KERNEL", "yes")
    with pytest.raises(ValueError, match="JAXPAGED_ARGMAX_KERNEL"):
        use_argmax_kernel()
