"""The sampler's cost for one step's logits, with and without logprobs asked:

    python benchmarks/sampler_time.py --rows 256 --vocab 128256

Greedy rows; prints the median milliseconds of the jitted `sample` on the default device.
"""

import argparse
import time

import jax
import numpy as np

from jaxpaged import SamplingParams
from jaxpaged.sampler import SamplingRow, build_sampling_metadata, sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    logits = jax.numpy.asarray(np.random.default_rng(0).normal(
        size=(args.rows, args.vocab)).astype(np.float32))
    f = jax.jit(sample)
    for logprobs in (None, 1):
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=logprobs)
        rows = [SamplingRow(params, i, [1, 2, 3], 2, 0) for i in range(args.rows)]
        md = build_sampling_metadata(rows, args.rows, args.vocab, 8192)
        jax.block_until_ready(f(logits, md))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(logits, md))
            times.append(time.perf_counter() - t0)
        print(f"{jax.devices()[0].device_kind}: sample {args.rows} x {args.vocab}, "
              f"logprobs={logprobs}: {np.median(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
