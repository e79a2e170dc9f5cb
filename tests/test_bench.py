"""jaxpaged-bench: argument parsing, the pure parts (length samplers, contiguous allocator, KV
waste accounting, tables) and tiny end-to-end runs on a 2-layer dummy model. No timings are
asserted: benchmarks measure, tests check that what they report is well-formed."""

import json

import numpy as np
import pytest

from jaxpaged import bench
from jaxpaged.bench_batching import (ContiguousAllocator, KVWaste, region_blocks,
                                     run_scheduler)
from jaxpaged.bench_common import (StepRecorder, capped_exponential, format_table,
                                   jsonl_workload, length_range, percentiles,
                                   random_workload)

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}
TINY_ENGINE = ["--load-format", "dummy", "--max-num-seqs", "4", "--max-num-batched-tokens",
               "16", "--max-model-len", "64"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(TINY))
    return str(path)


# -- argument parsing ------------------------------------------------------------------------


def parse(*argv: str):
    args = bench.build_parser().parse_args(argv)
    bench.validate(args)
    return args


def test_throughput_defaults_follow_vllm():
    args = parse("throughput", "--model", "llama-3.2-1b", "--load-format", "dummy")
    assert (args.input_len, args.output_len, args.num_prompts) == (512, 256, 512)
    assert args.dataset == "random" and args.range_ratio == 0.0 and not args.ignore_eos
    assert args.compare is None and args.roofline and args.enable_prefix_caching


def test_engine_flags_and_compare():
    args = parse("throughput", "--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
                 "--num-kv-blocks", "100", "--dtype", "bfloat16", "--block-size", "32",
                 "--compare", "hf", "--hf-modes", "generate", "--no-enable-prefix-caching")
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.num_kv_blocks) == (256, 8192, 100)
    assert args.dtype == "bfloat16" and args.block_size == 32 and not args.enable_prefix_caching
    assert args.compare == "hf" and args.hf_modes == ["generate"]


def test_dummy_without_model_means_smollm2_shapes():
    assert parse("latency", "--load-format", "dummy").model == "smollm2-135m"


def test_batching_lists():
    args = parse("batching", "--caps", "32,1536", "--schedulers", "paged,reserve")
    assert args.caps == [32, 1536] and args.schedulers == ["paged", "reserve"]
    assert parse("batching").caps == [32, 128, 512, 1536]


