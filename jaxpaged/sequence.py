"""A request's host-side state: its tokens, its progress and its block table.

Host-only module: plain Python, never imports ``jax``.

Invariants (kept by the scheduler, checked by its tests):
  * ``all_token_ids == prompt_token_ids + output_token_ids`` at all times; outputs are added
    only through ``append_output_token(s)`` so that the two lists never diverge.
  * ``0 <= num_computed_tokens <= num_tokens + num_output_placeholders``: the KV of tokens
    ``[0, num_computed_tokens)`` is in the blocks ``block_ids`` (the request's block table), or
    will be once the steps already handed to the device have run.
  * ``num_output_placeholders`` counts tokens a scheduled step will sample but whose ids the
    host does not know yet (between steps: 0 or 1, up to num_scheduler_steps with multi-step
    outputs; with async scheduling, the next step may already feed the last unknown token,
    which the device takes from the previous step's output).
  * ``block_hashes[i]`` is the chained hash of the i-th full block of ``all_token_ids``; the
    list only grows, since tokens are never rewritten (preemption keeps it).
"""

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Every status from FINISHED_STOPPED on is final."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS or a stop token id / stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # the request can never run, see Request.error

    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style ``finish_reason`` ("stop", "length", "abort", "error") or None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)  # an entity: equality is identity
class Request:
    """One sequence being generated. ``sampling_params`` is duck-typed: the scheduler reads
    only ``max_tokens``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids`` and
    ``prompt_logprobs`` from it (missing attributes take vLLM's defaults)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_output_placeholders: int = 0  # sampled by a step in flight, ids not known yet
    block_ids: list[int] = field(default_factory=list)  # the block table
    num_cached_tokens: int = 0  # prefix-cache hit at first admission, in tokens
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # why the request is FINISHED_ERROR
    block_hashes: list[bytes] = field(default_factory=list)
    # Stop conditions resolved from sampling_params once, when the scheduler admits it (read
    # every step): the length at which it finishes (max_tokens or max_model_len), min_tokens,
    # the EOS id that stops it (None with ignore_eos) and its stop token ids; and whether its
    # sampling allows multi-step outputs (no logprobs, no penalties).
    length_limit: int = field(default=0, repr=False)
    min_tokens: int = field(default=0, repr=False)
    stop_eos_token_id: int | None = field(default=None, repr=False)
    stop_token_ids: frozenset[int] = field(default=frozenset(), repr=False)
    multi_step: bool = field(default=False, repr=False)  # may decode several steps an output
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str):
            raise ValueError(f"request_id must be a str, got {self.request_id!r}")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        if self.num_computed_tokens < 0:
            raise ValueError(f"num_computed_tokens must be >= 0, got {self.num_computed_tokens}")
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs. The live list, not a copy (O(1)): read it, never mutate it."""
        return self._all_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished()

    def append_output_token(self, token_id: int) -> None:
        """One new output token (a plain int): the per-step path, without conversions."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        # int() also turns a NumPy scalar from the runner into a plain int.
        if isinstance(token_ids, (list, tuple)):
            token_ids = [int(t) for t in token_ids]
        else:
            token_ids = [int(token_ids)]
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)
