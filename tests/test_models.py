"""Our paged forward against transformers' PyTorch models: SmolLM2 and tiny models per family."""

import numpy as np
import pytest
import torch

from reference import PagedRunner, rel_err

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with "
    "the ends of worms and an oozy smell, nor yet a dry, bare, sandy hole with nothing in it to "
    "sit down on or to eat: it was a hobbit-hole, and that means comfort.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",  # 2-digit tokens: exactly a block or one past it
]


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_prefill_logits_match_transformers(smollm2, hf_smollm2, prompt):
    ids = smollm2.tokenizer(prompt)["input_ids"]
    runner = PagedRunner(smollm2, num_seqs=1, max_len=128)
    ours = runner.step({0: ids}, num_tokens=128)[0]
    assert rel_err(ours, hf_logits(hf_smollm2, ids)) <= 1e-4


def test_smollm2_chunked_then_token_by_token_matches_transformers(smollm2, hf_smollm2):
    """Prefill in two chunks, then decode one token a step through the shuffled paged cache."""
    ids = smollm2.tokenizer(PROMPTS[2])["input_ids"]
    ref = hf_logits(hf_smollm2, ids)
    runner = PagedRunner(smollm2, num_seqs=1, max_len=128, seed=3)
    got = [runner.step({0: ids[:17]})[0], runner.step({0: ids[17:40]})[0]]
    got += [runner.step({0: [t]})[0] for t in ids[40:]]
    assert rel_err(np.concatenate(got), ref) <= 1e-4


def test_smollm2_mixed_batch_of_prefills_and_decodes(smollm2, hf_smollm2):
    """Several sequences in one flat batch: one decodes while another prefills."""
    a = smollm2.tokenizer(PROMPTS[0])["input_ids"]
    b = smollm2.tokenizer(PROMPTS[3])["input_ids"]
    runner = PagedRunner(smollm2, num_seqs=3, max_len=64, seed=5)
    first = runner.step({0: a[:-1]})
    mixed = runner.step({0: a[-1:], 2: b})
    assert rel_err(np.concatenate([first[0], mixed[0]]), hf_logits(hf_smollm2, a)) <= 1e-4
    assert rel_err(mixed[2], hf_logits(hf_smollm2, b)) <= 1e-4


def test_second_load_comes_from_the_orbax_cache(smollm2, cache_root):
    import os

    from jaxpaged.loader import load_model
    from jaxpaged.weights import flatten_state

    # The cache root also holds "xla", the compilation cache.
    entries = [e for e in os.listdir(cache_root) if e.startswith("SmolLM2")]
    assert len(entries) == 1 and os.path.isfile(os.path.join(cache_root, entries[0], "complete"))
    again = load_model(None, dtype="float32")
    a, b = flatten_state(smollm2.params), flatten_state(again.params)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert again.tokenizer.eos_token_id == 2  # the GGUF metadata's EOS, <|im_end|>
    assert again.tokenizer.chat_template


def _tiny_hf_model(family: str, tmp_path, **extra):
    import transformers

    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    cfg = config_cls(**{**common, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # break the zero-bias and unit-norm symmetry of a fresh model
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model.eval()


FAMILIES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
               "rope_theta": 500000.0}),
    ("mistral", {"sliding_window": None}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32}),
]


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("family,extra", FAMILIES, ids=["llama", "llama3-rope-tied", "mistral",
                                                        "qwen2", "qwen3"])
def test_tiny_family_model_matches_transformers(family, extra, impl, tmp_path):
    from jaxpaged.loader import load_model

    hf = _tiny_hf_model(family, tmp_path, **extra)
    ours = load_model(str(tmp_path), dtype="float32")
    assert ours.config.family == family
    ids = list(np.random.default_rng(1).integers(0, 160, size=70))
    ref = hf_logits(hf, ids)
    runner = PagedRunner(ours, num_seqs=1, max_len=96, block_size=16, seed=2, impl=impl)
    got = [runner.step({0: ids[:33]})[0]] + [runner.step({0: [t]})[0] for t in ids[33:]]
    assert rel_err(np.concatenate(got), ref) <= 1e-4


