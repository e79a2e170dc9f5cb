"""Paged over reserving continuous batching as the KV cache shrinks: one row per
`jaxpaged-bench batching` run (each at its own --num-kv-blocks), at one output-length cap.

    python benchmarks/batching_kv_sweep.py RUN.json... --cap 1536 \
        --out results/batching_kv_sweep_<model>_<card>.json

Writes the rows as JSON, a plot beside it (.png: both throughputs and their ratio against the
KV cache's usable tokens) and prints a Markdown table (`jaxpaged.bench_batching.kv_sweep`).

Why a sweep: the continuous-batching study this experiment comes from ran OPT-13B on a 40 GB
A100, whose KV cache held roughly 11-15k tokens (the model keeps ~800 KB a token; the vLLM
paper's figure 1 gives the KV cache ~12 GB of that card, less at vLLM's default memory
fraction). At cap 1536 a reserved region is 2,048 tokens, so only ~5-7 requests fit there
without paging. An H100 holding a GQA model's cache (128 KB a token for llama-3.1-8b) fits ten
times more, and the gain from paging shrinks with the memory pressure: the sweep shows how.
"""

import argparse
import json
import os

from jaxpaged.bench_batching import kv_sweep, kv_sweep_table, plot_kv_sweep
from jaxpaged.bench_common import read_json_results

STUDY_KV_TOKENS = (11_000, 15_000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--cap", type=int, default=1536)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = read_json_results(args.results)
    rows = kv_sweep(results, args.cap)
    first = results[0]
    out = {"benchmark": "batching_kv_sweep", "card": first["card"], "model": first["model"],
           "cap": args.cap, "study_kv_tokens": STUDY_KV_TOKENS,
           "sources": [os.path.basename(p) for p in args.results], "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    plot_kv_sweep(rows, args.cap, f"{first['model']} on {first['card']}", png,
                  shade=STUDY_KV_TOKENS)
    print(kv_sweep_table(rows))
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
