"""Where the host's time goes in an engine step: milliseconds per step for each phase.

    python benchmarks/host_phases.py --model llama-3.2-1b --num-prompts 512 \
        --input-len 512 --output-len 256 [--no-async-scheduling] [--json PATH]

Runs `LLM.generate` on dummy weights and times, per engine step, the scheduler, the engine's
per-request inputs, the runner's input builders and its jit dispatches, the wait for the
device (`fetch`), and the application of results (scheduler update, engine outputs). Phases
nest (indented rows are part of the row above). With async scheduling the host's own time is
the step time minus the wait; when the wait is near zero the host bounds the step.

`--stub-device` replaces the jitted forward and sampler by stand-ins that return at once
(every request samples token 1): the host's work alone, measurable on any machine, e.g. the CPU:

    python benchmarks/host_phases.py --stub-device --num-prompts 256 --input-len 64 \
        --output-len 64 --max-num-batched-tokens 4096

For an A/B of host-side code on a shared machine compare the main thread's CPU time a step at
its 10th and 25th percentiles, from interleaved runs of the two versions (--repeat 3 each):
other tenants only ever add time, so the low percentiles stay put where totals and medians
move by 30% from run to run.
"""

import argparse
import collections
import gc
import json
import time

import numpy as np

import jaxpaged.runner as runner_module
from jaxpaged import LLM, SamplingParams
from jaxpaged.bench_common import env_info, timed

# (row label, owner, attribute): an owner string names a module-level function of the runner.
PHASES = [
    ("engine.step", "engine", "step"),
    ("  scheduler.schedule", "scheduler", "schedule"),
    ("  engine._runner_inputs", "engine", "_runner_inputs"),
    ("  runner.dispatch", "runner", "dispatch"),
    ("    build_step_inputs", "runner_module", "build_step_inputs"),
    ("    build_sampling_metadata", "runner_module", "build_sampling_metadata"),
    ("    forward dispatch", "runner", "_run_forward"),
    ("    sampler dispatch", "runner_module", "_jit_sample"),
    ("  runner.fetch (wait + copy)", "runner", "fetch"),
    ("  engine._apply_step", "engine", "_apply_step"),
    ("    scheduler.update_from_output", "scheduler", "update_from_output"),
]


def install(engine, totals: dict[str, float], calls: dict[str, int]) -> None:
    """Wrap every phase: its seconds add up in totals[label], its calls in calls[label]."""
    owners = {"engine": engine, "scheduler": engine.scheduler, "runner": engine.runner,
              "runner_module": runner_module}

    def adding_to(label: str):
        def add(seconds: float) -> None:
            totals[label] += seconds
            calls[label] += 1
        return add

    for label, owner, attr in PHASES:
        obj = owners[owner]
        setattr(obj, attr, timed(getattr(obj, attr), adding_to(label)))


def stub_device() -> None:
    """Forward and sampler that cost nothing: the host's share of a step, alone."""
    from jaxpaged.sampler import SamplerOutput

    def forward(model_def, params_leaves, kv_cache, packed, prev_sampled, spec, *args):
        return kv_cache, None

    def sample(logits, packed, spec, width):
        num_rows = spec[1][0][1][0]  # the first sampling field's length: the row count
        out = SamplerOutput(np.ones(num_rows, np.int32), np.zeros(num_rows, np.float32),
                            np.ones(num_rows, np.int32), np.zeros((num_rows, 0), np.int32),
                            np.zeros((num_rows, 0), np.float32))
        return out, np.ones(width, np.int32), logits

    runner_module._jit_forward = forward
    runner_module._jit_sample = sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stub-device", action="store_true",
                   help="time the host alone: forward and sampler return at once")
    p.add_argument("--python-gc-thresholds", action="store_true",
                   help="put back Python's default collector thresholds (700, 10, 10), which "
                        "the engine raises: the A/B of that choice")
    p.add_argument("--compare-gc-thresholds", action="store_true",
                   help="time the workload twice in one process, with the engine's collector "
                        "thresholds and then with Python's defaults")
    p.add_argument("--params-per-request", action="store_true",
                   help="one SamplingParams object per request, equal in value (the "
                        "benchmark CLI's way), instead of one shared by all")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the workload this many times in the process (each reported)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=args.num_kv_blocks, async_scheduling=args.async_scheduling,
              warmup=not args.stub_device)
    if args.stub_device:
        stub_device()
    vocab = llm.llm_engine.model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, args.input_len).tolist()}
               for _ in range(args.num_prompts)]
    def make_params() -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    # Per request, as jaxpaged-bench throughput (and vLLM's) passes them, or one shared.
    shared = make_params()
    params = [make_params() if args.params_per_request else shared for _ in prompts]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # first-call costs out of the way
    totals: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    install(llm.llm_engine, totals, calls)
    step_cpu: list[float] = []  # the main thread's CPU seconds of each engine.step()
    llm.llm_engine.step = timed(llm.llm_engine.step, step_cpu.append, clock=time.thread_time)
    thresholds = [gc.get_threshold()]
    if args.python_gc_thresholds:
        thresholds = [(700, 10, 10)]
    elif args.compare_gc_thresholds:
        thresholds = [gc.get_threshold(), (700, 10, 10)]
    results = []
    for threshold in thresholds:
        for _ in range(args.repeat):
            gc.set_threshold(*threshold)
            totals.clear()
            calls.clear()
            step_cpu.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            llm.generate(prompts, params, use_tqdm=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            results.append(report(args, calls["engine.step"], wall, cpu, totals, step_cpu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, **env_info()}, f, indent=1)


def report(args, n: int, wall: float, cpu: float, totals: dict[str, float],
           step_cpu: list[float]) -> dict:
    """`cpu`: the process's CPU seconds (all threads). `step_cpu`: the main thread's CPU
    time of each step. On a shared machine the low percentiles of the latter are the steadiest
    A/B measure of the host's own work (with --stub-device, nearly all of it): time lost to
    other tenants only adds, and inflates the median and the totals run to run."""
    rows = {label: totals[label] / n * 1e3 for label, _, _ in PHASES}
    host = rows["engine.step"] - rows["  runner.fetch (wait + copy)"]
    print(f"{n} steps, {wall:.2f} s, {args.num_prompts * args.output_len / wall:,.0f} output "
          f"tok/s, async_scheduling={args.async_scheduling}, gc threshold {gc.get_threshold()}")
    print(f"{'phase':36} {'ms/step':>8}")
    for label, ms in rows.items():
        print(f"{label:36} {ms:8.3f}")
    print(f"{'host busy (step - fetch)':36} {host:8.3f}")
    print(f"{'process CPU time':36} {cpu / n * 1e3:8.3f}")
    step_cpu_ms = np.percentile(np.asarray(step_cpu) * 1e3, [10, 25, 50]).tolist()
    print(f"{'main thread CPU a step, p10/p25/p50':36} "
          f"{' / '.join(f'{ms:.3f}' for ms in step_cpu_ms)}")
    return {"steps": n, "wall_s": wall, "ms_per_step": rows, "host_busy_ms": host,
            "process_cpu_ms_per_step": cpu / n * 1e3,
            "main_thread_cpu_ms_per_step": dict(zip(("p10", "p25", "p50"), step_cpu_ms)),
            "gc_threshold": gc.get_threshold()}


if __name__ == "__main__":
    main()
