"""End to end on SmolLM2: the engine's greedy tokens equal transformers' under every
scheduling regime (batched, one at a time, preemption, chunked prefill, prefix-cache hits),
and sampling, logprobs, stops and bad requests behave as in vLLM."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxpaged import LLM, SamplingParams
from reference import first_layers, hf_first_layers, hf_greedy

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_greedy.json").read_text())
ROWS = GOLDEN["rows"]
PROMPTS = [r["prompt_token_ids"] for r in ROWS]
EXPECTED = [r["output_token_ids"] for r in ROWS]
GREEDY = SamplingParams(temperature=0.0, max_tokens=GOLDEN["meta"]["max_new_tokens"])


# A KV cache of 47 usable blocks: the 17 prompts at full length need 71, so under the
# engine's batch limits (those of the `llm` fixture) some requests are preempted and resumed.
PREEMPTING = dict(num_kv_blocks=48, max_num_seqs=16, max_num_batched_tokens=256,
                  enable_prefix_caching=False)


@pytest.fixture(scope="module")
def make_llm():
    """`LLM(**kwargs)` with this module's defaults. Engines of the default model in f32 share
    one load of its weights (each on its own copy of the `LoadedModel` record, so a test that
    edits its model's config edits only its own); any other model or dtype loads as usual."""
    import jaxpaged.engine

    load_model = jaxpaged.engine.load_model
    weights = load_model(None, dtype="float32")
    cuts = {}

    def make(layers: int | None = None, **kwargs) -> LLM:
        """`layers`: the default model cut to its first `layers` layers (`first_layers`)."""
        kwargs.setdefault("warmup", False)
        kwargs.setdefault("max_model_len", 256)
        kwargs.setdefault("dtype", "float32")
        if layers is not None and layers not in cuts:
            cuts[layers] = first_layers(weights, layers)
        shared = weights if layers is None else cuts[layers]

        def shared_or_load(model=None, **kwargs):
            if model is None and kwargs.get("load_format", "auto") == "auto" and \
                    kwargs.get("dtype") == "float32" and kwargs.get("mesh") is None:
                return dataclasses.replace(shared)
            if layers is not None:
                raise ValueError("layers= cuts the default model in float32 only")
            return load_model(model, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(jaxpaged.engine, "load_model", shared_or_load)
            return LLM(**kwargs)

    return make


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def kv_blocks_in_use(llm: LLM) -> int:
    """Blocks held by requests (freed blocks kept for the prefix cache count as free)."""
    bm = llm.llm_engine.scheduler.block_manager
    return llm.llm_engine.num_kv_blocks - 1 - bm.num_free_blocks


@pytest.fixture(scope="module")
def llm(make_llm):
    return make_llm(max_num_seqs=16, max_num_batched_tokens=256, warmup=True)


@pytest.fixture(scope="module")
def preempting(make_llm):
    """An engine whose small KV cache preempts requests (`PREEMPTING`); shapes as `llm`'s
    except the cache's."""
    return make_llm(**PREEMPTING)


def test_at_least_16_mixed_prompts(llm):
    assert len(PROMPTS) >= 16 and max(map(len, PROMPTS)) >= 100 and min(map(len, PROMPTS)) <= 5


def test_all_at_once_matches_transformers_without_compiling(llm):
    compiled_before = llm.llm_engine.runner.num_compiles_since_warmup
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == EXPECTED
    assert compiled_before == 0 and llm.llm_engine.runner.num_compiles_since_warmup == 0
    assert kv_blocks_in_use(llm) == 0


def test_one_at_a_time_matches_transformers(llm):
    # Short and long raw prompts (104 tokens: a prefill over several blocks) and chats that
    # end at EOS; each request alone in the engine, one step per token.
    picks = [0, 8, 9, 13, 16]
    got = [token_ids(llm.generate([PROMPTS[i]], GREEDY, use_tqdm=False))[0] for i in picks]
    assert got == [EXPECTED[i] for i in picks]


def test_preemption_under_a_tiny_cache_matches_transformers(preempting):
    preemptions = preempting.llm_engine.scheduler.num_preemptions
    outputs = preempting.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert preempting.llm_engine.scheduler.num_preemptions > preemptions
    assert token_ids(outputs) == EXPECTED
    assert kv_blocks_in_use(preempting) == 0


def test_seeded_sampling_is_the_same_with_preemption(llm, preempting):
    """A preempted request resumes with its own seed and output position: the engine keeps
    each completion's sampler inputs across steps, and they must stay right across a resume."""
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, min_tokens=4, max_tokens=24)
    want = token_ids(llm.generate(PROMPTS, params, use_tqdm=False))
    preemptions = preempting.llm_engine.scheduler.num_preemptions
    got = token_ids(preempting.generate(PROMPTS, params, use_tqdm=False))
    assert preempting.llm_engine.scheduler.num_preemptions > preemptions
    assert got == want


def test_chunked_prefill_matches_transformers(make_llm):
    # max_num_seqs as `llm`'s, so the steps' shapes are ones its warm-up compiled.
    llm = make_llm(max_num_seqs=16, max_num_batched_tokens=16)
    longest = max(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    picks = [longest, 0, 8, 9]
    outputs = llm.generate([PROMPTS[i] for i in picks], GREEDY, use_tqdm=False)
    assert len(PROMPTS[longest]) > 16 * 4  # the prompt really is split into many chunks
    assert token_ids(outputs) == [EXPECTED[i] for i in picks]


def test_shared_system_prompt_hits_the_prefix_cache(llm):
    chat = [i for i, r in enumerate(ROWS) if r["kind"] == "chat"]
    stats_before = llm.llm_engine.scheduler.get_stats()
    first = llm.generate([PROMPTS[chat[0]]], GREEDY, use_tqdm=False)
    rest = llm.generate([PROMPTS[i] for i in chat[1:]], GREEDY, use_tqdm=False)
    stats = llm.llm_engine.scheduler.get_stats()
    assert stats.prefix_cache_hits > stats_before.prefix_cache_hits
    assert all(o.num_cached_tokens > 0 for o in rest)
    assert token_ids(first + rest) == [EXPECTED[i] for i in chat]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    alone = llm.generate([PROMPTS[9]], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(PROMPTS[:12], [GREEDY] * 9 + [params] + [GREEDY] * 2, use_tqdm=False)
    assert batch[9].outputs[0].token_ids == alone
    assert alone != EXPECTED[9][:len(alone)]  # it really sampled


def test_n_3_gives_three_distinct_completions(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(n=3, temperature=1.0, seed=7,
                                                     max_tokens=16), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 16 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert kv_blocks_in_use(llm) == 0


def test_logprobs_match_log_softmax_of_transformers_logits(llm, hf_smollm2):
    prompt = PROMPTS[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=5,
                                                prompt_logprobs=3), use_tqdm=False)[0]
    comp = out.outputs[0]
    full = prompt + comp.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([full])).logits[0].float(), -1).numpy()
    for i, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert set(lp) >= set(np.argsort(-row)[:5].tolist())
        for t, entry in lp.items():
            assert entry.logprob == pytest.approx(row[t], abs=1e-3)
    assert comp.cumulative_logprob == pytest.approx(
        sum(ref[len(prompt) - 1 + i, t] for i, t in enumerate(comp.token_ids)), abs=1e-2)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert out.prompt_logprobs[i][prompt[i]].logprob == pytest.approx(
            ref[i - 1, prompt[i]], abs=1e-3)


def test_stop_strings_and_stop_ids_finish_with_the_right_reason(llm):
    tok = llm.get_tokenizer()
    text = tok.decode(EXPECTED[0])  # " Paris.\n\nThe answer is: ..."
    stop_str = text[3:9]  # spans token boundaries
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=32,
                                                    stop=[stop_str]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", stop_str)
    assert comp.text == text[:3]
    stop_id = EXPECTED[1][5]
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=32,
                                                    stop_token_ids=[stop_id]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", stop_id)
    assert comp.token_ids == EXPECTED[1][:EXPECTED[1].index(stop_id) + 1]
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=5),
                       use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5


