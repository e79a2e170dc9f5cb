"""The three evaluations of `jaxpaged-eval` on the small set in examples/data/, with one engine:
greedy completions of 20 prompts (written as they finish, resumable), accuracy on 32
multiple-choice questions by log-likelihood, and the strided perplexity of a short story.
Run with `python examples/evaluate.py [results.jsonl]`; the CLI does the same piece by piece:

    jaxpaged-eval generate --input examples/data/prompts.jsonl --output results.jsonl
    jaxpaged-eval loglikelihood --input examples/data/mc.jsonl
    jaxpaged-eval perplexity --input examples/data/text.txt --window 512 --stride 256
"""

import sys
import tempfile
from pathlib import Path

from jaxpaged import EngineConfig, LLMEngine
from jaxpaged.eval_data import read_loglikelihood_rows, read_text
from jaxpaged.eval_generate import plan_generate, print_summary, run_generate
from jaxpaged.eval_score import accuracy_summary, loglikelihood, perplexity, tokenize_text

DATA = Path(__file__).parent / "data"
SAMPLING = {"temperature": 0.0, "max_tokens": 64}


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(tempfile.mkdtemp(prefix="jaxpaged-eval-")) / "results.jsonl"
    engine = LLMEngine(EngineConfig(max_model_len=1024))
    plan = plan_generate(DATA / "prompts.jsonl", output, SAMPLING, skip_invalid=False)
    print_summary(plan, run_generate(engine, plan, SAMPLING))

    results = loglikelihood(engine, read_loglikelihood_rows(DATA / "mc.jsonl"))
    summary = accuracy_summary(results)
    print(f"multiple choice: {summary['accuracy']:.1%} accuracy, {summary['accuracy_norm']:.1%} "
          f"by log-likelihood per character, on {summary['graded']} questions")

    ppl = perplexity(engine, tokenize_text(engine, read_text(DATA / "text.txt")), 512, 256)
    print(f"perplexity: {ppl.perplexity:.2f} over {ppl.num_scored} tokens in "
          f"{ppl.num_windows} windows of 512, stride 256")


if __name__ == "__main__":
    main()
