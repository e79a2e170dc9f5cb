"""Where the device's time goes in a steady decode step: GPU kernels by total time.

    python benchmarks/device_profile.py --model llama-3.1-8b --batch 256 --context 640

Fills the batch with dummy-weight requests, steps until every request decodes, then records
`--steps` engine steps (under multi-step decoding each is a window of several decode steps,
and the times are reported per decode step) with the JAX profiler and sums the device's kernel
events by name (jax.profiler.ProfileData, no TensorBoard needed). `--phase prefill` records the
prompts' steps instead (from the first, at most `--steps` of them, each a full
`--max-num-batched-tokens` chunk but the last): where issue 5's workload spends its prefill
time. Prints the top kernels in ms per step and the share of the step each takes; `--json`
keeps the table. Compare the total with the roofline
that `jaxpaged-bench throughput` prints for the same batch and context.
"""

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import jax
import numpy as np

from jaxpaged import LLM, SamplingParams


def kernel_times(trace_dir: str) -> tuple[dict[str, float], dict[str, int], str, list]:
    """Device kernel events of the trace under `trace_dir`: (total seconds by name, count by
    name, the plane read, every event as (start ns, end ns, name))."""
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(paths[0])
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if not planes:  # no GPU: the host's XLA threads, so the tool runs (less usefully) anywhere
        planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
    seconds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    events = []
    for plane in planes:
        for line in plane.lines:
            if plane.name.startswith("/device:GPU") and "Stream" not in line.name:
                continue  # only the streams' kernel and memcpy events, not the XLA op lines
            for event in line.events:
                seconds[event.name] += event.duration_ns * 1e-9
                counts[event.name] += 1
                events.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
    return seconds, counts, ", ".join(p.name for p in planes), events


def idle_gaps(events: list, top: int = 8) -> dict:
    """The device's timeline from its first event to its last: span, time with no event
    running (idle) and the longest idle gaps, each with the event before and after it. With
    async scheduling a step's kernels should follow the last step's without gaps when the
    device bounds the step; idle time is the host (or the dispatch thread) coming late."""
    if not events:  # e.g. the CPU backend with the host tracer off
        return {"span_s": 0.0, "idle_s": 0.0, "longest_gaps": []}
    events = sorted(events)
    gaps, busy_until, before = [], events[0][1], events[0][2]
    for start, end, name in events[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, before, name))
        if end > busy_until:
            busy_until, before = end, name
    span = busy_until - events[0][0]
    idle = sum(g for g, _, _ in gaps)
    return {"span_s": span * 1e-9, "idle_s": idle * 1e-9,
            "longest_gaps": [{"us": g * 1e-3, "after": a, "before": b}
                             for g, a, b in sorted(gaps, reverse=True)[:top]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=640, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_num_seqs=args.batch,
              max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=args.num_kv_blocks)
    engine = llm.llm_engine
    vocab = engine.model.config.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=10 * args.steps + 64, ignore_eos=True)
    # final_only, as LLM.generate asks: a cumulative request's output (token ids copied) would
    # be built every step, host work that generate never does.
    for i in range(args.batch):
        engine.add_request(str(i), {"prompt_token_ids": rng.integers(0, vocab, args.context)
                                    .tolist()}, params, output_kind="final_only")
    def prefilling() -> bool:
        return any(r.num_computed_tokens < r.num_prompt_tokens
                   for r in engine.scheduler.requests.values())

    if args.phase == "decode":
        while prefilling():
            engine.step()
        for _ in range(4):  # past the last prefill's step in flight
            engine.step()
    trace_dir = tempfile.mkdtemp(prefix="jaxpaged_trace_")
    def computed() -> int:
        return sum(r.num_computed_tokens for r in engine.scheduler.requests.values())

    steps, start = 0, computed()
    # The host's tracers off: with Python and host tracing on, a host-bound step ran ~5x
    # slower under the profiler, so the device's idle time said nothing about a real run.
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level, options.python_tracer_level = 0, 0
    with jax.profiler.trace(trace_dir, profiler_options=options):
        t0 = time.perf_counter()
        while steps < args.steps and (args.phase == "decode" or prefilling()):
            engine.step()
            steps += 1
        jax.effects_barrier()
        wall = time.perf_counter() - t0
    tokens = computed() - start
    # A decode call of the engine may run a multi-step window: count decode steps, a token
    # for each request each.
    args.steps = steps = steps if args.phase == "prefill" else max(1, round(tokens / args.batch))
    seconds, counts, planes, events = kernel_times(trace_dir)
    total = sum(seconds.values()) or float("nan")
    timeline = idle_gaps(events)
    rows = sorted(seconds.items(), key=lambda kv: -kv[1])
    print(f"{args.model}: batch {args.batch}, context {args.context}, {args.phase}: {steps} "
          f"steps ({tokens} tokens scheduled) traced on {planes}; device busy "
          f"{total / steps * 1e3:.2f} ms/step")
    print(f"device timeline: {wall / steps * 1e3:.2f} ms/step of wall time; "
          f"{timeline['span_s'] / steps * 1e3:.2f} ms/step from first to last "
          f"event, idle {timeline['idle_s'] / steps * 1e3:.2f} ms/step; longest idle gaps (us, "
          f"between): " + "; ".join(f"{g['us']:.0f} {g['after'][:40]} -> {g['before'][:40]}"
                                     for g in timeline["longest_gaps"][:5]))
    print(f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel")
    for name, s in rows[:args.top]:
        print(f"{s / args.steps * 1e3:8.3f} {s / total:6.1%} {counts[name] / args.steps:10.1f}"
              f"  {name[:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(jax.devices()[0].device_kind),
                       "git_revision": os.environ.get("JAXPAGED_GIT_REV"),
                       "tokens_scheduled": tokens,
                       "device_busy_ms_per_step": total / args.steps * 1e3,
                       "wall_ms_per_step": wall / args.steps * 1e3,
                       "device_span_ms_per_step": timeline["span_s"] / args.steps * 1e3,
                       "device_idle_ms_per_step": timeline["idle_s"] / args.steps * 1e3,
                       "longest_idle_gaps": timeline["longest_gaps"],
                       "kernels": [{"name": n, "ms_per_step": s / args.steps * 1e3,
                                    "calls_per_step": counts[n] / args.steps}
                                   for n, s in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
