"""`throughput` and `latency`: vLLM's `benchmark_throughput` / `benchmark_latency` on jaxpaged.

throughput: every prompt goes into one `LLM.generate` call. Besides the rates it reports the
warm-up, compiles after warm-up (must be 0), preemptions, peak KV-cache use, and the steady
decode step at the largest decode batch reached, against the memory roofline measured in the
same run. With `--compare hf` the same prompts and lengths first run through transformers'
`generate` (static batches) and `generate_batch` (continuous, paged) in a child process.

latency: one batch, `--num-iters` times (fresh random prompts each time, so the prefix cache
cannot help); percentiles of the end-to-end time and of the decode-only `engine.step()` times.
"""

import argparse
import json
import os
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxpaged.bench_common import (StepRecorder, ThreadUsage, Workload, env_info,
                                   format_table, host_python_ms, jsonl_workload, percentiles,
                                   random_workload, slug, write_json)
from jaxpaged.config import PRESETS, ModelConfig

ENGINE_ARGS = ("dtype", "load_format", "block_size", "max_num_seqs", "max_num_batched_tokens",
               "max_model_len", "num_kv_blocks", "kv_cache_memory_fraction",
               "enable_prefix_caching", "seed", "tensor_parallel_size", "async_scheduling",
               "num_scheduler_steps")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The architecture of --model, without loading weights or touching the device."""
    model = args.model
    if model is None or (args.load_format == "dummy" and model in PRESETS):
        return PRESETS[model or "smollm2-135m"]  # the embedded model has smollm2's shapes
    if os.path.isdir(model):
        return ModelConfig.from_json_file(os.path.join(model, "config.json"))
    if str(model).endswith(".gguf"):
        from jaxpaged.gguf_loader import read_gguf

        return read_gguf(model)[0]
    raise ValueError(f"--model {model!r}: expected a preset ({', '.join(sorted(PRESETS))}) "
                     f"with --load-format dummy, a Hugging Face directory or a .gguf file")


def _tokenizer(args: argparse.Namespace) -> Any | None:
    from transformers import AutoTokenizer

    if args.load_format == "dummy":
        return None
    if args.model is None:
        from jaxpaged.loader import default_model_path

        path = default_model_path()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if os.path.isdir(args.model):
        return AutoTokenizer.from_pretrained(args.model)
    return None


def make_workload(args: argparse.Namespace, config: ModelConfig) -> Workload:
    if args.dataset == "random":
        return random_workload(args.num_prompts, args.input_len, args.output_len,
                               args.range_ratio, config.vocab_size, args.seed)
    tok = None
    if args.model is None or os.path.isdir(str(args.model)):
        tokenizer = _tokenizer(args)
        tok = (lambda text: tokenizer(text)["input_ids"]) if tokenizer else None
    return jsonl_workload(args.dataset, args.num_prompts, args.output_len, tok)


def build_llm(args: argparse.Namespace) -> Any:
    from jaxpaged import LLM

    return LLM(args.model, **{k: getattr(args, k) for k in ENGINE_ARGS})


def sampling_params(args: argparse.Namespace, output_lens: list[int]) -> list[Any]:
    from jaxpaged import SamplingParams

    return [SamplingParams(max_tokens=n, ignore_eos=args.ignore_eos,
                           temperature=args.temperature, top_p=1.0) for n in output_lens]


def engine_summary(llm: Any) -> dict[str, Any]:
    engine = llm.llm_engine
    programs, seconds = engine.warmup_stats or (0, 0.0)
    return {"max_num_seqs": engine.max_num_seqs,
            "max_num_batched_tokens": engine.max_num_batched_tokens,
            "max_model_len": engine.max_model_len, "num_kv_blocks": engine.num_kv_blocks,
            "block_size": engine.config.block_size, "dtype": np.dtype(engine.model.dtype).name,
            "tensor_parallel_size": engine.config.tensor_parallel_size,
            "async_scheduling": engine.config.async_scheduling,
            "num_scheduler_steps": engine.num_scheduler_steps,
            "warmup_programs": programs, "warmup_s": seconds}


# -- throughput ---------------------------------------------------------------------------------


def run_hf_peers(args: argparse.Namespace, work: Workload) -> dict[str, Any]:
    from jaxpaged.bench_hf import HF_MODES, run_peers_subprocess

    sub = work.head(args.compare_num_prompts)
    spec = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype,
            "prompts": sub.prompts, "output_lens": sub.output_lens,
            "modes": list(args.hf_modes or HF_MODES), "batch_size": args.hf_batch_size,
            "temperature": args.temperature, "cb_overrides": json.loads(args.hf_cb_config)}
    peers = run_peers_subprocess(spec, timeout=args.compare_timeout)
    peers["num_prompts"] = len(sub.prompts)
    return peers


def steady_decode(recorder: StepRecorder, config: ModelConfig, itemsize: int,
                  copy: dict[str, Any] | None, num_devices: int = 1) -> dict[str, Any] | None:
    """Decode-only steps at the largest decode batch reached, against the roofline."""
    from jaxpaged.bench_roofline import roofline

    decode = recorder.decode_steps()
    if not decode:
        return None
    batch = max(s.num_seqs for s in decode)
    steps = recorder.decode_steps(batch)
    times = percentiles([s.seconds for s in steps])
    wait = percentiles([s.wait_seconds for s in steps])
    host = percentiles([s.seconds - s.wait_seconds for s in steps])
    dispatch = percentiles([s.dispatch_seconds for s in steps])
    forward = percentiles([s.forward_seconds for s in steps])
    context = round(sum(s.context_tokens for s in steps) / len(steps))
    out = {"num_seqs": batch, "num_steps": len(steps), "step_s": times, "wait_s": wait,
           "host_s": host, "dispatch_s": dispatch, "forward_dispatch_s": forward,
           "num_decode_steps": len(decode), "mean_context_tokens": context}
    if copy is not None:
        out["roofline"] = roofline(times["p50"], batch, context, config, itemsize,
                                   copy["best_GBps"], num_devices)
        out["roofline"]["host_over_roofline"] = host["p50"] / out["roofline"]["roofline_s"]
    return out


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    config = model_config(args)
    work = make_workload(args, config)
    peers = run_hf_peers(args, work) if args.compare == "hf" else None  # before JAX takes the card
    info = env_info()
    copy = None
    if args.roofline:
        from jaxpaged.bench_roofline import copy_bandwidth

        copy = copy_bandwidth(args.copy_bytes)
    llm = build_llm(args)
    engine = llm.llm_engine
    recorder = StepRecorder(engine)
    t0 = time.perf_counter()
    with ThreadUsage() as main_thread:
        outputs = llm.generate(work.prompts, sampling_params(args, work.output_lens),
                               use_tqdm=True)
    elapsed = time.perf_counter() - t0
    recorder.uninstall()
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result: dict[str, Any] = {
        "benchmark": "throughput", **info, "model": args.model or "SmolLM2-135M-Instruct",
        "load_format": args.load_format, "args": vars(args), "engine": engine_summary(llm),
        "num_requests": len(outputs), "prompt_tokens": work.num_prompt_tokens,
        "output_tokens": out_tokens, "elapsed_s": elapsed,
        "requests_per_s": len(outputs) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (work.num_prompt_tokens + out_tokens) / elapsed,
        "num_steps": len(recorder.steps),
        "compiles_after_warmup": engine.runner.num_compiles_since_warmup,
        "num_preemptions": engine.scheduler.num_preemptions,
        "peak_kv_cache_usage": recorder.peak_kv_usage, "copy_bandwidth": copy,
        "main_thread": main_thread.result,
        # The fixed Python timing again, right after the run (env_info's is from before it):
        # the host's speed can drift within a lease.
        "host_python_ms_after": round(host_python_ms(), 2),
        # The engine's config: with tensor parallelism its padded or replicated heads are
        # really read, so the per-device roofline counts them.
        "steady_decode": steady_decode(recorder, engine.model.config,
                                       np.dtype(engine.model.dtype).itemsize, copy,
                                       engine.config.tensor_parallel_size)}
    if peers is not None:
        result["hf"] = peers
        result["ratios"] = {f"vs_hf_{m}": result["output_tokens_per_s"]
                            / peers[m]["output_tokens_per_s"]
                            for m in ("generate", "generate_batch")
                            if "output_tokens_per_s" in peers.get(m, {})}
    return result


def throughput_table(r: dict[str, Any]) -> str:
    rows = [("jaxpaged", r["requests_per_s"], r["output_tokens_per_s"],
             r["total_tokens_per_s"], r["elapsed_s"], "1.0")]
    if "error" in r.get("hf", {}):
        rows.append(("HF peers", None, None, None, None, r["hf"]["error"][:60]))
    for mode in ("generate", "generate_batch"):
        peer = r.get("hf", {}).get(mode)
        if peer is None:
            continue
        if "error" in peer:
            rows.append((f"HF {mode}", None, None, None, None, peer["error"][:60]))
            continue
        rows.append((f"HF {mode} ({r['hf']['num_prompts']} prompts)", peer["requests_per_s"],
                     peer["output_tokens_per_s"], peer["total_tokens_per_s"],
                     peer["elapsed_s"], f"{r['ratios'][f'vs_hf_{mode}']:.1f}x"))
    table = format_table(["", "req/s", "output tok/s", "total tok/s", "seconds",
                          "jaxpaged speed-up"], rows)
    e = r["engine"]
    lines = [table, "",
             f"warm-up: {e['warmup_programs']} programs in {e['warmup_s']:.1f} s; compiles "
             f"after warm-up: {r['compiles_after_warmup']}; preemptions: "
             f"{r['num_preemptions']}; peak KV-cache use: {r['peak_kv_cache_usage']:.1%} of "
             f"{e['num_kv_blocks'] - 1} blocks"]
    sd = r.get("steady_decode")
    if sd:
        line = (f"steady decode at batch {sd['num_seqs']} ({sd['num_steps']} steps, mean "
                f"context {sd['mean_context_tokens']} tokens): p50 "
                f"{sd['step_s']['p50'] * 1e3:.2f} ms/step: host busy "
                f"{sd['host_s']['p50'] * 1e3:.2f} ms")
        if "dispatch_s" in sd:  # results from before it was recorded lack it
            line += (f" (dispatch {sd['dispatch_s']['p50'] * 1e3:.2f} ms, of which the "
                     f"forward's call {sd['forward_dispatch_s']['p50'] * 1e3:.2f} ms)")
        line += f", waiting for the device {sd['wait_s']['p50'] * 1e3:.2f} ms"
        rl = sd.get("roofline")
        if rl:
            line += (f"; roofline {rl['roofline_s'] * 1e3:.2f} ms = ({rl['weight_bytes'] / 1e9:.2f}"
                     f" GB weights + {rl['kv_bytes'] / 1e9:.2f} GB KV) / "
                     f"{rl['copy_GBps']:.0f} GB/s copy; step / roofline = "
                     f"{rl['step_over_roofline']:.2f} (host busy / roofline = "
                     f"{rl['host_over_roofline']:.2f})")
        lines.append(line)
    t = r.get("main_thread")
    if t:  # the host's main thread over the generate call (see bench_common.ThreadUsage)
        lines.append(f"main thread: {t['cpu_s']:.2f} s of CPU in {t['wall_s']:.2f} s; "
                     f"{t['voluntary_switches']} voluntary and {t['involuntary_switches']} "
                     f"involuntary context switches; last on CPU {t['last_cpu']} of "
                     f"{t['cpus_allowed']} allowed")
    return "\n".join(lines)


# -- latency ----------------------------------------------------------------------------------


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    config = model_config(args)
    info = env_info()
    llm = build_llm(args)
    engine = llm.llm_engine
    e2e, decode = [], []
    iters = args.num_iters_warmup + args.num_iters
    for i in tqdm(range(iters), desc="Latency iterations"):
        work = random_workload(args.batch_size, args.input_len, args.output_len, 0.0,
                               config.vocab_size, args.seed + i)
        recorder = StepRecorder(engine)
        t0 = time.perf_counter()
        llm.generate(work.prompts, sampling_params(args, work.output_lens), use_tqdm=False)
        dt = time.perf_counter() - t0
        recorder.uninstall()
        if i >= args.num_iters_warmup:
            e2e.append(dt)
            decode += [s.seconds for s in recorder.decode_steps()]
    return {"benchmark": "latency", **info, "model": args.model or "SmolLM2-135M-Instruct",
            "load_format": args.load_format, "args": vars(args), "engine": engine_summary(llm),
            "e2e_s": percentiles(e2e), "decode_step_s": percentiles(decode),
            "num_decode_steps": len(decode),
            "compiles_after_warmup": engine.runner.num_compiles_since_warmup}


def latency_table(r: dict[str, Any]) -> str:
    rows = [(name, r[key]["p50"] * scale, r[key]["p90"] * scale, r[key]["p99"] * scale)
            for name, key, scale in (("end-to-end (s)", "e2e_s", 1.0),
                                     ("decode step (ms)", "decode_step_s", 1e3))]
    return format_table(["", "p50", "p90", "p99"], rows)


def default_json_name(r: dict[str, Any]) -> str:
    return f"{r['benchmark']}_{slug(str(r['model']))}_{slug(r['card'])}.json"


def report(r: dict[str, Any], table: str, json_path: str | None) -> None:
    path = write_json(r, json_path, default_json_name(r))
    print("\n" + table)
    if path:
        print(f"\nwrote {path}")
