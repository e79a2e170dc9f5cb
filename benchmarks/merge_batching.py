"""Merge `jaxpaged-bench batching` runs that measured different caps of one experiment (split
over device calls to fit a time limit) into one result, its table and its plot:

    python benchmarks/merge_batching.py a.json b.json --out results/batching_<model>_<card>.json

The plot lands beside --out with a .png suffix. Runs must agree on card, model, engine and
workload arguments (`jaxpaged.bench_batching.merge_results` refuses otherwise).
"""

import argparse
import json
import os

from jaxpaged.bench_batching import batching_table, merge_results, plot
from jaxpaged.bench_common import read_json_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = read_json_results(args.results)
    merged = merge_results(results)
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(merged, png)
    print(batching_table(merged))
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
