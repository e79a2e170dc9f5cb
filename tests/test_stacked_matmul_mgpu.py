"""stacked_matmul_mgpu (Mosaic GPU) against stacked_matmul_fused_reference: in Mosaic GPU's CPU
interpreter here, as the real kernel on a GPU (JAX_PLATFORMS=cuda); its lowering for an H100 at
the engine's launch shapes (lowered, not run, from the CPU); and kernel="auto"'s choice."""

import functools
import json

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import stacked_matmul, stacked_matmul_fused, stacked_matmul_fused_reference
from pallas_kernels.stacked_matmul_mgpu import mosaic_settings, stacked_matmul_mgpu

from kernel_cases import assert_close, lower_for_cuda, poison_device_memory

L = 3


def stacks(seed: int, d_in: int, d_outs, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((L, d_in, d)) / np.sqrt(d_in), dtype)
                 for d in d_outs)


def tokens(seed: int, num_tokens: int, d_in: int, dtype=jnp.bfloat16):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((num_tokens, d_in)), dtype)


def lower(x, ws, epilogue=None, **tuning) -> str:
    fn = functools.partial(stacked_matmul_mgpu, epilogue=epilogue, interpret=False, **tuning)
    return lower_for_cuda(fn, x, ws, jax.ShapeDtypeStruct((), jnp.int32))


def check(x, ws, layer, epilogue=None, **tuning):
    poison_device_memory()
    got = stacked_matmul_mgpu(x, ws, jnp.int32(layer), epilogue=epilogue, **tuning)
    want = stacked_matmul_fused_reference(x, ws, jnp.int32(layer), epilogue=epilogue)
    got, want = ((got,), (want,)) if epilogue else (got, want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == x.dtype
        assert_close(g, w, jnp.bfloat16)


# T: under one 64-row wgmma block (padded), exactly one, and two tiles with a padded tail.
@pytest.mark.parametrize("num_tokens", [1, 64, 130])
@pytest.mark.parametrize("warp_specialized", [False, True])
def test_fused_qkv_matches_reference(num_tokens, warp_specialized):
    x, ws = tokens(num_tokens, num_tokens, 128), stacks(1, 128, (128, 64, 64))
    check(x, ws, 2, block_n=64, warp_specialized=warp_specialized)


@pytest.mark.parametrize("warp_specialized", [False, True])
def test_silu_mul_matches_reference(warp_specialized):
    x, ws = tokens(3, 200, 192), stacks(4, 192, (128, 128))
    check(x, ws, 1, epilogue="silu_mul", block_n=64, warp_specialized=warp_specialized)


@pytest.mark.parametrize("warp_specialized", [False, True])
def test_split_d_in_over_several_column_blocks_and_weights(warp_specialized):
    x, ws = tokens(9, 130, 256), stacks(10, 256, (128, 64))
    check(x, ws, 1, block_n=64, num_splits=4, warp_specialized=warp_specialized)


def test_split_partials_warp_specialized():
    """The f32 partials of a warp-specialized split launch, each split's rows at its own row
    blocks (two compute warpgroups a tile): their sum is the product."""
    x, ws = tokens(11, 200, 256), stacks(12, 256, (128,))
    (parts,) = stacked_matmul_mgpu(x, ws, jnp.int32(2), num_splits=2, warp_specialized=True,
                                   block_n=64, sum_partials=False)
    assert parts.shape == (2, 256, 128) and parts.dtype == jnp.float32
    want = jnp.dot(x.astype(jnp.float32), ws[0][2].astype(jnp.float32))
    halves = [jnp.dot(x[:, k:k + 128].astype(jnp.float32), ws[0][2, k:k + 128].astype(
        jnp.float32)) for k in (0, 128)]
    for s in range(2):
        assert_close(parts[s, :200], halves[s], jnp.float32)
    assert_close(parts[:, :200].sum(axis=0), want, jnp.float32)


def test_every_layer_under_one_compile():
    x, ws = tokens(5, 40, 128, jnp.float16), stacks(6, 128, (64,), jnp.float16)
    run = jax.jit(functools.partial(stacked_matmul_mgpu, max_concurrent_steps=2))
    for layer in range(L):
        (got,) = run(x, ws, jnp.int32(layer))
        (want,) = stacked_matmul_fused_reference(x, ws, jnp.int32(layer))
        assert_close(got, want, jnp.bfloat16)


@pytest.mark.parametrize("tuning", [
    dict(block_m=64, max_concurrent_steps=1),  # one step in flight: no wgmma overlap
    dict(block_k=128),  # the whole D_in in one step
    dict(swizzle=True, block_n=64),
    dict(programs_per_sm=2),
    dict(num_splits=2, block_n=64),  # D_in split: f32 partial sums added by XLA
    dict(num_splits=2, max_concurrent_steps=1),
])
def test_tuning_variants(tuning):
    x, ws = tokens(7, 72, 128), stacks(8, 128, (128,))
    check(x, ws, 0, **tuning)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(num_tokens=st.integers(1, 150), d_in=st.sampled_from([64, 128, 192]),
                  widths=st.lists(st.sampled_from([16, 48, 64, 128]), min_size=1, max_size=3),
                  silu_mul=st.booleans(), warp_specialized=st.booleans())
def test_property_shapes(num_tokens, d_in, widths, silu_mul, warp_specialized):
    """Widths of 16 and 48 take the narrowest column tile (16); each example also lowers for
    the GPU."""
    widths = [widths[0]] * 2 if silu_mul else widths
    x, ws = tokens(num_tokens, num_tokens, d_in), stacks(d_in, d_in, widths)
    tuning = dict(epilogue="silu_mul" if silu_mul else None, block_n=64,
                  warp_specialized=warp_specialized)
    check(x, ws, num_tokens % L, **tuning)
    assert "mosaic_gpu" in lower(x, ws, **tuning)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_m=96), "block_m=96"),
    (dict(block_m=64, warp_specialized=True), "block_m=64"),
    (dict(num_splits=3), "num_splits=3"),
])
def test_rejects_bad_tuning(kwargs, match):
    x, ws = tokens(0, 8, 64), stacks(0, 64, (64,))
    with pytest.raises(ValueError, match=match):
        stacked_matmul_mgpu(x, ws, jnp.int32(0), **kwargs)