@pytest.mark.parametrize("argv", [
    ("throughput", "--num-prompts", "0"),
    ("throughput", "--range-ratio", "1.5"),
    ("throughput", "--hf-modes", "generate,vllm"),
    ("throughput", "--compare", "vllm"),
    ("throughput", "--hf-cb-config", "{block_size: 16}"),
    ("throughput", "--hf-cb-config", "[16]"),
    ("batching", "--caps", "32,x"),
    ("batching", "--schedulers", "fifo"),
    ("latency", "--temperature", "-1"),
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert "error:" in capsys.readouterr().err


def test_serving_is_mounted_only_when_its_module_exists(monkeypatch):
    monkeypatch.setattr(bench, "_serving_module", lambda: None)
    sub = next(a for a in bench.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"throughput", "latency", "batching", "summary"}


def test_serving_that_cannot_import_says_why(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_serving_module", lambda: "No module named 'httpx'")
    with pytest.raises(SystemExit):
        bench.main(["serving"])
    assert "httpx" in capsys.readouterr().err


# -- workloads and statistics ------------------------------------------------------------------


def test_length_range_is_vllms():
    assert length_range(562, 0.822) == (100, 1024)
    assert length_range(256, 0.0) == (256, 256)
    with pytest.raises(ValueError, match="range-ratio"):
        length_range(10, 1.0)


def test_random_workload_lengths_and_tokens():
    w = random_workload(200, 100, 50, 0.5, vocab_size=512, seed=1)
    assert all(50 <= len(p) <= 150 for p in w.prompts)
    assert all(25 <= n <= 75 for n in w.output_lens)
    assert all(0 <= t < 512 for p in w.prompts for t in p)
    assert w == random_workload(200, 100, 50, 0.5, vocab_size=512, seed=1)
    assert w.head(3).prompts == w.prompts[:3]


def test_jsonl_workload(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt_token_ids": [5, 6, 7], "output_len": 3}\n\n'
                    '{"prompt": "hi there"}\n{"prompt_token_ids": [9]}\n')
    w = jsonl_workload(str(path), 2, 8, tokenize=lambda text: [len(text)])
    assert w.prompts == [[5, 6, 7], [8]] and w.output_lens == [3, 8]
    with pytest.raises(ValueError, match="tokenizer"):
        jsonl_workload(str(path), 3, 8, tokenize=None)


def test_capped_exponential():
    lens = capped_exponential(20000, 128, 32, seed=0)
    assert min(lens) >= 1 and max(lens) == 32
    # ceil(x) >= 32 iff x > 31: the cap holds P(X > 31) = exp(-31/128) of the draws.
    assert np.mean(np.array(lens) == 32) == pytest.approx(np.exp(-31 / 128), abs=0.02)
    uncapped = capped_exponential(20000, 128, 10**9, seed=0)
    assert np.mean(uncapped) == pytest.approx(128.5, rel=0.03)  # ceil adds half a token
    assert lens == capped_exponential(20000, 128, 32, seed=0)
    # The same seed draws the same lengths: a larger cap only clips fewer of them.
    assert np.array_equal(np.minimum(uncapped, 32), lens)
    with pytest.raises(ValueError):
        capped_exponential(10, 0, 32, seed=0)


def test_percentiles_and_table():
    p = percentiles([1.0, 2.0, 3.0, 4.0])
    assert p["p50"] == 2.5 and p["mean"] == 2.5 and p["p99"] <= 4.0
    table = format_table(["a", "b"], [(1, 2.5), ("x", None)])
    assert table.splitlines()[0].startswith("| a") and "| -" in table.splitlines()[3]


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.2-1b", "qwen3-0.6b"])
def test_hf_peer_has_the_presets_architecture(preset):
    import torch
    import transformers

    from jaxpaged.bench_hf import dummy_model_config, hf_config_dict
    from jaxpaged.config import PRESETS

    d = hf_config_dict(dummy_model_config(preset))
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in hf.parameters()) == PRESETS[preset].num_params


def test_static_hf_peer_is_timed_after_a_full_batch_of_warm_up():
    """The first batch runs once, untimed, at its real shapes (on an H100 a cold first batch
    took 4x a warm one); every batch is then timed, and each request gets its own length."""
    from jaxpaged.bench_common import Workload
    from jaxpaged.bench_hf import load_hf_model, run_static

    hf = load_hf_model("smollm2-135m", "dummy", "float32", "cpu")
    calls = []
    generate = hf.generate
    hf.generate = lambda *a, **kw: calls.append(a[0].shape) or generate(*a, **kw)
    work = Workload([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]], [3, 2, 4, 1, 2])
    tokens: list[list[int]] = []
    r = run_static(hf, work, batch_size=2, temperature=0.0, device="cpu", progress=False,
                   tokens=tokens)
    assert calls[0] == calls[1] == (2, 3)  # the warm-up is the first batch itself
    assert len(calls) == 4 and len(r["batch_s"]) == 3 and r["warmup_s"] > 0
    assert [len(t) for t in tokens] == work.output_lens
    assert r["output_tokens_per_s"] == pytest.approx(sum(work.output_lens) / r["elapsed_s"])


# -- the no-paging allocator and the waste accounting -------------------------------------------


def test_contiguous_allocator_first_fit_and_fragmentation():
    alloc = ContiguousAllocator(12)
    assert alloc.allocate("a", 4) and alloc.allocate("b", 4) and alloc.allocate("c", 4)
    assert not alloc.allocate("d", 1)
    alloc.free("b")
    assert not alloc.allocate("d", 5)  # 4 free blocks, but not contiguous enough
    assert alloc.allocate("e", 3) and alloc.regions["e"] == (4, 3)
    alloc.free("a")
    assert alloc.allocate("f", 4) and alloc.regions["f"] == (0, 4)
    assert alloc.reserved_blocks == 11 and not alloc.allocate("g", 2)
    with pytest.raises(ValueError):
        alloc.allocate("h", 0)


def test_kv_waste():
    waste = KVWaste()
    assert waste.fraction == 0.0
    waste.add(reserved=100, used=90)
    waste.add(reserved=100, used=70)
    assert waste.fraction == pytest.approx(0.2)
    with pytest.raises(ValueError):
        waste.add(reserved=10, used=11)
    assert region_blocks(512, 1536, 16) == 128 and region_blocks(512, 1, 16) == 33


# -- end to end on a 2-layer model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tiny_model):
    from jaxpaged import LLM

    return LLM(tiny_model, load_format="dummy", max_num_seqs=4, max_num_batched_tokens=16,
               max_model_len=64, num_kv_blocks=9, enable_prefix_caching=False)


@pytest.mark.parametrize("name", ["static", "reserve", "paged"])
def test_schedulers_serve_every_request(tiny_llm, name):
    engine = tiny_llm.llm_engine
    prompts = random_workload(10, 12, 1, 0.0, 512, seed=0).prompts
    lens = capped_exponential(10, 6, 16, seed=0)
    stats = run_scheduler(engine, name, prompts, lens, cap=16)
    assert stats.output_tokens == sum(lens)
    assert not engine.has_unfinished_requests()
    assert 1 <= stats.max_batch <= 4 and 0.0 < stats.waste.fraction < 1.0
    if name != "paged":  # 8 blocks hold 4 regions of ceil((12 + 16) / 16) = 2 blocks
        assert stats.max_batch <= 4 and stats.num_preemptions == 0
    assert engine.scheduler.block_manager.num_free_blocks == engine.num_kv_blocks - 1
    # The step times split into prefilling and decode-only steps, about the whole run's time
    # (the loop's own bookkeeping between steps is the rest).
    row = stats.row()
    assert row["num_mixed_steps"] >= 1 and row["mixed_steps_s"] > 0
    assert 0 <= row["decode_only_under_16_seqs_s"] <= row["decode_only_steps_s"]
    assert row["mixed_steps_s"] + row["decode_only_steps_s"] <= stats.elapsed_s


def test_step_recorder_sees_every_step_and_uninstalls(tiny_llm):
    from jaxpaged import SamplingParams

    engine = tiny_llm.llm_engine
    recorder = StepRecorder(engine)
    prompts = random_workload(3, 20, 1, 0.0, 512, seed=2).prompts
    tiny_llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    recorder.uninstall()
    assert not {"step", "dispatch", "fetch", "schedule"} & (
        set(vars(engine)) | set(vars(engine.runner)) | set(vars(engine.scheduler)))
    # Every prompt token and the 3 tokens fed back per request (the 4th is never fed).
    assert sum(s.num_tokens for s in recorder.steps) == 60 + 3 * 3
    decode = recorder.decode_steps()
    assert decode and all(s.num_tokens == s.num_seqs <= 3 for s in decode)
    assert max(s.context_tokens for s in decode) <= 3 * (20 + 3)
    assert recorder.decode_steps(num_seqs=1) == [s for s in decode if s.num_seqs == 1]
    assert 0 < recorder.peak_kv_usage <= 1
    assert all(0 < s.dispatch_seconds and 0 <= s.wait_seconds
               and s.dispatch_seconds + s.wait_seconds <= s.seconds for s in recorder.steps)
    # The forward's jit call is part of dispatch, and every step made one.
    assert all(0 < s.forward_seconds <= s.dispatch_seconds for s in recorder.steps)


def test_step_recorder_counts_each_step_of_a_multi_step_output(tiny_model):
    from jaxpaged import LLM, SamplingParams

    llm = LLM(tiny_model, load_format="dummy", max_num_seqs=4, max_num_batched_tokens=16,
              max_model_len=64, num_kv_blocks=9, num_scheduler_steps=3)
    engine = llm.llm_engine
    recorder = StepRecorder(engine)
    prompts = random_workload(3, 5, 1, 0.0, 512, seed=2).prompts  # one prefill step
    llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    recorder.uninstall()
    assert "_run_multi_step" not in vars(engine.runner)
    # Every prompt token and the 7 tokens fed back per request, a window's as one a step.
    assert sum(s.num_tokens for s in recorder.steps) == 15 + 3 * 7
    decode = recorder.decode_steps(num_seqs=3)
    assert len(decode) == 7 and all(s.num_tokens == 3 for s in decode)
    # Contexts grow by one a request a step, inside windows too: 6 + 7 + ... per request.
    assert [s.context_tokens for s in decode] == [3 * (6 + j) for j in range(7)]
    assert all(0 < s.forward_seconds for s in decode)


def test_reservation_limits_the_batch_and_paging_does_not(tiny_llm):
    engine = tiny_llm.llm_engine
    prompts = random_workload(8, 12, 1, 0.0, 512, seed=1).prompts
    lens = [8] * 8
    # cap 52: each region is ceil(64 / 16) = 4 of the 8 blocks, so at most 2 run at once;
    # paged, a request holds ceil(19 / 16) = 2 blocks.
    reserve = run_scheduler(engine, "reserve", prompts, lens, cap=52)
    paged = run_scheduler(engine, "paged", prompts, lens, cap=52)
    assert reserve.max_batch == 2 and paged.max_batch > 2
    assert max(reserve.decode_batches) == 2
    assert paged.row()["mean_decode_batch"] > reserve.row()["mean_decode_batch"]
    assert paged.waste.fraction < reserve.waste.fraction


def test_throughput_end_to_end_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(["throughput", "--model", tiny_model, *TINY_ENGINE, "--num-prompts", "5",
                "--input-len", "10", "--output-len", "4", "--ignore-eos", "--copy-bytes",
                "1000000", "--json", str(out)])
    r = json.loads(out.read_text())
    for key in ("card", "jax_version", "git_revision", "requests_per_s", "output_tokens_per_s",
                "total_tokens_per_s", "num_preemptions", "peak_kv_cache_usage", "host_cpu"):
        assert key in r, key
    assert r["host_python_ms"] > 0 and r["host_python_ms_after"] > 0  # before and after the run
    assert r["output_tokens"] == 5 * 4 and r["num_requests"] == 5
    assert r["compiles_after_warmup"] == 0
    assert r["engine"]["warmup_programs"] > 0 and r["engine"]["warmup_s"] > 0
    assert 0 < r["peak_kv_cache_usage"] <= 1
    sd = r["steady_decode"]
    assert sd["num_seqs"] == 4 and sd["num_steps"] >= 1
    assert sd["roofline"]["weight_bytes"] > 0 and sd["roofline"]["step_over_roofline"] > 0
    assert 0 <= sd["wait_s"]["p50"] <= sd["step_s"]["p50"]  # waiting is part of the step
    assert 0 < sd["host_s"]["p50"] <= sd["step_s"]["p50"]
    assert 0 < sd["forward_dispatch_s"]["p50"] <= sd["dispatch_s"]["p50"] <= sd["step_s"]["p50"]
    t = r["main_thread"]  # Linux: the main thread's rusage over the generate call
    assert 0 < t["cpu_s"] <= t["wall_s"] + 0.01 and t["cpus_allowed"] >= 1
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and "of which the forward's call" in printed
    assert "involuntary context switches" in printed


def test_throughput_with_multi_step_decoding(tiny_model, tmp_path):
    out = tmp_path / "r.json"
    bench.main(["throughput", "--model", tiny_model, *TINY_ENGINE, "--num-prompts", "4",
                "--input-len", "10", "--output-len", "9", "--ignore-eos", "--copy-bytes",
                "1000000", "--num-scheduler-steps", "4", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["engine"]["num_scheduler_steps"] == 4
    assert r["output_tokens"] == 4 * 9 and r["compiles_after_warmup"] == 0
    assert r["steady_decode"]["num_seqs"] == 4 and r["steady_decode"]["num_steps"] == 8


def test_summary_checks_the_targets(tmp_path, capsys):
    r = {"benchmark": "throughput", "card": "H100", "jax_version": "0.11.2",
         "git_revision": "abc", "model": "llama-3.2-1b", "num_requests": 512,
         "output_tokens_per_s": 40000.0,
         "ratios": {"vs_hf_generate": 41.0, "vs_hf_generate_batch": 19.0},
         "steady_decode": {"roofline": {"num_seqs": 256, "step_over_roofline": 1.2}},
         "compiles_after_warmup": 0, "engine": {"warmup_s": 150.0}}
    b = {"benchmark": "batching", "card": "H100", "model": "llama-3.2-1b",
         "rows": [{"cap": 1536, "scheduler": "paged", "kv_waste": 0.01}],
         "paged_over_reserve": {"1536": 2.5}, "compiles_after_warmup": 0}
    paths = []
    for name, data in (("t.json", r), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    bench.main(["summary", *paths, "--out", str(tmp_path / "s.md")])
    lines = {line.split("|")[2].strip(): line.split("|")[5].strip()
             for line in (tmp_path / "s.md").read_text().splitlines()[4:]}
    assert lines["speed-up hf_generate"] == "yes" and lines["speed-up hf_generate_batch"] == "NO"
    assert lines["decode step / roofline at batch 256"] == "yes"
    assert lines["warm-up"] == "NO" and lines["paged / reserve at cap 1536"] == "yes"
    assert lines["paged KV waste at cap 1536"] == "yes"
    # The same run measured twice: each of its rows names its revision.
    (tmp_path / "t2.json").write_text(json.dumps({**r, "git_revision": "def"}))
    bench.main(["summary", *paths, str(tmp_path / "t2.json"), "--out", str(tmp_path / "s.md")])
    runs = {line.split("|")[1].strip() for line in (tmp_path / "s.md").read_text().splitlines()[4:]}
    assert {"llama-3.2-1b (512 prompts), git abc", "llama-3.2-1b (512 prompts), git def",
            "batching llama-3.2-1b"} == runs


def test_batching_runs_of_different_caps_merge_into_one_result():
    from jaxpaged.bench_batching import merge_results

    def run(caps, rev, **args):
        rows = [{"cap": c, "scheduler": s, "output_tokens_per_s": t * c}
                for c in caps for s, t in (("reserve", 1.0), ("paged", 3.0))]
        return {"card": "H100", "model": "m", "engine": {"max_num_seqs": 256, "warmup_s": float(len(caps))},
                "kv_capacity_tokens": 1000, "git_revision": rev, "compiles_after_warmup": 0,
                "args": {"caps": caps, "num_prompts": 1000, "json": "x", **args},
                "rows": rows}

    merged = merge_results([run([1536], "a"), run([32, 512], "b")])
    assert [(r["cap"], r["scheduler"]) for r in merged["rows"]] == [
        (32, "reserve"), (32, "paged"), (512, "reserve"), (512, "paged"),
        (1536, "reserve"), (1536, "paged")]
    assert merged["args"]["caps"] == [32, 512, 1536] and merged["git_revision"] == "a,b"
    assert merged["paged_over_reserve"] == {"32": 3.0, "512": 3.0, "1536": 3.0}
    with pytest.raises(ValueError, match="arguments differ: \\['num_prompts'\\]"):
        merge_results([run([32], "a"), run([512], "a", num_prompts=500)])
    with pytest.raises(ValueError, match="repeat \\(cap, scheduler\\): \\[\\(32, 'paged'\\)"):
        merge_results([run([32], "a"), run([32], "b")])


def test_kv_sweep_pairs_reserve_and_paged_by_cache_size(tmp_path):
    from jaxpaged.bench_batching import kv_sweep, kv_sweep_table, plot_kv_sweep

    def run(blocks, reserve, paged, rev="r", **args):
        rows = [{"cap": 1536, "scheduler": s, "output_tokens_per_s": t, "mean_decode_batch": b,
                 "num_preemptions": 3, "kv_waste": 0.01}
                for s, t, b in (("reserve", reserve, 7.0), ("paged", paged, 21.0))]
        rows.append({"cap": 32, "scheduler": "static", "output_tokens_per_s": 1.0})
        return {"card": "H100", "model": "m", "git_revision": rev, "rows": rows,
                "kv_capacity_tokens": (blocks - 1) * 16,
                "args": {"num_kv_blocks": blocks, "block_size": 16, "input_len": 512,
                         "num_prompts": 1000, **args}}

    rows = kv_sweep([run(2049, 300.0, 450.0), run(129, 100.0, 250.0)], cap=1536)
    assert [r["num_kv_blocks"] for r in rows] == [129, 2049]  # smallest cache first
    assert [r["paged_over_reserve"] for r in rows] == [2.5, 1.5]
    # 128 usable blocks of 16 tokens hold one 512 + 1536 region; 2048 hold sixteen.
    assert [r["reserved_regions"] for r in rows] == [1, 16]
    assert "2.50x" in kv_sweep_table(rows)
    plot_kv_sweep(rows, 1536, "m", str(tmp_path / "sweep.png"), shade=(100, 200))
    assert (tmp_path / "sweep.png").stat().st_size > 0
    with pytest.raises(ValueError, match="differ in \\['num_prompts'\\]"):
        kv_sweep([run(129, 1.0, 2.0), run(257, 1.0, 2.0, num_prompts=500)], cap=1536)
    with pytest.raises(ValueError, match="no run measured both"):
        kv_sweep([run(129, 1.0, 2.0)], cap=512)


def test_thread_usage_tells_work_from_waiting():
    import time

    from jaxpaged.bench_common import ThreadUsage

    with ThreadUsage() as busy:
        start = time.thread_time()
        while time.thread_time() - start < 0.03:  # 30 ms of this thread's CPU, however long
            pass
    with ThreadUsage() as idle:
        for _ in range(3):
            time.sleep(0.01)
    assert busy.result["cpu_s"] >= 0.025  # spinning is CPU time (rusage ticks are coarser)
    assert idle.result["cpu_s"] < 0.02 and idle.result["voluntary_switches"] >= 3  # sleeps block
    assert idle.result["wall_s"] >= 0.03
