"""Multi-step decoding gives the tokens single steps give, on the GPU path (Pallas attention,
stacked projections, unrolled decode, the dispatch thread): one process, two engines on the
same dummy weights (same seed), greedy and seeded sampling, the fraction of equal completions
printed and written as JSON. The CPU tests check the same on SmolLM2 with the reference
attention; the device image has no SmolLM2, so this uses a preset's dummy weights.

    python benchmarks/multi_step_check.py --model llama-3.2-1b --steps 4 --json $OUT/x.json
"""

import argparse
import gc
import json
import time

import numpy as np

from jaxpaged import LLM, SamplingParams
from jaxpaged.bench_common import env_info


def run(args, num_steps: int, prompts, params) -> tuple[list, float, int]:
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", seed=0,
              max_num_seqs=args.num_prompts, num_kv_blocks=args.num_kv_blocks,
              max_model_len=1024, num_scheduler_steps=num_steps)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    compiles = llm.llm_engine.runner.num_compiles_since_warmup
    del llm
    gc.collect()
    return [[c.token_ids for c in o.outputs] for o in outs], elapsed, compiles


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 30000, int(n)).tolist()
               for n in rng.integers(16, 200, args.num_prompts)]
    # Greedy with varied lengths (windows end early for some rows), seeded sampling with
    # top-k/top-p, and min_tokens (single steps until it is reached).
    params = [SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True)
              if i % 3 else SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i,
                                           max_tokens=int(n), min_tokens=5, ignore_eos=True)
              for i, n in enumerate(rng.integers(6, 60, args.num_prompts))]
    single, t1, c1 = run(args, 1, prompts, params)
    multi, tk, ck = run(args, args.steps, prompts, params)
    equal = [a == b for a, b in zip(single, multi)]
    first_diff = [next((j for j, (x, y) in enumerate(zip(a[0], b[0])) if x != y), None)
                  for a, b in zip(single, multi)]
    result = {"env": env_info(), "model": args.model, "num_scheduler_steps": args.steps,
              "num_prompts": args.num_prompts, "equal_completions": int(sum(equal)),
              "greedy_equal": int(sum(e for i, e in enumerate(equal) if i % 3)),
              "greedy_total": sum(1 for i in range(args.num_prompts) if i % 3),
              "first_difference_at": [d for d in first_diff if d is not None],
              "lengths_equal": all(len(a[0]) == len(b[0]) for a, b in zip(single, multi)),
              "compiles_after_warmup": [c1, ck], "generate_s": [t1, tk]}
    print(json.dumps({k: v for k, v in result.items() if k != "env"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