def test_bad_requests_fail_alone_and_the_batch_completes(llm):
    vocab = llm.llm_engine.model.config.vocab_size
    prompts = [PROMPTS[0], list(range(1, 300)), [], [5, vocab + 3], PROMPTS[1], PROMPTS[3]]
    params = [GREEDY] * 5 + [{"temperature": -1.0}]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    reasons = [o.outputs[0].finish_reason for o in outputs]
    assert reasons[1:4] == ["error"] * 3 and reasons[5] == "error"
    assert "max_model_len" in outputs[1].error or "256" in outputs[1].error
    assert "empty" in outputs[2].error
    assert "vocabulary" in outputs[3].error
    assert "temperature" in outputs[5].error
    assert token_ids([outputs[0], outputs[4]]) == [EXPECTED[0], EXPECTED[1]]
    assert not llm.llm_engine.has_unfinished_requests()


def test_streaming_engine_abort_frees_blocks(llm):
    engine = llm.llm_engine
    engine.add_request("a", PROMPTS[8], SamplingParams(temperature=0, max_tokens=32))
    engine.add_request("b", PROMPTS[9], SamplingParams(temperature=0, max_tokens=32))
    seen = []
    for _ in range(3):
        seen += engine.step()
    engine.abort_request("a")
    finals = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = o
    assert finals["a"].outputs[0].finish_reason == "abort"
    assert finals["b"].outputs[0].token_ids == EXPECTED[9]
    assert any(o.request_id == "b" and not o.finished for o in seen)
    assert kv_blocks_in_use(llm) == 0
    engine.scheduler.block_manager.check_invariants([])


