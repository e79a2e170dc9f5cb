"""What an unrolled layer loop costs to compile, and why: one decode bucket's forward compiled
with the layers scanned or unrolled, attention through the Pallas kernels or XLA's reference.

    JAXPAGED_COMPILATION_CACHE=0 python benchmarks/compile_time.py --model llama-3.2-1b

Prints compile seconds per variant. If unrolled-pallas is much slower than unrolled-reference,
the cost is compiling each layer's kernel instances; if both are slow, it is XLA's own work
(autotuning each GEMM: compare a run with XLA_FLAGS=--xla_gpu_autotune_level=0).
`--multi-step K` also times the multi-step window program of the same bucket (greedy sampler
variant): lowering is Python (one thread at a time under the GIL, so warm-up's threads cannot
overlap it), compiling is XLA's.
"""

import argparse
import json
import os
import time

from jaxpaged import LLM
from jaxpaged.runner import BucketShape
from jaxpaged.sampler import sampling_metadata_variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--impls", default="pallas,reference")
    p.add_argument("--unroll", default="0,1")
    p.add_argument("--multi-step", type=int, default=0, metavar="K")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if os.environ.get("JAXPAGED_COMPILATION_CACHE", "1") != "0":
        raise SystemExit("set JAXPAGED_COMPILATION_CACHE=0: a cache hit is not a compile")
    shape = BucketShape(args.batch, args.batch, args.batch, True)
    rows = []
    for impl in args.impls.split(","):
        llm = LLM(args.model, load_format="dummy", max_num_seqs=args.batch, num_kv_blocks=1024,
                  attention_impl=impl, warmup=False)
        runner = llm.llm_engine.runner
        for unroll in args.unroll.split(","):
            runner.unroll_setting = unroll
            t0 = time.perf_counter()
            lowered = runner.lower_forward(shape)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            rows.append({"impl": impl, "unrolled": unroll == "1", "lower_s": t1 - t0,
                         "compile_s": t2 - t1})
            print(f"{impl:9} unrolled={unroll}: lower {t1 - t0:6.1f} s, compile {t2 - t1:6.1f} s",
                  flush=True)
            if args.multi_step > 1:
                runner.num_scheduler_steps = args.multi_step
                smd = next(m for m in sampling_metadata_variants(
                    args.batch, runner.vocab_size, runner.max_model_len)
                    if m.all_greedy and m.no_penalties and not m.max_num_logprobs)
                t0 = time.perf_counter()
                lowered = runner.lower_multi_step(args.batch, smd)
                t1 = time.perf_counter()
                lowered.compile()
                t2 = time.perf_counter()
                rows.append({"impl": impl, "unrolled": unroll == "1", "multi_step": args.multi_step,
                             "lower_s": t1 - t0, "compile_s": t2 - t1})
                print(f"{impl:9} unrolled={unroll} window of {args.multi_step}: lower "
                      f"{t1 - t0:6.1f} s, compile {t2 - t1:6.1f} s", flush=True)
        del llm, runner
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
