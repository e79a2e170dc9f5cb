"""Continuous batching, vLLM V1 style: one token budget, no prefill or decode phases.

Host-only module: plain Python, never imports ``jax``. Each step, every request's
``num_computed_tokens`` catches up with its ``num_tokens`` as far as the token budget
(``max_num_batched_tokens``) and the blocks allow; chunked prefill, prefix-cache hits and
recompute after preemption are all that one rule. An engine step is

    scheduler_output = scheduler.schedule()
    sampled = runner.fetch(runner.dispatch(scheduler_output, ...))  # {request_id: token id}
    changed = scheduler.update_from_output(scheduler_output, sampled)

with ``while scheduler.has_requests():`` around it. ``schedule()`` advances each scheduled
request's ``num_computed_tokens`` at once and counts the token a sampling chunk will produce as
an output placeholder; ``update_from_output`` fills the placeholder in and checks stops.

Async scheduling (``max_outputs_in_flight=2``): the engine may call ``schedule()`` for step
N + 1 before ``update_from_output`` of step N, so the host plans and prepares the next step
while the device runs the current one (vLLM's async scheduling). A request whose last token is
still a placeholder is then fed ``PLACEHOLDER_TOKEN_ID`` at that position, which the runner
replaces on the device with the token step N sampled. A request step N finishes (EOS, stop)
may already be in step N + 1: that step's result for it is dropped. Its freed blocks are safe
to hand out again because the device runs steps in order: a later step's writes land after
step N + 1's. Outputs are applied in the order they were scheduled.

Multi-step decoding (``num_scheduler_steps=K > 1``, vLLM's ``--num-scheduler-steps``): when
every running request decodes, none asks for logprobs or penalties, none is under its
``min_tokens`` and nothing waiting could be admitted, one output covers K decode steps that
the device runs back to back, each request feeding its own samples back. A request takes
``min(K, tokens it may still produce)`` of them (``ScheduledRequest.num_steps``): the blocks
for that many positions are allocated at once and as many placeholders counted, and
``update_from_output`` takes its list of tokens, appending them one at a time until a stop.
Tokens after a stop are dropped. The host then plans, prepares and applies once per K tokens
a request; what it gives up is admitting a new request (or noticing a finished one) in the
middle of a window.

Invariants (the stateful test checks them after every step):
  * ``running`` is in admission order and ``len(running) <= max_num_seqs``; a step schedules
    at most ``max_num_batched_tokens`` tokens, running requests first, in order.
  * Every live request (waiting or running) has ``num_computed_tokens <= num_tokens``
    once every scheduled output has been applied; waiting ones hold no blocks and have
    ``num_computed_tokens == 0``.
  * A finished request holds no blocks and has left ``waiting``, ``running`` and ``requests``.
  * Parallel sampling shares prompt blocks: a waiting request whose next uncached full block
    is being computed by a running request stays waiting (keeping its place) until that block
    is cached, then takes it as a prefix hit instead of computing a private copy.
  * A request that could never run (empty prompt, prompt longer than ``max_model_len``, or a
    worst-case KV footprint larger than the whole cache) is finished alone with
    FINISHED_ERROR at ``add_request``; nothing else is affected.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from jaxpaged.block_manager import BlockManager
from jaxpaged.sequence import Request, RequestStatus

# Fed in place of a token the previous step samples; the runner resolves it on the device.
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    max_model_len: int
    num_blocks: int  # including the reserved null block 0
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    # 1: schedule() and update_from_output() alternate. 2: async scheduling, one step ahead.
    max_outputs_in_flight: int = 1
    # Decode steps one output may cover (multi-step decoding, see the module docstring).
    num_scheduler_steps: int = 1

    @property
    def max_num_blocks_per_req(self) -> int:
        """Longest block table a request can have: the runner's block-table width."""
        return -(-self.max_model_len // self.block_size)

    def __post_init__(self) -> None:
        if self.max_outputs_in_flight not in (1, 2):
            raise ValueError(f"max_outputs_in_flight must be 1 or 2, got {self.max_outputs_in_flight}")
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "num_scheduler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {self.num_blocks}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so every running request can decode"
            )


