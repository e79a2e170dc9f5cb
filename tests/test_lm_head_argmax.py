"""lm_head_argmax (the LM head's GEMM with a greedy argmax epilogue, Mosaic GPU) against its
reference: in Mosaic GPU's CPU interpreter here, as the real kernel on a GPU; its lowering for an
H100 at the benchmark models' heads (lowered, not run, from the CPU); the sampler's greedy head
and the model's greedy forward through it."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.sampler import greedy_head, greedy_tokens, use_lm_head_argmax
from pallas_kernels import lm_head_argmax, lm_head_argmax_reference, lm_head_argmax_supports

from kernel_cases import lower_for_cuda, poison_device_memory


def integer_inputs(seed: int, num_tokens: int, d: int, vocab: int, transposed: bool,
                   dtype=jnp.bfloat16, levels: int = 3):
    """Small integers: the f32 products are exact whatever the summation order, so the kernel's
    logits round to exactly the reference's, and rows tie at their maximum often (only the
    first index of it is right)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(-levels, levels + 1, (num_tokens, d)), dtype)
    w = jnp.asarray(rng.integers(-2, 3, (vocab, d) if transposed else (d, vocab)), dtype)
    return x, w


def lower(x, w, transposed, **tuning) -> str:
    return lower_for_cuda(functools.partial(lm_head_argmax, transposed=transposed,
                                            interpret=False, **tuning), x, w)


def check(x, w, transposed, **tuning):
    poison_device_memory()
    got = np.asarray(lm_head_argmax(x, w, transposed=transposed, **tuning))
    want = np.asarray(lm_head_argmax_reference(x, w, transposed=transposed))
    assert got.dtype == np.int32 and got.shape == (x.shape[0],)
    np.testing.assert_array_equal(got, want)


# T: a partial row block, and two row blocks of 128 with a padded tail; the vocabulary in
# several column blocks, and D in several k steps.
@pytest.mark.parametrize("num_tokens", [5, 130])
@pytest.mark.parametrize("transposed", [True, False], ids=["tied", "untied"])
def test_matches_reference(num_tokens, transposed):
    x, w = integer_inputs(num_tokens, num_tokens, 96, 192, transposed)
    check(x, w, transposed, block_m=128, block_n=64, block_k=32)


@pytest.mark.parametrize("vocab", [512, 384])
def test_default_tiles(vocab):
    """128 x 256 tiles where 256 divides the vocabulary, else 256 x 128 (llama's 128,256 and
    qwen3's 151,936); T 140 spans two of the narrower row blocks."""
    from pallas_kernels.lm_head_argmax import default_tiles

    assert default_tiles(128256) == (128, 256) and default_tiles(151936) == (256, 128)
    x, w = integer_inputs(vocab, 140, 64, vocab, True)
    check(x, w, True)


def test_ties_across_column_blocks_keep_the_first():
    """Every row's maximum is in several column blocks (and twice in one): the first wins."""
    x, w = integer_inputs(1, 6, 32, 256, True)
    w = np.array(w)
    w[[200, 70, 71, 130]] = 4 * np.sign(np.array(x, np.float32)[0])  # row 0's best, four times
    check(x, jnp.asarray(w, jnp.bfloat16), True, block_n=64, block_k=16)


def test_float16_and_one_k_step_many_in_flight():
    x, w = integer_inputs(2, 20, 64, 128, False, jnp.float16)
    check(x, w, False, block_n=32, block_k=64, max_concurrent_steps=6)


def test_rounds_the_logits_before_comparing():
    """Two columns whose f32 logits differ by less than a bf16 ulp round to the same value: the
    first index wins, as in the unfused path (logits stored in bf16), not the larger f32."""
    x = jnp.asarray([[1.0] * 16], jnp.bfloat16)
    w = np.zeros((16, 64), np.float32)
    w[:, 3] = 16.0  # logit 256
    w[0, 9], w[1:, 9] = 17.0, 16.0  # logit 257: 256 in bf16 (8 bits of mantissa)
    w = jnp.asarray(w, jnp.bfloat16)
    assert int(jnp.argmax(jnp.dot(x, w, preferred_element_type=jnp.float32)[0])) == 9
    assert int(lm_head_argmax_reference(x, w, transposed=False)[0]) == 3
    check(x, w, False, block_n=32, block_k=16)


def test_no_rows():
    assert lm_head_argmax(jnp.zeros((0, 32), jnp.bfloat16), jnp.zeros((64, 32), jnp.bfloat16),
                          transposed=True).shape == (0,)


def test_rejects_bad_inputs():
    x, w = integer_inputs(3, 4, 32, 64, True)
    with pytest.raises(ValueError, match="hidden size"):
        lm_head_argmax(x, w, transposed=False)  # [V, D] read as [D, V]
    with pytest.raises(ValueError, match="bfloat16 or both float16"):
        lm_head_argmax(x.astype(jnp.float32), w.astype(jnp.float32), transposed=True)
    with pytest.raises(ValueError, match="V % 16"):  # an 8-column tile finds no GPU tiling
        lm_head_argmax(x, w[:56], transposed=True)
    with pytest.raises(ValueError, match="block_m=64"):
        lm_head_argmax(x, w, transposed=True, block_m=64)
    assert not lm_head_argmax_supports(32, 56, jnp.bfloat16)
    assert not lm_head_argmax_supports(32, 64, jnp.float32)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(num_tokens=st.integers(1, 140), d=st.sampled_from([16, 48, 64]),
                  vocab=st.sampled_from([16, 48, 144]), transposed=st.booleans(),
                  levels=st.integers(1, 4))
