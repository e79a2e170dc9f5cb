"""The engine's decode attention, replayed outside the engine on the engine's own inputs.

At llama-3.2-1b's batch-256 shape the engine's decode-attention launch took ~141 us (device
profile) where ``decode_variants.py --timer device`` times the same kernel at ~129 us for the
same context. This script finds which difference costs it. It fills an engine with dummy-weight
requests (as device_profile.py), steps until every request decodes, then times
``paged_decode_attention`` (device kernel time, interleaved rounds) on:

- ``engine``: the engine's KV pool (every layer's pages, as the model passes it), the requests'
  block tables at the engine's width, their lengths, and RoPE tables, as the model calls it;
- one difference at a time from that: ``no_rope``, ``narrow`` (tables only as wide as the
  longest sequence needs), ``shuffled`` (each sequence's pages replaced by distinct random
  pages of the same pool), ``layer0_pool`` (a copy of layer 0's pages alone: under 4 GiB, so
  the kernel's Triton offsets are 32-bit instead of 64-bit), ``bench`` (all of these at once:
  the benchmark's inputs);

then profiles a few engine steps and reports the engine's own time a launch on the same machine.

    python benchmarks/attention_replay.py --model llama-3.2-1b --context 640 --json out.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels  # noqa: E402
from device_profile import kernel_times  # noqa: E402

from jaxpaged import LLM, SamplingParams  # noqa: E402
from jaxpaged.bench_common import git_revision  # noqa: E402
from jaxpaged.models.llama import rope_inv_freq, rope_tables  # noqa: E402
from pallas_kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention, paged_decode_attention_reference)

VARIANTS = ("engine", "no_rope", "narrow", "shuffled", "layer0_pool", "bench")


def engine_inputs(engine) -> dict:
    """Block tables (engine width), lengths and positions of the running requests."""
    runner = engine.runner
    reqs = sorted(engine.scheduler.requests.values(), key=lambda r: r.request_id)
    width = runner.max_blocks_per_seq
    tables = np.zeros((len(reqs), width), np.int32)
    for i, r in enumerate(reqs):
        tables[i, :len(r.block_ids)] = r.block_ids
    lens = np.array([r.num_computed_tokens + 1 for r in reqs], np.int32)  # the new token too
    return {"tables": tables, "lens": lens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=640, help="prompt tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile-steps", type=int, default=4, help="engine steps profiled after")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_num_seqs=args.batch,
              kv_cache_memory_fraction=0.6)  # room for layer 0's copy
    engine = llm.llm_engine
    cfg = engine.model.config
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"{i:05d}", {"prompt_token_ids": rng.integers(0, cfg.vocab_size, args.context)
                                        .tolist()}, params, output_kind="final_only")
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(4):
        engine.step()
    jax.effects_barrier()
    inputs = engine_inputs(engine)
    kv = engine.runner.kv_cache
    L, P, B, K, H = kv.k.shape
    nq = cfg.num_attention_heads
    k_pool, v_pool = kv.k.reshape(L * P, B, K, H), kv.v.reshape(L * P, B, K, H)
    tables, lens = inputs["tables"], inputs["lens"]
    need = int(-(-lens.max() // B))
    used = tables[:, :need]
    # Distinct random pages of layer 0 for the shuffled tables (the engine's are mostly runs).
    free = rng.permutation(np.arange(1, P))[:used.size].astype(np.int32).reshape(used.shape)
    shuffled = np.where(used > 0, free, 0).astype(np.int32)
    pos = jnp.asarray(lens - 1)
    cos, sin = rope_tables(pos, jnp.asarray(rope_inv_freq(cfg)))
    q0 = jax.random.normal(jax.random.key(1), (args.batch, nq, H), kv.k.dtype)
    layer0 = (k_pool[:P] + 0, v_pool[:P] + 0)  # copies, 1/L of the pool
    names = args.variants.split(",")
    cases = {
        "engine": (k_pool, v_pool, tables, True),
        "no_rope": (k_pool, v_pool, tables, False),
        "narrow": (k_pool, v_pool, used, True),
        "shuffled": (k_pool, v_pool, np.pad(shuffled, ((0, 0), (0, tables.shape[1] - need))), True),
        "layer0_pool": (*layer0, tables, True),
        "bench": (*layer0, shuffled, False),
    }
    kernels.TIMER = "device"
    times: dict[str, list[float]] = {n: [] for n in names}
    errs = {}
    for n in names:  # the reference's gathers are large: on layer 0's copy, narrow tables
        kc, vc, t, rope = cases[n]
        if kc.shape[0] != P:
            errs[n] = float("nan")
            continue
        t = np.asarray(t)[:, :need]
        r = (cos, sin) if rope else None
        try:
            out = paged_decode_attention(q0, kc, vc, jnp.asarray(t), jnp.asarray(lens), r)
            ref = paged_decode_attention_reference(q0, kc, vc, jnp.asarray(t), jnp.asarray(lens), r)
            errs[n] = float(jnp.linalg.norm((out - ref).astype(jnp.float32))
                            / jnp.maximum(jnp.linalg.norm(ref.astype(jnp.float32)), 1e-30))
        except Exception as e:  # the check must not cost the timings
            print(f"{n}: reference check failed: {e!r}"[:400], flush=True)
            errs[n] = float("nan")
    for _ in range(args.rounds):
        for n in names:
            kc, vc, t, rope = cases[n]
            t = jnp.asarray(t)
            if rope:
                fn = lambda q, kc, vc, ln, t, cs: paged_decode_attention(q, kc, vc, t, ln, cs)  # noqa: E731
                sets = ((t, (cos, sin)),)
            else:
                fn = lambda q, kc, vc, ln, t: paged_decode_attention(q, kc, vc, t, ln)  # noqa: E731
                sets = ((t,),)
            times[n].append(kernels.time_jax(fn, q0, (kc, vc, jnp.asarray(lens)), sets))
    kv_bytes = 2 * int(lens.sum()) * K * H * kv.k.dtype.itemsize
    rows = {n: {"us": statistics.median(v) * 1e6, "TBps": kv_bytes / statistics.median(v) / 1e12,
                "rounds_us": [x * 1e6 for x in v], "rel_err": errs[n]} for n, v in times.items()}
    del layer0, cases
    # The engine's own launches, same machine, right after.
    trace_dir = tempfile.mkdtemp(prefix="jaxpaged_replay_")
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level, options.python_tracer_level = 0, 0
    lens_before = engine_inputs(engine)["lens"]
    with jax.profiler.trace(trace_dir, profiler_options=options):
        for _ in range(args.profile_steps):
            engine.step()
        jax.effects_barrier()
    lens_after = engine_inputs(engine)["lens"]
    seconds, counts, _, _ = kernel_times(trace_dir)
    # None where the engine runs another attention (the CPU's reference path).
    name = next((k for k in seconds if k.startswith("paged_decode_attention")), None)
    engine_us = seconds[name] / counts[name] * 1e6 if name else float("nan")
    mean_len = float((lens_before.mean() + lens_after.mean() - 1) / 2)
    result = {"card": kernels.card_name(), "git_revision": git_revision(), "model": args.model,
              "batch": args.batch, "pool_pages": L * P, "table_width": int(tables.shape[1]),
              "mean_kv_len_replayed": float(lens.mean()), "rows": rows,
              "engine_profile": {"us_per_launch": engine_us, "launches": counts.get(name, 0),
                                 "mean_kv_len": mean_len,
                                 "us_per_launch_at_replayed_len": engine_us * lens.mean() / mean_len}}
    lines = [f"{'variant':12} {'us':>8} {'TB/s':>6} {'rel err':>8}  rounds"]
    for n, row in rows.items():
        lines.append(f"{n:12} {row['us']:8.1f} {row['TBps']:6.2f} {row['rel_err']:8.1e}  "
                     + " ".join(f"{x:.1f}" for x in row["rounds_us"]))
    e = result["engine_profile"]
    lines.append(f"engine's own launches: {e['us_per_launch']:.1f} us at mean kv len "
                 f"{e['mean_kv_len']:.0f} ({e['us_per_launch_at_replayed_len']:.1f} us scaled to "
                 f"the replayed {lens.mean():.0f})")
    result["table"] = "\n".join(lines)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(result["table"])


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"({time.time() - start:.0f} s)")