@dataclass(slots=True)  # not frozen: a frozen init costs ~1 us, 256 of them a step
class ScheduledRequest:
    request_id: str
    # The tokens fed this step, at positions start_pos, start_pos + 1, ...; the last one is
    # PLACEHOLDER_TOKEN_ID when the previous step (still in flight) samples it.
    token_ids: list[int]
    start_pos: int  # num_computed_tokens before this step
    block_ids: list[int]  # the whole block table (a copy), covering start_pos + len(token_ids)
    sample: bool  # this chunk reaches the last known token: sample one from its last row
    # Admitted from the waiting queue by this step (first time, or resumed after preemption):
    # its block table is new, not an extension of one sent before.
    admitted: bool = False
    # Decode steps this request takes in a multi-step output (1 otherwise): it feeds one token
    # (at start_pos), then its own samples, and samples num_steps tokens; block_ids cover
    # start_pos + num_steps.
    num_steps: int = 1


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled_requests: list[ScheduledRequest]  # running requests first, in admission order
    total_num_scheduled_tokens: int
    preempted_req_ids: list[str]  # preempted in this step (their blocks are gone)
    finished_req_ids: list[str]  # finished since the previous schedule(), for any reason
    errored_req_ids: list[str]  # of those, the ones rejected by add_request (FINISHED_ERROR)
    # Decode steps the device runs for this output: 1, or num_scheduler_steps for a multi-step
    # output (every scheduled request feeds one token and takes 1 to num_steps of them).
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_requests


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running_reqs: int
    num_waiting_reqs: int
    num_preemptions: int  # total since start
    kv_cache_usage: float  # fraction of usable blocks held
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    prefix_cache_hit_rate: float


@dataclass(slots=True)
class _Plan:
    """What schedule() has decided so far in one step."""

    token_budget: int
    # Each planned request's view, made as it is planned (which advances its progress: see
    # _scheduled_request): the running ones first, then the admitted ones.
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


def _scheduled_request(request: Request, num_new_tokens: int) -> ScheduledRequest:
    """The step's view of `request`, whose progress it then advances: num_computed_tokens
    by the tokens fed, and a placeholder for the token a sampling chunk will produce."""
    # Positional arguments and no helper calls: this runs for every request of every step.
    start = request.num_computed_tokens
    token_ids = request.all_token_ids[start : start + num_new_tokens]
    if len(token_ids) < num_new_tokens:
        token_ids += [PLACEHOLDER_TOKEN_ID] * (num_new_tokens - len(token_ids))
    sample = start + num_new_tokens == len(request.all_token_ids) + request.num_output_placeholders
    request.num_computed_tokens = start + num_new_tokens
    request.num_output_placeholders += sample
    return ScheduledRequest(request.request_id, token_ids, start, request.block_ids.copy(), sample)


def _scheduled_window(request: Request, num_steps: int) -> ScheduledRequest:
    """`_scheduled_request` of a decoding request in a multi-step output: it feeds its next
    token and then its own samples, `num_steps` positions written and tokens sampled."""
    start = request.num_computed_tokens
    token_ids = request.all_token_ids[start : start + 1] or [PLACEHOLDER_TOKEN_ID]
    request.num_computed_tokens = start + num_steps
    request.num_output_placeholders += num_steps
    return ScheduledRequest(request.request_id, token_ids, start, request.block_ids.copy(), True,
                            False, num_steps)


