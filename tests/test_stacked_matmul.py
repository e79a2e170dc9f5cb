"""stacked_matmul and stacked_matmul_fused vs their pure-jnp references (the Pallas interpreter
on the CPU), their Triton lowering for an H100 (lowered, not run, from the CPU), and the model's
decode step with the stacked kernels against the plain (sliced-weights) path, and the setting's
defaults."""

import dataclasses
import functools
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import (stacked_matmul, stacked_matmul_fused, stacked_matmul_fused_reference,
                            stacked_matmul_reference)
from pallas_kernels.stacked_matmul import choose_num_splits

from kernel_cases import assert_close

L = 3


def make_inputs(seed: int, num_tokens: int, d_in: int, d_out: int, dtype, num_layers: int = L):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((num_tokens, d_in)), dtype)
    w = jnp.asarray(rng.standard_normal((num_layers, d_in, d_out)) / np.sqrt(d_in), dtype)
    return x, w


def check_every_layer(x, w, **tuning):
    # One compile per shape: the layer index is traced, as it is in the model's scan.
    run = jax.jit(functools.partial(stacked_matmul, **tuning))
    for layer in range(w.shape[0]):
        out = run(x, w, jnp.int32(layer))
        assert out.shape == (x.shape[0], w.shape[2]) and out.dtype == x.dtype
        assert_close(out, stacked_matmul_reference(x, w, layer), x.dtype.type)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 13, 16, 40])
def test_matches_reference_for_every_layer(num_tokens, dtype):
    # D_in 96 and D_out 80 shrink the default blocks to 32 and 16; block_t 16 makes T = 40 three
    # blocks, the last one part masked.
    x, w = make_inputs(num_tokens, num_tokens, 96, 80, dtype)
    check_every_layer(x, w, block_t=16)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_split_k_partials_add_up(num_splits):
    x, w = make_inputs(7, 21, 128, 48, jnp.float32)
    check_every_layer(x, w, block_k=32, block_n=16, num_splits=num_splits)


def test_default_blocks_on_model_like_widths():
    # SmolLM2's D = 576 = 9 * 64 (block_k 128 -> 64) into its K * H = 192 kv width.
    x, w = make_inputs(3, 24, 576, 192, jnp.bfloat16, num_layers=2)
    check_every_layer(x, w)


def test_layer_traced_in_a_scan_under_jit():
    """Each step's layer comes from the scan, as in the model: x <- tanh(x @ w[l])."""
    x, w = make_inputs(5, 12, 64, 64, jnp.float32, num_layers=4)

    def run(mm, x, w):
        def body(x, layer):
            return jnp.tanh(mm(x, w, layer)), None

        return jax.lax.scan(body, x, jnp.arange(w.shape[0], dtype=jnp.int32))[0]

    got = jax.jit(functools.partial(run, stacked_matmul))(x, w)
    want = run(stacked_matmul_reference, x, w)
    assert_close(got, want, jnp.float32)


def test_choose_num_splits_fills_small_launches_only():
    # llama-3.1-8b k_proj at T = 64: 16 column blocks, D_in 4096 in 32 steps of 128. Splitting
    # stops at two: four or more measured slower (their f32 partials cost more than they win).
    assert choose_num_splits(1, 16, 32, 64, 4096, 2) == 2
    # llama-3.2-1b down_proj at T = 256: 2 * 32 programs, D_in 8192 in 128 steps of 64.
    assert choose_num_splits(2, 32, 128, 256, 8192, 2) == 2
    # gate_proj at T = 256: 2 * 224 programs already fill the GPU; so do the 8B's q/k/v (2 * 96).
    assert choose_num_splits(2, 224, 32, 256, 4096, 2) == 1
    assert choose_num_splits(2, 96, 64, 256, 4096, 2) == 1
    # Never fewer than 4 k steps per split, and never a split that does not divide the steps.
    assert choose_num_splits(1, 1, 8, 16, 1024, 2) == 2
    assert choose_num_splits(1, 1, 9, 16, 1152, 2) == 1
    assert choose_num_splits(1, 1, 4, 16, 1024, 2) == 1


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield from _all_eqns(inner)
            elif hasattr(param, "eqns"):
                yield from _all_eqns(param)


