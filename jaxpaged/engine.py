"""`LLMEngine`: requests in, `RequestOutput`s out, one scheduler/runner step at a time.

A step is: the scheduler plans (`SchedulerOutput`), the runner executes it on the device, the
scheduler applies the sampled tokens, and the engine turns what changed into outputs
(detokenization, stop strings, logprobs). With async scheduling (the default) the engine plans
and dispatches step N + 1 before it waits for step N, so the host's scheduling, input
preparation and output processing overlap the device's work instead of idling it; outputs are
the same token for token. Requests with repetition/frequency/presence penalties need every
previous token on the host, so while one is live the engine runs steps one at a time. With
multi-step decoding (`num_scheduler_steps`, 4 on a GPU) a step may be a window of several
decode steps (jaxpaged.scheduler): a request then gets up to that many tokens from one
`step()`, cut at a stop string like any other.

A request with `n > 1` fans out into `n` child requests sharing its prompt (and, through the
prefix cache, its prompt's KV blocks).
Invariants: a request that fails validation never reaches the scheduler and finishes alone with
finish_reason "error"; every child the engine adds is eventually finished by the scheduler,
which frees its blocks.
"""

import dataclasses
import gc
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import jax

from jaxpaged.detokenizer import IncrementalDetokenizer
from jaxpaged.engine_config import EngineConfig
from jaxpaged.loader import LoadedModel, load_model
from jaxpaged.outputs import (CompletionOutput, Logprob, RequestMetrics, RequestOutput,
                              make_logprobs_dict)
from jaxpaged.runner import ModelRunner
from jaxpaged.sampler import SamplingRow
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler, SchedulerConfig
from jaxpaged.sequence import Request, RequestStatus
from jaxpaged.sharding import (TP_AXIS, initialize_distributed, make_mesh, param_spec,
                               shard_model)

logger = logging.getLogger(__name__)

# Per-platform defaults for the batch limits (see EngineConfig): (max_num_seqs,
# max_num_batched_tokens, max_model_len cap).
_CPU_DEFAULTS = (16, 256, 1024)
_GPU_DEFAULTS = (256, 8192, 8192)
_CPU_KV_BYTES = 1 << 30  # the CPU has no device-memory figure to take a fraction of
# Decode steps a scheduler output may cover on a GPU (EngineConfig.num_scheduler_steps None).
# With 4, llama-3.2-1b's steady step at batch 256 on an H100 went from 4.91 to 3.70 ms (the
# host's share of a token from 3.7 to 1.3 ms; benchmarks/NOTES_engine.md, tenth session); 8
# measured the same as 4, and each step of a window is one more token a new request may wait.
GPU_SCHEDULER_STEPS = 4


# Objects allocated between the collector's youngest-generation passes (Python's default: 700).
GC_GEN0_THRESHOLD = 50_000


def _collect_garbage_less_often() -> None:
    """A step allocates thousands of short-lived objects per request batch; with Python's
    default thresholds the cyclic garbage collector then runs dozens of times a step, and its
    older generations walk the process's millions of long-lived objects (jax, the model):
    ~3 ms of a 5.5 ms host step at batch 256 (benchmarks/host_phases.py --stub-device).
    Raising the thresholds keeps every collection, just fewer of them. (vLLM freezes the
    start-up heap instead; that also never frees an earlier engine's cycles, and this
    library lets a process build several engines.)"""
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), max(gen1, 50), gen2)