# The GPU-path tests below run the Pallas kernels in the interpreter on SmolLM2 cut to its first
# CUT_LAYERS layers: they check how the engine wires its kernels (layer indices, slots, positions,
# windows, frozen rows), which two layers show as well as thirty, in a fraction of the time. Their
# reference is transformers' greedy tokens for the same cut model, computed here.
CUT_LAYERS = 2
CUT_PICKS = (0, 9, 3)


@pytest.fixture(scope="module")
def cut_expected(hf_smollm2) -> dict[int, list[int]]:
    """Prompt index -> transformers' 8 greedy tokens for it on the cut model."""
    cut = hf_first_layers(hf_smollm2, CUT_LAYERS)
    tokens = hf_greedy(cut, [PROMPTS[i] for i in CUT_PICKS], 8, GOLDEN["meta"]["eos_token_id"])
    return dict(zip(CUT_PICKS, tokens))


def test_pallas_kernels_in_the_engine_match_transformers(make_llm, cut_expected):
    """The GPU attention path (interpreted on the CPU) inside the engine: decode-only steps use
    the decode kernel, mixed steps the ragged kernel, writes go through the KV-write kernel."""
    llm = make_llm(layers=CUT_LAYERS, attention_impl="pallas", num_kv_blocks=24,
                   max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64)
    picks = [0, 9, 3]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    outputs = llm.generate([PROMPTS[i] for i in picks], params, use_tqdm=False)
    assert token_ids(outputs) == [cut_expected[i] for i in picks]