def test_unrolled_layer_loop_matches_transformers(tmp_path):
    """The GPU default: the layer scan unrolled (static per-layer weight slices)."""
    from jaxpaged.loader import load_model

    hf = _tiny_hf_model("llama", tmp_path)
    ours = load_model(str(tmp_path), dtype="float32")
    ids = list(np.random.default_rng(3).integers(0, 160, size=40))
    runner = PagedRunner(ours, num_seqs=1, max_len=64, block_size=16, seed=4, unroll=True)
    got = [runner.step({0: ids[:30]})[0]] + [runner.step({0: [t]})[0] for t in ids[30:]]
    assert rel_err(np.concatenate(got), hf_logits(hf, ids)) <= 1e-4


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen3", {"head_dim": 32})])
def test_stacked_decode_with_fused_add_norm_matches_transformers(family, extra, tmp_path,
                                                                 monkeypatch):
    """The GPU's decode path (interpreted): the stacked projections in an unrolled layer loop,
    the residual adds and norms in add_rms_norm launches (a width of 64, a power of two), the
    KV write inside the decode kernel; logits against transformers over a prompt and decode
    steps."""
    import pallas_kernels
    from jaxpaged.loader import load_model

    monkeypatch.setenv("JAXPAGED_FUSED_ADD_NORM", "1")
    monkeypatch.setenv("JAXPAGED_FUSED_KV_WRITE", "1")
    traced = []  # add_rms_norm's calls while the steps are traced

    def counted(*args, _kernel=pallas_kernels.add_rms_norm, **kwargs):
        traced.append(args[1].shape)
        return _kernel(*args, **kwargs)

    monkeypatch.setattr(pallas_kernels, "add_rms_norm", counted)
    hf = _tiny_hf_model(family, tmp_path, **extra)
    ours = load_model(str(tmp_path), dtype="float32")
    ids = list(np.random.default_rng(5).integers(0, 160, size=26))
    runner = PagedRunner(ours, num_seqs=1, max_len=64, block_size=16, seed=6, impl="pallas",
                         unroll=True, stacked_matmul=True)
    got = [runner.step({0: ids[:20]})[0]] + [runner.step({0: [t]})[0] for t in ids[20:]]
    assert rel_err(np.concatenate(got), hf_logits(hf, ids)) <= 1e-4
    assert len(traced) == 2 * ours.config.num_hidden_layers  # the decode step's, traced once


def test_unrolling_only_decode_steps(tmp_path, monkeypatch):
    """JAXPAGED_UNROLL_LAYERS=decode: decode-only buckets lower without a layer loop, the
    others keep the scan, and the engine's greedy tokens do not change."""
    from jaxpaged import LLM, SamplingParams

    _tiny_hf_model("llama", tmp_path)
    prompts = [[int(t) for t in np.random.default_rng(s).integers(0, 160, 9 + s)] for s in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    got = {}
    for setting in ("0", "decode"):
        monkeypatch.setenv("JAXPAGED_UNROLL_LAYERS", setting)
        llm = LLM(str(tmp_path), dtype="float32", warmup=False, max_model_len=64,
                  max_num_seqs=4, max_num_batched_tokens=32)
        got[setting] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                     use_tqdm=False)]
    runner = llm.llm_engine.runner
    shapes = runner.bucket_shapes()
    for shape in (next(s for s in shapes if s.decode_only), next(s for s in shapes
                                                                  if not s.decode_only)):
        hlo = runner.lower_forward(shape).as_text()
        assert ("stablehlo.while" in hlo) != shape.decode_only
    assert got["decode"] == got["0"]
    monkeypatch.setenv("JAXPAGED_UNROLL_LAYERS", "sometimes")
    with pytest.raises(ValueError, match="JAXPAGED_UNROLL_LAYERS"):
        LLM(str(tmp_path), dtype="float32", warmup=False, max_model_len=64)


def test_unroll_defaults_to_decode_where_the_stacked_path_runs(monkeypatch):
    """Unset: decode steps are unrolled exactly where they take the stacked-weight path (one
    GPU), where it costs no warm-up; elsewhere the loop stays rolled. A set value wins."""
    from jaxpaged.runner import unroll_setting

    monkeypatch.delenv("JAXPAGED_UNROLL_LAYERS", raising=False)
    assert unroll_setting(stacked_matmul=True) == "decode"
    assert unroll_setting(stacked_matmul=False) == "0"
    assert unroll_setting() == "0"
    for setting in ("0", "1", "decode"):
        monkeypatch.setenv("JAXPAGED_UNROLL_LAYERS", setting)
        assert unroll_setting(stacked_matmul=True) == setting