class Scheduler:
    """Owns the requests and the BlockManager; plans each step, then applies its results."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}  # live (unfinished) requests
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_req_ids: list[str] = []  # since the last schedule()
        self._errored: dict[str, Request] = {}  # rejected, not yet reported by schedule()
        self._errored_reported: dict[str, Request] = {}  # reported, not yet returned by update
        # Scheduled outputs not applied yet, oldest first (at most max_outputs_in_flight).
        self._in_flight: deque[SchedulerOutput] = deque()

    # -- requests in and out --------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests or request.request_id in self._errored or \
                request.request_id in self._errored_reported:
            raise ValueError(f"request_id {request.request_id!r} is already in the scheduler")
        error = self._why_never_fits(request)
        if error is not None:
            request.status, request.error = RequestStatus.FINISHED_ERROR, error
            self._errored[request.request_id] = request
            self._finished_req_ids.append(request.request_id)
            return
        params = request.sampling_params
        request.length_limit = min(request.num_prompt_tokens + self._max_tokens(request),
                                   self.config.max_model_len)
        request.min_tokens = getattr(params, "min_tokens", 0)
        request.stop_eos_token_id = (None if getattr(params, "ignore_eos", False)
                                     else request.eos_token_id)
        request.stop_token_ids = frozenset(getattr(params, "stop_token_ids", None) or ())
        # Multi-step outputs sample on the device without logprobs or penalties.
        request.multi_step = (getattr(params, "logprobs", None) is None
                              and not getattr(params, "uses_penalties", False))
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _why_never_fits(self, request: Request) -> str | None:
        cfg = self.config
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            return "the prompt is empty"
        if num_prompt > cfg.max_model_len:
            return f"prompt length {num_prompt} exceeds max_model_len={cfg.max_model_len}"
        max_tokens = self._max_tokens(request)
        if max_tokens < 1:
            return f"max_tokens must be >= 1, got {max_tokens}"
        # The last sampled token is never fed back, so it needs no KV slot.
        final_len = min(num_prompt + max_tokens, max(cfg.max_model_len, num_prompt + 1))
        num_blocks = -(-(final_len - 1) // cfg.block_size)
        if num_blocks > cfg.num_blocks - 1:
            return (
                f"prompt length {num_prompt} plus up to {final_len - num_prompt} generated tokens "
                f"needs up to {num_blocks} KV blocks of {cfg.block_size} tokens, but the cache has "
                f"only {cfg.num_blocks - 1}"
            )
        return None

    def _max_tokens(self, request: Request) -> int:
        max_tokens = getattr(request.sampling_params, "max_tokens", None)
        return self.config.max_model_len if max_tokens is None else max_tokens

    def finish_requests(
        self, request_ids: str | Iterable[str], finished_status: RequestStatus
    ) -> list[Request]:
        """Finish live requests (aborts, stop strings found by the detokenizer). Unknown or
        already finished ids are ignored. Returns the requests finished here."""
        if not finished_status.is_finished():
            raise ValueError(f"finished_status must be a FINISHED_* status, got {finished_status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            request.status = finished_status
            self._finish(request)
            finished.append(request)
        return finished

    def _finish(self, request: Request) -> None:
        """Take a live request, whose status is already final, out of its queue."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._free_request(request)

    def _free_request(self, request: Request) -> None:
        self.block_manager.free(request)
        del self.requests[request.request_id]
        self._finished_req_ids.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def has_finished_requests(self) -> bool:
        """Finished requests not yet reported by schedule() / update_from_output()."""
        return bool(self._finished_req_ids or self._errored or self._errored_reported)

    def has_requests(self) -> bool:
        return self.has_unfinished_requests() or self.has_finished_requests()

    # -- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        if len(self._in_flight) >= self.config.max_outputs_in_flight:
            raise RuntimeError(
                f"schedule() called with {len(self._in_flight)} outputs not yet applied by "
                f"update_from_output() (max_outputs_in_flight={self.config.max_outputs_in_flight})"
            )
        plan = _Plan(token_budget=self.config.max_num_batched_tokens)
        window = self._decode_window()
        if window > 1:
            self._schedule_window(plan, window)
        else:
            self._schedule_running(plan)
            if not plan.preempted:  # if blocks ran out for running requests, admit nobody
                self._schedule_waiting(plan)
        output = SchedulerOutput(
            scheduled_requests=plan.scheduled,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - plan.token_budget,
            preempted_req_ids=[r.request_id for r in plan.preempted],
            finished_req_ids=self._finished_req_ids,
            errored_req_ids=list(self._errored),
            num_steps=window if plan.scheduled else 1,
        )
        self._errored_reported.update(self._errored)
        self._errored.clear()
        self._finished_req_ids = []
        self._in_flight.append(output)
        return output

    def _schedule_running(self, plan: _Plan) -> None:
        """Plan the running requests in order. Preemption only takes requests from the end of
        `running`, ones not planned yet, so a planned request's view stays valid."""
        running, allocate_slots = self.running, self.block_manager.allocate_slots
        planned = plan.scheduled.append
        i = 0
        while i < len(running) and plan.token_budget > 0:
            request = running[i]
            # Known tokens plus those that steps in flight will sample.
            total = len(request.all_token_ids) + request.num_output_placeholders
            if request.num_output_placeholders and total >= request.length_limit:
                i += 1  # a placeholder already takes it to its length: it finishes when applied
                continue
            num_new = min(total - request.num_computed_tokens, plan.token_budget)
            if not allocate_slots(request, num_new) and \
                    not self._preempt_until_allocated(request, num_new, plan):
                return
            planned(_scheduled_request(request, num_new))
            plan.token_budget -= num_new
            i += 1

    def _preempt_until_allocated(self, request: Request, num_tokens: int, plan: _Plan) -> bool:
        """Recompute preemption until `request` gets blocks for `num_tokens` more: the most
        recently admitted request gives its blocks back, which may be this very request when
        it is the last one running. -> False if it was (it is preempted, not planned)."""
        while not self.block_manager.allocate_slots(request, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _decode_window(self) -> int:
        """Decode steps the next output covers: num_scheduler_steps when every running request
        decodes (feeds one token), allows multi-step sampling and is past its min_tokens, some
        request can take all of them before reaching its length, and nobody waiting could be
        admitted instead; else 1. (A request that takes fewer steps than the window, being
        near its length, only ends the window early for itself.)"""
        window = self.config.num_scheduler_steps
        running = self.running
        if window == 1 or not running or (self.waiting
                                          and len(running) < self.config.max_num_seqs):
            return 1
        longest = 0
        for request in running:
            total = len(request.all_token_ids) + request.num_output_placeholders
            if total - request.num_computed_tokens != 1 or not request.multi_step or \
                    total - request.num_prompt_tokens < request.min_tokens:
                return 1
            longest = max(longest, request.length_limit - total)
        return window if longest >= window else 1

    def _schedule_window(self, plan: _Plan, window: int) -> None:
        """`_schedule_running` for a multi-step output: every running request feeds one token
        and takes up to `window` decode steps (fewer near its length limit), with blocks for
        all of them; blocks that run out preempt from the end of `running` as usual."""
        running, allocate_slots = self.running, self.block_manager.allocate_slots
        i = 0
        while i < len(running):
            request = running[i]
            total = len(request.all_token_ids) + request.num_output_placeholders
            num_steps = min(window, request.length_limit - total)
            if num_steps < 1:
                i += 1  # its placeholders already take it to its length
                continue
            if not allocate_slots(request, num_steps) and \
                    not self._preempt_until_allocated(request, num_steps, plan):
                return
            plan.scheduled.append(_scheduled_window(request, num_steps))
            plan.token_budget -= 1
            i += 1

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)  # resumes before any new request

    def _schedule_waiting(self, plan: _Plan) -> None:
        held_back: list[Request] = []
        while self.waiting and plan.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_output_placeholders:  # preempted while its last step is in flight
                held_back.append(self.waiting.popleft())
                continue
            computed_blocks, num_hit_tokens = self.block_manager.get_computed_blocks(request)
            if self._prefix_in_flight(request, len(computed_blocks)):
                held_back.append(self.waiting.popleft())
                continue
            num_new = min(request.num_tokens - num_hit_tokens, plan.token_budget)
            if not self.block_manager.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:  # first admission, not a resume
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled = _scheduled_request(request, num_new)
            scheduled.admitted = True
            plan.scheduled.append(scheduled)
            plan.token_budget -= num_new
        self.waiting.extendleft(reversed(held_back))

    def _prefix_in_flight(self, request: Request, num_hit_blocks: int) -> bool:
        """Whether a running request is computing ``request``'s next uncached full block
        (it has not entered it into the prefix cache yet).

        Waiting for it turns a duplicate computation into a prefix hit one step or a few later:
        this is how the n children of a parallel-sampling request share their prompt blocks.
        Equal chained hashes at index k mean equal prefixes, so comparing index k suffices.
        """
        k = num_hit_blocks
        if not self.block_manager.reads_prefix_cache(request):
            return False
        if k >= (request.num_tokens - 1) // self.config.block_size:  # no further block to hit
            return False
        block_hash = request.block_hashes[k]
        # The slice is empty when the other request's hashes do not reach index k.
        cached = self.block_manager.num_cached_blocks
        return any(
            cached.get(other.request_id, 0) <= k and other.block_hashes[k : k + 1] == [block_hash]
            for other in self.running
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, int | list[int]]
    ) -> list[Request]:
        """Apply a step's results; steps are applied in the order they were scheduled. A
        request of a multi-step output (`num_steps` > 1) gets the list of its own `num_steps`
        tokens; they are appended in order until one stops it. Returns the requests that got
        new tokens (finished or not) and the requests rejected by add_request that this output
        reported."""
        if not self._in_flight or self._in_flight[0] is not scheduler_output:
            raise ValueError("update_from_output() got an output that is not the oldest one in flight")
        missing = [
            s.request_id
            for s in scheduler_output.scheduled_requests
            if s.sample and s.request_id in self.requests and s.request_id not in sampled_token_ids
        ]
        if missing:  # checked first, so a bad call changes nothing
            raise ValueError(f"sampled_token_ids has no token for {missing}, which sampled this step")
        if scheduler_output.num_steps != 1:
            for s in scheduler_output.scheduled_requests:
                tokens = sampled_token_ids.get(s.request_id)
                if s.request_id in self.requests and (not isinstance(tokens, (list, tuple))
                                                      or len(tokens) != s.num_steps):
                    raise ValueError(f"{s.request_id!r} took {s.num_steps} decode steps of a "
                                     f"multi-step output; got {tokens!r}, not a list of "
                                     f"{s.num_steps} token ids")
        self._in_flight.popleft()
        changed = [self._errored_reported.pop(request_id) for request_id in scheduler_output.errored_req_ids]
        requests, block_manager = self.requests, self.block_manager
        # Whether cache_blocks can have work: a block filled up since the last call. Checked
        # here because the call alone costs more than the check, for every request every step.
        num_cached = block_manager.num_cached_blocks if block_manager.enable_prefix_caching else None
        block_size = self.config.block_size
        append, check_stop = changed.append, self._check_stop
        window = scheduler_output.num_steps != 1
        for scheduled in scheduler_output.scheduled_requests:
            request = requests.get(scheduled.request_id)
            if request is None:  # finished (aborted, stopped) after schedule()
                continue
            sample = scheduled.sample
            if window:
                self._apply_window(request, scheduled, sampled_token_ids[scheduled.request_id])
                append(request)
                continue
            if sample:
                request.num_output_placeholders -= 1
                request.append_output_token(int(sampled_token_ids[scheduled.request_id]))
            if num_cached is not None:
                # Only known tokens can be hashed; a preempted request holds no blocks (no-op).
                num_known = request.num_computed_tokens
                num_tokens = len(request.all_token_ids)
                if num_tokens < num_known:
                    num_known = num_tokens
                if num_known // block_size > num_cached.get(request.request_id, 0):
                    block_manager.cache_blocks(request, num_known)
            if sample:
                append(request)
                if check_stop(request):
                    self._finish(request)
        return changed

    def _apply_window(self, request: Request, scheduled: ScheduledRequest,
                      token_ids: list[int]) -> None:
        """update_from_output for one request of a multi-step output."""
        request.num_output_placeholders -= scheduled.num_steps
        stopped = False
        for token_id in token_ids:
            request.append_output_token(int(token_id))
            if self._check_stop(request):
                stopped = True
                break
        block_manager = self.block_manager
        if block_manager.enable_prefix_caching:
            num_known = min(request.num_computed_tokens, len(request.all_token_ids))
            if num_known // self.config.block_size > \
                    block_manager.num_cached_blocks.get(request.request_id, 0):
                block_manager.cache_blocks(request, num_known)
        if stopped:
            self._finish(request)

    @staticmethod
    def _check_stop(request: Request) -> bool:
        output = request.output_token_ids
        if len(output) >= request.min_tokens:
            last = output[-1]
            if last == request.stop_eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in request.stop_token_ids:
                request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, last
                return True
        if request.num_tokens >= request.length_limit:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def get_stats(self) -> SchedulerStats:
        stats = self.block_manager.prefix_cache_stats
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=stats.queries,
            prefix_cache_hits=stats.hits,
            prefix_cache_hit_rate=stats.hit_rate,
        )
