"""Decode-attention variants at the engine's batch-256 shapes, timed in interleaved rounds.

The single-pass sweep in ``kernels.py --sections engine`` measured identical kernels up to 10%
apart, more than the differences it was looking for. Here every variant runs once a round, in
the same order, for several rounds on the same inputs, and the table reports each variant's
median over the rounds and its ratio to the first variant of the list.

    python benchmarks/decode_variants.py --variants base,pf1,pf2 --rounds 3 --out $OUT
    python benchmarks/decode_variants.py --variants base,pf2 --profile-only   # for ncu
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import (ENGINE_DECODE_SHAPES, L2_BYTES, card_name, make_decode_inputs,  # noqa: E402
                     time_jax)

from pallas_kernels.paged_decode_attention import paged_decode_attention_tuned  # noqa: E402

VARIANTS = {
    "base": dict(block_n=64, num_warps=4, num_stages=2, prefetch=0),
    "base_s3": dict(block_n=64, num_warps=4, num_stages=3, prefetch=0),
    "pf1": dict(block_n=64, num_warps=4, num_stages=2, prefetch=1),
    "pf1_s3": dict(block_n=64, num_warps=4, num_stages=3, prefetch=1),
    "pf1_s1": dict(block_n=64, num_warps=4, num_stages=1, prefetch=1),
    "pf2": dict(block_n=64, num_warps=4, num_stages=1, prefetch=2),
    "pf2_s2": dict(block_n=64, num_warps=4, num_stages=2, prefetch=2),
    "pf2_bn32": dict(block_n=32, num_warps=4, num_stages=1, prefetch=2),
    "pf2_bn128": dict(block_n=128, num_warps=4, num_stages=1, prefetch=2),
    "pf2_w2": dict(block_n=64, num_warps=2, num_stages=1, prefetch=2),
    "pf2_bn128_w8": dict(block_n=128, num_warps=8, num_stages=1, prefetch=2),
    "pf1_bn128": dict(block_n=128, num_warps=4, num_stages=2, prefetch=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-only", action="store_true",
                        help="call each variant a few times, untimed (run under ncu)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    names = args.variants.split(",")
    rev = os.environ.get("JAXPAGED_GIT_REV") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"card": card_name(), "jax": jax.__version__, "git_revision": rev,
              "batch": args.batch, "context": args.context, "variants": {n: VARIANTS[n] for n in names},
              "models": {}}
    for model in args.models.split(","):
        nq, nkv, head_dim = ENGINE_DECODE_SHAPES[model]
        kv_bytes = 2 * args.batch * args.context * nkv * head_dim * 2
        total = kv_bytes + 2 * args.batch * nq * head_dim * 2
        num_sets = 1 if args.profile_only else int(min(16, max(1, -(-4 * L2_BYTES // kv_bytes))))
        k_cache, v_cache, tables, qs, lens = make_decode_inputs(
            args.batch, args.context, nq, nkv, num_sets, head_dim=head_dim)
        sets = tuple((t,) for t in tables)
        fns = {n: functools.partial(paged_decode_attention_tuned, **VARIANTS[n]) for n in names}
        if args.profile_only:
            for n, fn in fns.items():
                for _ in range(3):
                    jax.block_until_ready(fn(qs[0], k_cache, v_cache, tables[0], lens))
                print(f"{model} {n}: called", flush=True)
            continue
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for n, fn in fns.items():
                try:
                    times[n].append(time_jax(lambda q, kc, vc, ln, t, fn=fn: fn(q, kc, vc, t, ln),
                                             qs[0], (k_cache, v_cache, lens), sets))
                except Exception as e:  # one failing variant must not lose the others
                    times[n] = []
                    result.setdefault("errors", {})[f"{model}/{n}"] = repr(e)[:300]
        rows = {}
        for n in names:
            if not times[n]:
                continue
            med = statistics.median(times[n])
            rows[n] = {"us": med * 1e6, "TBps": total / med / 1e12,
                       "rounds_us": [t * 1e6 for t in times[n]]}
        result["models"][model] = {"bytes": total, "rows": rows}
        del k_cache, v_cache
    if args.profile_only:
        return
    base = names[0]
    lines = [f"{'model':14} {'variant':14} {'us':>8} {'TB/s':>6} {'vs ' + base:>9}  rounds"]
    for model, entry in result["models"].items():
        ref = entry["rows"].get(base, {}).get("us")
        for n, row in entry["rows"].items():
            ratio = f"{ref / row['us']:.3f}" if ref else "-"
            spread = " ".join(f"{t:.0f}" for t in row["rounds_us"])
            lines.append(f"{model:14} {n:14} {row['us']:8.1f} {row['TBps']:6.2f} {ratio:>9}  {spread}")
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