def test_stacked_matmul_in_the_engine_matches_transformers(make_llm, monkeypatch,
                                                           cut_expected):
    """JAXPAGED_STACKED_MATMUL=1: decode steps read each layer's projections in place from the
    stacked weights (pallas_kernels.stacked_matmul, interpreted here), same greedy tokens, and
    warm-up still compiles every program the steps use (one token bucket: the prompts go in
    chunks of 16, and warm-up compiles two prefill programs, not six)."""
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "1")
    llm = make_llm(layers=CUT_LAYERS, attention_impl="pallas", num_kv_blocks=24,
                   max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16, warmup=True)
    assert llm.llm_engine.runner.stacked_matmul
    picks = [0, 9]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outputs = llm.generate([PROMPTS[i] for i in picks], params, use_tqdm=False)
    assert token_ids(outputs) == [cut_expected[i][:6] for i in picks]
    assert llm.llm_engine.runner.num_compiles_since_warmup == 0


def test_multi_step_with_the_gpu_kernels_matches_transformers(make_llm, monkeypatch,
                                                              cut_expected):
    """A multi-step program on the GPU path (interpreted): the decode kernel, the KV-write
    kernel and the stacked projections, in an unrolled decode step, inside the window's loop."""
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "1")
    llm = make_llm(layers=CUT_LAYERS, attention_impl="pallas", num_kv_blocks=24,
                   max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                   num_scheduler_steps=3)
    assert llm.llm_engine.runner.unrolls(True)
    windows = _watch_windows(llm.llm_engine)
    picks = [0, 9]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    outputs = llm.generate([PROMPTS[i] for i in picks], params, use_tqdm=False)
    assert token_ids(outputs) == [cut_expected[i] for i in picks]
    assert windows.count(3) == 2


@pytest.mark.parametrize("fused_write", ["1", "0"])
def test_kv_write_inside_the_decode_kernel_matches_transformers(make_llm, monkeypatch,
                                                                cut_expected, fused_write):
    """JAXPAGED_FUSED_KV_WRITE in multi-step windows on the GPU path (interpreted): requests of
    different lengths, so rows freeze inside a window (no slot: they read their last position
    from the cache) while the others write and attend their new token in the kernel ("1", the
    default) or in the separate KV-write kernel first ("0")."""
    monkeypatch.setenv("JAXPAGED_STACKED_MATMUL", "1")
    monkeypatch.setenv("JAXPAGED_FUSED_KV_WRITE", fused_write)
    llm = make_llm(layers=CUT_LAYERS, attention_impl="pallas", num_kv_blocks=24,
                   max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                   num_scheduler_steps=3)
    picks, lengths = [0, 9, 3], [8, 5, 7]
    outputs = llm.generate([PROMPTS[i] for i in picks],
                           [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths],
                           use_tqdm=False)
    assert token_ids(outputs) == [cut_expected[i][:n] for i, n in zip(picks, lengths)]
    assert kv_blocks_in_use(llm) == 0


def test_bfloat16_logits_reach_the_sampler_as_compiled(make_llm):
    """A bf16 model's forward leaves its logits in bf16 (the sampler widens them): warm-up
    compiles the samplers for that dtype, so serving (logprobs included) compiles nothing new.
    (One token bucket, enough for the two prompts: warm-up compiles three forwards.)"""
    llm = make_llm(dtype="bfloat16", num_kv_blocks=24, max_model_len=128, max_num_seqs=4,
                   max_num_batched_tokens=16, warmup=True)
    runner = llm.llm_engine.runner
    shape = runner.bucket_shapes()[0]
    out_logits = runner.lower_forward(shape).out_info[1]
    assert str(out_logits.dtype) == "bfloat16"
    outputs = llm.generate([PROMPTS[0], PROMPTS[3]],
                           SamplingParams(temperature=0.0, max_tokens=4, logprobs=2),
                           use_tqdm=False)
    assert runner.num_compiles_since_warmup == 0
    assert [len(out.outputs[0].token_ids) for out in outputs] == [4, 4]
    assert all(np.isfinite(lp.logprob) for out in outputs for top in out.outputs[0].logprobs
               for lp in top.values())


