"""Benchmark jaxpaged's Pallas kernels on the GPU against their ceilings and peers.

Decode: our paged_decode_attention vs jax's deprecated Triton paged_attention and the XLA
reference, as achieved bandwidth (bytes of K, V, Q and output over time) and as a fraction of the
device copy bandwidth. Prefill: our ragged_paged_attention vs torch SDPA (flash backend) on
contiguous tensors of the same shape, in TFLOP/s and as a fraction of the bf16 matmul peak.
KV write: our aliased Pallas kernel vs the XLA scatter, both donated, at two cache sizes
(a copy of the cache would make the time grow with the cache).

Run on the GPU machine:  python3 benchmarks/kernels.py [--quick] [--out DIR]
Writes kernels_<card>.json and .md under benchmarks/results/ (and DIR if given).
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the card

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.kv_cache_write import write_kv_cache_reference, write_kv_cache_tuned  # noqa: E402
from pallas_kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention_reference,
    paged_decode_attention_tuned,
)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_tuned  # noqa: E402
from jaxpaged.bench_common import format_table, git_revision  # noqa: E402

BLOCK = 16
HEAD_DIM = 128
DTYPE = jnp.bfloat16
L2_BYTES = 50e6  # H100: rotate inputs over several times this so repeats do not hit in L2
LOG: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


# "wall": host wall clock over a chain of calls (launch gaps included: ~25 us a call for the
# decode kernel, where Nsight Compute reads 125 us against the chain's 150). "device": the
# device's kernel time over the same chain, from a JAX profiler trace (gaps excluded, like the
# CUDA events that time the torch peers). Set by --timer.
TIMER = "wall"
# With TIMER "device": only kernels whose name starts with this count (None: every kernel), for
# chains whose steps add other work around the kernel under test.
DEVICE_KERNEL_PREFIX: str | None = None
TIMER_DESCRIPTIONS = {
    "wall": "host wall clock over a chain of calls in one jit (launch gaps included)",
    "device": "the device's kernel time over a chain of calls in one jit, from a JAX profiler trace",
}


def traced_kernel_seconds(run) -> dict[str, float]:
    """The device's kernel time (seconds) by kernel name while ``run()`` runs under a JAX
    profiler trace; memcpy and memset excluded."""
    import tempfile

    from device_profile import kernel_times

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        seconds, _, _, _ = kernel_times(trace_dir)
    return {name: t for name, t in seconds.items() if not name.startswith(("Memcpy", "Memset"))}


def device_seconds(fn, args, reps: int) -> float:
    """Device kernel time (seconds, summed over every kernel, or those DEVICE_KERNEL_PREFIX
    names) of ``reps`` runs of ``fn(*args)``."""
    def run():
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    return sum(t for name, t in traced_kernel_seconds(run).items()
               if DEVICE_KERNEL_PREFIX is None or name.startswith(DEVICE_KERNEL_PREFIX))


def time_jax(step, x0, shared=(), sets=((),), reps: int = 10, min_calls: int = 8) -> float:
    """Median seconds per call of ``x = step(x, *shared, *sets[i])``, queued back to back in one jit
    (with TIMER "device": the mean device kernel time per call over ``reps`` chains).

    Feeding each output into the next call keeps XLA from merging identical calls, and rotating
    over ``sets`` (disjoint inputs) keeps repeats from being served out of L2.
    """
    calls = max(min_calls, len(sets))

    def chain(x, shared, sets):
        for i in range(calls):
            # The barrier keeps XLA from fusing consecutive elementwise calls into one pass.
            x = jax.lax.optimization_barrier(step(x, *shared, *sets[i % len(sets)]))
        return x

    multi = jax.jit(chain)
    jax.block_until_ready(multi(x0, shared, sets))
    # Short kernels leave the GPU idle between compiles: run ~0.1 s first so clocks settle,
    # then take the median over at least `reps` repetitions and ~0.1 s.
    t_end = time.perf_counter() + 0.1
    while time.perf_counter() < t_end:
        jax.block_until_ready(multi(x0, shared, sets))
    if TIMER == "device":
        return device_seconds(multi, (x0, shared, sets), reps) / (reps * calls)
    times: list[float] = []
    t_end = time.perf_counter() + 0.1
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        jax.block_until_ready(multi(x0, shared, sets))
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def time_torch(fn, reps: int = 20) -> float:
    import torch

    t_end = time.perf_counter() + 0.1  # warm up clocks, as in time_jax
    while time.perf_counter() < t_end:
        fn()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------- ceilings


def copy_bandwidth() -> dict:
    import torch

    n = 1 << 30  # 2 GiB of bf16
    x = jnp.ones((n,), DTYPE)
    t_xla = time_jax(lambda a: a + jnp.asarray(1, DTYPE), x, min_calls=4)
    del x
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_torch = time_torch(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    moved = 2 * n * 2  # read + write
    res = {"xla_TBps": moved / t_xla / 1e12, "torch_TBps": moved / t_torch / 1e12}
    res["best_TBps"] = max(res["xla_TBps"], res["torch_TBps"])
    log(f"copy bandwidth: XLA {res['xla_TBps']:.2f} TB/s, torch {res['torch_TBps']:.2f} TB/s")
    return res


def matmul_peak() -> dict:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_torch = time_torch(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()
    x = jax.random.normal(jax.random.key(0), (n, n), DTYPE)
    scale = jnp.asarray(1 / math.sqrt(n), DTYPE)  # keeps the chained products finite
    t_xla = time_jax(lambda u, v: (u @ v) * scale, x, shared=(x + 1,), min_calls=4)
    res = {"torch_TFLOPs": 2 * n**3 / t_torch / 1e12, "xla_TFLOPs": 2 * n**3 / t_xla / 1e12}
    res["best_TFLOPs"] = max(res.values())
    log(f"bf16 matmul: torch {res['torch_TFLOPs']:.0f}, XLA {res['xla_TFLOPs']:.0f} TFLOP/s")
    return res


# ---------------------------------------------------------------- decode


def make_decode_inputs(batch, ctx, num_heads, num_kv_heads, num_sets, seed=0, head_dim: int = HEAD_DIM):
    """One page pool holding num_sets disjoint, shuffled block-table sets (for L2 rotation)."""
    pages_per_seq = ctx // BLOCK
    num_pages = 1 + num_sets * batch * pages_per_seq
    key = jax.random.key(seed)
    shape = (num_pages, BLOCK, num_kv_heads, head_dim)
    k_cache = jax.random.normal(key, shape, DTYPE)
    v_cache = jax.random.normal(jax.random.fold_in(key, 1), shape, DTYPE)
    perm = np.random.default_rng(seed).permutation(np.arange(1, num_pages)).astype(np.int32)
    tables = [jnp.asarray(perm[i * batch * pages_per_seq : (i + 1) * batch * pages_per_seq].reshape(batch, -1))
              for i in range(num_sets)]
    qs = [jax.random.normal(jax.random.fold_in(key, 10 + i), (batch, num_heads, head_dim), DTYPE)
          for i in range(num_sets)]
    lens = jnp.full((batch,), ctx, jnp.int32)
    return k_cache, v_cache, tables, qs, lens


DECODE_VARIANTS = {
    "default": dict(),
    "bn64_w4_s2": dict(block_n=64, num_warps=4, num_stages=2),
    "bn128_w4_s2": dict(block_n=128, num_warps=4, num_stages=2),
    "bn128_w8_s2": dict(block_n=128, num_warps=8, num_stages=2),
    "bn64_w4_s3": dict(block_n=64, num_warps=4, num_stages=3),
    "bn256_w8_s2": dict(block_n=256, num_warps=8, num_stages=2),
    "bn64_w4_s2_sp1": dict(block_n=64, num_warps=4, num_stages=2, num_splits=1),
    "bn64_w4_s2_sp2": dict(block_n=64, num_warps=4, num_stages=2, num_splits=2),
    "bn64_w4_s2_sp4": dict(block_n=64, num_warps=4, num_stages=2, num_splits=4),
    "bn128_w4_s2_sp1": dict(block_n=128, num_warps=4, num_stages=2, num_splits=1),
    "bn128_w4_s2_sp4": dict(block_n=128, num_warps=4, num_stages=2, num_splits=4),
    "bn64_w4_s2_sp64": dict(block_n=64, num_warps=4, num_stages=2, num_splits=64),
    "bn32_w4_s2_sp128": dict(block_n=32, num_warps=4, num_stages=2, num_splits=128),
    "bn128_w4_s3": dict(block_n=128, num_warps=4, num_stages=3),
    "bn128_w2_s2": dict(block_n=128, num_warps=2, num_stages=2),
    "bn256_w4_s2": dict(block_n=256, num_warps=4, num_stages=2),
    "bn128_w4_s2_sp8": dict(block_n=128, num_warps=4, num_stages=2, num_splits=8),
    "bn128_w4_s2_sp16": dict(block_n=128, num_warps=4, num_stages=2, num_splits=16),
}


# The decode attention of the engine's benchmark models at batch 256 (query heads, kv heads,
# head dim), timed at a 640-token context, the mean of issue 5's steady decode (512 in + 256 out).
ENGINE_DECODE_SHAPES = {
    "llama-3.2-1b": (32, 8, 64),
    "llama-3.1-8b": (32, 8, 128),
    "qwen3-0.6b": (16, 8, 128),
}


def bench_decode(batch, ctx, num_heads, num_kv_heads, copy_bw, variants, with_ref=True, head_dim: int = HEAD_DIM) -> dict:
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * 2
    qo_bytes = 2 * batch * num_heads * head_dim * 2
    total = kv_bytes + qo_bytes
    if 2 * kv_bytes > 40e9:
        return {"skipped": f"KV {kv_bytes / 1e9:.1f} GB too large"}
    num_sets = int(min(16, max(1, math.ceil(4 * L2_BYTES / kv_bytes))))
    k_cache, v_cache, tables, qs, lens = make_decode_inputs(batch, ctx, num_heads, num_kv_heads, num_sets, head_dim=head_dim)
    row = {"kv_bytes": kv_bytes, "bytes": total, "sets": num_sets}
    sets = tuple((t,) for t in tables)

    def report(name, seconds):
        row[name] = {"us": seconds * 1e6, "TBps": total / seconds / 1e12, "of_copy": total / seconds / 1e12 / copy_bw}

    ours = None
    # The first variant timed in a configuration read up to 13 % slow (identical kernels, runs
    # 10-11): time it once more, untimed, before the real measurements.
    warm = functools.partial(paged_decode_attention_tuned, **next(iter(variants.values())))
    time_jax(lambda q, kc, vc, ln, t: warm(q, kc, vc, t, ln), qs[0], (k_cache, v_cache, lens), sets, reps=3)
    for vname, params in variants.items():
        fn = functools.partial(paged_decode_attention_tuned, **params)
        try:
            report(f"ours_{vname}", time_jax(lambda q, kc, vc, ln, t: fn(q, kc, vc, t, ln), qs[0], (k_cache, v_cache, lens), sets))
            if ours is None:
                ours = fn(qs[0], k_cache, v_cache, tables[0], lens)
        except Exception as e:  # keep going: one failing variant must not lose the others
            row[f"ours_{vname}"] = {"error": repr(e)[:300]}
    best = min((v["us"], k) for k, v in row.items() if k.startswith("ours_") and "us" in v)
    row["ours_best"] = best[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    k_t, v_t = jnp.transpose(k_cache, (2, 0, 1, 3)), jnp.transpose(v_cache, (2, 0, 1, 3))
    del k_cache, v_cache
    try:
        # Its kernel needs k_splits to divide the pages per sequence (40 at context 640).
        k_splits = max(d for d in range(1, 17) if (ctx // BLOCK) % d == 0)
        peer = functools.partial(jax_paged.paged_attention, k_splits=k_splits)
        report("jax_paged_attention", time_jax(lambda q, kc, vc, ln, t: peer(q, kc, vc, t, ln), qs[0], (k_t, v_t, lens), sets))
        # jax's kernel applies no softmax scale: give it the pre-scaled query for the error check.
        peer_out = peer(qs[0] * (1 / math.sqrt(head_dim)), k_t, v_t, tables[0], lens)
        if ours is not None:
            row["err_vs_jax"] = rel_err(ours, peer_out)
    except Exception as e:
        row["jax_paged_attention"] = {"error": repr(e)[:300]}
    k_cache, v_cache = jnp.transpose(k_t, (1, 2, 0, 3)), jnp.transpose(v_t, (1, 2, 0, 3))
    del k_t, v_t
    if with_ref and 8 * kv_bytes < 30e9:
        ref = jax.jit(paged_decode_attention_reference)
        try:
            report("xla_reference", time_jax(lambda q, kc, vc, ln, t: ref(q, kc, vc, t, ln), qs[0], (k_cache, v_cache, lens), sets, min_calls=2, reps=3))
            if ours is not None:
                row["err_vs_ref"] = rel_err(ours, ref(qs[0], k_cache, v_cache, tables[0], lens))
        except Exception as e:
            row["xla_reference"] = {"error": repr(e)[:300]}
    else:
        row["xla_reference"] = {"skipped": "gathered f32 reference too large"}
    return row


# ---------------------------------------------------------------- prefill

PREFILL_VARIANTS = {
    "default": dict(),
    "m128_n128_w8_s2": dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
    "m128_n128_w8_s3": dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    "m128_n64_w4_s3": dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
    "m64_n64_w4_s3": dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
    "m64_n128_w4_s3": dict(block_m=64, block_n=128, num_warps=4, num_stages=3),
    "m64_n64_w4_s2": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
    "m128_n64_w8_s3": dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
    "m32_n64_w4_s3": dict(block_m=32, block_n=64, num_warps=4, num_stages=3),
    "m128_n128_w4_s2": dict(block_m=128, block_n=128, num_warps=4, num_stages=2),
    "m32_n128_w4_s3": dict(block_m=32, block_n=128, num_warps=4, num_stages=3),
    "m64_n128_w4_s2": dict(block_m=64, block_n=128, num_warps=4, num_stages=2),
    "m16_n64_w2_s3": dict(block_m=16, block_n=64, num_warps=2, num_stages=3),
    "m32_n64_w2_s3": dict(block_m=32, block_n=64, num_warps=2, num_stages=3),
}


def bench_prefill(num_seqs, seq_len, num_heads, num_kv_heads, peak, variants, head_dim: int = HEAD_DIM) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = num_seqs * seq_len
    flops = 2 * num_heads * head_dim * seq_len * (seq_len + 1) * num_seqs  # causal QK^T and PV
    key = jax.random.key(1)
    q = jax.random.normal(key, (tokens, num_heads, head_dim), DTYPE)
    k = jax.random.normal(jax.random.fold_in(key, 1), (tokens, num_kv_heads, head_dim), DTYPE)
    v = jax.random.normal(jax.random.fold_in(key, 2), (tokens, num_kv_heads, head_dim), DTYPE)
    pages = seq_len // BLOCK
    perm = np.random.default_rng(0).permutation(np.arange(1, 1 + num_seqs * pages)).astype(np.int32)
    block_tables = jnp.asarray(perm.reshape(num_seqs, pages))
    slots = (jnp.asarray(perm).reshape(num_seqs, pages)[:, :, None] * BLOCK + jnp.arange(BLOCK)).reshape(-1)
    cache_shape = (1 + num_seqs * pages, BLOCK, num_kv_heads, head_dim)
    k_cache, v_cache = write_kv_cache_reference(
        k, v, jnp.zeros(cache_shape, DTYPE), jnp.zeros(cache_shape, DTYPE), slots.astype(jnp.int32)
    )
    kv_lens = jnp.full((num_seqs,), seq_len, jnp.int32)
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32) * seq_len
    row = {"tokens": tokens, "flops": flops}

    def report(name, seconds):
        row[name] = {"us": seconds * 1e6, "TFLOPs": flops / seconds / 1e12, "of_peak": flops / seconds / 1e12 / peak}

    outs = {}
    warm = functools.partial(ragged_paged_attention_tuned, **next(iter(variants.values())))
    time_jax(warm, q, (k_cache, v_cache, block_tables, kv_lens, cu), min_calls=4, reps=3)  # untimed, as in decode
    for vname, params in variants.items():
        fn = functools.partial(ragged_paged_attention_tuned, **params)
        try:
            report(f"ours_{vname}", time_jax(fn, q, (k_cache, v_cache, block_tables, kv_lens, cu), min_calls=4))
            outs[vname] = fn(q, k_cache, v_cache, block_tables, kv_lens, cu)
        except Exception as e:
            row[f"ours_{vname}"] = {"error": repr(e)[:300]}

    def to_torch(x, heads):  # [T, heads, H] -> [S, heads, L, H]
        t = torch.from_dlpack(x.astype(jnp.float32)).to(torch.bfloat16)
        return t.reshape(num_seqs, seq_len, heads, head_dim).transpose(1, 2).contiguous()

    group = num_heads // num_kv_heads
    tq = to_torch(q, num_heads)
    tk = to_torch(k, num_kv_heads).repeat_interleave(group, dim=1)
    tv = to_torch(v, num_kv_heads).repeat_interleave(group, dim=1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)  # noqa: E731
        report("torch_sdpa_flash", time_torch(sdpa))
        ref = sdpa().transpose(1, 2).reshape(tokens, num_heads, head_dim).float().cpu().numpy()
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            report("torch_sdpa_cudnn", time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)))
    except Exception as e:
        row["torch_sdpa_cudnn"] = {"error": repr(e)[:200]}
    try:  # Mosaic GPU's FlashAttention-3-style kernel (no paging): what the other lowering reaches
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention_mgpu
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        # Its bf16 path failed to lower here (a bf16/f16 copy mismatch): run it in f16, same FLOPs.
        qh, kh, vh = (x.reshape(num_seqs, seq_len, *x.shape[1:]).astype(jnp.float16) for x in (q, k, v))
        mg = functools.partial(attention_mgpu.attention, config=config)
        report("jax_mosaic_fa3", time_jax(mg, qh, (kh, vh), min_calls=4))
        # Like jax's paged_attention it applies no softmax scale: pre-scale q for the error check.
        scaled = (qh * (1 / math.sqrt(head_dim))).astype(jnp.float16)
        row["err_jax_mosaic_fa3_vs_torch"] = rel_err(mg(scaled, kh, vh).reshape(q.shape), ref)
    except Exception as e:
        row["jax_mosaic_fa3"] = {"error": repr(e)[:300]}
    for vname, out in outs.items():
        row[f"err_{vname}_vs_torch"] = rel_err(out, ref)
    del tq, tk, tv
    torch.cuda.empty_cache()
    timed = [(v["us"], k) for k, v in row.items() if k.startswith("ours_") and isinstance(v, dict) and "us" in v]
    row["ours_best"] = min(timed)[1] if timed else None
    return row


# ---------------------------------------------------------------- KV write


def bench_write(num_tokens, cache_gb, steps: int = 16) -> dict:
    """Per-step time of a lax.scan that writes into donated caches carried through the loop.

    A copy of the cache per step would cost cache_gb / 3 TB/s (0.3 ms per GB): the time must not
    grow with the cache size.
    """
    num_kv_heads = 8
    page_bytes = BLOCK * num_kv_heads * HEAD_DIM * 2
    num_pages = int(cache_gb * 1e9 / 2 / page_bytes)
    shape = (num_pages, BLOCK, num_kv_heads, HEAD_DIM)
    key = jax.random.key(2)
    k = jax.random.normal(key, (num_tokens, num_kv_heads, HEAD_DIM), DTYPE)
    v = k + 1
    slots = jax.random.permutation(key, num_pages * BLOCK)[:num_tokens].astype(jnp.int32)
    slots = slots.at[::7].set(-1)
    res = {"new_bytes": 2 * num_tokens * num_kv_heads * HEAD_DIM * 2}
    for name, fn in [("pallas", write_kv_cache_tuned), ("xla_scatter", write_kv_cache_reference)]:
        def scan_steps(k, v, kc, vc, slots, fn=fn):
            def body(caches, i):
                return fn(k + i.astype(k.dtype), v, *caches, slots), None

            return jax.lax.scan(body, (kc, vc), jnp.arange(steps))[0]

        run = jax.jit(scan_steps, donate_argnums=(2, 3))
        step = jax.jit(fn, donate_argnums=(2, 3))
        kc, vc = jnp.zeros(shape, DTYPE), jnp.zeros(shape, DTYPE)
        kc, vc = run(k, v, kc, vc, slots)
        kc, vc = step(k, v, kc, vc, slots)
        jax.block_until_ready(kc)
        scan_times, call_times = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            kc, vc = run(k, v, kc, vc, slots)
            jax.block_until_ready(kc)
            scan_times.append((time.perf_counter() - t0) / steps)
            t0 = time.perf_counter()
            for _ in range(steps):
                kc, vc = step(k, v, kc, vc, slots)
            jax.block_until_ready(kc)
            call_times.append((time.perf_counter() - t0) / steps)
        res[name] = {"us": statistics.median(scan_times) * 1e6, "us_per_jit_call": statistics.median(call_times) * 1e6}
        if name == "pallas":
            check = write_kv_cache_reference(k, v, jnp.zeros(shape, DTYPE), jnp.zeros(shape, DTYPE), slots)
            res["pallas_matches_scatter"] = bool(jnp.array_equal(check[0], kc) and jnp.array_equal(check[1], vc))
        del kc, vc
    return res


# ---------------------------------------------------------------- main


def card_name() -> str:
    return jax.devices()[0].device_kind


def add_variants_arguments(p: argparse.ArgumentParser) -> None:
    """The options every interleaved-rounds variants benchmark takes (argmax_variants.py,
    add_rms_norm_variants.py)."""
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timer", choices=("wall", "device"), default="wall")
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter, tiny shapes")
    p.add_argument("--out", default=None, help="directory for the JSON")


def new_variants_result(timer: str) -> dict:
    """A variants benchmark's JSON before its rows: card, revision, timer, jax version. Sets
    the timer (TIMER) for time_jax too."""
    global TIMER
    TIMER = timer
    return {"card": card_name(), "git_revision": git_revision(), "timer": timer,
            "jax": jax.__version__, "rows": []}


def finish_variants(result: dict, out: str | None, stem: str, headers: list[str],
                    table: list[list]) -> None:
    """A variants benchmark's end: ``result`` as ``<out>/<stem>_<git revision>.json`` (``out``
    None: not written), then the card and the table on the console."""
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{stem}_{result['git_revision']}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", path)
    print(f"{result['card']}, timer {result['timer']}, git {result['git_revision']}")
    print(format_table(headers, table))


def write_reports(results: dict, out_dirs: list[str]) -> None:
    slug = card_name().replace(" ", "_").replace("/", "_")
    md = to_markdown(results)
    for d in out_dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"kernels_{slug}.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(d, f"kernels_{slug}.md"), "w") as f:
            f.write(md)


def _bandwidth(timing: dict) -> str:
    return f"{timing['TBps']:.2f} TB/s ({timing['of_copy']:.0%}) {timing['us']:.0f}us" if "TBps" in timing else "-"


def _decode_cells(row: dict) -> str:
    """A decode row's default, best variant (named) and jax paged_attention cells."""
    best = row.get("ours_best", "")
    return (f"{_bandwidth(row.get('ours_default', {}))} | {_bandwidth(row.get(best, {}))} {best[5:]} | "
            f"{_bandwidth(row.get('jax_paged_attention', {}))}")


