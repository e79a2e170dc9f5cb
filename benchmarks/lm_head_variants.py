"""A greedy step's LM head and argmax: XLA's GEMM + the argmax kernel against one fused launch.

The engine's greedy decode step writes [T, V] logits from the LM head's GEMM (cuBLAS through XLA)
and reads them back in ``pallas_kernels.argmax_rows``; ``pallas_kernels.lm_head_argmax`` reduces
each output tile to a (maximum, first index) pair a row in the GEMM's epilogue, so the logits never
reach memory. Each variant here runs once a round for several rounds, on a chain of distinct
hidden-state arrays (the weight, 0.25-1 GB, is far past L2 anyway). The table gives each one's
median time, the weight bytes over it, and how many of its tokens differ from XLA's unfused
argmax (differences can only be near-ties: the largest logit gap of a differing token, in f32
logits, is reported).

    python benchmarks/lm_head_variants.py --timer device --rounds 3 --out $OUT
    python benchmarks/lm_head_variants.py --interpret --rounds 1   # a CPU smoke run
"""

import argparse
import functools
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import (add_variants_arguments, finish_variants, new_variants_result,  # noqa: E402
                     time_jax)

from pallas_kernels.argmax import argmax_rows  # noqa: E402
from pallas_kernels.lm_head_argmax import lm_head_argmax  # noqa: E402

# name: (hidden size, vocabulary, tied: the weight is the [V, D] embedding table)
SHAPES = {"llama-3.2-1b": (2048, 128256, True), "llama-3.1-8b": (4096, 128256, False),
          "qwen3-0.6b": (1024, 151936, True)}
SMALL_SHAPES = {"small": (128, 512, True), "small-untied": (128, 512, False)}
TOKENS = (256, 64, 8)
CHAIN = 8  # distinct inputs a chain: as many as its calls (time_jax), so XLA merges nothing
FUSED_SETTINGS = ({}, dict(block_m=256, block_n=128, max_concurrent_steps=4),
                  dict(block_m=128, block_n=128, max_concurrent_steps=6))


def head_logits(x: jax.Array, w: jax.Array, tied: bool) -> jax.Array:
    """The model's LM head: logits in x's dtype (nnx.Embed.attend / a Linear)."""
    return jnp.dot(x, w.T if tied else w)


def unfused(x, w, tied: bool, argmax) -> jax.Array:
    return argmax(head_logits(x, w, tied)).astype(jnp.int32)


def xla_argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    add_variants_arguments(p)
    args = p.parse_args()
    shapes = SMALL_SHAPES if args.interpret else {s: SHAPES[s] for s in args.shapes}
    interpret = args.interpret or None
    tokens = [16] if args.interpret else args.tokens
    rows, result = [], new_variants_result(args.timer)
    for shape_name, (d, vocab, tied) in shapes.items():
        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.standard_normal((vocab, d) if tied else (d, vocab)) * 0.02,
                        jnp.bfloat16)
        for num_tokens in tokens:
            sets = [(jnp.asarray(rng.standard_normal((num_tokens, d)), jnp.bfloat16),)
                    for _ in range(1 if args.interpret else CHAIN)]
            variants = {"xla gemm + argmax kernel": functools.partial(
                            unfused, tied=tied,
                            argmax=functools.partial(argmax_rows, interpret=interpret)),
                        "xla gemm + xla argmax": functools.partial(unfused, tied=tied,
                                                                   argmax=xla_argmax)}
            for tuning in FUSED_SETTINGS:
                label = ",".join(f"{k}={v}" for k, v in tuning.items()) or "defaults"
                variants[f"fused {label}"] = functools.partial(
                    lm_head_argmax, transposed=tied, interpret=interpret, **tuning)
            x0 = sets[0][0]
            f32_logits = np.asarray(jnp.dot(x0, w.T if tied else w,
                                            preferred_element_type=jnp.float32))
            want = np.asarray(jax.jit(variants["xla gemm + xla argmax"])(x0, w))
            checks = {}
            for name, fn in variants.items():
                got = np.asarray(jax.jit(fn)(x0, w))
                differ = np.flatnonzero(got != want)
                rows_at = np.arange(len(got))
                gaps = (f32_logits[rows_at, want] - f32_logits[rows_at, got])[differ]
                checks[name] = (len(differ), float(np.abs(gaps).max()) if len(differ) else 0.0)
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    # Each call's x takes the last call's tokens in one element: every GEMM
                    # then depends on the one before, so XLA can neither merge the calls' GEMMs
                    # (they share the weight) into one nor drop repeats.
                    step = (lambda carry, w, x, fn=fn: carry + fn(
                        x.at[0, 0].set(carry[0].astype(x.dtype)), w))
                    times[name].append(time_jax(step, jnp.zeros(num_tokens, jnp.int32),
                                                shared=(w,), sets=sets))
            base = statistics.median(times["xla gemm + argmax kernel"])
            for name in variants:
                seconds = statistics.median(times[name])
                mismatches, gap = checks.get(name, (None, None))
                row = dict(shape=shape_name, tokens=num_tokens, hidden=d, vocab=vocab, tied=tied,
                           variant=name, us=seconds * 1e6, weight_TBps=w.nbytes / seconds / 1e12,
                           vs_engine=base / seconds, mismatches=mismatches, max_gap=gap,
                           rounds_us=[t * 1e6 for t in times[name]])
                result["rows"].append(row)
                rows.append([shape_name, num_tokens, name, f"{row['us']:.1f}",
                             f"{row['weight_TBps']:.2f}", f"{row['vs_engine']:.3f}",
                             "-" if mismatches is None else f"{mismatches} ({gap:.2g})"])
                print(f"{shape_name} T{num_tokens} {name}: {row['us']:.1f} us", flush=True)
    finish_variants(result, args.out, "lm_head_variants",
                    ["shape", "T", "variant", "us", "weight TB/s", "vs engine",
                     "differ (max gap)"], rows)


if __name__ == "__main__":
    main()
