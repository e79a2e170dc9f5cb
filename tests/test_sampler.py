import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged.sampler as sampler_module
from jaxpaged.sampler import (
    MAX_SUPPRESSED_TOKEN_IDS,
    SamplingRow,
    apply_penalties,
    build_sampling_metadata,
    compute_logprobs,
    sample,
    sampling_metadata_variants,
)
from jaxpaged.sampling_params import MAX_LOGPROBS, SamplingParams

V = 8  # vocab
L = 16  # max_model_len
sample_jit = jax.jit(sample)
LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)


def row(seed: int = 0, tokens: list[int] | None = None, prompt_len: int = 1, eos: int | None = None,
        **kw) -> SamplingRow:
    tokens = [0] if tokens is None else tokens
    return SamplingRow(SamplingParams(**kw), seed, tokens, prompt_len, eos)


def draws(num: int, logits: np.ndarray = LOGITS, **kw) -> np.ndarray:
    """`num` draws from one distribution: one row per seed, all in one batch."""
    md = build_sampling_metadata([row(seed=s, **kw) for s in range(num)], num, V, L)
    return np.asarray(sample_jit(jnp.tile(jnp.asarray(logits), (num, 1)), md).sampled_token_ids)


def test_greedy_is_argmax() -> None:
    logits = np.random.default_rng(0).normal(size=(5, V)).astype(np.float32)
    md = build_sampling_metadata([row(temperature=0.0)] * 3, 5, V, L)
    assert md.all_greedy and md.no_penalties and md.max_num_logprobs == 0
    out = sample_jit(jnp.asarray(logits), md)
    np.testing.assert_array_equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.topk_token_ids.shape == (5, 0) and out.topk_logprobs.shape == (5, 0)


def test_greedy_rows_in_random_batch_are_argmax() -> None:
    logits = np.random.default_rng(1).normal(size=(4, V)).astype(np.float32)
    rows = [row(temperature=0.0), row(seed=3, temperature=1.5), row(temperature=0.0), None]
    out = sample_jit(jnp.asarray(logits), build_sampling_metadata(rows, 4, V, L))
    got = np.asarray(out.sampled_token_ids)
    np.testing.assert_array_equal(got[[0, 2, 3]], logits.argmax(-1)[[0, 2, 3]])


def test_temperature_matches_softmax() -> None:
    num, temperature = 4000, 0.7
    counts = np.bincount(draws(num, temperature=temperature), minlength=V) / num
    expected = np.exp(LOGITS / temperature) / np.exp(LOGITS / temperature).sum()
    # Binomial standard error is at most 0.008 here; 4 sigma.
    np.testing.assert_allclose(counts, expected, atol=0.032)


@pytest.mark.parametrize(
    "kw, support",
    [
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_k=1, temperature=2.0), {0}),
        # probs 0.405, 0.245, 0.149, ...: the mass before token 2 is 0.65, before token 3 0.80.
        (dict(top_p=0.6), {0, 1}),
        (dict(top_p=0.7), {0, 1, 2}),
        (dict(top_p=0.3), {0}),
        (dict(top_k=2, top_p=0.9), {0, 1}),
        # p_i / p_max >= 0.3 <=> logit_i >= 2 + ln 0.3 = 0.796.
        (dict(min_p=0.3), {0, 1, 2}),
        (dict(min_p=0.3, top_k=2), {0, 1}),
    ],
)
def test_truncation_support(kw: dict, support: set[int]) -> None:
    assert set(draws(3000, **kw).tolist()) == support


def test_top_p_keeps_ties_at_threshold() -> None:
    logits = np.array([1.0, 1.0, 1.0, 1.0, -9, -9, -9, -9], np.float32)
    assert set(draws(500, logits, top_p=0.3).tolist()) == {0, 1, 2, 3}


