"""add_rms_norm's tunings against XLA's add + norm at the engine's decode junctions.

At a decode step of batch 256 each layer has two junctions: the o (or down) projection's output
added to the residual stream and the sum normalised for the next projection. llama-3.2-1b's o
and down launches leave f32 partial sums over a D_in split in two ([2, 256, 2048]); the 8B's
leave their bf16 output ([256, 4096]). Each variant runs once a round, in the same order, for
several rounds (as decode_variants.py); the table gives each one's median device time and the
bytes it must move over that time.

    python benchmarks/add_rms_norm_variants.py --timer device --rounds 3 --out $OUT
    python benchmarks/add_rms_norm_variants.py --interpret --rounds 1   # a CPU smoke run
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

from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference  # noqa: E402

EPS = 1e-5
# model: (T, D, partial sums S or 0 for a bf16 output, layers of norm scales)
SHAPES = {"llama-3.2-1b": (256, 2048, 2, 16), "llama-3.1-8b": (256, 4096, 0, 32)}
SMALL_SHAPES = {"tiny": (8, 64, 2, 2)}
TUNINGS = [dict(block_t=1, num_warps=4), dict(block_t=1, num_warps=2),
           dict(block_t=1, num_warps=8), dict(block_t=2, num_warps=4),
           dict(block_t=2, num_warps=8), dict(block_t=4, num_warps=8),
           dict(block_t=8, num_warps=8)]


def inputs(num_tokens: int, dim: int, splits: int, layers: int):
    rng = np.random.default_rng(0)
    residual = jnp.asarray(rng.standard_normal((num_tokens, dim)), jnp.bfloat16)
    y = (jnp.asarray(rng.standard_normal((splits, num_tokens, dim)), jnp.float32) if splits
         else jnp.asarray(rng.standard_normal((num_tokens, dim)), jnp.bfloat16))
    scales = jnp.asarray(1 + 0.1 * rng.standard_normal((layers, dim)), jnp.bfloat16)
    return residual, y, scales


def junction(fn, index: int):
    """One junction as a chain step: (residual, normed) -> the next (residual, normed), the
    norm's scale row `index` of the stack."""
    def step(carry, y, scales):
        return fn(carry[0], y, scales, index)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES))
    add_variants_arguments(p)
    args = p.parse_args()
    shapes = SMALL_SHAPES if args.interpret else {m: SHAPES[m] for m in args.models}
    tunings = TUNINGS[:2] if args.interpret else TUNINGS
    rows, result = [], new_variants_result(args.timer)
    for model, (num_tokens, dim, splits, layers) in shapes.items():
        residual, y, scales = inputs(num_tokens, dim, splits, layers)
        moved = residual.nbytes * 3 + y.nbytes  # residual in, residual and norm out, y in
        variants = {"xla": jax.jit(functools.partial(add_rms_norm_reference, eps=EPS))}
        for t in tunings:
            variants[f"block_t={t['block_t']},warps={t['num_warps']}"] = jax.jit(
                functools.partial(add_rms_norm, eps=EPS, interpret=args.interpret or None, **t))
        index = layers - 1
        want = variants["xla"](residual, y, scales, index)
        errors = {}
        for name, fn in variants.items():
            got = fn(residual, y, scales, index)
            errors[name] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(
                jnp.float32)))) for g, w in zip(got, want))
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(time_jax(junction(fn, index), (residual, residual),
                                                (y, scales)))
        base = statistics.median(times["xla"])
        for name in variants:
            seconds = statistics.median(times[name])
            row = dict(model=model, variant=name, us=seconds * 1e6, GBps=moved / seconds / 1e9,
                       vs_xla=base / seconds, max_abs_err=errors[name], rounds_us=[
                           t * 1e6 for t in times[name]])
            result["rows"].append(row)
            rows.append([model, name, f"{row['us']:.2f}", f"{row['GBps']:.0f}",
                         f"{row['vs_xla']:.2f}", f"{row['max_abs_err']:.3g}"])
            print(f"{model} {name}: {row['us']:.2f} us", flush=True)
    finish_variants(result, args.out, "add_rms_norm_variants",
                    ["model", "variant", "us", "GB/s", "vs xla", "max abs err"], rows)


if __name__ == "__main__":
    main()