def test_activation_reserve_counts_a_shards_columns():
    """Under tensor parallelism a device's reserve shrinks by the head and MLP columns other
    shards hold (llama-3.1-70b at tp 4: 1.66 GB), keeps the gathered logits whole, and keeps
    the whole MLP where its width does not split (llama-3.1-8b's 14336 over 3 shards)."""
    import dataclasses
    from types import SimpleNamespace

    from jaxpaged.config import PRESETS
    from jaxpaged.engine import LLMEngine
    from jaxpaged.sharding import padded_head_counts

    def reserve(model: str, tp: int, T: int = 8192) -> int:
        # The engine sees the config shard_model made: heads padded to split over tp.
        N, K = padded_head_counts(PRESETS[model], tp)
        config = dataclasses.replace(PRESETS[model], num_attention_heads=N, num_key_value_heads=K)
        engine = SimpleNamespace(model=SimpleNamespace(config=config, dtype="bfloat16"),
                                 max_num_batched_tokens=T,
                                 config=SimpleNamespace(tensor_parallel_size=tp))
        return LLMEngine._activation_reserve(engine)

    assert reserve("llama-3.1-70b", 1) - reserve("llama-3.1-70b", 4) == pytest.approx(1.66e9,
                                                                                     rel=0.01)
    # 8B at tp 2: its 6144 head columns and 28672 MLP columns halve. At tp 3 the heads are
    # padded to 36 + 2 * 9 (6912 columns, a third each) and the MLP, replicated, stays whole.
    T = 8192
    full = reserve("llama-3.1-8b", 1)
    assert full - reserve("llama-3.1-8b", 2) == 2 * T * (6144 + 28672) // 2 * 2
    assert full - reserve("llama-3.1-8b", 3) == 2 * T * (6144 - 6912 // 3) * 2


def test_models_with_several_eos_ids_stop_on_each(make_llm):
    llm = make_llm(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
    engine = llm.llm_engine
    engine.model.config = __import__("dataclasses").replace(engine.model.config,
                                                             eos_token_ids=(2, 7, 9))
    engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=4, stop_token_ids=[7]))
    engine.add_request("y", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    requests = engine.scheduler.requests
    assert requests["x#0"].sampling_params.stop_token_ids == [7, 9]
    assert requests["y#0"].sampling_params.stop_token_ids == []
    engine.abort_request(["x", "y"])
    while engine.has_unfinished_requests():
        engine.step()


def _watch_run_ahead(engine) -> list[bool]:
    """Per fetched step: whether the next step was already dispatched (async scheduling)."""
    ran_ahead, fetch = [], engine.runner.fetch

    def watched(handle):
        ran_ahead.append(engine._pending is not None)
        return fetch(handle)

    engine.runner.fetch = watched
    return ran_ahead


def test_async_scheduling_runs_ahead_and_matches_one_step_at_a_time(llm, make_llm):
    """With async scheduling (the default) step N + 1 is dispatched before step N is waited
    for; seeded sampling (output positions, min_tokens), logprobs, stops and greedy decoding
    give what an engine running one step at a time gives. A request with penalties needs
    every earlier token on the host, so while it lives the engine runs one step at a time."""
    sync = make_llm(max_num_seqs=16, max_num_batched_tokens=256, async_scheduling=False)
    eos = llm.llm_engine.model.config.eos_token_ids[0]
    params = [SamplingParams(temperature=1.0, seed=5, max_tokens=20, min_tokens=12,
                             stop_token_ids=[EXPECTED[0][3]]),
              SamplingParams(temperature=0.9, top_k=20, seed=9, max_tokens=20, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=32, stop=["\n"]),
              GREEDY, GREEDY, SamplingParams(temperature=0.7, seed=3, max_tokens=24)]
    prompts = [PROMPTS[i] for i in (0, 1, 2, 9, 12, 15)]
    engine = llm.llm_engine
    ran_ahead = _watch_run_ahead(engine)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        steps = len(ran_ahead)
        penalized = llm.generate([PROMPTS[3]], SamplingParams(
            temperature=0.0, max_tokens=12, repetition_penalty=1.5), use_tqdm=False)
    finally:
        del engine.runner.fetch
    want = sync.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(want)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    for a, b in zip(got[1].outputs[0].logprobs, want[1].outputs[0].logprobs, strict=True):
        assert a.keys() == b.keys()
        assert [a[t].logprob for t in a] == pytest.approx([b[t].logprob for t in a], abs=1e-4)
    assert len(got[0].outputs[0].token_ids) >= 12 and eos not in got[0].outputs[0].token_ids[:12]
    assert token_ids(got)[3:5] == [EXPECTED[9], EXPECTED[12]]
    assert sum(ran_ahead[:steps]) > steps // 2  # most steps overlapped the next one
    assert ran_ahead[steps:] == [False] * 12  # the penalized request ran one step at a time
    assert token_ids(penalized) == token_ids(sync.generate(
        [PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.5),
        use_tqdm=False))
    assert kv_blocks_in_use(llm) == 0 and kv_blocks_in_use(sync) == 0


def test_the_garbage_collector_runs_less_often_once_an_engine_exists(llm):
    import gc

    from jaxpaged.engine import GC_GEN0_THRESHOLD

    assert gc.get_threshold()[0] >= GC_GEN0_THRESHOLD


def test_a_dispatch_thread_gives_the_same_outputs(llm, make_llm, monkeypatch):
    """JAXPAGED_DISPATCH_THREAD=1: each step's jitted calls run on one worker thread, in
    order, while the calling thread plans and applies steps; greedy tokens under preemption,
    seeded samples, logprobs and prompt logprobs equal the engine's without it."""
    import sys
    import threading

    monkeypatch.setenv("JAXPAGED_DISPATCH_THREAD", "1")
    interval = sys.getswitchinterval()
    try:
        threaded = make_llm(**PREEMPTING)
        assert sys.getswitchinterval() == pytest.approx(200e-6, abs=2e-6)
        runner = threaded.llm_engine.runner
        launching_threads, launch = set(), runner._launch

        def watched(*args):
            launching_threads.add(threading.get_ident())
            return launch(*args)

        runner._launch = watched
        outputs = threaded.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert threaded.llm_engine.scheduler.num_preemptions > 0
        assert token_ids(outputs) == EXPECTED
        params = [SamplingParams(temperature=0.8, seed=11, max_tokens=10, logprobs=2),
                  SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=1)]
        got = threaded.generate([PROMPTS[1], PROMPTS[4]], params, use_tqdm=False)
    finally:
        sys.setswitchinterval(interval)
    want = llm.generate([PROMPTS[1], PROMPTS[4]], params, use_tqdm=False)
    assert len(launching_threads) == 1 and threading.get_ident() not in launching_threads
    assert token_ids(got) == token_ids(want)
    for a, b in zip(got[0].outputs[0].logprobs, want[0].outputs[0].logprobs, strict=True):
        assert a.keys() == b.keys()
        assert [a[t].logprob for t in a] == pytest.approx([b[t].logprob for t in a], abs=1e-4)
    got_plp, want_plp = got[1].prompt_logprobs, want[1].prompt_logprobs
    assert len(got_plp) == len(want_plp) == len(PROMPTS[4])
    assert [next(iter(d)) if d else None for d in got_plp] == \
        [next(iter(d)) if d else None for d in want_plp]
    assert kv_blocks_in_use(threaded) == 0


