"""The gate/up launch two ways at T 256: two 128-wide weight tiles a step (the engine's), or one
256-wide tile of paired columns (``epilogue="silu_mul_paired"``, ``pair_gate_up``).

At T 256 the launch sits at the compute ridge (NOTES_engine, fifteenth session); with two
weights each warpgroup's wgmmas read its rows of x from shared memory twice a step, with one
paired tile once, in one instruction of twice the width. Device time of the Mosaic launches
alone, 16 layers' stacks read in turn, interleaved rounds:

    python benchmarks/silu_mul_paired.py --models llama-3.2-1b,llama-3.1-8b --out $OUT
"""

import argparse
import functools
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels  # noqa: E402
from kernels import card_name, time_jax  # noqa: E402

from jaxpaged.bench_common import git_revision  # noqa: E402
from pallas_kernels.stacked_matmul_mgpu import pair_gate_up, stacked_matmul_mgpu  # noqa: E402

SHAPES = {"llama-3.2-1b": (2048, 8192), "llama-3.1-8b": (4096, 14336),
          "tiny": (128, 256)}  # D, F; tiny: a dry run on the CPU (interpreter)
VARIANTS = {
    "two_tiles": dict(epilogue="silu_mul", warp_specialized=True, block_m=128, block_n=128,
                      max_concurrent_steps=4),  # mosaic_settings' for silu_mul at T 256
    "paired_s4": dict(epilogue="silu_mul_paired", warp_specialized=True, block_m=128,
                      block_n=256, max_concurrent_steps=4),
    "paired_s3": dict(epilogue="silu_mul_paired", warp_specialized=True, block_m=128,
                      block_n=256, max_concurrent_steps=3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama-3.2-1b")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    kernels.TIMER = "device"
    kernels.DEVICE_KERNEL_PREFIX = "stacked_matmul_mgpu"
    names = args.variants.split(",")
    result = {"card": card_name(), "jax": jax.__version__, "git_revision": git_revision(),
              "tokens": args.tokens, "variants": {n: VARIANTS[n] for n in names}, "models": {}}
    for model in args.models.split(","):
        d, f = SHAPES[model]
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (args.tokens, d), jnp.bfloat16)
        gate, up = (0.02 * jax.random.normal(k, (args.layers, d, f), jnp.bfloat16)
                    for k in keys[1:])
        paired = pair_gate_up(gate, up, 256)
        ref = stacked_matmul_mgpu(x, (gate, up), jnp.int32(3), **VARIANTS["two_tiles"])
        layers = tuple((jnp.int32(i),) for i in range(args.layers))
        times: dict[str, list[float]] = {n: [] for n in names}
        errors = {}
        for n in names:
            ws = (paired,) if "paired" in n else (gate, up)
            out = stacked_matmul_mgpu(x, ws, jnp.int32(3), **VARIANTS[n])
            errors[n] = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
        for _ in range(args.rounds):
            for n in names:
                ws = (paired,) if "paired" in n else (gate, up)
                launch = functools.partial(stacked_matmul_mgpu, **VARIANTS[n])

                def step(x, ws, layer, launch=launch):
                    out = launch(x, ws, layer)  # the next x depends on this launch's output
                    return x + out[:, :x.shape[1]] * jnp.asarray(1e-3, x.dtype)

                times[n].append(time_jax(step, x, shared=(ws,), sets=layers,
                                         min_calls=args.layers) * 1e6)
                print(f"{model} {n}: {times[n][-1]:.1f} us", flush=True)
        rows = {n: statistics.median(v) for n, v in times.items()}
        result["models"][model] = {"median_us": rows, "rounds_us": times,
                                   "max_abs_diff_vs_two_tiles": errors}
        base = rows[names[0]] or float("nan")  # 0 on a CPU (no device kernels)
        print(f"\n{model}, T {args.tokens}: us a launch (device), median of {args.rounds}")
        for n, us in rows.items():
            print(f"  {n:12} {us:7.1f}  {us / base:6.3f}  max |diff| {errors[n]:.2e}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"silu_mul_paired_{result['git_revision']}.json")
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
