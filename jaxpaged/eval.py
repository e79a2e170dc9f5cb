"""`jaxpaged-eval` (also `python -m jaxpaged.eval`): batch generation, multiple-choice
log-likelihoods and perplexity on the engine, from the command line.

    jaxpaged-eval generate --input prompts.jsonl --output results.jsonl [--chat] [--skip-invalid]
    jaxpaged-eval loglikelihood --input mc.jsonl [--output scores.jsonl]
    jaxpaged-eval perplexity --input text.txt [--window N] [--stride M]

Each takes the model flags (--model, --dtype, --max-model-len, ...); generate also takes
sampling flags (--temperature, --top-p, --max-tokens, ...), which rows may override by field
name (`{"id": 3, "prompt": "...", "max_tokens": 64}`). Bad input is reported with its file, line
and what is allowed, before the model loads, with exit status 2; Ctrl-C during generate exits
with 130 after the rows finished so far are safely written, and re-running resumes.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxpaged.eval_data import (InputError, check_output_path, read_loglikelihood_rows,
                                read_text)
from jaxpaged.eval_generate import plan_generate, print_summary, run_generate
from jaxpaged.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jaxpaged.engine import LLMEngine

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") \
                from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _model_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face directory (default: embedded SmolLM2-135M)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    for flag in ("--max-model-len", "--max-num-seqs", "--max-num-batched-tokens"):
        g.add_argument(flag, type=_int_at_least(1), default=None,
                       help="default: the engine's per-platform default")
    g.add_argument("--num-kv-blocks", type=_int_at_least(2), default=None)
    g.add_argument("--tensor-parallel-size", "-tp", type=_int_at_least(1), default=1,
                   help="devices to split the model over (see docs/tensor_parallel.md)")
    g.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="engine seed; rows without a seed sample with one derived from it")
    g.add_argument("--no-warmup", action="store_true",
                   help="compile shapes as they are met instead of all at start-up")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (rows may override any SamplingParams field)")
    g.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 or -1: off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--max-tokens", type=_int_at_least(1), default=256)
    g.add_argument("--min-tokens", type=_int_at_least(0), default=0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, metavar="STRING",
                   help="stop string; repeat for several")
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpaged-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = _model_flags()
    gen = sub.add_parser("generate", parents=[model], help="complete a JSONL file of prompts",
                         description="Each line: {\"id\": ..., \"prompt\": \"...\"} or "
                                     "{\"id\": ..., \"messages\": [...]}, optionally with "
                                     "SamplingParams fields and \"metadata\".")
    gen.add_argument("--input", type=Path, required=True)
    gen.add_argument("--output", type=Path, required=True,
                     help="results, appended as they finish; ids already there are skipped")
    gen.add_argument("--chat", action="store_true",
                     help="apply the chat template to \"prompt\" rows too")
    gen.add_argument("--skip-invalid", action="store_true",
                     help="record bad lines as error rows instead of stopping")
    _sampling_flags(gen)
    ll = sub.add_parser("loglikelihood", parents=[model],
                        help="score multiple-choice continuations",
                        description="Each line: {\"id\": ..., \"context\": \"...\", "
                                    "\"continuations\": [...], \"answer\": index or text}.")
    ll.add_argument("--input", type=Path, required=True)
    ll.add_argument("--output", type=Path, default=None, help="per-row scores as JSONL")
    ppl = sub.add_parser("perplexity", parents=[model], help="strided perplexity of a text")
    ppl.add_argument("--input", type=Path, required=True, help="a UTF-8 text file")
    ppl.add_argument("--window", type=_int_at_least(2), default=None,
                     help="tokens per window (default: --max-model-len)")
    ppl.add_argument("--stride", type=_int_at_least(1), default=None,
                     help="tokens between window starts (default: half the window)")
    ppl.add_argument("--output", type=Path, default=None, help="the result as JSON")
    return parser


def sampling_base(args: argparse.Namespace) -> dict[str, Any]:
    """SamplingParams fields from the sampling flags; InputError naming the flag if invalid."""
    base = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "min_p": args.min_p, "max_tokens": args.max_tokens, "min_tokens": args.min_tokens,
            "presence_penalty": args.presence_penalty,
            "frequency_penalty": args.frequency_penalty,
            "repetition_penalty": args.repetition_penalty, "stop": args.stop,
            "ignore_eos": args.ignore_eos}
    try:
        SamplingParams(**base)
    except ValueError as e:
        flag = next((f"--{k.replace('_', '-')}" for k in base if str(e).startswith(k)), "")
        raise InputError(f"argument {flag}: {e}" if flag else str(e)) from None
    return base


def make_engine(args: argparse.Namespace) -> "LLMEngine":
    from jaxpaged.engine import LLMEngine
    from jaxpaged.engine_config import EngineConfig

    try:
        return LLMEngine(EngineConfig(
            model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
            seed=args.seed, warmup=not args.no_warmup,
            tensor_parallel_size=args.tensor_parallel_size))
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"cannot start the engine: {e}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    base = sampling_base(args)
    plan = plan_generate(args.input, args.output, base, args.skip_invalid)
    if plan.num_dropped_bytes:
        print(f"{args.output}: cut off a partial last line ({plan.num_dropped_bytes} bytes) "
              f"left by an interrupted run", file=sys.stderr)
    if plan.num_pending == 0:
        print(f"nothing to do: all {plan.num_input_rows} rows are already in {args.output}")
        return 0
    # Only bad lines left to record (under --skip-invalid) need no model.
    engine = make_engine(args) if plan.rows else None
    if engine is not None and args.chat and not getattr(engine.tokenizer, "chat_template", None):
        raise InputError("--chat: this model has no chat template")
    stats = run_generate(engine, plan, base, chat=args.chat, seed=args.seed,
                         use_tqdm=not args.no_progress)
    print_summary(plan, stats)
    return EXIT_INTERRUPTED if stats.interrupted else 0


def cmd_loglikelihood(args: argparse.Namespace) -> int:
    from jaxpaged.eval_score import accuracy_summary, loglikelihood

    rows = read_loglikelihood_rows(args.input)
    if args.output is not None:
        check_output_path(args.output)
    results = loglikelihood(make_engine(args), rows, use_tqdm=not args.no_progress)
    if args.output is not None:
        _write_atomically(args.output, "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    summary = accuracy_summary(results)
    print(json.dumps(summary))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from jaxpaged.eval_score import perplexity, tokenize_text

    text = read_text(args.input)
    if args.output is not None:
        check_output_path(args.output)
    # What the flags alone decide fails before the model loads.
    if args.window and args.stride and args.stride > args.window:
        raise InputError(f"--stride must be in [1, --window={args.window}], got {args.stride}")
    if args.window and args.max_model_len and args.window > args.max_model_len:
        raise InputError(f"--window={args.window} exceeds --max-model-len={args.max_model_len}")
    engine = make_engine(args)
    window = args.window or engine.max_model_len
    stride = args.stride or max(1, window // 2)
    result = perplexity(engine, tokenize_text(engine, text), window, stride,
                        use_tqdm=not args.no_progress)
    summary = {"perplexity": result.perplexity, "nll": result.nll,
               "num_tokens": result.num_tokens, "num_scored": result.num_scored,
               "num_windows": result.num_windows, "window": window, "stride": stride}
    if args.output is not None:
        _write_atomically(args.output, json.dumps(summary) + "\n")
    print(json.dumps(summary))
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """Whole results or none: a killed run never leaves a truncated file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


COMMANDS = {"generate": cmd_generate, "loglikelihood": cmd_loglikelihood,
            "perplexity": cmd_perplexity}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"jaxpaged-eval {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"jaxpaged-eval {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