def test_a_failing_launch_on_the_dispatch_thread_raises_from_generate(make_llm, monkeypatch):
    """An error in a step's jitted calls on the dispatch thread reaches the caller when the
    step is fetched, as it reached it from dispatch without the thread."""
    import sys

    monkeypatch.setenv("JAXPAGED_DISPATCH_THREAD", "1")
    interval = sys.getswitchinterval()
    try:
        # `llm`'s limits: the steps' programs are compiled already.
        llm = make_llm(max_num_seqs=16, max_num_batched_tokens=256)
        runner, calls = llm.llm_engine.runner, []
        run_forward = runner._run_forward

        def failing(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("device lost")
            return run_forward(*args)

        runner._run_forward = failing
        with pytest.raises(RuntimeError, match="device lost"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    finally:
        sys.setswitchinterval(interval)


def test_the_dispatch_thread_setting(monkeypatch):
    from jaxpaged.runner import dispatch_thread_setting, switch_interval_setting

    monkeypatch.delenv("JAXPAGED_DISPATCH_THREAD", raising=False)
    assert dispatch_thread_setting() is False  # unset: on for a GPU backend only
    monkeypatch.setenv("JAXPAGED_DISPATCH_THREAD", "1")
    assert dispatch_thread_setting() is True
    monkeypatch.setenv("JAXPAGED_DISPATCH_THREAD", "yes")
    with pytest.raises(ValueError, match="JAXPAGED_DISPATCH_THREAD='yes'"):
        dispatch_thread_setting()
    monkeypatch.setenv("JAXPAGED_SWITCH_INTERVAL_US", "50")
    assert switch_interval_setting() == pytest.approx(50e-6)
    monkeypatch.setenv("JAXPAGED_SWITCH_INTERVAL_US", "0")
    with pytest.raises(ValueError, match="must be > 0"):
        switch_interval_setting()
    monkeypatch.setenv("JAXPAGED_SWITCH_INTERVAL_US", "fast")
    with pytest.raises(ValueError, match="JAXPAGED_SWITCH_INTERVAL_US='fast'"):
        switch_interval_setting()


# -- multi-step decoding (num_scheduler_steps > 1) ---------------------------------------------


@pytest.fixture(scope="module")
def multi_step(make_llm):
    return make_llm(max_num_seqs=16, max_num_batched_tokens=256, warmup=True,
                    num_scheduler_steps=4)


def _watch_windows(engine) -> list[int]:
    """The num_steps of every output the engine's scheduler plans from now on."""
    windows, schedule = [], engine.scheduler.schedule

    def watched():
        out = schedule()
        windows.append(out.num_steps)
        return out

    engine.scheduler.schedule = watched
    return windows


def test_multi_step_greedy_matches_transformers_without_compiling(multi_step):
    engine = multi_step.llm_engine
    windows = _watch_windows(engine)
    try:
        outputs = multi_step.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        del engine.scheduler.schedule
    assert token_ids(outputs) == EXPECTED
    assert windows.count(4) >= 4 and set(windows) == {1, 4}
    assert engine.runner.num_compiles_since_warmup == 0
    assert kv_blocks_in_use(multi_step) == 0


def test_multi_step_gives_what_single_steps_give(llm, multi_step):
    """Seeded sampling (top-k, top-p, min_tokens), stop strings and ids inside a window,
    max_tokens shorter than a window, n > 1, and a request with logprobs (which plans single
    steps while it lives): the same tokens, texts and finish reasons as one step at a time."""
    text = llm.get_tokenizer().decode(EXPECTED[0])
    params = [SamplingParams(temperature=1.0, seed=5, max_tokens=20, min_tokens=6,
                             stop_token_ids=[EXPECTED[0][3]]),
              SamplingParams(temperature=0.9, top_k=20, top_p=0.8, seed=9, max_tokens=22),
              SamplingParams(temperature=0.0, max_tokens=32, stop=[text[14:20]]),
              SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[EXPECTED[1][9]]),
              SamplingParams(temperature=0.0, max_tokens=2), SamplingParams(temperature=0.0,
                                                                             max_tokens=7),
              SamplingParams(temperature=0.8, n=2, seed=3, max_tokens=17), GREEDY]
    prompts = [PROMPTS[i] for i in (0, 4, 0, 1, 2, 3, 5, 6)]
    engine = multi_step.llm_engine
    windows = _watch_windows(engine)
    try:
        got = multi_step.generate(prompts, params, use_tqdm=False)
        first_run = len(windows)
        # The request with logprobs outlives the others (they end within 22 tokens): no
        # window at all.
        mixed = (prompts[:3] + [PROMPTS[7]],
                 params[:3] + [SamplingParams(temperature=0.0, max_tokens=24, logprobs=2,
                                              ignore_eos=True)])
        with_logprobs = multi_step.generate(*mixed, use_tqdm=False)
    finally:
        del engine.scheduler.schedule
    want = llm.generate(prompts, params, use_tqdm=False)
    assert windows[:first_run].count(4) >= 3 and windows[first_run:].count(4) == 0
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        assert [c.text for c in g.outputs] == [c.text for c in w.outputs]
        assert [(c.finish_reason, c.stop_reason) for c in g.outputs] == \
            [(c.finish_reason, c.stop_reason) for c in w.outputs]
    assert got[2].outputs[0].stop_reason == text[14:20]
    assert got[3].outputs[0].stop_reason == EXPECTED[1][9]
    assert token_ids(with_logprobs) == token_ids(llm.generate(*mixed, use_tqdm=False))
    assert len(with_logprobs[3].outputs[0].logprobs) == 24
    assert kv_blocks_in_use(multi_step) == 0


def test_multi_step_under_preemption_matches_transformers(make_llm):
    llm = make_llm(**PREEMPTING, num_scheduler_steps=3)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == EXPECTED
    assert kv_blocks_in_use(llm) == 0


def test_multi_step_streams_cumulative_outputs_and_aborts_mid_window(multi_step):
    """The streaming engine under windows of 4: each report extends the last by 1 to 4 tokens
    (text with them), the completions end as transformers', and an abort while a window is in
    flight finishes that request alone and frees its blocks."""
    engine = multi_step.llm_engine
    for name, i in (("a", 8), ("b", 9), ("c", 10)):
        engine.add_request(name, PROMPTS[i], SamplingParams(temperature=0, max_tokens=32))
    reports: dict[str, list] = {"a": [], "b": [], "c": []}
    step = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            reports[o.request_id].append(o)
        step += 1
        if step == 4:
            engine.abort_request("c")
    tok = multi_step.get_tokenizer()
    for name, i in (("a", 8), ("b", 9)):
        lens = [len(o.outputs[0].token_ids) for o in reports[name]]
        assert all(1 <= b - a <= 4 for a, b in zip(lens, lens[1:])) and max(
            b - a for a, b in zip(lens, lens[1:])) == 4
        final = reports[name][-1]
        assert final.finished and final.outputs[0].token_ids == EXPECTED[i]
        assert final.outputs[0].text == tok.decode(EXPECTED[i], skip_special_tokens=True)
        texts = [o.outputs[0].text for o in reports[name]]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    aborted = reports["c"][-1]
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert aborted.outputs[0].token_ids == EXPECTED[10][:len(aborted.outputs[0].token_ids)]
    assert kv_blocks_in_use(multi_step) == 0
    engine.scheduler.block_manager.check_invariants([])


def test_num_scheduler_steps_is_checked_and_defaults_per_platform(llm, multi_step):
    import argparse

    from jaxpaged.engine_config import EngineConfig
    from jaxpaged.serve import add_cli_args, engine_config_from_args

    for bad in (0, -2, 1.5, "4"):
        with pytest.raises(ValueError, match=f"num_scheduler_steps={bad!r}"):
            EngineConfig(num_scheduler_steps=bad)
    assert EngineConfig().num_scheduler_steps is None  # the engine picks: 1 on the CPU
    engine = llm.llm_engine
    assert engine.num_scheduler_steps == 1 and engine.runner.num_scheduler_steps == 1
    assert multi_step.llm_engine.scheduler.config.num_scheduler_steps == 4
    args = add_cli_args(argparse.ArgumentParser()).parse_args(["--num-scheduler-steps", "3"])
    assert engine_config_from_args(args).num_scheduler_steps == 3
