"""Scoring text with the engine: log-likelihoods of multiple-choice continuations and strided
perplexity, both read from the engine's prompt logprobs.

Every scored sequence is submitted as a token-id prompt with `max_tokens=1, prompt_logprobs=0`,
so it is batched by the same scheduler as generation, and `prompt_logprobs[i]` holds
log p(token i | tokens < i). The one sampled token is thrown away.

Tokenization follows lm-evaluation-harness: context and continuation are encoded together and
the continuation's tokens are the tail beyond the context's own encoding; trailing spaces of the
context move to the front of the continuation, where BPE vocabularies keep them (" Paris").
Perplexity follows the Hugging Face strided recipe: windows of `window` tokens start every
`stride` tokens, and each scores only tokens no earlier window scored, so every token but the
first is scored once, with at least `window - stride` tokens of context after the first window.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from jaxpaged.eval_data import InputError, LoglikelihoodRow
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine pulls in jax; bad input should fail before that
    from jaxpaged.engine import LLMEngine

# Greedy so the throwaway token costs no sampling state; one token is the least vLLM allows.
_SCORE_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
_request_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class TokenScore:
    logprob: float
    is_greedy: bool  # the token was the model's argmax (rank 1)


def run_prompts(engine: LLMEngine, prompts: Sequence[list[int]], use_tqdm: bool = True,
                desc: str = "scoring") -> list[RequestOutput]:
    """Score token-id prompts through the engine's scheduler; outputs in input order. Prompts
    enter the engine 2 * max_num_seqs at a time, enough to keep every sequence slot busy."""
    ids = [f"eval-score-{next(_request_ids)}" for _ in prompts]
    waiting = iter(zip(ids, prompts))
    running: set[str] = set()  # the engine may be running other requests too
    done: dict[str, RequestOutput] = {}
    start, tokens = time.perf_counter(), 0
    with tqdm(total=len(ids), desc=desc, unit="seq", disable=not use_tqdm,
              dynamic_ncols=True) as bar:
        try:
            while len(done) < len(ids):
                while len(running) < 2 * engine.max_num_seqs and \
                        (job := next(waiting, None)) is not None:
                    engine.add_request(job[0], job[1], _SCORE_PARAMS)
                    running.add(job[0])
                for out in engine.step():
                    if out.finished and out.request_id in running:
                        running.remove(out.request_id)
                        done[out.request_id] = out
                        tokens += len(out.prompt_token_ids or [])
                        bar.update(1)
                        bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tok/s")
        except BaseException:
            engine.abort_request(list(running))
            raise
    return [done[r] for r in ids]


def token_scores(out: RequestOutput, first: int) -> list[TokenScore]:
    """Scores of prompt tokens `first`.. of a finished scoring request (first >= 1)."""
    if out.error is not None:
        raise ValueError(out.error)
    ids, plp = out.prompt_token_ids, out.prompt_logprobs
    return [TokenScore(plp[i][ids[i]].logprob, plp[i][ids[i]].rank == 1)
            for i in range(first, len(ids))]


# -- log-likelihood of continuations ------------------------------------------------------


def prefix_token_id(tokenizer: Any) -> int:
    """What an empty context is scored after: BOS, else EOS (lm-evaluation-harness)."""
    token_id = tokenizer.bos_token_id
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an "
                         "empty context")
    return token_id


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens), as lm-evaluation-harness's `_encode_pair`."""
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces:
        context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if not context:
        return [prefix_token_id(tokenizer)], whole
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


@dataclasses.dataclass(frozen=True)
class ContinuationScore:
    logprob: float | None  # sum over the continuation's tokens; None when it could not be scored
    num_tokens: int
    is_greedy: bool  # every continuation token was the argmax
    error: str | None = None


def score_continuations(engine: LLMEngine, pairs: Sequence[tuple[str, str]],
                        use_tqdm: bool = True) -> list[ContinuationScore]:
    """log p(continuation | context) for each (context, continuation) pair, batched."""
    if engine.tokenizer is None:
        raise InputError("this model has no tokenizer, so it cannot score text")
    max_len = engine.max_model_len
    jobs: dict[int, tuple[list[int], int]] = {}  # pair index -> (prompt, first scored position)
    scores: dict[int, ContinuationScore] = {}
    for i, (context, continuation) in enumerate(pairs):
        ctx, cont = encode_pair(engine.tokenizer, context, continuation)
        if not cont:
            scores[i] = ContinuationScore(None, 0, False, f"continuation {continuation!r} has "
                                                          f"no tokens beyond the context's")
        elif len(cont) >= max_len:
            scores[i] = ContinuationScore(None, 0, False, (
                f"continuation of {len(cont)} tokens leaves no room for context in "
                f"max_model_len={max_len}"))
        else:
            # Too long a context loses its oldest tokens, as lm-evaluation-harness truncates.
            ctx = ctx[-(max_len - len(cont)):]
            jobs[i] = (ctx + cont, len(ctx))
    outputs = run_prompts(engine, [prompt for prompt, _ in jobs.values()], use_tqdm,
                          desc="loglikelihood")
    for (i, (_, first)), out in zip(jobs.items(), outputs):
        if out.error is not None:
            scores[i] = ContinuationScore(None, 0, False, out.error)
            continue
        tokens = token_scores(out, first)
        scores[i] = ContinuationScore(math.fsum(t.logprob for t in tokens), len(tokens),
                                      all(t.is_greedy for t in tokens))
    return [scores[i] for i in range(len(pairs))]


