"""Decode-attention variants at the engine's batch-256 shapes, timed in interleaved rounds.

The single-pass sweep in ``kernels.py --sections engine`` measured identical kernels up to 10%
apart, more than the differences it was looking for. Here every variant runs once a round, in
the same order, for several rounds on the same inputs, and the table reports each variant's
median over the rounds and its ratio to the first variant of the list.

    python benchmarks/decode_variants.py --variants base,seqs_fastest,mgpu --rounds 3 --out $OUT
    python benchmarks/decode_variants.py --variants base,mgpu --profile-only   # under ncu
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels  # noqa: E402
from kernels import (ENGINE_DECODE_SHAPES, L2_BYTES, card_name, make_decode_inputs,  # noqa: E402
                     time_jax)

from jaxpaged.bench_common import git_revision  # noqa: E402
from pallas_kernels.paged_decode_attention import (  # noqa: E402
    default_block_n, paged_decode_attention_reference, paged_decode_attention_tuned)

VARIANTS = {
    "base": dict(),  # the default: Triton, kv heads fastest
    "seqs_fastest": dict(heads_fastest=False),
    "bn32": dict(block_n=32),
    "bn128": dict(block_n=128),
    "base_s3": dict(num_stages=3),
    "mgpu": dict(kernel="mgpu"),
    "mgpu_s2": dict(kernel="mgpu", stages=2),
    "mgpu_s3": dict(kernel="mgpu", stages=3),
    "mgpu_s6": dict(kernel="mgpu", stages=6),
    "mgpu_bn128": dict(kernel="mgpu", block_n=128),
    "mgpu_bn128_s3": dict(kernel="mgpu", block_n=128, stages=3),
    # The engine's inputs, one difference at a time: RoPE tables (the model passes them), and a
    # page pool over 4 GiB (the engine's: Pallas's Triton lowering then computes 64-bit offsets).
    "rope": dict(rope=True),
    "big_pool": dict(pool_gib=5),
    "big_pool_rope": dict(pool_gib=5, rope=True),
    # With 64-bit offsets the kernel takes 65 registers and loses an eighth of its occupancy
    # (ncu): tiles and warps that may bring it back under 64.
    "big_pool_bn32": dict(pool_gib=5, block_n=32),
    "big_pool_w8": dict(pool_gib=5, num_warps=8),
    "big_pool_bn128_w8": dict(pool_gib=5, block_n=128, num_warps=8),
    "big_pool_s1": dict(pool_gib=5, num_stages=1),
    "big_pool_s3": dict(pool_gib=5, num_stages=3),
    "big_pool_bn16": dict(pool_gib=5, block_n=16),
    "big_pool_bn32_w2": dict(pool_gib=5, block_n=32, num_warps=2),
    "big_pool_bn32_s3": dict(pool_gib=5, block_n=32, num_stages=3),
    "big_pool_bn64": dict(pool_gib=5, block_n=64),
    # The same pages at the front of a --big-pool-gib pool, or spread evenly over all of it
    # (the engine's pages drift over its pool as its FIFO free queue hands out blocks). One
    # pool holds both copies of the pages.
    "pool_big": dict(pool_gib="big"),
    # The engine's call at head dim 64 (fourteenth session): its 32-key tile, RoPE tables, the
    # pages at the front of a --big-pool-gib pool (the engine's is ~20 GiB for K and V each).
    "engine_bn32": dict(pool_gib="big", block_n=32, rope=True),
    # Each sequence's pages in one ascending run, sequences side by side, as the engine's FIFO
    # free queue hands them out in a fresh engine (the benchmark's tables are shuffled).
    "contiguous_bn32": dict(block_n=32, contiguous=True),
    "engine_contiguous": dict(pool_gib=5, block_n=32, rope=True, contiguous=True),
    # The engine's tile for the model's head dim ("engine": default_block_n), over pages laid
    # out as an allocator could hand them out: shuffled in a compact pool (the benchmark's),
    # one ascending run a sequence, runs shuffled within windows of W pages, or scattered at
    # random over a --big-pool-gib pool (a free list shuffled once over the engine's pool).
    "tile": dict(block_n="engine"),
    "tile_contiguous": dict(block_n="engine", contiguous=True),
    "tile_window64": dict(block_n="engine", contiguous=True, window=64),
    "tile_window512": dict(block_n="engine", contiguous=True, window=512),
    "tile_window4096": dict(block_n="engine", contiguous=True, window=4096),
    "tile_scatter": dict(block_n="engine", pool_gib="big", scatter=True),
    # Each call after a GEMM the size of llama-3.2-1b's gate/up launch (256 x 2048 x 16384,
    # bf16), whose result its query depends on, as the engine's attention follows projections;
    # with --attention-only the attention kernel alone is timed (does the tensor cores' work
    # just before slow it, e.g. through the clocks?).
    "tile_after_gemm": dict(block_n="engine", after_gemm=True),
    # Block tables as wide as the engine's (max_model_len / block size = 512 columns; the pages
    # past a sequence's context point at page 0).
    "tile_wide_table": dict(block_n="engine", table_width=512),
    "tile_wider_table": dict(block_n="engine", table_width=8192),  # max_model_len 131072
    "pool_big_spread": dict(pool_gib="big", spread=True),
}
INPUT_OPTIONS = ("rope", "pool_gib", "spread", "contiguous", "window", "scatter", "after_gemm",
                 "table_width")


def variant_fn(params: dict, head_dim: int):
    """The decode kernel a variant names, with its tuning (``kernel="mgpu"``: the Mosaic GPU one;
    ``block_n="engine"``: the engine's tile for the head dim)."""
    params = {k: v for k, v in params.items() if k not in INPUT_OPTIONS}
    if params.get("block_n") == "engine":
        params["block_n"] = default_block_n(head_dim)
    if params.pop("kernel", "triton") == "mgpu":
        from pallas_kernels.paged_decode_attention_mgpu import paged_decode_attention_mgpu

        return functools.partial(paged_decode_attention_mgpu, **params)
    return functools.partial(paged_decode_attention_tuned, **params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--extra-tokens", type=int, default=0,
                        help="kv_lens = context + this (1-15: a partial last page and tile)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-pool-gib", type=float, default=16.0,
                        help="the pool size of the pool_big variants")
    parser.add_argument("--profile-only", action="store_true",
                        help="call each variant a few times, untimed (run under ncu)")
    parser.add_argument("--timer", choices=("wall", "device"), default="wall",
                        help="kernels.py's TIMER: host wall clock over the chain, or device time")
    parser.add_argument("--attention-only", action="store_true",
                        help="with --timer device: time the paged_decode_attention kernel alone")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    names = args.variants.split(",")
    kernels.TIMER = args.timer
    if args.attention_only:
        kernels.DEVICE_KERNEL_PREFIX = "paged_decode_attention"
    rev = git_revision()
    result = {"card": card_name(), "jax": jax.__version__, "git_revision": rev,
              "timer": args.timer, "batch": args.batch, "context": args.context,
              "extra_tokens": args.extra_tokens, "variants": {n: VARIANTS[n] for n in names},
              "models": {}}
    for model in args.models.split(","):
        nq, nkv, head_dim = ENGINE_DECODE_SHAPES[model]
        kv_bytes = 2 * args.batch * (args.context + args.extra_tokens) * nkv * head_dim * 2
        total = kv_bytes + 2 * args.batch * nq * head_dim * 2
        num_sets = 1 if args.profile_only else int(min(16, max(1, -(-4 * L2_BYTES // kv_bytes))))
        pages_ctx = args.context + (16 if args.extra_tokens else 0)
        k_cache, v_cache, tables, qs, lens = make_decode_inputs(
            args.batch, pages_ctx, nq, nkv, num_sets, head_dim=head_dim)
        lens = jnp.full_like(lens, args.context + args.extra_tokens)
        sets = tuple((t,) for t in tables)
        fns = {n: variant_fn(VARIANTS[n], head_dim) for n in names}
        def pool_of(n):
            gib = VARIANTS[n].get("pool_gib", 0)
            return args.big_pool_gib if gib == "big" else gib

        pools = {0: (k_cache, v_cache)}
        for n in names:  # the same pages at the front of a larger pool, zeros after them
            gib = pool_of(n)
            if gib not in pools:
                pad = max(0, int(gib * 2**30) // (k_cache[0].size * k_cache.dtype.itemsize)
                          - k_cache.shape[0])
                pools[gib] = tuple(jnp.pad(c, ((0, pad), (0, 0), (0, 0), (0, 0))) for c in (k_cache, v_cache))
        angles = jax.random.uniform(jax.random.key(7), (args.batch, head_dim // 2), jnp.float32, 0, 6.3)
        rope = (jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1)))
        for n in names:
            if VARIANTS[n].get("rope"):
                fns[n] = functools.partial(fns[n], rope=rope)
        variant_sets = {n: sets for n in names}
        for n in names:  # page p -> n + p * stride, behind the front copy, spread to the end
            if VARIANTS[n].get("spread"):
                gib, front = pool_of(n), k_cache.shape[0]
                stride = (pools[gib][0].shape[0] - front) // front
                ids = front + jnp.arange(front) * stride
                put = jax.jit(lambda c, src: c.at[ids].set(src), donate_argnums=0)
                pools[gib] = (put(pools[gib][0], k_cache), put(pools[gib][1], v_cache))
                variant_sets[n] = tuple((front + t * stride,) for t in tables)
        for n in names:  # the same pages, each set's ids sorted: every row one ascending run
            if VARIANTS[n].get("contiguous"):
                window = VARIANTS[n].get("window")
                rng = np.random.default_rng(5)
                def arrange(t, window=window, rng=rng):
                    ids = np.sort(np.asarray(t).reshape(-1))
                    if window:  # runs shuffled within windows of `window` pages
                        for start in range(0, ids.size, window):
                            ids[start:start + window] = rng.permutation(ids[start:start + window])
                    return jnp.asarray(ids.reshape(t.shape))
                variant_sets[n] = tuple((arrange(t),) for (t,) in variant_sets[n])
        for n in names:  # every page copied to a random place behind the front copy
            if VARIANTS[n].get("scatter"):
                gib, front = pool_of(n), k_cache.shape[0]
                ids = front + jnp.asarray(np.random.default_rng(6).choice(
                    pools[gib][0].shape[0] - front, front, replace=False).astype(np.int32))
                put = jax.jit(lambda c, src: c.at[ids].set(src), donate_argnums=0)
                pools[gib] = (put(pools[gib][0], k_cache), put(pools[gib][1], v_cache))
                variant_sets[n] = tuple((ids[t],) for t in tables)
        for n in names:  # the same tables padded to the engine's width with the null page
            width = VARIANTS[n].get("table_width")
            if width:
                variant_sets[n] = tuple((jnp.pad(t, ((0, 0), (0, width - t.shape[1]))),)
                                        for (t,) in variant_sets[n])
        caches = {n: pools[pool_of(n)] for n in names}
        if args.profile_only:
            for n, fn in fns.items():
                try:
                    for _ in range(3):
                        jax.block_until_ready(fn(qs[0], *caches[n], variant_sets[n][0][0], lens))
                    print(f"{model} {n}: called", flush=True)
                except Exception as e:  # one failing variant must not lose the others
                    print(f"{model} {n}: {e!r}"[:500], flush=True)
            continue
        # Same answer as the XLA reference on the first table set, before any timing.
        # (A variant's own first table: the spread ones' pages hold the same data as the front
        # copy, the contiguous ones read other pages of the same pool.)
        refs = {}
        def reference(n):
            key = (bool(VARIANTS[n].get("rope")), n if VARIANTS[n].get("contiguous") else "")
            if key not in refs:
                table = variant_sets[n][0][0] if key[1] else tables[0]
                refs[key] = np.asarray(paged_decode_attention_reference(
                    qs[0], k_cache, v_cache, table, lens, rope if key[0] else None), np.float32)
            return refs[key]

        errs = {}
        for n, fn in fns.items():
            ref = reference(n)
            try:
                out = np.asarray(fn(qs[0], *caches[n], variant_sets[n][0][0], lens), np.float32)
                errs[n] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            except Exception as e:
                result.setdefault("errors", {})[f"{model}/{n}"] = repr(e)[:300]
        gemm_operands = ()
        if any(VARIANTS[n].get("after_gemm") for n in names):
            gemm_operands = (jnp.ones((args.batch, 2048), jnp.bfloat16),
                             jnp.ones((2048, 16384), jnp.bfloat16) * 1e-3)
        times: dict[str, list[float]] = {n: [] for n in names if n in errs}
        for _ in range(args.rounds):
            for n in times:
                fn = fns[n]
                try:
                    if VARIANTS[n].get("after_gemm"):
                        def step(q, kc, vc, ln, gx, gw, t, fn=fn):
                            g = jnp.dot(gx, gw, preferred_element_type=jnp.float32)
                            return fn(q + (jnp.max(g) * 0).astype(q.dtype), kc, vc, t, ln)
                        shared = (*caches[n], lens, *gemm_operands)
                    else:
                        step = (lambda q, kc, vc, ln, t, fn=fn: fn(q, kc, vc, t, ln))
                        shared = (*caches[n], lens)
                    times[n].append(time_jax(step, qs[0], shared, variant_sets[n]))
                except Exception as e:  # one failing variant must not lose the others
                    times[n] = []
                    result.setdefault("errors", {})[f"{model}/{n}"] = repr(e)[:300]
        rows = {}
        for n in names:
            if not times.get(n):
                continue
            med = statistics.median(times[n])
            rows[n] = {"us": med * 1e6, "TBps": total / med / 1e12, "rel_err": errs[n],
                       "rounds_us": [t * 1e6 for t in times[n]]}
        result["models"][model] = {"bytes": total, "rows": rows}
        del k_cache, v_cache, pools, caches
    if args.profile_only:
        return
    base = names[0]
    lines = [f"{'model':14} {'variant':14} {'us':>8} {'TB/s':>6} {'vs ' + base:>9} {'rel err':>8}  rounds"]
    for model, entry in result["models"].items():
        ref = entry["rows"].get(base, {}).get("us")
        for n, row in entry["rows"].items():
            ratio = f"{ref / row['us']:.3f}" if ref else "-"
            spread = " ".join(f"{t:.0f}" for t in row["rounds_us"])
            lines.append(f"{model:14} {n:14} {row['us']:8.1f} {row['TBps']:6.2f} {ratio:>9} "
                         f"{row['rel_err']:8.1e}  {spread}")
    table = "\n".join(lines)
    result["table"] = table
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"decode_variants{args.tag}_{rev}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print(table)
    if result.get("errors"):
        print("errors:", json.dumps(result["errors"], indent=1))


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"({time.time() - start:.0f} s)")