def test_rejects_a_split_silu_mul():
    x, ws = tokens(0, 8, 128), stacks(0, 128, (64, 64))
    with pytest.raises(ValueError, match="num_splits > 1"):
        stacked_matmul_mgpu(x, ws, jnp.int32(0), epilogue="silu_mul", num_splits=2)


def test_rejects_bad_shapes_and_dtypes():
    x, ws = tokens(0, 8, 64), stacks(0, 64, (64,))
    with pytest.raises(ValueError, match="D_out=60"):
        stacked_matmul_mgpu(x, (ws[0][:, :, :60],), jnp.int32(0))
    with pytest.raises(ValueError, match="D_out=24 must be a multiple of 16"):
        stacked_matmul_mgpu(x, (ws[0][:, :, :24],), jnp.int32(0))  # 8 columns: no GPU tiling
    with pytest.raises(ValueError, match="bfloat16 or all float16"):
        stacked_matmul_mgpu(x.astype(jnp.float32), (ws[0].astype(jnp.float32),), jnp.int32(0))
    with pytest.raises(ValueError, match="silu_mul"):
        stacked_matmul_mgpu(x, ws, jnp.int32(0), epilogue="silu_mul")


# The engine's decode launches at T 256 (llama-3.2-1b, llama-3.1-8b: D, F, q width, kv width).
MODELS = {"llama-3.2-1b": (2048, 8192, 2048, 512), "llama-3.1-8b": (4096, 14336, 4096, 1024)}


def launches(model: str):
    """(d_in, d_outs, silu_mul) of a layer's four stacked launches."""
    d, f, q, kv = MODELS[model]
    return {"qkv": (d, [q, kv, kv], False), "gate_up": (d, [f, f], True), "o": (q, [d], False),
            "down": (f, [d], False)}


