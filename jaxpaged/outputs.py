"""What the engine hands back per request: vLLM's ``RequestOutput`` / ``CompletionOutput``.

Logprobs use vLLM's shape: one ``dict[int, Logprob]`` per position holding the sampled (or, for
the prompt, the actual) token plus the top-N tokens; the first prompt position has no logprobs
and is ``None``. Ranks are 1-based: rank 1 is the most likely token.

Finish reasons are vLLM V1's four strings. ``"error"`` is how one bad request is reported
without taking the rest of the batch down (STYLE rule 15): where vLLM raises from ``generate``
when a request fails validation, our engine finishes that request at once with
``finish_reason="error"``, no tokens, and the ``ValueError`` text in ``RequestOutput.error``;
every other request in the batch finishes normally. ``RequestOutput.from_error`` builds it.

Host only: no ``jax`` import; the engine converts the sampler's arrays with NumPy first.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "abort", "error")


@dataclasses.dataclass(frozen=True, slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank in the vocabulary
    decoded_token: str | None = None


# One dict per generated token.
SampleLogprobs = list[dict[int, Logprob]]
# One dict per prompt token; the first is None because nothing precedes it.
PromptLogprobs = list[dict[int, Logprob] | None]


def make_logprobs_dict(
    token_id: int,
    logprob: float,
    rank: int,
    topk_token_ids: Sequence[int] | np.ndarray,
    topk_logprobs: Sequence[float] | np.ndarray,
    num_logprobs: int,
    decode: Callable[[int], str] | None = None,
) -> dict[int, Logprob]:
    """One position's logprobs from one row of the sampler's output.

    The sampler always computes ``MAX_LOGPROBS`` top tokens; only the request's first
    ``num_logprobs`` are kept. The chosen token comes first, as in vLLM, and is not repeated when
    it is also among the top tokens.
    """
    if not 0 <= num_logprobs <= len(topk_token_ids):
        raise ValueError(f"num_logprobs must be in [0, {len(topk_token_ids)}], got {num_logprobs}.")
    entries = {int(token_id): Logprob(float(logprob), int(rank), decode(int(token_id)) if decode else None)}
    for i in range(num_logprobs):
        top_id = int(topk_token_ids[i])
        if top_id not in entries:
            entries[top_id] = Logprob(float(topk_logprobs[i]), i + 1, decode(top_id) if decode else None)
    return entries


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    """One of a request's ``n`` completions. Mutable: the engine extends it step by step."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the completion; None for EOS, length or error.
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, got {self.finish_reason!r}.")

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (``time.time()`` seconds) of a request's life, vLLM V0's names."""

    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    # Why the request failed, for finish_reason "error"; None otherwise. Not in vLLM, which raises.
    error: str | None = None

    @classmethod
    def from_error(
        cls,
        request_id: str,
        error: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        metrics: RequestMetrics | None = None,
    ) -> "RequestOutput":
        """A finished request that produced nothing because it was rejected or failed."""
        # One completion even when n was the invalid field: callers read outputs[0].finish_reason.
        failed = CompletionOutput(0, "", [], None, None, finish_reason="error")
        return cls(request_id, prompt, prompt_token_ids, None, [failed], True, metrics, None, error)