def test_fused_launches_are_not_split_by_default():
    # One T block and two column blocks (block_n shrinks to 32): the split rule splits a
    # single-weight launch of this shape in two (f32 partials), but a launch of several weights
    # is not split unless asked: silu_mul would lose its fused epilogue, and q/k/v measured no
    # faster split. Each writes its outputs in x's dtype.
    x = jnp.ones((16, 1024), jnp.bfloat16)
    ws = (jnp.ones((2, 1024, 32), jnp.bfloat16),) * 2
    assert choose_num_splits(1, 2, 1024 // 64, 16, 1024, 2) == 2

    def pallas_outputs(fn, *args, **kwargs) -> list:
        jaxpr = jax.make_jaxpr(functools.partial(fn, interpret=True, **kwargs))(*args)
        pallas = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
        assert len(pallas) == 1
        return [(v.aval.shape, v.aval.dtype) for v in pallas[0].outvars]

    layer = jnp.int32(1)
    assert pallas_outputs(stacked_matmul_fused, x, ws, layer, epilogue="silu_mul") == [
        ((16, 32), jnp.bfloat16)]
    assert pallas_outputs(stacked_matmul_fused, x, ws, layer) == [((16, 32), jnp.bfloat16)] * 2
    assert pallas_outputs(stacked_matmul_fused, x, ws, layer, num_splits=2) == [
        ((32, 32), jnp.float32)] * 2
    assert pallas_outputs(stacked_matmul, x, ws[0], layer) == [((32, 32), jnp.float32)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_n=48), "block_n=48"),
    (dict(block_k=8), "block_k=8"),
    (dict(num_splits=3), "num_splits=3"),
])
def test_rejects_bad_tuning(kwargs, match):
    x, w = make_inputs(0, 8, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match=match):
        stacked_matmul(x, w, jnp.int32(0), **kwargs)


def test_rejects_bad_shapes():
    x, w = make_inputs(0, 8, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match="D_in"):
        stacked_matmul(x[:, :40], w[:, :40], jnp.int32(0))
    with pytest.raises(ValueError, match="x must be"):
        stacked_matmul(x, w[0], jnp.int32(0))


# -- stacked_matmul_fused: q/k/v in one launch, gate/up with the silu_mul epilogue ---------------


def make_stacks(seed: int, num_tokens: int, d_in: int, d_outs: tuple[int, ...], dtype,
                num_layers: int = L):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((num_tokens, d_in)), dtype)
    ws = tuple(jnp.asarray(rng.standard_normal((num_layers, d_in, d)) / np.sqrt(d_in), dtype)
               for d in d_outs)
    return x, ws


def check_fused_every_layer(x, ws, epilogue=None, **tuning):
    run = jax.jit(functools.partial(stacked_matmul_fused, epilogue=epilogue, **tuning))
    for layer in range(ws[0].shape[0]):
        got = run(x, ws, jnp.int32(layer))
        want = stacked_matmul_fused_reference(x, ws, layer, epilogue=epilogue)
        if epilogue == "silu_mul":
            got, want = (got,), (want,)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == x.dtype
            assert_close(g, w, x.dtype.type)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens,d_in,d_outs,tuning", [
    (13, 64, (64, 16, 16), dict(block_t=16)),  # GQA 4:1 widths; block_n 16, 6 column blocks
    (40, 96, (64, 32, 32), dict(block_t=16)),  # three T blocks, the last part masked
    (24, 576, (576, 192, 192), {}),  # SmolLM2's q/k/v: block_n 64, block_k 64
])
def test_fused_matches_reference(num_tokens, d_in, d_outs, tuning, dtype):
    x, ws = make_stacks(num_tokens, num_tokens, d_in, d_outs, dtype,
                        num_layers=2 if d_in > 128 else L)
    check_fused_every_layer(x, ws, **tuning)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens", [13, 40])
