"""add_rms_norm (residual add + RMSNorm in one launch) against its jnp reference, in the Pallas
interpreter here (on a GPU, the real kernel); its lowering for an H100; and the stacked
projections' f32 partial sums it reads (stacked_matmul(..., sum_partials=False))."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (add_rms_norm, add_rms_norm_reference, add_rms_norm_supports,
                            stacked_matmul)

from kernel_cases import poison_device_memory

EPS = 1e-5


def case(seed: int, num_tokens: int, dim: int, dtype, splits: int = 0, extra_rows: int = 0):
    """residual [T, D] and scale [D] in dtype; y [T, D] in dtype, or with splits f32 partial
    sums [splits, T + extra_rows, D] (padding rows past T, as Mosaic GPU's padded tiles leave)."""
    rng = np.random.default_rng(seed)
    residual = jnp.asarray(rng.standard_normal((num_tokens, dim)), dtype)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(dim), dtype)
    if splits:
        y = rng.standard_normal((splits, num_tokens + extra_rows, dim)).astype(np.float32)
        y[:, num_tokens:] = np.nan  # padding: never read
        return residual, jnp.asarray(y), scale
    return residual, jnp.asarray(rng.standard_normal((num_tokens, dim)), dtype), scale


def check(residual, y, scale, scale_index=0, **tuning):
    poison_device_memory()
    got = add_rms_norm(residual, y, scale, scale_index, eps=EPS, **tuning)
    want = add_rms_norm_reference(residual, y, scale, scale_index, eps=EPS)
    for g, w in zip(got, want):
        assert g.shape == w.shape == residual.shape and g.dtype == residual.dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert not np.isnan(g).any()
        # Same roundings in the same order; the mean's summation order may differ, which can
        # move a bf16 result by one unit in the last place.
        tol = 1e-6 if residual.dtype == jnp.float32 else 2 ** -7
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("splits,extra_rows", [(0, 0), (1, 0), (2, 0), (2, 56), (4, 3)])
def test_matches_reference(dtype, splits, extra_rows):
    check(*case(splits + extra_rows, 9, 256, dtype, splits, extra_rows))


@pytest.mark.parametrize("index", [0, 4])
def test_a_stack_of_scales_read_at_an_index(index):
    """scale [L, D] (L = 5, not a power of two) and an index, constant or traced: the row at
    the index, as a scale of its own gives."""
    residual, y, _ = case(5, 6, 128, jnp.bfloat16, 2)
    scales = jnp.asarray(1 + 0.1 * np.random.default_rng(6).standard_normal((5, 128)),
                         jnp.bfloat16)
    check(residual, y, scales, index)
    traced = jax.jit(functools.partial(add_rms_norm, eps=EPS))(residual, y, scales,
                                                                jnp.int32(index))
    one = add_rms_norm(residual, y, scales[index], eps=EPS)
    for a, b in zip(traced, one):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("block_t,num_warps", [(2, 4), (4, 8), (16, 2)])
def test_tuning_variants(block_t, num_warps):
    # 9 rows: the last block of 2, 4 and 16 rows hangs past T.
    check(*case(7, 9, 128, jnp.bfloat16, 2), block_t=block_t, num_warps=num_warps)


def test_sum_of_partials_rounds_once_to_the_model_dtype():
    """The partials are added in f32 and rounded once: a sum that bf16 partials rounded apart
    would lose. 1 + 2^-8 is not a bf16 (it rounds to 1); (1 + 2^-8) + 2^-8 = 1 + 2^-7 is."""
    dim = 16
    residual = jnp.zeros((1, dim), jnp.bfloat16)
    y = jnp.stack([jnp.full((1, dim), 1 + 2 ** -8), jnp.full((1, dim), 2 ** -8)]).astype(
        jnp.float32)
    new_residual, _ = add_rms_norm(residual, y, jnp.ones(dim, jnp.bfloat16), eps=EPS)
    assert float(new_residual[0, 0]) == 1 + 2 ** -7


