"""Tensor parallelism on the CPU's forced host devices (conftest.py asks XLA for 4): greedy
tokens with 1, 2, 3 and 4 shards equal the unsharded engine's for a tiny model of every family
(3 shards pad its 4 query / 2 KV heads to 6 / 3), through the reference attention and the
Pallas kernels; SmolLM2 (9 query / 3 KV heads) gives transformers' tokens at 3 shards as it is
and at 2 and 4 padded to 12 / 4 heads. Also: the padding rule and its zeros, the Megatron
specs, loaders that place weights on their shards, the compiled collectives, the stacked-weight
decode projections run per shard, two processes joined through jax.distributed, the -tp
flags."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpaged import LLM, SamplingParams
from jaxpaged.config import PRESETS
from jaxpaged.engine_config import EngineConfig
from jaxpaged.sharding import (kv_cache_sharding, load_mesh, make_mesh, pad_heads,
                               padded_head_counts, param_spec, shard_model)
from reference import PagedRunner
from test_engine import EXPECTED, PROMPTS
from test_models import FAMILIES, _tiny_hf_model
from test_stacked_matmul import decode_step_inputs, tiny_model

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices: run with "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=4")

TINY_PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, 160, size=n)]
                for i, n in enumerate([5, 40, 17, 70])]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)


# One token bucket: an engine compiles one prefill forward and one decode forward (the
# prompts go in chunks of 16 tokens), for each shard count.
LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128)


def run(model, tp: int, **kwargs) -> tuple[LLM, list]:
    kwargs = dict(dict(dtype="float32", warmup=False, **LIMITS), **kwargs)
    llm = LLM(model, tensor_parallel_size=tp, **kwargs)
    return llm, llm.generate(TINY_PROMPTS, GREEDY, use_tqdm=False)


def assert_same_completions(got, want) -> None:
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    np.testing.assert_allclose([o.outputs[0].cumulative_logprob for o in got],
                               [o.outputs[0].cumulative_logprob for o in want], rtol=1e-4)


# -- host-side rules -----------------------------------------------------------------------

def test_megatron_partition_specs():
    tp = 2
    assert param_spec(("layers", "self_attn", "q_proj", "kernel"), (3, 64, 64), tp) == \
        P(None, None, "tp")
    assert param_spec(("layers", "self_attn", "k_proj", "bias"), (3, 32), tp) == P(None, "tp")
    assert param_spec(("layers", "self_attn", "o_proj", "kernel"), (3, 64, 64), tp) == \
        P(None, "tp", None)
    assert param_spec(("layers", "mlp", "up_proj", "kernel"), (3, 64, 96), tp) == \
        P(None, None, "tp")
    assert param_spec(("layers", "mlp", "down_proj", "kernel"), (3, 96, 64), tp) == \
        P(None, "tp", None)
    assert param_spec(("embed_tokens", "embedding"), (160, 64), tp) == P("tp", None)
    assert param_spec(("lm_head", "kernel"), (64, 160), tp) == P(None, "tp")
    assert param_spec(("layers", "input_layernorm", "scale"), (3, 64), tp) == P()
    assert param_spec(("layers", "self_attn", "k_norm", "scale"), (3, 16), tp) == P()
    # A vocabulary tp does not divide is replicated, not refused.
    assert param_spec(("embed_tokens", "embedding"), (161, 64), tp) == P()


def test_heads_that_do_not_divide_are_padded_and_too_many_shards_refused():
    """(N', K') for tp shards: the fewest K' >= K that split (K' % tp == 0) or replicate
    (tp % K' == 0) and whose K' * G query heads split; G = N / K stays."""
    smollm2 = PRESETS["smollm2-135m"]  # 9 query heads, 3 KV heads: G = 3
    assert {tp: padded_head_counts(smollm2, tp) for tp in (1, 2, 3, 4, 8, 9)} == {
        1: (9, 3), 2: (12, 4), 3: (9, 3), 4: (12, 4), 8: (24, 8), 9: (9, 3)}
    mqa = dataclasses.replace(smollm2, num_attention_heads=3, num_key_value_heads=1)
    assert padded_head_counts(mqa, 2) == (6, 2)  # G = 3 kept, so the one KV head gains a twin
    assert padded_head_counts(mqa, 3) == (3, 1)  # replicated 3 times, no padding
    odd = dataclasses.replace(smollm2, num_attention_heads=12, num_key_value_heads=6)
    assert padded_head_counts(odd, 4) == (16, 8)
    assert padded_head_counts(PRESETS["llama-3.1-8b"], 8) == (32, 8)  # K = 8: split
    assert padded_head_counts(PRESETS["qwen3-0.6b"], 16) == (16, 8)  # each replicated twice
    # More shards than query heads: some would hold nothing but zeros.
    with pytest.raises(ValueError, match="tensor_parallel_size=10 exceeds this model's "
                                         "num_attention_heads=9"):
        padded_head_counts(smollm2, 10)
    # Loaders place weights straight on the mesh only when nothing is padded or replicated.
    assert load_mesh(smollm2, make_mesh(2)) is None
    mesh = make_mesh(3)
    assert load_mesh(smollm2, mesh) is mesh


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("qwen3", {"head_dim": 32})])
def test_pad_heads_appends_zeros_and_keeps_the_models_function(family, extra, tmp_path):
    """4 query / 2 KV heads padded for 3 shards to 6 / 3: the appended q/k/v columns (and
    qwen2's bias entries) and o_proj rows are zero, everything else is the checkpoint's, and
    the padded model's logits on one device equal the original's (qwen3: q_norm/k_norm too)."""
    from jaxpaged.loader import load_model
    from jaxpaged.weights import flatten_state, to_state

    _tiny_hf_model(family, tmp_path, **extra)
    loaded = load_model(str(tmp_path), dtype="float32")
    H = loaded.config.head_dim
    flat = flatten_state(loaded.params)
    padded, config = pad_heads(flat, loaded.config, 3)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 3, H)
    # Module -> (padded axis: out features, o_proj's in features; width before; after).
    appended = {"q_proj": (-1, 4 * H, 6 * H), "k_proj": (-1, 2 * H, 3 * H),
                "v_proj": (-1, 2 * H, 3 * H), "o_proj": (-2, 4 * H, 6 * H)}
    for path, arr in flat.items():
        if path[-2] not in appended:
            assert padded[path] is arr, path
            continue
        axis, before, after = appended[path[-2]]
        new = padded[path]
        assert new.shape[axis] == after, path
        assert np.array_equal(np.take(new, range(before), axis), arr), path
        assert not np.take(new, range(before, after), axis).any(), path
    graphdef, params = to_state(config, padded, loaded.dtype)
    padded_model = dataclasses.replace(loaded, config=config, graphdef=graphdef, params=params)
    ids = TINY_PROMPTS[3]
    want, got = (PagedRunner(m, num_seqs=1, max_len=128) for m in (loaded, padded_model))
    np.testing.assert_allclose(got.step({0: ids[:-1]})[0], want.step({0: ids[:-1]})[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.step({0: ids[-1:]})[0], want.step({0: ids[-1:]})[0],
                               rtol=1e-5, atol=1e-6)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size=64 exceeds the 4 cpu devices"):
        make_mesh(64)
    assert make_mesh(1) is None


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_loaders_put_each_weight_straight_on_its_shards(load_format, tmp_path):
    """No device holds the whole model at load: a safetensors directory and dummy weights
    arrive split, with the values of an unsharded load."""
    from jaxpaged.loader import load_model
    from jaxpaged.weights import flatten_state

    _tiny_hf_model("qwen2", tmp_path)
    whole = load_model(str(tmp_path), load_format=load_format, dtype="float32")
    split = load_model(str(tmp_path), load_format=load_format, dtype="float32",
                       mesh=make_mesh(2))
    q = split.params["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec == P(None, None, "tp")
    assert q.addressable_shards[0].data.shape == (3, 64, 32)
    a, b = flatten_state(whole.params), flatten_state(split.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # 3 shards need 6 / 3 padded heads: loaded whole, then padded and split by shard_model.
    mesh = make_mesh(3)
    padded = shard_model(load_model(str(tmp_path), load_format=load_format, dtype="float32",
                                    mesh=mesh), mesh)
    assert (padded.config.num_attention_heads, padded.config.num_key_value_heads) == (6, 3)
    q = padded.params["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec == P(None, None, "tp") and q.shape == (3, 64, 96)
    assert np.array_equal(q[..., :64], a[("layers", "self_attn", "q_proj", "kernel")])
    # More shards than query heads is refused before any weight is read (none exist here).
    few = tmp_path / "two_heads"
    few.mkdir()
    (few / "config.json").write_text(json.dumps(dict(TINY_LLAMA, num_attention_heads=2,
                                                     num_key_value_heads=1)))
    with pytest.raises(ValueError, match="tensor_parallel_size=4 exceeds this model's "
                                         "num_attention_heads=2"):
        load_model(str(few), load_format=load_format, mesh=make_mesh(4))


# -- end to end ----------------------------------------------------------------------------

@pytest.mark.parametrize("family,extra", FAMILIES, ids=["llama", "llama3-rope-tied", "mistral",
                                                        "qwen2", "qwen3"])
def test_tiny_family_greedy_is_identical_on_1_2_3_4_shards(family, extra, tmp_path):
    """4 query heads, 2 KV heads: 2 shards split the KV heads, 3 pad them to 6 / 3 heads, 4
    replicate each KV head twice."""
    _tiny_hf_model(family, tmp_path, **extra)
    _, want = run(str(tmp_path), 1)
    for tp in (2, 3, 4):
        llm, got = run(str(tmp_path), tp)
        assert_same_completions(got, want)
        cache = llm.llm_engine.runner.kv_cache.k
        assert tuple(cache.sharding.spec)[3] == "tp"
        assert cache.shape[3] == max(2, tp)  # padded to 3, or replicated up to tp where K < tp


def test_padding_then_replication_on_four_shards(tmp_path):
    """6 query heads, 1 KV head on 4 shards: padded to 12 / 2 (G = 6 kept), then each KV head
    replicated twice; the tokens stay the unsharded engine's."""
    _tiny_hf_model("llama", tmp_path, hidden_size=96, num_attention_heads=6, num_key_value_heads=1)
    _, want = run(str(tmp_path), 1)
    llm, got = run(str(tmp_path), 4)
    assert_same_completions(got, want)
    assert llm.llm_engine.model.config.num_attention_heads == 12
    assert llm.llm_engine.runner.kv_cache.k.shape[3] == 4


def test_tensor_parallel_compiles_every_bucket_at_warmup(tmp_path):
    _tiny_hf_model("llama", tmp_path, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    _, want = run(str(tmp_path), 1)
    llm, got = run(str(tmp_path), 4, warmup=True, max_num_batched_tokens=16)
    assert_same_completions(got, want)
    assert llm.llm_engine.runner.num_compiles_since_warmup == 0
    assert llm.llm_engine.runner.kv_cache.k.shape[3] == 4  # split, not replicated


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(result shape, op) of every collective in a compiled program's text, sorted. A loop's
    body appears once, so a layer's collectives count once whatever the depth."""
    return sorted(re.findall(r"= (\w+\[[\d,]*\])\S* (all-reduce|all-gather|all-to-all|"
                             r"reduce-scatter|collective-permute)(?:-start)?\(", hlo))


@pytest.mark.parametrize("tied", [False, True])
def test_collectives_are_megatrons(tied, tmp_path):
    """Per layer one all-reduce after o_proj and one after down_proj, one for the embedding,
    and the only all-gather is the R x V logits' (never a weight's or the KV cache's)."""
    _tiny_hf_model("llama", tmp_path, tie_word_embeddings=tied)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, dtype="float32", max_num_seqs=4,
              max_num_batched_tokens=16, max_model_len=64, warmup=False)
    runner = llm.llm_engine.runner
    shape = runner.bucket_shapes()[-1]
    hlo = runner.lower_forward(shape).compile().as_text()
    T, R = shape.num_tokens, shape.num_logits
    assert collectives(hlo) == [(f"f32[{R},160]", "all-gather")] + [(f"f32[{T},64]",
                                                                     "all-reduce")] * 3
    # The sharded cache is still donated: outputs 0 and 1 (k, v) reuse their input buffers.
    assert re.search(r"input_output_alias=\{ \{0\}: \(\d+, \{\}, may-alias\), \{1\}: ", hlo)


def test_pallas_kernels_run_per_shard(tmp_path):
    """The kernels (interpreted on the CPU) inside shard_map: decode, ragged and KV write."""
    _tiny_hf_model("qwen3", tmp_path, head_dim=32)
    _, want = run(str(tmp_path), 1, attention_impl="reference")
    # 3: padded to 6 query / 3 KV heads, 2 / 1 per shard; 4: 1 / 1 (KV heads replicated).
    for tp in (2, 3, 4):
        _, got = run(str(tmp_path), tp, attention_impl="pallas")
        assert_same_completions(got, want)


# -- the stacked-weight decode projections, per shard --------------------------------------

def kv_layout(cache: jax.Array, config, tp: int) -> np.ndarray:
    """An unsharded cache [L, P, B, K, H] in the layout of the model shard_model makes for tp
    shards: zero heads appended up to K', then each KV head repeated where tp > K'."""
    K, (_, K2) = cache.shape[3], padded_head_counts(config, tp)
    padded = np.pad(np.asarray(cache), [(0, 0)] * 3 + [(0, K2 - K), (0, 0)])
    return np.repeat(padded, max(1, tp // K2), axis=3)


@pytest.mark.parametrize("family,tp,intermediate_size", [
    *[(family, tp, 192) for family in ("llama", "qwen2", "qwen3") for tp in (2, 3, 4)],
    ("llama", 3, 112),  # 112 / 3 does not split: the MLP is replicated, only o_proj all-reduces
], ids=lambda v: str(v))
def test_stacked_decode_step_per_shard_matches_unsharded(family, tp, intermediate_size):
    """stacked_matmul=True under a mesh: the projection kernels run per shard inside shard_map
    on each shard's slice of the stacks and the decode step's logits and KV cache equal the
    unsharded default path's (qwen2's q/k/v biases and qwen3's q/k norms included). 4 query /
    2 KV heads: 2 shards split them, 3 pad them to 6 / 3, 4 replicate each KV head twice. One
    psum per row-parallel projection in the layer body, and the compiled step's collectives
    are the plain mesh path's: Megatron's all-reduce after o_proj and down_proj and one for
    the embedding, nothing resharded."""
    from jaxpaged.loader import LoadedModel
    from jaxpaged.models import forward

    cfg, graphdef, params = tiny_model(family, intermediate_size)
    cache, ids, pos, md = decode_step_inputs(cfg)
    want_cache, want_logits = jax.jit(functools.partial(
        forward, graphdef, impl="pallas", stacked_matmul=False))(params, cache, ids, pos, md)
    mesh = make_mesh(tp)
    model = shard_model(LoadedModel("tiny", cfg, graphdef, params, None, jnp.float32), mesh)
    sharded_cache = jax.device_put(jax.tree.map(lambda c: kv_layout(c, cfg, tp), cache),
                                   kv_cache_sharding(mesh))
    args = (model.params, sharded_cache, ids, pos, md)
    steps = {stacked: jax.jit(functools.partial(forward, model.graphdef, impl="pallas",
                                                mesh=mesh, stacked_matmul=stacked))
             for stacked in (False, True)}
    jaxpr = str(jax.make_jaxpr(steps[True])(*args))
    names = set(re.findall(r"name=(stacked_matmul\w*)", jaxpr))
    assert names == {"stacked_matmul_fused", "stacked_matmul_silu_mul", "stacked_matmul"}, names
    mlp_split = intermediate_size % tp == 0
    assert len(re.findall(r"\bpsum\[", jaxpr)) == (2 if mlp_split else 1)
    want_ops = [("f32[4,64]", "all-reduce")] * (3 if mlp_split else 2)
    for stacked, step in steps.items():
        assert collectives(step.lower(*args).compile().as_text()) == want_ops, stacked
    got_cache, got_logits = steps[True](*args)
    np.testing.assert_allclose(np.asarray(got_logits)[:3], np.asarray(want_logits)[:3],
                               rtol=1e-5, atol=1e-5)
    for got, want in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
        np.testing.assert_allclose(np.asarray(got), kv_layout(want, cfg, tp), rtol=1e-5,
                                   atol=1e-5)


def test_stacked_matmul_engine_on_2_shards_matches_unsharded(monkeypatch, tmp_path):
    """JAXPAGED_STACKED_MATMUL=1 with tensor_parallel_size=2: the unsharded engine's greedy
    tokens, and the decode programs call the stacked kernels."""
    _tiny_hf_model("qwen2", tmp_path)
    _, want = run(str(tmp_path), 1)
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "1")
    llm, got = run(str(tmp_path), 2, attention_impl="pallas")
    assert_same_completions(got, want)
    runner = llm.llm_engine.runner
    assert runner.stacked_matmul
    decode = next(shape for shape in runner.bucket_shapes() if shape.decode_only)
    assert "stacked_matmul" in runner.lower_forward(decode).as_text()


def test_multi_step_windows_on_2_shards_match_single_steps_unsharded(monkeypatch, tmp_path):
    """num_scheduler_steps=3 on the stacked GPU path at tensor_parallel_size 2 (the window's
    loop around the per-shard kernels): the unsharded single-step engine's greedy tokens."""
    _tiny_hf_model("qwen2", tmp_path)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = LLM(str(tmp_path), dtype="float32", warmup=False, **LIMITS).generate(
        TINY_PROMPTS, greedy, use_tqdm=False)
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "1")
    llm = LLM(str(tmp_path), tensor_parallel_size=2, attention_impl="pallas", dtype="float32",
              warmup=False, num_scheduler_steps=3, **LIMITS)
    windows, schedule = [], llm.llm_engine.scheduler.schedule
    llm.llm_engine.scheduler.schedule = lambda: windows.append(schedule()) or windows[-1]
    got = llm.generate(TINY_PROMPTS, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert sum(out.num_steps == 3 for out in windows) >= 2


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_smollm2_on_2_3_4_shards_matches_transformers(smollm2, tp):
    """SmolLM2's 9 query and 3 KV heads split three ways as they are, and two or four ways
    padded with zero heads to 12 and 4; the golden tokens are transformers'. (The smollm2
    fixture fills the session's weight cache, which this load reads.)"""
    llm = LLM(None, tensor_parallel_size=tp, dtype="float32", warmup=False, max_model_len=256,
              max_num_seqs=4, max_num_batched_tokens=64)
    assert llm.llm_engine.runner.kv_cache.k.shape[3] == (3 if tp == 3 else 4)
    picks = [0, 3, 9]
    outputs = llm.generate([PROMPTS[i] for i in picks],
                           SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [EXPECTED[i][:8] for i in picks]


_PROCESS_SCRIPT = """
import json, sys
from jaxpaged import LLM, SamplingParams
prompts, tp = json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=tp, max_num_seqs=4,
          max_num_batched_tokens=16, max_model_len=128, warmup=False)
out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                   use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in out]))
"""


def test_two_processes_share_one_mesh_through_jax_distributed(tmp_path):
    """The multi-host launch on one machine: 2 processes of 2 CPU devices each join through
    JAXPAGED_COORDINATOR_ADDRESS (gloo collectives) into one 4-way mesh; both produce the
    unsharded engine's tokens."""
    import os
    import socket
    import subprocess
    import sys

    _tiny_hf_model("llama", tmp_path)
    _, want = run(str(tmp_path), 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAXPAGED_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXPAGED_NUM_PROCESSES="2",
                   JAXPAGED_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _PROCESS_SCRIPT, str(tmp_path), json.dumps(TINY_PROMPTS), "4"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
        line = next(line for line in out.splitlines() if line.startswith("TOKENS "))
        assert json.loads(line[7:]) == [o.outputs[0].token_ids for o in want]


# -- command lines ---------------------------------------------------------------------------

def test_tensor_parallel_flag_reaches_every_entry_point(tmp_path):
    import argparse

    from jaxpaged import bench, eval as jeval
    from jaxpaged.serve import add_cli_args, engine_config_from_args

    serve_args = add_cli_args(argparse.ArgumentParser()).parse_args(["-tp", "2"])
    assert engine_config_from_args(serve_args).tensor_parallel_size == 2
    eval_args = jeval.build_parser().parse_args(
        ["generate", "--input", "in.jsonl", "--output", "out.jsonl", "--tensor-parallel-size", "4"])
    assert eval_args.tensor_parallel_size == 4
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    engine = ["--model", str(tmp_path), "--load-format", "dummy", "--max-num-seqs", "4",
              "--max-num-batched-tokens", "16", "--max-model-len", "64", "--num-prompts", "5",
              "--input-len", "10", "--output-len", "4", "--ignore-eos", "--copy-bytes",
              "1000000"]
    results = {}
    for tp in (1, 2):
        bench.main(["throughput", *engine, "-tp", str(tp), "--json", str(tmp_path / f"{tp}.json")])
        results[tp] = json.loads((tmp_path / f"{tp}.json").read_text())
    assert results[2]["engine"]["tensor_parallel_size"] == 2
    assert results[2]["compiles_after_warmup"] == 0 and results[2]["output_tokens"] == 20
    # Each device reads half the weights: the roofline is per device.
    w1, w2 = (results[tp]["steady_decode"]["roofline"]["weight_bytes"] for tp in (1, 2))
    assert w2 == w1 // 2


TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}