def test_silu_mul_epilogue_matches_silu_of_products(num_tokens, dtype):
    x, (wg, wu) = make_stacks(num_tokens + 1, num_tokens, 64, (96, 96), dtype)
    run = jax.jit(functools.partial(stacked_matmul_fused, epilogue="silu_mul", block_t=16))
    for layer in range(L):
        got = run(x, (wg, wu), jnp.int32(layer))
        gate = stacked_matmul_reference(x.astype(jnp.float32), wg, layer)
        up = stacked_matmul_reference(x.astype(jnp.float32), wu, layer)
        assert got.shape == (num_tokens, 96) and got.dtype == x.dtype
        assert_close(got, jax.nn.silu(gate) * up, x.dtype.type)


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(num_tokens=st.integers(1, 70), d_in=st.sampled_from([16, 48, 64, 128]),
                  widths=st.lists(st.sampled_from([16, 32, 48, 64]), min_size=1, max_size=3),
                  silu_mul=st.booleans(), split=st.booleans(),
                  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_property_shapes(num_tokens, d_in, widths, silu_mul, split, dtype):
    """Any T, widths down to the 16-wide tile, one to three stacks or a silu_mul pair, split or
    not: the Triton kernel equals the reference at every layer."""
    widths = (widths[0],) * 2 if silu_mul else tuple(widths)
    x, ws = make_stacks(num_tokens, num_tokens, d_in, widths, dtype, num_layers=2)
    splits = 2 if split and (d_in // 16) % 2 == 0 else None
    check_fused_every_layer(x, ws, epilogue="silu_mul" if silu_mul else None, block_t=16,
                            block_k=16, num_splits=splits)


@pytest.mark.parametrize("epilogue,d_outs", [(None, (64, 32, 32)), ("silu_mul", (48, 48))])
def test_fused_split_k_partials_add_up(epilogue, d_outs):
    # With a split the silu_mul epilogue runs in XLA on the summed partials.
    x, ws = make_stacks(9, 21, 128, d_outs, jnp.float32)
    check_fused_every_layer(x, ws, epilogue, block_k=32, block_n=16, num_splits=2)


def test_fused_layer_traced_in_a_scan_under_jit():
    """A layer-like step, each layer from the scan: x <- tanh(q * (k + v) + silu(x Wg) * x Wu)."""
    x, ws = make_stacks(6, 12, 32, (32, 32, 32, 32, 32), jnp.float32, num_layers=4)

    def run(fused, x, ws):
        def body(x, layer):
            q, k, v = fused(x, ws[:3], layer)
            return jnp.tanh(q * (k + v) + fused(x, ws[3:], layer, epilogue="silu_mul")), None

        return jax.lax.scan(body, x, jnp.arange(ws[0].shape[0], dtype=jnp.int32))[0]

    got = jax.jit(functools.partial(run, stacked_matmul_fused))(x, ws)
    want = run(stacked_matmul_fused_reference, x, ws)
    assert_close(got, want, jnp.float32)


def test_fused_rejects_bad_arguments():
    x, ws = make_stacks(0, 8, 64, (32, 32, 16), jnp.float32)
    with pytest.raises(ValueError, match="epilogue='gelu'"):
        stacked_matmul_fused(x, ws[:2], jnp.int32(0), epilogue="gelu")
    with pytest.raises(ValueError, match="exactly two stacks"):
        stacked_matmul_fused(x, ws, jnp.int32(0), epilogue="silu_mul")
    with pytest.raises(ValueError, match="exactly two stacks"):
        stacked_matmul_fused(x, ws[1:], jnp.int32(0), epilogue="silu_mul")
    with pytest.raises(ValueError, match="x must be"):
        stacked_matmul_fused(x, (ws[0], ws[1][:, :48]), jnp.int32(0))
    with pytest.raises(ValueError, match="layer counts"):
        stacked_matmul_fused(x, (ws[0], ws[1][:2]), jnp.int32(0))
    with pytest.raises(ValueError, match="gcd of the D_outs"):
        stacked_matmul_fused(x, (ws[0], jnp.zeros((L, 64, 40))), jnp.int32(0))


# -- the Triton lowering, checked from the CPU --------------------------------------------------


def lower_for_h100(x_shape, w_shape, dtype, fn=stacked_matmul, **kwargs) -> str:
    """StableHLO of the kernel lowered through Pallas-Triton for an (abstract) H100: catches
    what the Triton lowering rejects (tile shapes, indexers, dot shapes) without a GPU. It does
    not run Triton's own compiler, so shared-memory limits are not checked. A tuple of
    w_shapes is one stack each (for stacked_matmul_fused)."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    w = (tuple(jax.ShapeDtypeStruct(s, dtype) for s in w_shape)
         if isinstance(w_shape[0], tuple) else jax.ShapeDtypeStruct(w_shape, dtype))
    args = (jax.ShapeDtypeStruct(x_shape, dtype), w, jax.ShapeDtypeStruct((), jnp.int32))
    fn = functools.partial(fn, interpret=False, **kwargs)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.filterwarnings("ignore:.*Triton backend is deprecated")
@pytest.mark.parametrize("num_tokens,d_in,d_out,dtype,tuning", [
    (8, 4096, 1024, jnp.bfloat16, {}),  # llama-3.1-8b k_proj, tiny batch: split over D_in
    (64, 4096, 14336, jnp.bfloat16, {}),  # gate_proj
    (200, 14336, 4096, jnp.bfloat16, {}),  # down_proj, T not a power of two
    (256, 576, 192, jnp.bfloat16, dict(block_t=256, num_warps=8)),  # SmolLM2 k_proj
    (64, 2048, 512, jnp.float32, {}),
])
def test_lowers_through_triton_for_h100(num_tokens, d_in, d_out, dtype, tuning):
    hlo = lower_for_h100((num_tokens, d_in), (4, d_in, d_out), dtype, **tuning)
    assert hlo.count("__gpu$xla.gpu.triton") == 1
    # The weight goes in whole (a free reshape), never a dynamic slice of the stack.
    assert f"tensor<{4 * d_in}x{d_out}x" in hlo and "dynamic_slice" not in hlo


@pytest.mark.filterwarnings("ignore:.*Triton backend is deprecated")
@pytest.mark.parametrize("num_tokens,d_in,d_outs,epilogue,dtype", [
    (8, 4096, (4096, 1024, 1024), None, jnp.bfloat16),  # llama-3.1-8b q/k/v: split over D_in
    (256, 4096, (4096, 1024, 1024), None, jnp.bfloat16),
    (200, 576, (576, 192, 192), None, jnp.bfloat16),  # SmolLM2, T not a power of two
    (64, 4096, (14336, 14336), "silu_mul", jnp.bfloat16),  # 8b gate/up: the in-kernel epilogue
    (64, 2048, (8192, 8192), "silu_mul", jnp.bfloat16),  # 1b gate/up: split, epilogue in XLA
    (64, 2048, (2048, 512, 512), None, jnp.float32),
])
def test_fused_lowers_through_triton_for_h100(num_tokens, d_in, d_outs, epilogue, dtype):
    w_shapes = tuple((4, d_in, d) for d in d_outs)
    hlo = lower_for_h100((num_tokens, d_in), w_shapes, dtype, fn=stacked_matmul_fused,
                         epilogue=epilogue)
    assert hlo.count("__gpu$xla.gpu.triton") == 1
    assert "dynamic_slice" not in hlo
    for d in d_outs:
        assert f"tensor<{4 * d_in}x{d}x" in hlo


# -- the model: JAXPAGED_STACKED_MATMUL=1 in a decode-only step ---------------------------------


def tiny_model(family: str, intermediate_size: int = 96):
    """llama; qwen2 with q/k/v biases; qwen3 with q/k norms."""
    from jaxpaged.config import ModelConfig
    from jaxpaged.models import CausalLM

    cfg = ModelConfig(family=family, vocab_size=96, hidden_size=64,
                      intermediate_size=intermediate_size, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      attention_bias=family == "qwen2", qk_norm=family == "qwen3")
    graphdef, params = nnx.split(CausalLM(cfg, jnp.float32, nnx.Rngs(0)))
    # Fresh biases are zero and norm scales one: perturb them so they show up in the logits.
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape, p.dtype) if p.ndim <= 2 else p,
        params)
    return cfg, graphdef, params


def decode_step_inputs(cfg, block_size: int = 16):
    from jaxpaged.attention import KVCache
    from jaxpaged.metadata import build_step_inputs

    rng = np.random.default_rng(2)
    lens = [5, 17, 1]  # tokens already cached; a fourth, padded sequence slot stays empty
    tables = [[3, 1], [2, 5], [4]]
    ids, pos, md = build_step_inputs(
        [[int(t)] for t in rng.integers(0, cfg.vocab_size, len(lens))], lens, tables,
        block_size, num_tokens=4, num_seqs=4, max_blocks_per_seq=2, logits_indices=[0, 1, 2],
        num_logits=4, decode_only=True)
    shape = (cfg.num_hidden_layers, 6, block_size, cfg.num_key_value_heads, cfg.head_dim)
    cache = KVCache(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                    jnp.asarray(rng.standard_normal(shape), jnp.float32))
    return cache, jnp.asarray(ids), jnp.asarray(pos), jax.tree.map(jnp.asarray, md)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_model_decode_step_with_env_matches_default(family, monkeypatch):
    from jaxpaged.models import forward

    cfg, graphdef, params = tiny_model(family)
    cache, ids, pos, md = decode_step_inputs(cfg)
    results, jaxprs = {}, {}
    for setting in ("0", "1"):
        monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", setting)
        # A fresh jit per setting: the variable is read when the forward is traced.
        step = jax.jit(functools.partial(forward, graphdef, impl="pallas"))
        jaxprs[setting] = str(jax.make_jaxpr(step)(params, cache, ids, pos, md))
        results[setting] = step(params, cache, ids, pos, md)
    assert "stacked_matmul" not in jaxprs["0"]
    # q/k/v in one launch, gate/up in another with the epilogue, o and down on their own.
    names = set(re.findall(r"name=(stacked_matmul\w*)", jaxprs["1"]))
    assert names >= {"stacked_matmul_fused", "stacked_matmul_silu_mul", "stacked_matmul"}, names
    (cache0, logits0), (cache1, logits1) = results["0"], results["1"]
    np.testing.assert_allclose(np.asarray(logits1)[:3], np.asarray(logits0)[:3],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache1.k), np.asarray(cache0.k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache1.v), np.asarray(cache0.v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("unroll", [False, True])
def test_fused_add_norm_matches_xla_add_and_norm(family, unroll, monkeypatch):
    """JAXPAGED_FUSED_ADD_NORM: the stacked decode step with each residual add and the norm
    after it in one add_rms_norm launch (two a layer, the last one by the final norm's scale)
    gives the logits and cache of XLA's adds and norms, in a scan and unrolled. An MLP width of
    512 makes Triton's rule split the down launch's D_in in two (eight k steps): it hands over
    its f32 partial sums [2, T, D]; the o launch (D_in 64) does not split."""
    from jaxpaged.models import forward

    cfg, graphdef, params = tiny_model(family, intermediate_size=512)
    cache, ids, pos, md = decode_step_inputs(cfg)
    results, jaxprs = {}, {}
    for setting in ("0", "1"):
        monkeypatch.setenv("JAXPAGED_FUSED_ADD_NORM", setting)
        step = jax.jit(functools.partial(forward, graphdef, impl="pallas", unroll=unroll,
                                         stacked_matmul=True))
        jaxprs[setting] = str(jax.make_jaxpr(step)(params, cache, ids, pos, md))
        results[setting] = step(params, cache, ids, pos, md)
    launches = len(re.findall(r"jit\[\s*name=add_rms_norm", jaxprs["1"]))
    assert launches == 2 * (cfg.num_hidden_layers if unroll else 1)
    # An add_rms_norm taking (residual [4, 64], the down launch's partials [2, 4, 64], ...).
    assert re.search(r"lambda ; \w+:f32\[4,64\] \w+:f32\[2,4,64\]", jaxprs["1"])
    # The norm scales reach the kernel as the whole [L, D] stacks (read in place at the layer):
    # a slice taken outside would cost a copy a launch on a GPU.
    assert re.search(r"lambda ; \w+:f32\[4,64\] \w+:f32\[4,64\] \w+:f32\[3,64\]", jaxprs["1"])
    assert "add_rms_norm" not in jaxprs["0"]
    (cache0, logits0), (cache1, logits1) = results["0"], results["1"]
    np.testing.assert_allclose(np.asarray(logits1)[:3], np.asarray(logits0)[:3],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache1.k), np.asarray(cache0.k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache1.v), np.asarray(cache0.v), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("JAXPAGED_FUSED_ADD_NORM", "yes")
    with pytest.raises(ValueError, match="JAXPAGED_FUSED_ADD_NORM"):
        forward(graphdef, params, cache, ids, pos, md, impl="pallas", stacked_matmul=True)


def test_unrolled_stacked_decode_matches_the_scan_with_constant_layer_indices():
    """The GPU's decode default: stacked kernels in an unrolled layer loop. Same logits and
    cache as the rolled scan; each layer's index reaches the kernels as a constant (a scan's
    indices are slices of an iota, which XLA does not fold: a kernel launch per layer on a
    GPU), so the unrolled program has no iota of the layer count."""
    from jaxpaged.models import forward

    cfg, graphdef, params = tiny_model("qwen3")
    cache, ids, pos, md = decode_step_inputs(cfg)
    got = {}
    for unroll in (False, True):
        step = jax.jit(functools.partial(forward, graphdef, impl="pallas", unroll=unroll,
                                         stacked_matmul=True))
        got[unroll] = step(params, cache, ids, pos, md)
        hlo = step.lower(params, cache, ids, pos, md).as_text()
        layer_iota = f"iota dim = 0 : tensor<{cfg.num_hidden_layers}xi32>"
        assert (layer_iota in hlo.replace("stablehlo.iota", "iota")) != unroll
    (cache0, logits0), (cache1, logits1) = got[False], got[True]
    np.testing.assert_allclose(np.asarray(logits1)[:3], np.asarray(logits0)[:3],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache1.k), np.asarray(cache0.k), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache1.v), np.asarray(cache0.v), rtol=1e-6, atol=1e-6)


def test_model_keeps_the_plain_path_outside_pallas_decode(monkeypatch):
    """The reference impl, non-decode steps and widths (per shard) that are not multiples of
    16, the kernels' smallest tile, ignore the setting; a bad value is an error."""
    from jaxpaged.models import forward
    from jaxpaged.sharding import make_mesh

    cfg, graphdef, params = tiny_model("llama")
    cache, ids, pos, md = decode_step_inputs(cfg)
    mixed = dataclasses.replace(md, decode_only=False)

    def uses_kernels(graphdef, params, impl="pallas", metadata=md, mesh=None) -> bool:
        step = functools.partial(forward, graphdef, impl=impl, mesh=mesh, stacked_matmul=True)
        return "stacked_matmul" in str(jax.make_jaxpr(step)(params, cache, ids, pos, metadata))

    assert not uses_kernels(graphdef, params, impl="reference")
    assert not uses_kernels(graphdef, params, metadata=mixed)
    # An MLP width of 72 does not fit; 80 does, but not split over 2 shards (40 each).
    assert not uses_kernels(*tiny_model("llama", intermediate_size=72)[1:])
    _, graphdef80, params80 = tiny_model("llama", intermediate_size=80)
    assert uses_kernels(graphdef80, params80)
    if len(jax.devices()) >= 2:
        assert not uses_kernels(graphdef80, params80, mesh=make_mesh(2))
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "yes")
    with pytest.raises(ValueError, match="JAXPAGED_STACKED_MATMUL"):
        forward(graphdef, params, cache, ids, pos, md, "pallas")


def test_setting_defaults_to_the_backend(monkeypatch):
    """Unset: on for a GPU backend (measured faster on one H100 and, per shard, on two), off on
    the CPU (interpreted); "1" and "0" force it."""
    from jaxpaged.models import llama, stacked_matmul_setting

    monkeypatch.delenv("JAXPAGED_STACKED_MATMUL", raising=False)
    assert stacked_matmul_setting() is (jax.default_backend() == "gpu")
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "gpu")
    assert stacked_matmul_setting() is True
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "cpu")
    assert stacked_matmul_setting() is False
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "1")
    assert stacked_matmul_setting() is True
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "0")
    assert stacked_matmul_setting() is False