def to_markdown(results: dict) -> str:
    lines = [f"# Kernel benchmark on {results['card']}", "",
             f"jax {results['jax']}, {results['date']}, git {results.get('git_revision', '?')}", ""]
    timer = results.get("timer", "wall")
    lines += [f"JAX timings: {TIMER_DESCRIPTIONS.get(timer, timer)}; torch's by CUDA events.", ""]
    c = results.get("copy", {})
    m = results.get("matmul", {})
    if c:
        lines.append(f"Copy bandwidth (read+write): XLA {c['xla_TBps']:.2f} TB/s, torch {c['torch_TBps']:.2f} TB/s.")
    if m:
        lines.append(f"bf16 matmul 8192^3: torch {m['torch_TFLOPs']:.0f}, XLA {m['xla_TFLOPs']:.0f} TFLOP/s.")
    lines += ["", "## Decode (bf16, head dim 128, block 16): achieved TB/s (fraction of copy bandwidth)", ""]
    lines.append("| batch | ctx | heads q/kv | ours (default) | ours best variant | jax paged_attention | XLA reference | default / jax |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for key, row in results.get("decode", {}).items():
        if "skipped" in row:
            lines.append(f"| {key} | skipped: {row['skipped']} |")
            continue
        default = row.get("ours_default", {})
        best = row.get(row.get("ours_best", ""), {})
        jaxp = row.get("jax_paged_attention", {})
        ref = row.get("xla_reference", {})
        cell = lambda d: f"{d['TBps']:.2f} ({d['of_copy']:.0%}) {d['us']:.0f}us" if "TBps" in d else "-"  # noqa: E731
        ratio = f"{jaxp['us'] / default['us']:.2f}x" if "us" in default and "us" in jaxp else "-"
        b, ctx, nq, nkv = key.split("_")
        lines.append(f"| {b} | {ctx} | {nq}/{nkv} | {cell(default)} | {cell(best)} {row.get('ours_best', '')[5:]} | {cell(jaxp)} | {cell(ref)} | {ratio} |")
    lines += ["", "## Prefill (causal, bf16, head dim 128): TFLOP/s", ""]
    lines.append("| seqs x len | heads q/kv | ours (default) | ours best variant | torch SDPA flash | torch cuDNN | jax Mosaic FA3 (no paging) | default / flash |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for key, row in results.get("prefill", {}).items():
        default = row.get("ours_default", {})
        best = row.get(row.get("ours_best") or "", {})
        fl = row.get("torch_sdpa_flash", {})
        cu = row.get("torch_sdpa_cudnn", {})
        mg = row.get("jax_mosaic_fa3", {})
        cell = lambda d: f"{d['TFLOPs']:.0f} ({d['us']:.0f}us)" if "TFLOPs" in d else "-"  # noqa: E731
        ratio = f"{fl['us'] / default['us']:.2f}x" if "us" in default and "us" in fl else "-"
        s, length, nq, nkv = key.split("_")
        lines.append(f"| {s}x{length} | {nq}/{nkv} | {cell(default)} | {cell(best)} {(row.get('ours_best') or '')[5:]} | {cell(fl)} | {cell(cu)} | {cell(mg)} | {ratio} |")
    if results.get("engine_decode"):
        lines += ["", "## The engine's steady decode: batch 256, context 640 (bf16, block 16)", ""]
        lines.append("| model | heads q/kv, head dim | ours (default) | ours best variant | jax paged_attention |")
        lines.append("|---|---|---|---|---|")
        for model, row in results["engine_decode"].items():
            nq, nkv, hd = ENGINE_DECODE_SHAPES.get(model, ("?", "?", "?"))
            lines.append(f"| {model} | {nq}/{nkv}, {hd} | {_decode_cells(row)} |")
    if results.get("smollm2_decode"):
        lines += ["", "## SmolLM2 shapes (9 query / 3 kv heads, head dim 64, block 16, bf16)", ""]
        lines.append("| decode batch x ctx | ours default | ours best | jax paged_attention | XLA reference |")
        lines.append("|---|---|---|---|---|")
        for key, row in results["smollm2_decode"].items():
            b, ctx = key.split("_")[:2]
            lines.append(f"| {b} x {ctx} | {_decode_cells(row)} | {_bandwidth(row.get('xla_reference', {}))} |")
        lines += ["", "| prefill seqs x len | ours default | ours best | torch SDPA flash | jax Mosaic FA3 |", "|---|---|---|---|---|"]
        for key, row in results.get("smollm2_prefill", {}).items():
            cell = lambda d: f"{d['TFLOPs']:.0f} TFLOP/s ({d['us']:.0f}us)" if "TFLOPs" in d else "-"  # noqa: E731
            s_, length = key.split("_")[:2]
            best = f"{cell(row.get(row.get('ours_best') or '', {}))} {(row.get('ours_best') or '')[5:]}"
            lines.append(f"| {s_} x {length} | {cell(row.get('ours_default', {}))} | {best} | {cell(row.get('torch_sdpa_flash', {}))} | {cell(row.get('jax_mosaic_fa3', {}))} |")
    lines += ["", "## KV write (donated caches), microseconds", ""]
    lines.append("Per step of a lax.scan carrying the donated caches (per separate jitted call in brackets).")
    lines.append("")
    lines.append("| tokens | cache GB | pallas (aliased) | XLA scatter |")
    lines.append("|---|---|---|---|")
    for key, row in results.get("write", {}).items():
        t, gb = key.split("_")
        p, x = row["pallas"], row["xla_scatter"]
        lines.append(f"| {t} | {gb} | {p['us']:.1f} ({p['us_per_jit_call']:.0f}) | {x['us']:.1f} ({x['us_per_jit_call']:.0f}) |")
    lines += ["", "Full numbers (every variant, errors vs peers) are in the JSON beside this file.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="key configurations only")
    parser.add_argument("--merge", action="store_true", help="update the card's existing report instead of replacing it")
    parser.add_argument("--out", default=None, help="extra directory for the reports (e.g. $OUT)")
    parser.add_argument("--sections", default="ceilings,decode,prefill,write",
                        help="also: smollm2, engine (decode at the engine's batch-256 shapes)")
    parser.add_argument("--decode-variants", default="default,bn128_w4_s2", help="outside the key configurations")
    parser.add_argument("--prefill-variants", default="default,m128_n128_w8_s2,m64_n64_w4_s3")
    parser.add_argument("--smollm2-decode-variants", default="default,bn128_w4_s2")
    parser.add_argument("--key-decode-variants", default=",".join(DECODE_VARIANTS), help="at the target configurations")
    parser.add_argument("--smollm2-prefill-variants", default="default")
    parser.add_argument("--timer", choices=("wall", "device"), default="wall",
                        help="JAX timings: host wall clock over a chain of calls, or the device's "
                        "kernel time over it from a profiler trace (no launch gaps)")
    args = parser.parse_args()
    global TIMER
    TIMER = args.timer
    sections = args.sections.split(",")
    out_dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")] + ([args.out] if args.out else [])
    results = {"card": card_name(), "jax": jax.__version__, "timer": args.timer,
               "git_revision": git_revision(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "decode": {}, "prefill": {}, "write": {}}
    slug = card_name().replace(" ", "_").replace("/", "_")
    previous = os.path.join(out_dirs[0], f"kernels_{slug}.json")
    if args.merge and os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        for section in ("copy", "matmul", "decode", "prefill", "write", "smollm2_decode", "smollm2_prefill"):
            if section in old:
                results[section] = old[section]
    log(f"card: {results['card']}")
    copy_bw = results.get("copy", {}).get("best_TBps", 3.0)
    peak = results.get("matmul", {}).get("best_TFLOPs", 790.0)
    if "ceilings" in sections:
        results["copy"] = copy_bandwidth()
        results["matmul"] = matmul_peak()
        copy_bw, peak = results["copy"]["best_TBps"], results["matmul"]["best_TFLOPs"]
        write_reports(results, out_dirs)
    if "decode" in sections:
        key_configs = {(64, 2048, 32), (64, 512, 32), (1, 8192, 32)}
        for nq in (32, 64):
            for batch in (1, 8, 64, 256):
                for ctx in (512, 2048, 8192):
                    if args.quick and (batch, ctx, nq) not in key_configs:
                        continue
                    names = args.key_decode_variants.split(",") if (batch, ctx, nq) in key_configs else args.decode_variants.split(",")
                    variants = {n: DECODE_VARIANTS[n] for n in names}
                    key = f"{batch}_{ctx}_{nq}_8"
                    t0 = time.time()
                    row = bench_decode(batch, ctx, nq, 8, copy_bw, variants)
                    results["decode"][key] = row
                    best = row.get(row.get("ours_best", ""), {})
                    jp = row.get("jax_paged_attention", {})
                    log(f"decode {key}: ours {best.get('TBps', 0):.2f} TB/s ({best.get('of_copy', 0):.0%}) "
                        f"[{row.get('ours_best')}], jax {jp.get('TBps', 0):.2f}, err_ref {row.get('err_vs_ref')}, "
                        f"err_jax {row.get('err_vs_jax')} ({time.time() - t0:.0f}s)")
                    write_reports(results, out_dirs)
    if "prefill" in sections:
        for nq in (32, 64):
            for num_seqs, seq_len in ((1, 4096), (8, 512), (1, 8192)):
                if args.quick and (num_seqs, seq_len) != (1, 4096):
                    continue
                key = f"{num_seqs}_{seq_len}_{nq}_8"
                variants = {n: PREFILL_VARIANTS[n] for n in args.prefill_variants.split(",")}
                row = bench_prefill(num_seqs, seq_len, nq, 8, peak, variants)
                results["prefill"][key] = row
                best = row.get(row.get("ours_best") or "", {})
                log(f"prefill {key}: ours {best.get('TFLOPs', 0):.0f} TFLOP/s [{row.get('ours_best')}], "
                    f"flash {row['torch_sdpa_flash']['TFLOPs']:.0f}, errs "
                    f"{ {k: round(v, 4) for k, v in row.items() if k.startswith('err_')} }")
                write_reports(results, out_dirs)
    if "smollm2" in sections:  # the default model's attention: 9 query / 3 kv heads, head dim 64
        for batch in (1, 8, 64, 256):
            for ctx in (512, 2048):
                key = f"{batch}_{ctx}_9_3_h64"
                names = args.smollm2_decode_variants.split(",")
                row = bench_decode(batch, ctx, 9, 3, copy_bw, {n: DECODE_VARIANTS[n] for n in names}, head_dim=64)
                results.setdefault("smollm2_decode", {})[key] = row
                best = row.get(row.get("ours_best", ""), {})
                log(f"smollm2 decode {key}: ours {best.get('TBps', 0):.2f} TB/s ({best.get('of_copy', 0):.0%}) [{row.get('ours_best')}], "
                    f"jax {row.get('jax_paged_attention', {}).get('TBps', 0):.2f}, err_ref {row.get('err_vs_ref')}")
                write_reports(results, out_dirs)
        for num_seqs, seq_len in ((1, 2048), (8, 512)):
            key = f"{num_seqs}_{seq_len}_9_3_h64"
            names = args.smollm2_prefill_variants.split(",")
            row = bench_prefill(num_seqs, seq_len, 9, 3, peak, {n: PREFILL_VARIANTS[n] for n in names}, head_dim=64)
            results.setdefault("smollm2_prefill", {})[key] = row
            best = row.get(row.get("ours_best") or "", {})
            log(f"smollm2 prefill {key}: ours {best.get('TFLOPs', 0):.0f} TFLOP/s [{row.get('ours_best')}], "
                f"flash {row['torch_sdpa_flash']['TFLOPs']:.0f}, err {row.get('err_default_vs_torch')}")
            write_reports(results, out_dirs)
    if "engine" in sections:  # the engine's steady decode at batch 256 (issue 5's workload)
        for model, (nq, nkv, head_dim) in ENGINE_DECODE_SHAPES.items():
            names = args.key_decode_variants.split(",")
            row = bench_decode(256, 640, nq, nkv, copy_bw, {n: DECODE_VARIANTS[n] for n in names},
                               with_ref=False, head_dim=head_dim)
            results.setdefault("engine_decode", {})[model] = row
            best, default = row.get(row.get("ours_best", ""), {}), row.get("ours_default", {})
            log(f"engine decode {model} (256 x 640, {nq}/{nkv}, head dim {head_dim}): default "
                f"{default.get('TBps', 0):.2f} TB/s ({default.get('of_copy', 0):.0%}), best "
                f"{best.get('TBps', 0):.2f} ({best.get('of_copy', 0):.0%}) [{row.get('ours_best')}]")
            write_reports(results, out_dirs)
    if "write" in sections:
        for tokens in (64, 4096):
            for gb in (1, 8):
                res = bench_write(tokens, gb)
                results["write"][f"{tokens}_{gb}"] = res
                log(f"write {tokens} tokens, {gb} GB cache: {res}")
                write_reports(results, out_dirs)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
