"""Greedy tokens with tensor parallelism against one device: each tensor_parallel_size runs in
its own process (so one run's weights and KV cache never share a GPU with the next), writes
its tokens, and the parent compares them prompt by prompt.

    python benchmarks/tp_greedy.py --model llama-3.1-8b --load-format dummy --dtype float32 \\
        --tp 1,2 --json results/tp_greedy.json

Exit status 0 when every tensor_parallel_size gives the first one's tokens exactly. Sums are
reduced in a different order once split (the all-reduce adds per-shard partial sums), so in
bfloat16 a near-tie can flip a token and everything after it; float32 is the exact check, and
bfloat16 reports how far the runs agree.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy", choices=("auto", "dummy"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tp", default="1,2", help="comma-separated tensor_parallel_size values")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--json", default=None, help="write the comparison here")
    p.add_argument("--worker-tp", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    from jaxpaged import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype,
              tensor_parallel_size=args.worker_tp, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
              attention_impl=args.attention_impl)
    vocab = llm.llm_engine.model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, vocab, size=args.input_len)]
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                            logprobs=1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    Path(args.worker_out).write_text(json.dumps({
        "tokens": [o.outputs[0].token_ids for o in outputs],
        "cumulative_logprobs": [o.outputs[0].cumulative_logprob for o in outputs],
        "compiles_after_warmup": llm.llm_engine.runner.num_compiles_since_warmup}))


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


def compare(runs: dict[int, dict]) -> dict:
    base_tp = min(runs)
    base = runs[base_tp]
    result = {}
    for tp, run in runs.items():
        diffs = [first_difference(a, b) for a, b in zip(base["tokens"], run["tokens"])]
        result[str(tp)] = {
            "identical_prompts": sum(d is None for d in diffs),
            "num_prompts": len(diffs),
            "first_difference_positions": [d for d in diffs if d is not None],
            "max_abs_cumulative_logprob_diff": max(
                abs(x - y) for x, y in zip(base["cumulative_logprobs"],
                                           run["cumulative_logprobs"])),
            "compiles_after_warmup": run["compiles_after_warmup"]}
    return {"baseline_tp": base_tp, "by_tp": result}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_tp is not None:
        worker(args)
        return 0
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in [int(t) for t in args.tp.split(",")]:
            out = os.path.join(tmp, f"tp{tp}.json")
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                   "--worker-tp", str(tp), "--worker-out", out]
            print(f"=== tensor_parallel_size={tp}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                print(f"tensor_parallel_size={tp} failed", file=sys.stderr)
                return 2
            runs[tp] = json.loads(Path(out).read_text())
    result = {"model": args.model, "dtype": args.dtype, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len, **compare(runs)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    identical = all(r["identical_prompts"] == r["num_prompts"]
                    for r in result["by_tp"].values())
    print("greedy tokens identical across", args.tp, ":", identical)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