def test_no_tokens():
    residual, y, scale = case(0, 0, 64, jnp.bfloat16)
    got = add_rms_norm(residual, y, scale, eps=EPS)
    assert [g.shape for g in got] == [(0, 64), (0, 64)]


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(num_tokens=st.integers(1, 40), dim=st.sampled_from([16, 64, 512]),
                  splits=st.sampled_from([0, 1, 2, 4]), extra_rows=st.integers(0, 9),
                  bf16=st.booleans())
def test_property_shapes(num_tokens, dim, splits, extra_rows, bf16):
    check(*case(num_tokens * dim, num_tokens, dim, jnp.bfloat16 if bf16 else jnp.float32, splits,
                extra_rows if splits else 0))


def test_supports_power_of_two_widths_only():
    assert [d for d in (16, 576, 1024, 2048, 3072, 4096) if add_rms_norm_supports(d)] == [
        16, 1024, 2048, 4096]


@pytest.mark.parametrize("make,match", [
    (lambda r, y, s: (r, y, s[:-1]), "scale must be"),
    (lambda r, y, s: (r, y, s[None, None]), "scale must be"),
    (lambda r, y, s: (r, y[:-1], s), "must have the residual's"),
    (lambda r, y, s: (r, jnp.stack([y, y, y]).astype(jnp.float32), s), "power of two"),
    (lambda r, y, s: (r, jnp.stack([y, y]), s), "float32"),
    (lambda r, y, s: (r, jnp.stack([y, y]).astype(jnp.float32)[:, :, :32], s), "need D = 64"),
    (lambda r, y, s: (r, y[None, None], s), "4 dims"),
    (lambda r, y, s: (r[:, :48], y[:, :48], s[:48]), "D=48"),
])
def test_rejects_bad_inputs(make, match):
    with pytest.raises(ValueError, match=match):
        add_rms_norm(*make(*case(0, 4, 64, jnp.bfloat16)), eps=EPS)


@pytest.mark.filterwarnings("ignore:.*Triton backend is deprecated")
@pytest.mark.parametrize("scales", [(2048,), (16, 2048), (17, 2048)])
def test_lowers_for_an_h100(scales):
    """The engine's shapes (llama-3.2-1b at T 256, partials of a split o projection; a scale,
    the 16 layers' post-attention scales, or their input scales and the final norm's), lowered
    to Triton for an (abstract) H100 without a GPU."""
    args = (jax.ShapeDtypeStruct((256, 2048), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, 256, 2048), jnp.float32),
            jax.ShapeDtypeStruct(scales, jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.int32))
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
    fn = functools.partial(add_rms_norm, eps=EPS, interpret=False)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=h100)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "add_rms_norm" in text


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
def test_stacked_matmul_hands_over_its_partial_sums(kernel):
    """sum_partials=False: a split launch returns f32 partials that add up to its summed
    output (Mosaic GPU's rows padded to its 64-row tile); an unsplit one its usual output."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((40, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2, 256, 64)) / 16, jnp.bfloat16)
    tuning = dict(num_splits=2) if kernel == "triton" else {}
    if kernel == "mosaic":  # the Mosaic kernel's split, through its own entry point
        from pallas_kernels.stacked_matmul_mgpu import stacked_matmul_mgpu

        run = functools.partial(stacked_matmul_mgpu, x, (w,), jnp.int32(1), block_n=64,
                                num_splits=2)
        (summed,), (partials,) = run(), run(sum_partials=False)
        assert partials.shape == (2, 64, 64)
    else:
        run = functools.partial(stacked_matmul, x, w, jnp.int32(1), kernel=kernel, **tuning)
        summed, partials = run(), run(sum_partials=False)
        assert partials.shape == (2, 40, 64)
        unsplit = stacked_matmul(x, w, jnp.int32(1), num_splits=1, sum_partials=False)
        assert unsplit.shape == (40, 64) and unsplit.dtype == jnp.bfloat16
    assert partials.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(partials[:, :40].sum(axis=0).astype(jnp.bfloat16), np.float32),
        np.asarray(summed, np.float32))