def test_auto_picks_mosaic_where_it_measured_faster(monkeypatch):
    def picked(model, name, num_tokens=256, dtype=jnp.bfloat16):
        d_in, d_outs, silu_mul = launches(model)[name]
        return mosaic_settings(num_tokens, d_in, d_outs, silu_mul, dtype)

    # Every 8B launch unsplit; the 1B's q/k/v and silu_mul. The 1B's o and down make 64 tiles:
    # D_in split in two (128 programs), unless JAXPAGED_MOSAIC_SPLIT=0 (then Triton).
    for name in ("qkv", "gate_up", "o", "down"):
        assert picked("llama-3.1-8b", name).get("num_splits", 1) == 1
    assert picked("llama-3.2-1b", "qkv") == dict(block_m=128, block_n=64, max_concurrent_steps=8)
    assert picked("llama-3.2-1b", "gate_up")["warp_specialized"]
    split = dict(block_m=128, block_n=64, max_concurrent_steps=6, num_splits=2)
    assert picked("llama-3.2-1b", "o") == split and picked("llama-3.2-1b", "down") == split
    monkeypatch.setenv("JAXPAGED_MOSAIC_SPLIT", "0")
    assert picked("llama-3.2-1b", "o") is None and picked("llama-3.2-1b", "down") is None
    monkeypatch.delenv("JAXPAGED_MOSAIC_SPLIT")
    # At T 64 and 128 (measured on the 8B): q/k/v, o and down, not silu_mul (it tied).
    for num_tokens in (64, 128):
        assert picked("llama-3.1-8b", "gate_up", num_tokens=num_tokens) is None
        for name in ("qkv", "o", "down"):
            assert picked("llama-3.1-8b", name, num_tokens=num_tokens) == dict(
                block_m=128, block_n=64, max_concurrent_steps=8)
        assert picked("llama-3.2-1b", "o", num_tokens=num_tokens) is None  # 32 tiles
    # Not measured below T 64, and wgmma here takes 16-bit inputs only.
    assert picked("llama-3.1-8b", "qkv", num_tokens=32) is None
    assert picked("llama-3.1-8b", "qkv", dtype=jnp.float32) is None


def test_measurement_settings_replace_the_rule_by_launch_name(monkeypatch):
    rule = mosaic_settings(256, 8192, [2048], False, jnp.bfloat16)
    wanted = dict(warp_specialized=True, block_n=128, num_splits=4)
    monkeypatch.setenv("JAXPAGED_MOSAIC_SETTINGS", json.dumps({"8192x2048": wanted}))
    assert mosaic_settings(256, 8192, [2048], False, jnp.bfloat16) == wanted
    assert mosaic_settings(64, 8192, [2048], False, jnp.bfloat16) != wanted  # T < 129: the rule
    assert mosaic_settings(256, 2048, [2048], False, jnp.bfloat16) == mosaic_settings(
        256, 2048, [2048], False, jnp.bfloat16)  # another launch: the rule
    monkeypatch.delenv("JAXPAGED_MOSAIC_SETTINGS")
    assert mosaic_settings(256, 8192, [2048], False, jnp.bfloat16) == rule
    monkeypatch.setenv("JAXPAGED_MOSAIC_SETTINGS", json.dumps({"8192x2048": {"bogus": 1}}))
    with pytest.raises(ValueError, match="bogus"):
        mosaic_settings(256, 8192, [2048], False, jnp.bfloat16)


def test_auto_is_triton_on_the_cpu_and_mosaic_is_the_interpreter():
    x, ws = tokens(9, 24, 128), stacks(10, 128, (64, 64))
    want = stacked_matmul_fused_reference(x, ws, jnp.int32(1))
    for kernel in ("auto", "mosaic"):
        got = stacked_matmul_fused(x, ws, jnp.int32(1), kernel=kernel)
        for g, w in zip(got, want):
            assert_close(g, w, jnp.bfloat16)
    assert_close(stacked_matmul(x, ws[0], jnp.int32(1), kernel="mosaic"), want[0], jnp.bfloat16)
    with pytest.raises(ValueError, match="kernel='cuda'"):
        stacked_matmul(x, ws[0], jnp.int32(1), kernel="cuda")


@pytest.mark.parametrize("model", list(MODELS))
def test_lowers_for_an_h100_at_the_engine_shapes(model):
    """The settings auto picks, lowered to Mosaic GPU for CUDA without a GPU."""
    lowered = 0
    for d_in, d_outs, silu_mul in launches(model).values():
        settings = mosaic_settings(256, d_in, d_outs, silu_mul, jnp.bfloat16)
        if settings is None:
            continue
        x = jax.ShapeDtypeStruct((256, d_in), jnp.bfloat16)
        ws = tuple(jax.ShapeDtypeStruct((2, d_in, d), jnp.bfloat16) for d in d_outs)
        text = lower(x, ws, "silu_mul" if silu_mul else None, **settings)
        assert "mosaic_gpu" in text
        lowered += 1
    assert lowered >= 2


@pytest.mark.parametrize("warp_specialized", [False, True])
def test_the_narrowest_column_tile_lowers_for_an_h100(warp_specialized):
    """D_out 48 takes 16-column tiles, the narrowest wgmma B tile that finds a GPU tiling (the
    interpreter would also run 8), and matches the reference."""
    x, ws = tokens(13, 128, 64), stacks(14, 64, (48,))
    check(x, ws, 1, block_n=64, warp_specialized=warp_specialized)
    assert "mosaic_gpu" in lower(x, ws, block_n=64, warp_specialized=warp_specialized)