@dataclasses.dataclass
class _Tracked:
    """The engine's view of one user request (all of its n completions)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    child_ids: list[str]
    seeds: list[int]
    completions: list[CompletionOutput]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    num_cached_tokens: int = 0
    error: str | None = None  # why a child was rejected (finish_reason "error")
    final_only: bool = False  # report only when finished (vLLM's RequestOutputKind.FINAL_ONLY)
    # Each completion's sampler inputs, made at its first sampling step and kept: its token
    # list is the request's live one, so a step only updates the pending count.
    sampling_rows: dict[int, SamplingRow] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        # A loop, not all() over a generator: asked for every touched request every step.
        for c in self.completions:
            if c.finish_reason is None:
                return False
        return True


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        tp = config.tensor_parallel_size
        if tp > 1:
            initialize_distributed()
        self.mesh = make_mesh(tp)
        # Sharded before the KV cache is sized, so device memory in use counts the weights'
        # shards only (loaders place each weight on its shards as they read it).
        self.model = shard_model(loaded or load_model(
            config.model, dtype=config.dtype, load_format=config.load_format, seed=config.seed,
            mesh=self.mesh), self.mesh)
        self.tokenizer = self.model.tokenizer
        mc = self.model.config
        on_cpu = jax.default_backend() == "cpu"
        seqs, tokens, len_cap = _CPU_DEFAULTS if on_cpu else _GPU_DEFAULTS
        model_max = min(mc.max_position_embeddings, mc.sliding_window or mc.max_position_embeddings)
        self.max_model_len = config.max_model_len or min(model_max, len_cap)
        if self.max_model_len > model_max:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's limit "
                             f"of {model_max} positions")
        self.max_num_seqs = config.max_num_seqs or seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(tokens,
                                                                           self.max_num_seqs)
        self.num_scheduler_steps = config.num_scheduler_steps or (
            1 if on_cpu else GPU_SCHEDULER_STEPS)
        num_blocks = config.num_kv_blocks or self._blocks_from_memory(on_cpu)
        impl = config.attention_impl
        if impl == "auto":
            impl = "reference" if on_cpu else "pallas"
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=config.block_size,
                                  max_num_seqs=self.max_num_seqs,
                                  max_num_batched_tokens=self.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, attention_impl=impl,
                                  mesh=self.mesh,
                                  num_scheduler_steps=self.num_scheduler_steps)
        self.scheduler = Scheduler(SchedulerConfig(
            max_model_len=self.max_model_len, num_blocks=num_blocks,
            block_size=config.block_size, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            max_outputs_in_flight=2 if config.async_scheduling else 1,
            num_scheduler_steps=self.num_scheduler_steps))
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB per device), "
                    "attention=%s, tensor_parallel_size=%d, num_scheduler_steps=%d",
                    num_blocks - 1, config.block_size, (num_blocks - 1) * config.block_size,
                    self._kv_bytes_per_block() * num_blocks / 2**30, impl, tp,
                    self.num_scheduler_steps)
        self.warmup_stats: tuple[int, float] | None = None
        if config.warmup:
            self.warmup_stats = self.runner.warmup()
            logger.info("warm-up compiled %d programs in %.1f s", *self.warmup_stats)
        self._tracked: dict[str, _Tracked] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}
        self._rng = random.Random(config.seed)
        self._eos = mc.eos_token_ids[0] if mc.eos_token_ids else None
        # A dispatched step whose results are not applied yet (async scheduling).
        self._pending: tuple[Any, Any] | None = None
        self._num_penalized = 0  # live requests with penalties: they force one step at a time
        _collect_garbage_less_often()

    # -- sizing --------------------------------------------------------------------------

    def _kv_bytes_per_block(self) -> int:
        """Bytes of one block on one device: each holds K / tensor_parallel_size heads, K
        counted after `shard_model` padded or replicated them (the cache's real K axis)."""
        mc = self.model.config
        itemsize = jax.numpy.dtype(self.model.dtype).itemsize
        kv_heads = mc.num_key_value_heads // self.config.tensor_parallel_size
        return (2 * mc.num_hidden_layers * self.config.block_size * kv_heads
                * mc.head_dim * itemsize)

    def _activation_reserve(self) -> int:
        """Bytes a device needs for the largest step beside weights and cache: three [T, V]
        f32 buffers for the prompt-logprobs variant over every token of a full step (gathered
        whole on every shard), plus the layer activations, of which a shard holds its heads'
        and (when the MLP splits) its MLP's columns. Without it a KV cache sized from the free
        memory left the 8192-token logprobs program of a 128k-vocabulary model out of memory.
        That was measured while the forward returned f32 logits; it returns the model's dtype
        now, so the logits term is likely about twice what bf16 needs (not re-measured)."""
        mc = self.model.config  # after shard_model: head counts padded to split over tp
        T = self.max_num_batched_tokens
        tp = self.config.tensor_parallel_size
        itemsize = jax.numpy.dtype(self.model.dtype).itemsize
        heads = (mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_dim // tp
        mlp_spec = param_spec(("layers", "mlp", "gate_proj", "kernel"),
                              (mc.hidden_size, mc.intermediate_size), tp)
        mlp = 2 * mc.intermediate_size // (tp if TP_AXIS in mlp_spec else 1)
        return 3 * T * mc.vocab_size * 4 + 2 * T * (2 * mc.hidden_size + heads + mlp) * itemsize

    def _blocks_from_memory(self, on_cpu: bool) -> int:
        stats = None if on_cpu else jax.local_devices()[0].memory_stats()
        if stats and "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            budget = int((free - self._activation_reserve()) *
                         self.config.kv_cache_memory_fraction)
        else:
            budget = _CPU_KV_BYTES
        blocks = budget // self._kv_bytes_per_block()
        # Never more than every sequence slot at full length needs (+ the null block).
        needed = self.max_num_seqs * -(-self.max_model_len // self.config.block_size) + 1
        blocks = min(blocks, needed)
        if blocks < 2:
            raise ValueError(f"not enough memory for a KV cache: {budget} bytes hold {blocks} "
                             f"blocks; lower max_model_len or free memory")
        return blocks

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.kv_cache.num_blocks

    # -- requests in ---------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None, output_kind: str = "cumulative") -> None:
        """Queue a request. Raises ValueError, naming what is wrong, for a bad prompt or bad
        sampling parameters; nothing is queued then. `output_kind` "cumulative" reports the
        request from every step that changes it; "final_only" only once it has finished."""
        if output_kind not in ("cumulative", "final_only"):
            raise ValueError(f"output_kind={output_kind!r}; allowed: cumulative, final_only")
        if request_id in self._tracked:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got "
                             f"{type(params).__name__}")
        params.verify(self.model.config.vocab_size)
        text, ids = self._tokenize(prompt)
        extra_eos = [t for t in self.model.config.eos_token_ids[1:]
                     if t not in params.stop_token_ids]
        if extra_eos and not params.ignore_eos:
            # Models with several EOS ids (Llama 3) stop on all of them, as vLLM does, by
            # treating the others as stop token ids.
            params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra_eos)
        now = time.time() if arrival_time is None else arrival_time
        seeds = [(params.seed + i) if params.seed is not None else self._rng.getrandbits(32)
                 for i in range(params.n)]
        tracked = _Tracked(
            request_id, text, ids, params, [f"{request_id}#{i}" for i in range(params.n)], seeds,
            [CompletionOutput(i, "", [], 0.0 if params.logprobs is not None else None,
                              [] if params.logprobs is not None else None)
             for i in range(params.n)],
            [self._detokenizer(ids, params) for _ in range(params.n)],
            RequestMetrics(arrival_time=now, last_token_time=now),
            [None] if params.prompt_logprobs is not None else None,
            final_only=output_kind == "final_only")
        self._tracked[request_id] = tracked
        self._num_penalized += params.uses_penalties
        for i, child in enumerate(tracked.child_ids):
            self._child_to_parent[child] = (request_id, i)
            self.scheduler.add_request(Request(child, ids, params, eos_token_id=self._eos,
                                               arrival_time=now))

    def _tokenize(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):  # vLLM's TokensPrompt / TextPrompt
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (dummy weights): give prompts as "
                                 "token-id lists")
            text, ids = prompt, self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"prompt must be a str or a list of token ids, got "
                             f"{type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:8]} are outside the vocabulary "
                             f"[0, {vocab})")
        return text, ids

    def _detokenizer(self, ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer.from_sampling_params(self.tokenizer, ids, params)

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        children = [c for r in ids if r in self._tracked for c in self._tracked[r].child_ids]
        self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
        for child in children:
            parent, index = self._child_to_parent[child]
            completion = self._tracked[parent].completions[index]
            if completion.finish_reason is None:
                completion.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_requests() or bool(self._tracked) or self._pending is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._tracked)

    # -- one step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, execute, apply. Returns outputs of requests that changed
        (cumulative, as vLLM's LLMEngine does), finished ones for the last time.

        With async scheduling the step applied here was dispatched by the previous call (or
        now, if none was), and the next one is dispatched before this one is waited for."""
        if self._pending is None:
            self._pending = self._schedule_and_dispatch()
        (sched, handle), self._pending = self._pending, None
        if handle is not None and self.config.async_scheduling and not self._num_penalized:
            self._pending = self._schedule_and_dispatch()
        result = None if handle is None else self.runner.fetch(handle)
        return self._apply_step(sched, result)

    def _schedule_and_dispatch(self) -> tuple[Any, Any]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self.runner.update_states(sched)
            return sched, None
        return sched, self.runner.dispatch(sched, *self._runner_inputs(sched))

    def _apply_step(self, sched, result) -> list[RequestOutput]:
        changed = self.scheduler.update_from_output(
            sched, result.sampled_token_ids if result else {})
        touched = {self._child_to_parent[r][0] for r in sched.finished_req_ids
                   if r in self._child_to_parent}
        if result is not None:
            touched |= self._apply_prompt_logprobs(result.prompt_logprobs)
        now = time.time()
        apply_request, touch = self._apply_request, touched.add
        for request in changed:
            touch(apply_request(request, result, now))
        tracked = self._tracked
        report = [rid for rid in touched if rid in tracked
                  and (not tracked[rid].final_only or tracked[rid].finished)]
        return [self._make_output(rid, now) for rid in sorted(report, key=self._order)]

    def _order(self, request_id: str) -> float:
        return self._tracked[request_id].metrics.arrival_time if request_id in self._tracked else 0

    def _runner_inputs(self, sched) -> tuple[dict[str, SamplingRow], dict[str, list[int]]]:
        rows, plp = {}, {}
        for s in sched.scheduled_requests:
            request = self.scheduler.requests[s.request_id]
            parent, index = self._child_to_parent[s.request_id]
            tracked = self._tracked[parent]
            if s.sample:
                # schedule() counted this step's own samples as placeholders already.
                pending = request.num_output_placeholders - s.num_steps
                row = tracked.sampling_rows.get(index)
                if row is None:
                    row = tracked.sampling_rows[index] = SamplingRow(
                        tracked.params, tracked.seeds[index], request.all_token_ids,
                        request.num_prompt_tokens, self._eos, pending)
                else:
                    row.num_pending_tokens = pending
                rows[s.request_id] = row
            if tracked.prompt_logprobs is not None and index == 0 and \
                    s.start_pos < request.num_prompt_tokens - 1:
                plp[s.request_id] = request.prompt_token_ids
        return rows, plp

    def _apply_prompt_logprobs(self, prompt_logprobs: dict) -> set[str]:
        touched = set()
        for child, (positions, lps, ranks, top_ids, top_lps) in prompt_logprobs.items():
            parent, _ = self._child_to_parent[child]
            tracked = self._tracked[parent]
            num = tracked.params.prompt_logprobs
            for j, p in enumerate(positions):
                if p < len(tracked.prompt_logprobs):  # recomputed after a preemption
                    continue
                tracked.prompt_logprobs.append(make_logprobs_dict(
                    tracked.prompt_token_ids[p], lps[j], ranks[j], top_ids[j], top_lps[j], num,
                    self._decode_one))
            touched.add(parent)
        return touched

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _apply_request(self, request: Request, result, now: float) -> str:
        """Apply `request`'s new token (or its rejection) to its parent's outputs; -> the
        parent's id."""
        parent, index = self._child_to_parent[request.request_id]
        tracked = self._tracked[parent]
        completion = tracked.completions[index]
        if request.status == RequestStatus.FINISHED_ERROR:
            completion.finish_reason = "error"
            tracked.error = request.error
            tracked.metrics.finished_time = now
            return parent
        # One token, or several from a multi-step output (which never has logprobs).
        new_tokens = request.output_token_ids[len(completion.token_ids):]
        if tracked.metrics.first_token_time is None:
            tracked.metrics.first_token_time = now
            tracked.num_cached_tokens = request.num_cached_tokens
        tracked.metrics.last_token_time = now
        if tracked.params.logprobs is not None and result is not None \
                and request.request_id in result.logprobs:
            lp, rank, top_ids, top_lps = result.logprobs[request.request_id]
            completion.logprobs.append(make_logprobs_dict(
                new_tokens[-1], lp, rank, top_ids, top_lps, tracked.params.logprobs,
                self._decode_one))
            completion.cumulative_logprob += lp
        detok = tracked.detokenizers[index]
        # A stop token (EOS or a stop id) ends the text without its own characters.
        status = request.status
        stop_str = (detok.update(new_tokens,
                                 stop_terminated=status == RequestStatus.FINISHED_STOPPED)
                    if detok is not None else None)
        if stop_str is not None:  # tokens after the one completing it are dropped
            del new_tokens[len(detok.output_token_ids) - len(completion.token_ids):]
        completion.token_ids.extend(new_tokens)
        if stop_str is not None:
            if not status.is_finished():
                self.scheduler.finish_requests(request.request_id, RequestStatus.FINISHED_STOPPED)
            completion.finish_reason, completion.stop_reason = "stop", stop_str
        elif status.is_finished():
            completion.finish_reason = status.finish_reason
            completion.stop_reason = request.stop_reason
        finished = completion.finish_reason is not None
        if detok is not None:
            completion.text = detok.get_next_output_text(finished, delta=False)
        if finished:
            tracked.metrics.finished_time = now
        return parent

    def _make_output(self, request_id: str, now: float) -> RequestOutput:
        tracked = self._tracked[request_id]
        finished = tracked.finished
        if finished:
            del self._tracked[request_id]
            self._num_penalized -= tracked.params.uses_penalties
            for child in tracked.child_ids:
                self._child_to_parent.pop(child, None)
        return RequestOutput(
            request_id, tracked.prompt, tracked.prompt_token_ids, tracked.prompt_logprobs,
            [dataclasses.replace(c, token_ids=list(c.token_ids),
                                 logprobs=None if c.logprobs is None else list(c.logprobs))
             for c in tracked.completions],
            finished, dataclasses.replace(tracked.metrics), tracked.num_cached_tokens,
            tracked.error)

    def get_stats(self) -> Any:
        return self.scheduler.get_stats()
