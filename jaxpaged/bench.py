"""`jaxpaged-bench` (or `python -m jaxpaged.bench`): offline benchmarks of the engine.

    jaxpaged-bench throughput --model llama-3.2-1b --load-format dummy --num-prompts 512 \\
        --input-len 512 --output-len 256 --ignore-eos --compare hf --json results/
    jaxpaged-bench latency --model llama-3.2-1b --load-format dummy --batch-size 8
    jaxpaged-bench batching --model llama-3.2-1b --load-format dummy --caps 32,128,512,1536
    jaxpaged-bench summary results/*.json        (issue 5's targets, met or not)
    jaxpaged-bench serving ...   (when jaxpaged.bench_serving is present)

Each subcommand prints a short table last and, with --json PATH (a file, or a directory for
an automatic name), writes every number with the card, jax version and git revision.
"""

import argparse
import importlib
import json
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="a preset (with --load-format dummy), a Hugging Face directory or a "
                        ".gguf file; default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--block-size", type=_positive_int, default=16)
    g.add_argument("--max-num-seqs", type=_positive_int, default=None)
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=None)
    g.add_argument("--max-model-len", type=_positive_int, default=None)
    g.add_argument("--num-kv-blocks", type=_positive_int, default=None)
    g.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1,
                   help="devices to split the model over (all hosts' devices after "
                        "jax.distributed.initialize; see docs/tensor_parallel.md)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="plan and dispatch step N + 1 while step N runs on the device")
    g.add_argument("--num-scheduler-steps", type=_positive_int, default=None,
                   help="decode steps one scheduler output may run on the device (vLLM's "
                        "multi-step scheduling; default: 4 on a GPU, 1 on the CPU)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 (greedy, default) gives every system the same work per token")
    g.add_argument("--json", default=None, metavar="PATH",
                   help="write the result here (a directory gets an automatic file name)")


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", default="random",
                   help="'random' or a .jsonl file (prompt_token_ids or prompt, output_len)")
    g.add_argument("--input-len", type=_positive_int, default=512)
    g.add_argument("--output-len", type=_positive_int, default=256)
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (vLLM's random dataset)")
    g.add_argument("--num-prompts", type=_positive_int, default=512)
    g.add_argument("--ignore-eos", action="store_true")
    g = p.add_argument_group("peers and roofline")
    g.add_argument("--compare", choices=("hf",), default=None,
                   help="also run transformers' generate and generate_batch on the same prompts")
    g.add_argument("--compare-num-prompts", type=_positive_int, default=None,
                   help="run the peers on the first N prompts only (rates are per second)")
    g.add_argument("--hf-modes", type=lambda s: s.split(","), default=None,
                   help="comma-separated subset of generate,generate_batch")
    g.add_argument("--hf-batch-size", type=_positive_int, default=64,
                   help="static batch size of HF generate")
    g.add_argument("--hf-cb-config", default="{}",
                   help="JSON overrides of transformers' ContinuousBatchingConfig")
    g.add_argument("--compare-timeout", type=float, default=None, help="seconds")
    g.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                   help="measure copy bandwidth and compare steady decode with the roofline")
    g.add_argument("--copy-bytes", type=_positive_int, default=None,
                   help="buffer size of the copy-bandwidth measurement")


def add_latency_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--input-len", type=_positive_int, default=32)
    p.add_argument("--output-len", type=_positive_int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=10)
    p.add_argument("--num-iters", type=_positive_int, default=30)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)


def add_batching_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--num-prompts", type=_positive_int, default=1000)
    p.add_argument("--input-len", type=_positive_int, default=512)
    p.add_argument("--mean-output-len", type=float, default=128.0)
    p.add_argument("--caps", type=_int_list, default=[32, 128, 512, 1536],
                   help="output-length caps, one row each")
    p.add_argument("--schedulers", type=lambda s: s.split(","),
                   default=["static", "reserve", "paged"],
                   help="comma-separated subset of static,reserve,paged")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="plot path (default: beside --json, or batching.png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpaged-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_throughput_args(sub.add_parser("throughput", help="vLLM's benchmark_throughput"))
    add_latency_args(sub.add_parser("latency", help="vLLM's benchmark_latency"))
    add_batching_args(sub.add_parser(
        "batching", help="static vs reserve-max_tokens vs paged continuous batching"))
    summary = sub.add_parser("summary", help="issue 5's targets against result JSON files")
    summary.add_argument("files", nargs="+", metavar="FILE.json")
    summary.add_argument("--out", default=None, metavar="MD", help="also write it here")
    serving = _serving_module()
    if isinstance(serving, str):  # present but not importable: say why when it is asked for
        sub.add_parser("serving", help=f"unavailable: {serving}", add_help=False)
    elif serving is not None:
        serving.add_parser(sub)
    return parser


def _serving_module():
    """jaxpaged.bench_serving (another engineer's), mounted as `serving` when present: the
    module, None when it does not exist, or why it failed to import (a missing extra)."""
    try:
        return importlib.import_module("jaxpaged.bench_serving")
    except ModuleNotFoundError as e:
        if e.name == "jaxpaged.bench_serving":
            return None
        return f"{e} (pip install -e '.[serve]')"
    except ImportError as e:
        return str(e)


def validate(args: argparse.Namespace) -> None:
    """Checks argparse cannot express; raise SystemExit via parser.error in main."""
    if getattr(args, "range_ratio", 0.0) and not 0.0 <= args.range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.command in ("throughput", "latency", "batching"):
        if args.load_format == "dummy" and args.model is None:
            args.model = "smollm2-135m"
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.command == "throughput":
        try:
            cb = json.loads(args.hf_cb_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--hf-cb-config is not JSON ({e}): {args.hf_cb_config!r}")
        if not isinstance(cb, dict):
            raise ValueError(f"--hf-cb-config must be a JSON object, got {args.hf_cb_config!r}")
    if args.command == "throughput" and args.hf_modes:
        bad = set(args.hf_modes) - {"generate", "generate_batch"}
        if bad:
            raise ValueError(f"--hf-modes: unknown {sorted(bad)}; allowed: generate, "
                             f"generate_batch")
    if args.command == "batching":
        bad = set(args.schedulers) - {"static", "reserve", "paged"}
        if bad:
            raise ValueError(f"--schedulers: unknown {sorted(bad)}; allowed: static, reserve, "
                             f"paged")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as e:
        parser.error(str(e))
    if args.command == "throughput":
        from jaxpaged import bench_throughput as bt

        result = bt.run_throughput(args)
        bt.report(result, bt.throughput_table(result), args.json)
    elif args.command == "latency":
        from jaxpaged import bench_throughput as bt

        result = bt.run_latency(args)
        bt.report(result, bt.latency_table(result), args.json)
    elif args.command == "batching":
        from jaxpaged import bench_batching as bb

        bb.main(args)
    elif args.command == "summary":
        from jaxpaged.bench_summary import summarize

        text = summarize(args.files)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    else:
        serving = _serving_module()
        if isinstance(serving, str):
            parser.error(f"serving is unavailable: {serving}")
        serving.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