def test_property_shapes(num_tokens, d, vocab, transposed, levels):
    """Vocabularies of 48 and 144 take the narrowest column tile (16); each example also lowers
    for the GPU."""
    x, w = integer_inputs(num_tokens * vocab, num_tokens, d, vocab, transposed, levels=levels)
    check(x, w, transposed, block_n=64, block_k=32)
    assert "mosaic_gpu" in lower(x, w, transposed, block_n=64, block_k=32)


# (hidden size, vocabulary, tied) of the benchmark models' heads
HEADS = {"llama-3.2-1b": (2048, 128256, True), "llama-3.1-8b": (4096, 128256, False),
         "qwen3-0.6b": (1024, 151936, True)}


@pytest.mark.parametrize("model", list(HEADS))
def test_lowers_for_an_h100_at_the_benchmark_heads(model):
    """A batch-256 step's head, lowered to Mosaic GPU for CUDA without a GPU."""
    d, vocab, tied = HEADS[model]
    text = lower(jax.ShapeDtypeStruct((256, d), jnp.bfloat16),
                 jax.ShapeDtypeStruct((vocab, d) if tied else (d, vocab), jnp.bfloat16), tied)
    assert "mosaic_gpu" in text and f"lm_head_argmax_{d}x{vocab}" in text


def test_the_switch(monkeypatch):
    """Unset: on only for a process with one GPU, from LM_HEAD_ARGMAX_MIN_TOKENS rows (here, a
    CPU: off); 1 / 0 force it where the shape allows; anything else is an error naming the
    variable."""
    monkeypatch.delenv("JAXPAGED_LM_HEAD_ARGMAX", raising=False)
    on_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
    assert use_lm_head_argmax(256, 64, 128, jnp.bfloat16) is on_gpu
    assert not use_lm_head_argmax(8, 64, 128, jnp.bfloat16)
    monkeypatch.setenv("JAXPAGED_LM_HEAD_ARGMAX", "1")
    assert use_lm_head_argmax(8, 64, 128, jnp.bfloat16)
    assert not use_lm_head_argmax(256, 64, 128, jnp.float32)  # wgmma: 16-bit floats only
    monkeypatch.setenv("JAXPAGED_LM_HEAD_ARGMAX", "0")
    assert not use_lm_head_argmax(256, 64, 128, jnp.bfloat16)
    monkeypatch.setenv("JAXPAGED_LM_HEAD_ARGMAX", "yes")
    with pytest.raises(ValueError, match="JAXPAGED_LM_HEAD_ARGMAX"):
        use_lm_head_argmax(256, 64, 128, jnp.bfloat16)


@pytest.mark.parametrize("transposed", [True, False], ids=["tied", "untied"])
def test_greedy_head_through_the_kernel_gives_the_greedy_tokens(monkeypatch, transposed):
    x, w = integer_inputs(4, 9, 32, 128, transposed)
    logits = jnp.dot(x, w.T if transposed else w)
    tokens = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("JAXPAGED_LM_HEAD_ARGMAX", setting)
        # A new function each time: JAX's trace cache would hand the second jit the first's
        # program, whatever the switch says.
        fresh = lambda x, w: greedy_head(x, w, transposed)  # noqa: E731
        assert ("lm_head_argmax" in str(jax.make_jaxpr(fresh)(x, w))) == (setting == "1")
        tokens[setting] = np.asarray(jax.jit(fresh)(x, w))
    np.testing.assert_array_equal(tokens["1"], tokens["0"])
    np.testing.assert_array_equal(tokens["0"], np.asarray(greedy_tokens(logits)))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_greedy_forward_gives_the_argmax_of_its_logits(monkeypatch, tied):
    """CausalLM's greedy head (the multi-step window's, for all-greedy batches), through the
    kernel: the argmax of the logits the same forward returns without it, on a bf16 model."""
    from flax import nnx

    from jaxpaged.attention import KVCache
    from jaxpaged.config import ModelConfig
    from jaxpaged.metadata import build_step_inputs
    from jaxpaged.models import CausalLM, forward

    monkeypatch.setenv("JAXPAGED_LM_HEAD_ARGMAX", "1")
    cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, tie_word_embeddings=tied)
    graphdef, params = nnx.split(CausalLM(cfg, jnp.bfloat16, nnx.Rngs(0)))
    ids, pos, md = build_step_inputs([list(range(3, 21)), list(range(50, 55))], [0, 0],
                                     [[0, 1], [2]], 16, num_tokens=24, num_seqs=2,
                                     max_blocks_per_seq=2, logits_indices=[17, 22],
                                     num_logits=2)
    args = (jnp.asarray(ids), jnp.asarray(pos), jax.tree.map(jnp.asarray, md))
    cache = KVCache.zeros(2, 3, 16, 2, 16, jnp.bfloat16)
    _, logits = forward(graphdef, params, cache, *args)
    _, tokens = jax.jit(functools.partial(forward, greedy=True), static_argnums=0)(
        graphdef, params, cache, *args)
    assert tokens.shape == (2,) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(greedy_tokens(logits)))
