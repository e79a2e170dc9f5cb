"""From a `stacked_matmul.py --variants launch --launch-kernels mgpu --timer device` JSON, the
Mosaic GPU setting of each launch that beat `mosaic_settings`'s own, as the
JAXPAGED_MOSAIC_SETTINGS value that makes the engine take them (for a device profile or an
A/B in the same call). Prints `{}` where nothing beat the rule.

    python benchmarks/pick_mosaic_settings.py $OUT/launch.json [--min-gain 0.03]

A split launch's f32 partials are read by the next launch (o and down: add_rms_norm), which
the launch benchmark does not time: each split past two is charged their extra bytes at 3 TB/s.
q/k/v is taken unsplit only (its partials would need a launch of their own to be summed).
"""

import argparse
import json
import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stacked_matmul import LAUNCHES, MODELS, SMALL_MODELS, weight_dims  # noqa: E402

from pallas_kernels.stacked_matmul_mgpu import mosaic_settings  # noqa: E402

READ_TBPS = 3.0
SHAPES = {**MODELS, **SMALL_MODELS}


def launch_shape(model: str, launch: str) -> tuple[int, list[int], bool]:
    dims = weight_dims(SHAPES[model])
    _, names, epilogue = LAUNCHES[launch]
    return dims[names[0]][0], [dims[n][1] for n in names], epilogue == "silu_mul"


def charged_ms(row: dict) -> float:
    """The row's kernel time plus what its extra partials cost their reader."""
    splits = row["tuning"].get("num_splits", 1)
    if row["launch"] not in ("o", "down") or splits <= 2:
        return row["ms"]
    shape = SHAPES[row["model"]]
    extra = (splits - 2) * shape["L"] * row["T"] * shape["D"] * 4
    return row["ms"] + extra / (READ_TBPS * 1e12) * 1e3


def pick(rows: list[dict], min_gain: float) -> dict[str, dict]:
    picked = {}
    for key in dict.fromkeys((r["model"], r["T"], r["launch"]) for r in rows):
        model, num_tokens, launch = key
        group = [r for r in rows if (r["model"], r["T"], r["launch"]) == key
                 and r.get("kernel") == "mgpu" and "ms" in r and r.get("rel_err", 1) < 1e-2]
        if launch == "qkv":
            group = [r for r in group if r["tuning"].get("num_splits", 1) == 1]
        d_in, d_outs, silu_mul = launch_shape(model, launch)
        rule = mosaic_settings(num_tokens, d_in, d_outs, silu_mul, jnp.bfloat16)
        base = next((r for r in group if r["tuning"] == rule), None)
        if not group or base is None:
            continue
        best = min(group, key=charged_ms)
        if charged_ms(best) < (1 - min_gain) * charged_ms(base):
            name = f"{'silu_mul_' if silu_mul else ''}{d_in}x{sum(d_outs)}"
            picked[name] = best["tuning"]
            print(f"{model} T={num_tokens} {launch}: {charged_ms(base):.4f} -> "
                  f"{charged_ms(best):.4f} ms a scan with {best['tuning']}", file=sys.stderr)
    return picked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json")
    p.add_argument("--min-gain", type=float, default=0.03)
    args = p.parse_args()
    with open(args.json) as f:
        rows = json.load(f)["rows"]
    print(json.dumps(pick([r for r in rows if "launch" in r], args.min_gain)))


if __name__ == "__main__":
    main()