def test_sample_depends_only_on_seed_and_position() -> None:
    rng = np.random.default_rng(2)
    target = rng.normal(size=V).astype(np.float32)
    target_row = row(seed=1234, tokens=[1, 2, 3, 4], prompt_len=2, temperature=1.0, top_p=0.95)
    results = set()
    for num_rows in (1, 6):
        for place in sorted({0, num_rows // 2, num_rows - 1}):
            others = [row(seed=s, temperature=0.9, top_k=3, repetition_penalty=1.3) for s in range(num_rows)]
            others[place] = target_row
            logits = rng.normal(size=(num_rows, V)).astype(np.float32)
            logits[place] = target
            out = sample_jit(jnp.asarray(logits), build_sampling_metadata(others, num_rows, V, L))
            results.add(int(out.sampled_token_ids[place]))
    assert len(results) == 1
    # A different position or seed gives an independent draw: over 15 of them, not all equal.
    rows = [row(seed=1234, tokens=[0] * n) for n in range(1, 16)] + [row(seed=s) for s in range(16)]
    md = build_sampling_metadata(rows, len(rows), V, L)
    got = np.asarray(sample_jit(jnp.tile(jnp.asarray(LOGITS), (len(rows), 1)), md).sampled_token_ids)
    assert len(set(got[:15].tolist())) > 1 and len(set(got[15:].tolist())) > 1


def test_logprobs_are_raw_log_softmax() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    rows = [row(seed=7, temperature=0.5, logprobs=5, presence_penalty=1.0, tokens=[3, 3]), row(temperature=0.0), None]
    out = sample_jit(jnp.asarray(logits), build_sampling_metadata(rows, 3, V, L))
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    ids = np.asarray(out.sampled_token_ids)
    np.testing.assert_allclose(out.sampled_logprobs, ref[np.arange(3), ids], rtol=1e-6)
    np.testing.assert_array_equal(out.sampled_token_ranks, (ref >= ref[np.arange(3), ids][:, None]).sum(-1))
    assert out.topk_token_ids.shape == (3, min(MAX_LOGPROBS, V))
    np.testing.assert_array_equal(out.topk_token_ids, np.argsort(-ref, axis=-1, kind="stable"))
    np.testing.assert_allclose(out.topk_logprobs, np.sort(ref, axis=-1)[:, ::-1], rtol=1e-6)


@pytest.mark.parametrize("num_rows", [4, 7])
def test_compute_logprobs_for_prompt_tokens(num_rows, monkeypatch) -> None:
    monkeypatch.setattr(sampler_module, "LOGPROBS_CHUNK_ROWS", 3)  # 7 rows: chunks 3, 3, 1
    logits = np.random.default_rng(4).normal(size=(num_rows, V)).astype(np.float32)
    tokens = np.array([0, 5, 7, 2, 6, 1, 3][:num_rows], np.int32)
    rows = np.arange(num_rows)
    lp = jax.jit(compute_logprobs, static_argnums=2)(jnp.asarray(logits), jnp.asarray(tokens), 3)
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(lp.token_logprobs, ref[rows, tokens], rtol=1e-6)
    np.testing.assert_array_equal(lp.token_ranks, 1 + (ref > ref[rows, tokens][:, None]).sum(-1))
    np.testing.assert_array_equal(lp.topk_token_ids, np.argsort(-ref, axis=-1)[:, :3])


def penalties_reference(logits: np.ndarray, rows: list[SamplingRow]) -> np.ndarray:
    """vLLM's formulas, one row at a time in plain NumPy."""
    out = logits.copy()
    for i, r in enumerate(rows):
        p = r.sampling_params
        prompt, output = list(r.token_ids[: r.num_prompt_tokens]), list(r.token_ids[r.num_prompt_tokens :])
        for t in range(logits.shape[1]):
            if t in prompt or t in output:
                out[i, t] = out[i, t] / p.repetition_penalty if out[i, t] > 0 else out[i, t] * p.repetition_penalty
            out[i, t] -= p.frequency_penalty * output.count(t) + p.presence_penalty * (t in output)
    return out


def test_penalties_match_reference() -> None:
    rng = np.random.default_rng(5)
    rows = [
        row(tokens=[1, 2, 2, 3, 3, 3], prompt_len=2, repetition_penalty=1.5, frequency_penalty=0.5,
            presence_penalty=0.25),
        row(tokens=[4, 4, 5], prompt_len=3, repetition_penalty=0.8, frequency_penalty=-1.0, presence_penalty=2.0),
        row(tokens=[7, 0, 0, 0, 6], prompt_len=1, frequency_penalty=1.0),
        row(tokens=[1], prompt_len=1),
    ]
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    md = build_sampling_metadata(rows, 4, V, L)
    assert not md.no_penalties and md.token_ids.shape == (4, L)
    got = jax.jit(apply_penalties)(jnp.asarray(logits), md)
    np.testing.assert_allclose(got, penalties_reference(logits, rows), rtol=1e-6, atol=1e-6)
    # NumPy histories (the fast path for the engine) build the same metadata.
    as_arrays = [SamplingRow(r.sampling_params, r.seed, np.asarray(r.token_ids, np.int32), r.num_prompt_tokens)
                 for r in rows]
    np.testing.assert_array_equal(build_sampling_metadata(as_arrays, 4, V, L).token_ids, md.token_ids)
    # Penalties apply to greedy rows too.
    greedy = [row(temperature=0.0, tokens=r.token_ids, prompt_len=r.num_prompt_tokens,
                  repetition_penalty=r.sampling_params.repetition_penalty,
                  frequency_penalty=r.sampling_params.frequency_penalty,
                  presence_penalty=r.sampling_params.presence_penalty) for r in rows]
    out = sample_jit(jnp.asarray(logits), build_sampling_metadata(greedy, 4, V, L))
    np.testing.assert_array_equal(out.sampled_token_ids, penalties_reference(logits, rows).argmax(-1))


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    logits = np.tile(np.array([9.0, 8.0, 7.0, 0, 0, 0, 0, 0], np.float32), (3, 1))
    rows = [
        row(tokens=[5, 5], prompt_len=1, eos=0, temperature=0.0, min_tokens=3, stop_token_ids=[1],
            logprobs=1),
        row(tokens=[5, 5, 5, 5], prompt_len=1, eos=0, temperature=0.0, min_tokens=3, stop_token_ids=[1]),
        row(tokens=[5], prompt_len=1, eos=0, temperature=0.0, min_tokens=2, ignore_eos=True),
    ]
    out = sample_jit(jnp.asarray(logits), build_sampling_metadata(rows, 3, V, L))
    np.testing.assert_array_equal(out.sampled_token_ids, [2, 0, 1])
    # Suppression does not touch the reported logprobs: they are of the raw logits.
    assert int(out.sampled_token_ranks[0]) == 3
    assert set(draws(300, logits[0], eos=0, min_tokens=1).tolist()).isdisjoint({0})


def test_padding_rows_are_inert() -> None:
    md = build_sampling_metadata([row(seed=9, temperature=1.0, top_k=2, frequency_penalty=1.0)], 4, V, L)
    assert md.temperature.shape == (4,) and md.token_ids.shape == (4, L)
    np.testing.assert_array_equal(md.temperature[1:], 0.0)
    np.testing.assert_array_equal(md.repetition_penalties[1:], 1.0)
    np.testing.assert_array_equal(md.suppressed_token_ids[1:], -1)
    np.testing.assert_array_equal(md.token_ids[1:], -1)
    assert md.suppressed_token_ids.shape == (4, MAX_SUPPRESSED_TOKEN_IDS)


def test_real_rows_identical_with_and_without_padding() -> None:
    rng = np.random.default_rng(6)
    rows = [
        row(seed=11, tokens=[1, 2, 3], prompt_len=2, temperature=0.8, top_p=0.9, logprobs=3, frequency_penalty=0.5),
        None,
        row(temperature=0.0, tokens=[4, 4], min_tokens=3, eos=1),
    ]
    logits = rng.normal(size=(8, V)).astype(np.float32)
    small = sample_jit(jnp.asarray(logits[:3]), build_sampling_metadata(rows, 3, V, L))
    large = sample_jit(jnp.asarray(logits), build_sampling_metadata(rows, 8, V, L))
    for field in ("sampled_token_ids", "sampled_logprobs", "sampled_token_ranks", "topk_token_ids", "topk_logprobs"):
        real_small, real_large = np.asarray(getattr(small, field))[[0, 2]], np.asarray(getattr(large, field))[[0, 2]]
        np.testing.assert_array_equal(real_small, real_large)


def test_static_flags() -> None:
    md = build_sampling_metadata([row(temperature=0.0, top_k=3), None], 2, V, L)
    assert (md.all_greedy, md.no_penalties, md.no_top_k_top_p, md.max_num_logprobs) == (True, True, True, 0)
    assert md.token_ids.shape == (2, 0)
    md = build_sampling_metadata([row(top_k=3, logprobs=0)], 2, V, L)
    assert (md.all_greedy, md.no_penalties, md.no_top_k_top_p, md.max_num_logprobs) == (False, True, False, V)


def test_no_compile_after_warmup() -> None:
    fn = jax.jit(sample)
    for md in sampling_metadata_variants(4, V, L):
        fn(jnp.zeros((4, V)), md)
    warm = fn._cache_size()
    configs = [dict(temperature=0.0), dict(), dict(top_k=2), dict(top_p=0.5, logprobs=3), dict(presence_penalty=1.0),
               dict(temperature=0.0, repetition_penalty=1.2, prompt_logprobs=2), dict(min_p=0.1, min_tokens=2)]
    for i, kw in enumerate(configs):
        for j in (i, (i + 3) % len(configs)):
            rows = [row(seed=i, tokens=[1, 2], **kw), row(seed=j, eos=0, **configs[j]), None]
            fn(jnp.zeros((4, V)), build_sampling_metadata(rows, 4, V, L))
    assert fn._cache_size() == warm


@pytest.mark.parametrize(
    "rows, pad, match",
    [
        ([row()] * 3, 2, "num_rows_padded"),
        ([row(tokens=list(range(L + 1)))], 2, "max_model_len"),
        ([row(eos=V, min_tokens=1)], 2, "vocab_size"),
        ([row(stop_token_ids=list(range(MAX_SUPPRESSED_TOKEN_IDS + 1)), min_tokens=1)], 2, "MAX_SUPPRESSED"),
    ],
)
def test_builder_rejects(rows: list[SamplingRow], pad: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_sampling_metadata(rows, pad, 64 if "MAX" in match else V, L)


def test_row_rejects_bad_prompt_len() -> None:
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        SamplingRow(SamplingParams(), 0, [1, 2], 3)


def test_rows_sharing_one_params_object_fill_like_rows_with_their_own() -> None:
    """The builder fills per-request constants once per distinct SamplingParams object."""
    import copy

    shared = SamplingParams(temperature=0.7, top_k=3, presence_penalty=0.5, seed=1)
    under_min = SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[5, 6])
    rows = [SamplingRow(shared, 11, [1, 2, 3], 2, 7), SamplingRow(under_min, 12, [1, 2], 2, 7),
            None, SamplingRow(shared, 13, [4, 4, 4, 4], 1, 7, 0)]
    own = [None if r is None else SamplingRow(copy.deepcopy(r.sampling_params), r.seed,
                                              r.token_ids, r.num_prompt_tokens, r.eos_token_id)
           for r in rows]
    a, b = build_sampling_metadata(rows, 6, V, L), build_sampling_metadata(own, 6, V, L)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    np.testing.assert_array_equal(a.suppressed_token_ids[1, :3], [5, 6, 7])
    np.testing.assert_array_equal(a.top_k, [3, 0, 0, 3, 0, 0])


def test_logprobs_are_skipped_when_no_row_asks() -> None:
    """Without logprobs the sampler skips the log-softmax passes; the tokens are the same."""
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(4, V)).astype(np.float32))
    plain = [row(seed=s, temperature=0.9, top_p=0.8, min_tokens=2, tokens=[1, 2], eos=0)
             for s in range(4)]
    asked = [row(seed=s, temperature=0.9, top_p=0.8, min_tokens=2, tokens=[1, 2], eos=0,
                 logprobs=0) for s in range(4)]
    without = sample_jit(logits, build_sampling_metadata(plain, 4, V, L))
    with_lp = sample_jit(logits, build_sampling_metadata(asked, 4, V, L))
    np.testing.assert_array_equal(without.sampled_token_ids, with_lp.sampled_token_ids)
    np.testing.assert_array_equal(without.sampled_logprobs, 0.0)
    assert without.topk_token_ids.shape == (4, 0)
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(with_lp.sampled_logprobs,
                               ref[np.arange(4), np.asarray(with_lp.sampled_token_ids)], rtol=1e-6)


