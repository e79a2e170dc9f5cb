"""The greedy sampler's argmax over a decode step's logits: XLA's against a two-stage split.

At batch 256 a llama-3.2-1b step's logits are [256, 128256] bf16 (66 MB); XLA's argmax of them
(one reduction fusion, the f32 widening inside it) took 0.032 ms a step on an H100, 2.05 TB/s
(benchmarks/NOTES_engine.md, thirteenth session). Each variant here gives the first index of
the row maximum, as jnp.argmax does; each runs once a round for several rounds (as
decode_variants.py), on a chain of distinct logits arrays so that repeats are not served from
L2. The table gives each one's median time and the bytes it reads over that time.

    python benchmarks/argmax_variants.py --timer device --rounds 3 --out $OUT
    python benchmarks/argmax_variants.py --interpret --rounds 1   # a CPU smoke run
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

SHAPES = {"llama-3.2-1b": (256, 128256), "qwen3-0.6b": (256, 151936),
          "llama-3.2-1b-b64": (64, 128256)}
SMALL_SHAPES = {"small": (8, 1000)}
CHAIN = 8  # distinct logits arrays a chain, 8 x 66 MB: well past the 50 MB L2


def xla_argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)


def two_stage(logits: jax.Array, chunks: int) -> jax.Array:
    """XLA, in two reductions: the maximum and its first index in each of `chunks` column
    chunks, then the first chunk holding the row maximum."""
    rows, vocab = logits.shape
    width = -(-vocab // chunks)
    x = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, chunks * width - vocab)),
                constant_values=-jnp.inf).reshape(rows, chunks, width)
    m = jnp.max(x, axis=-1)
    i = jnp.argmax(x, axis=-1).astype(jnp.int32)
    c = jnp.argmax(m, axis=-1)
    return (c * width + jnp.take_along_axis(i, c[:, None], axis=1)[:, 0]).astype(jnp.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    add_variants_arguments(p)
    args = p.parse_args()
    shapes = SMALL_SHAPES if args.interpret else {s: SHAPES[s] for s in args.shapes}
    interpret = args.interpret or None
    rows, result = [], new_variants_result(args.timer)
    for shape_name, (num_rows, vocab) in shapes.items():
        rng = np.random.default_rng(0)
        sets = [(jnp.asarray(rng.standard_normal((num_rows, vocab)) * 4, jnp.bfloat16),)
                for _ in range(2 if args.interpret else CHAIN)]
        variants = {"xla": xla_argmax}
        for chunks in (8, 32, 128):
            variants[f"xla_two_stage_{chunks}"] = functools.partial(two_stage, chunks=chunks)
        for tuning in ({}, dict(block_rows=4, block_cols=1024, chunks=32),
                       dict(block_rows=8, block_cols=512, chunks=64),
                       dict(block_rows=2, block_cols=2048, chunks=16),
                       dict(block_rows=16, block_cols=256, chunks=128)):
            label = ",".join(f"{k}={v}" for k, v in tuning.items()) or "defaults"
            variants[f"pallas {label}"] = functools.partial(argmax_rows, interpret=interpret,
                                                            **tuning)
        want = np.asarray(xla_argmax(sets[0][0]))
        mismatches = {name: int((np.asarray(jax.jit(fn)(sets[0][0])) != want).sum())
                      for name, fn in variants.items()}
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                # The chain's carry: each call's tokens added to the last (the logits differ
                # a call, so nothing repeats and XLA merges nothing).
                step = (lambda carry, logits, fn=fn: carry + fn(logits))
                times[name].append(time_jax(step, jnp.zeros(num_rows, jnp.int32), sets=sets))
        base = statistics.median(times["xla"])
        moved = num_rows * vocab * 2
        for name in variants:
            seconds = statistics.median(times[name])
            row = dict(shape=shape_name, rows=num_rows, vocab=vocab, variant=name,
                       us=seconds * 1e6, GBps=moved / seconds / 1e9, vs_xla=base / seconds,
                       mismatches=mismatches[name], rounds_us=[t * 1e6 for t in times[name]])
            result["rows"].append(row)
            rows.append([shape_name, name, f"{row['us']:.2f}", f"{row['GBps']:.0f}",
                         f"{row['vs_xla']:.2f}", row["mismatches"]])
            print(f"{shape_name} {name}: {row['us']:.2f} us", flush=True)
    finish_variants(result, args.out, "argmax_variants",
                    ["shape", "variant", "us", "GB/s", "vs xla", "mismatches"], rows)


if __name__ == "__main__":
    main()