def loglikelihood(engine: LLMEngine, rows: Sequence[LoglikelihoodRow], use_tqdm: bool = True
                  ) -> list[dict[str, Any]]:
    """One result per multiple-choice row: each continuation's log-likelihood, the pick by
    total log-likelihood (lm-evaluation-harness's acc) and by log-likelihood per character of
    the continuation (its acc_norm), and whether they match the answer when one is given."""
    pairs = [(row.context, c) for row in rows for c in row.continuations]
    scores = iter(score_continuations(engine, pairs, use_tqdm))
    results = []
    for row in rows:
        row_scores = [next(scores) for _ in row.continuations]
        result: dict[str, Any] = {
            "id": row.id, "logprobs": [s.logprob for s in row_scores],
            "num_tokens": [s.num_tokens for s in row_scores],
            "is_greedy": [s.is_greedy for s in row_scores]}
        failed = [s.error for s in row_scores if s.error is not None]
        if failed:
            result["error"] = failed[0]
        else:
            lls = result["logprobs"]
            per_char = [ll / len(c) for ll, c in zip(lls, row.continuations)]
            result["prediction"] = max(range(len(lls)), key=lls.__getitem__)
            result["prediction_norm"] = max(range(len(lls)), key=per_char.__getitem__)
            if row.answer is not None:
                result["answer"] = row.answer
                result["correct"] = result["prediction"] == row.answer
                result["correct_norm"] = result["prediction_norm"] == row.answer
        if row.metadata is not None:
            result["metadata"] = row.metadata
        results.append(result)
    return results


def accuracy_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    graded = [r for r in results if "correct" in r]
    summary: dict[str, Any] = {"rows": len(results),
                               "errors": sum("error" in r for r in results),
                               "graded": len(graded)}
    if graded:
        summary["accuracy"] = sum(r["correct"] for r in graded) / len(graded)
        summary["accuracy_norm"] = sum(r["correct_norm"] for r in graded) / len(graded)
    return summary


# -- perplexity ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    begin: int  # the window is tokens [begin, end)
    end: int
    first_scored: int  # tokens [first_scored, end) are scored here


def strided_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Hugging Face's strided-perplexity windows. A window's first token has nothing before it
    in the window, so it is never scored there (the label shift)."""
    if num_tokens < 2:
        raise InputError(f"perplexity needs a text of at least 2 tokens, got {num_tokens}")
    if window < 2:
        raise InputError(f"--window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise InputError(f"--stride must be in [1, --window={window}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    num_tokens: int  # in the text
    num_scored: int
    num_windows: int
    nll: float  # mean negative log-likelihood per scored token (nats)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def perplexity(engine: LLMEngine, token_ids: Sequence[int], window: int, stride: int,
               use_tqdm: bool = True) -> PerplexityResult:
    """Strided perplexity of one token sequence; every window runs in one batch."""
    if window > engine.max_model_len:
        raise InputError(f"--window={window} exceeds max_model_len={engine.max_model_len}; "
                         f"lower --window or raise --max-model-len")
    windows = strided_windows(len(token_ids), window, stride)
    outputs = run_prompts(engine, [list(token_ids[w.begin:w.end]) for w in windows], use_tqdm,
                          desc="perplexity")
    logprobs = [t.logprob for w, out in zip(windows, outputs)
                for t in token_scores(out, w.first_scored - w.begin)]
    return PerplexityResult(len(token_ids), len(logprobs), len(windows),
                            -math.fsum(logprobs) / len(logprobs))


def tokenize_text(engine: LLMEngine, text: str) -> list[int]:
    """The whole text as one sequence, special tokens as the tokenizer adds them (as the
    Hugging Face recipe's `tokenizer(text)` does)."""
    if engine.tokenizer is None:
        raise InputError("this model has no tokenizer, so it cannot score text")
    return engine.tokenizer(text)["input_ids"]