def test_given_constants_fill_like_stacked_ones() -> None:
    """The runner passes the rows' constants kept across steps; the metadata is the same."""
    rows = [row(seed=3, temperature=0.7, top_k=3), None,
            row(temperature=0.0, min_tokens=4, eos=1), row(presence_penalty=0.5)]
    real = [r for r in rows if r is not None]
    constants = np.array([r.sampling_params.sampler_constants for r in real], np.float64)
    want = build_sampling_metadata(rows, 6, V, L)
    got = build_sampling_metadata(rows, 6, V, L, constants)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (got.all_greedy, got.no_penalties, got.no_top_k_top_p, got.max_num_logprobs) == \
        (want.all_greedy, want.no_penalties, want.no_top_k_top_p, want.max_num_logprobs)
    with pytest.raises(ValueError, match="constants has shape"):
        build_sampling_metadata(rows, 6, V, L, constants[:2])


def test_runner_sampler_suppresses_in_place_in_the_model_dtype() -> None:
    """The runner's jitted sampler donates the forward's bf16 logits and returns them
    suppressed, so XLA aliases the two (the -inf is written in place, no f32 copy of the
    logits); tokens and logprobs equal `sample` on the same logits widened to f32 first."""
    from jaxpaged.packed import pack
    from jaxpaged.runner import _jit_sample

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, V)).astype(np.float32)
    logits[:, 0] = 9.0  # EOS would win where it is not suppressed
    rows = [row(seed=s, tokens=[5, 5], prompt_len=1, eos=0, temperature=t, min_tokens=m,
                logprobs=1) for s, (t, m) in enumerate([(0.0, 3), (0.0, 0), (0.8, 3), (0.8, 0)])]
    md = build_sampling_metadata(rows, 4, V, L)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    want = sample_jit(bf16.astype(jnp.float32), md)
    compiled = _jit_sample.lower(bf16, *pack(md), width=8).compile().as_text()
    assert "input_output_alias={ {6}: (0, {}, may-alias) }" in compiled
    got, padded, suppressed = _jit_sample(bf16, *pack(md), width=8)
    assert bf16.is_deleted()  # donated
    for field in ("sampled_token_ids", "sampled_logprobs", "sampled_token_ranks"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    np.testing.assert_array_equal(padded, np.pad(want.sampled_token_ids, (0, 4)))
    assert suppressed.dtype == jnp.bfloat16
    assert np.isneginf(np.asarray(suppressed, np.float32)[[0, 2], 0]).all()
    assert not np.isneginf(np.asarray(suppressed, np.float32)[[1, 3], 0]).any()
    assert int(got.sampled_token_ids[1]) == 0 and int(got.sampled_token_ids[0]) != 0


def test_sampling_without_suppression_equals_sampling_when_nothing_is_suppressed() -> None:
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(6, V)).astype(np.float32))
    rows = [row(temperature=0.0), row(seed=1, temperature=0.9, top_k=3), row(seed=2, top_p=0.7),
            row(temperature=0.0, min_tokens=1, tokens=[4, 4], eos=2), None, row(seed=5)]
    md = build_sampling_metadata(rows, 6, V, L)
    assert not np.any(md.suppressed_token_ids >= 0)
    want = sample_jit(logits, md)
    got = jax.jit(sample, static_argnames="suppress")(logits, md, suppress=False)
    np.testing.assert_array_equal(got.sampled_token_ids, want.sampled_token_ids)