def test_rope_tables_are_computed_once_outside_the_layer_loop():
    """cos/sin depend on the positions only: the forward computes them before the layer scan,
    so no layer recomputes them (inside a scan XLA kept them per layer: a kernel a layer)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpaged.attention import KVCache
    from jaxpaged.config import ModelConfig
    from jaxpaged.metadata import build_step_inputs
    from jaxpaged.models import CausalLM, forward

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16)
    graphdef, params = nnx.split(CausalLM(cfg, jnp.float32, nnx.Rngs(0)))
    ids, pos, md = build_step_inputs([[1, 2, 3]], [0], [[1]], 16, num_tokens=4, num_seqs=1,
                                     max_blocks_per_seq=1, logits_indices=[2], num_logits=1,
                                     decode_only=False)
    cache = KVCache.zeros(3, 2, 16, 2, 16, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, c, i, q, m: forward(graphdef, p, c, i, q, m))(
        params, cache, jnp.asarray(ids), jnp.asarray(pos), jax.tree.map(jnp.asarray, md))
    (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    outside = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    body = str(scan.params["jaxpr"])
    assert {"cos", "sin"} <= outside
    assert " cos" not in body and " sin" not in body


def _run_tiny_llama_on_pallas(steps, num_blocks: int):
    """A 2-layer f32 Llama's forward (impl pallas, interpreted here) over `steps` (each
    build_step_inputs' output) on a fresh cache -> ([logits of each step], k cache, v cache)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxpaged.attention import KVCache
    from jaxpaged.config import ModelConfig
    from jaxpaged.models import CausalLM, forward

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16)
    graphdef, params = nnx.split(CausalLM(cfg, jnp.float32, nnx.Rngs(0)))
    cache = KVCache.zeros(2, num_blocks, 16, 2, 16, jnp.float32)
    logits = []
    for ids, pos, md in steps:
        cache, out = forward(graphdef, params, cache, jnp.asarray(ids), jnp.asarray(pos),
                             jax.tree.map(jnp.asarray, md), impl="pallas")
        logits.append(np.asarray(out))
    return logits, np.asarray(cache.k), np.asarray(cache.v)


def test_rope_inside_the_kernels_matches_xla_rope(monkeypatch):
    """JAXPAGED_FUSED_ROPE: the Pallas path (interpreted here) rotating q in the decode kernel and
    k in the KV write gives the logits and cache of rotating both with XLA first, through a
    prefill step and then a decode-only step."""
    import numpy as np

    from jaxpaged.metadata import build_step_inputs

    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    prefill = build_step_inputs(prompts, [0, 0], [[1], [2]], 16, num_tokens=8, num_seqs=2,
                                max_blocks_per_seq=1, logits_indices=[4, 6], num_logits=2)
    decode = build_step_inputs([[9], [10]], [5, 2], [[1], [2]], 16, num_tokens=2, num_seqs=2,
                               max_blocks_per_seq=1, logits_indices=[0, 1], num_logits=2,
                               decode_only=True)
    results = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("JAXPAGED_FUSED_ROPE", fused)
        results[fused] = _run_tiny_llama_on_pallas((prefill, decode), num_blocks=3)
    for got, want in zip(results["1"][0], results["0"][0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Layer 0's values are equal; later layers see the f32 rounding of the rotation upstream.
    np.testing.assert_array_equal(results["1"][2][0], results["0"][2][0])
    for got, want in zip(results["1"][1:], results["0"][1:]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused_rope", ["1", "0"])
def test_kv_write_inside_the_decode_kernel_matches_separate_write(monkeypatch, fused_rope):
    """JAXPAGED_FUSED_KV_WRITE: decode-only steps whose attention kernel writes the step's keys
    and values give the logits and cache of the separate KV-write kernel, over a prefill step
    and two decode steps (the second one's token the first of a new page), with RoPE inside the
    kernels or not."""
    import numpy as np

    from jaxpaged.metadata import build_step_inputs

    monkeypatch.setenv("JAXPAGED_FUSED_ROPE", fused_rope)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [6, 7]]
    steps = [
        build_step_inputs(prompts, [0, 0], [[1], [2]], 16, num_tokens=24, num_seqs=2,
                          max_blocks_per_seq=2, logits_indices=[14, 16], num_logits=2),
        build_step_inputs([[9], [10]], [15, 2], [[1], [2]], 16, num_tokens=2, num_seqs=2,
                          max_blocks_per_seq=2, logits_indices=[0, 1], num_logits=2,
                          decode_only=True),
        build_step_inputs([[11], [12]], [16, 3], [[1, 3], [2]], 16, num_tokens=2, num_seqs=2,
                          max_blocks_per_seq=2, logits_indices=[0, 1], num_logits=2,
                          decode_only=True),
    ]
    results = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("JAXPAGED_FUSED_KV_WRITE", fused)
        results[fused] = _run_tiny_llama_on_pallas(steps, num_blocks=4)
    for got, want in zip(results["1"][0], results["0"][0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(results["1"][1:], results["0"][1:]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The second decode step wrote sequence 0's token 16 into its new page 3.
    assert np.abs(results["1"][1][:, 3, 0]).sum() > 0


def test_kv_write_setting_rejects_other_values(monkeypatch):
    from jaxpaged.attention import fused_kv_write_setting

    monkeypatch.setenv("JAXPAGED_FUSED_KV_WRITE", "yes")
    with pytest.raises(ValueError, match="JAXPAGED_FUSED_KV_WRITE"):
        fused_kv_write_setting()
