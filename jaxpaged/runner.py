"""Executes a `SchedulerOutput` on the device: pads it to a bucket, runs the jitted forward
(KV cache donated) and the jitted sampler, and brings the results back in one transfer.

Invariants:
  * Every step is padded to a bucket shape listed by `bucket_shapes()`; warm-up compiles each
    of them, and `num_compiles_since_warmup` counts XLA compiles after that (a test asserts
    it stays 0 through `generate`).
  * A decode-only step (every scheduled request feeds one token) uses T = S, so the GPU path
    can run the decode kernel; any other step uses T from the token ladder and S = min(T, max).
  * A multi-step output (`SchedulerOutput.num_steps` = num_scheduler_steps > 1) is a
    decode-only step of bucket S run num_steps times in one program (`_multi_step`), one per
    (S, sampler variant without penalties or logprobs), also compiled at warm-up; its sampled
    ids come back as [num_steps, S], and the next step's placeholders take each row's last.
  * Logits rows: one per sequence slot (R = S), or one per token (R = T) when a request wants
    prompt logprobs in this step.
  * `dispatch` only enqueues device work and returns; `fetch` waits for it. Between the two the
    engine may dispatch the next step (async scheduling): a token the scheduler marks
    PLACEHOLDER_TOKEN_ID is then taken, on the device, from the previous dispatched step's
    sampled ids, so the host never waits for them before launching the next step.
  * With a dispatch thread (`dispatch_thread_setting`) the jitted calls of a step run on one
    worker thread, in dispatch order, while the calling thread goes on planning and applying
    steps; after warm-up only that thread touches `kv_cache` and the previous sampled ids.
  * Each request's block table and sampler constants stay in a row of an `InputBatch` across
    steps. Every scheduler output reaches `dispatch` or `update_states`, which release the rows
    of requests it reports finished or preempted; a missed release would only waste a row,
    since an admitted request's row always starts afresh.
"""

import dataclasses
import functools
import logging
import os
import sys
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpaged.attention import KVCache
from jaxpaged.buckets import PAD_SLOT_ID, bucket_for, make_buckets
from jaxpaged.input_batch import InputBatch
from jaxpaged.loader import LoadedModel, cache_dir
from jaxpaged.metadata import build_step_inputs
from jaxpaged.models import forward, stacked_matmul_setting
from jaxpaged.packed import pack, unpack
from jaxpaged.sampler import (MAX_LOGPROBS, NUM_SAMPLER_CONSTANTS, SamplingMetadata,
                              SamplingRow, build_sampling_metadata, compute_logprobs, sample,
                              sampling_metadata_variants)
from jaxpaged.scheduler import PLACEHOLDER_TOKEN_ID, SchedulerOutput
from jaxpaged.settings import on_for_gpu
from jaxpaged.sharding import gather_logits, kv_cache_sharding

logger = logging.getLogger(__name__)

MIN_TOKEN_BUCKET = 16
MIN_SEQ_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class BucketShape:
    num_tokens: int  # T
    num_seqs: int  # S
    num_logits: int  # R
    decode_only: bool


@dataclasses.dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int]
    # Per sampled request: (logprob, rank, top ids, top logprobs) of the sampled token.
    logprobs: dict[str, tuple[float, int, np.ndarray, np.ndarray]]
    # Per request with prompt logprobs: rows for the prompt tokens fed this step (those that
    # have a next prompt token): (token ids, logprobs, ranks, top ids, top logprobs).
    prompt_logprobs: dict[str, tuple[np.ndarray, ...]]


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: device results not fetched yet, and what is needed to read them."""

    sched: SchedulerOutput
    launched: Future  # -> (device SamplerOutput, device LogprobsTensors or None)
    positions: np.ndarray  # host positions of the flat batch
    prompt_rows: dict[str, np.ndarray]  # request id -> rows scored for prompt logprobs


class ModelDef:
    """The model's static structure (nnx GraphDef and the parameters' treedef) as one static
    jit argument with its hash computed once: jit hashes static arguments on every call, and
    hashing a GraphDef cost ~0.17 ms a step. Equal definitions still share compiled programs."""

    def __init__(self, graphdef, params_def):
        self.graphdef, self.params_def = graphdef, params_def
        self._hash = hash((graphdef, params_def))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, ModelDef) and self._hash == other._hash
                                 and self.graphdef == other.graphdef
                                 and self.params_def == other.params_def)


def _forward(model_def, params, kv_cache, input_ids, positions, md, impl, mesh, unroll,
             stacked, greedy: bool = False):
    """-> (kv cache, logits), or with `greedy` (no mesh) (kv cache, greedy tokens)."""
    kv_cache, logits = forward(model_def.graphdef, params, kv_cache, input_ids, positions, md,
                               impl, mesh, unroll, stacked, greedy)
    if mesh is not None:
        # The cache leaves as it came (split on KV heads, so donation reuses its buffers); the
        # logits leave replicated, so the sampler and the host see plain arrays.
        kv_cache = jax.lax.with_sharding_constraint(kv_cache, kv_cache_sharding(mesh))
        logits = gather_logits(logits, mesh)
    return kv_cache, logits


def _step_inputs(model_def, params_leaves, packed, prev_sampled, spec):
    # Parameters travel as a flat list: flattening the nnx.State on every call costs the host
    # milliseconds a step, a list of arrays costs microseconds. The step's inputs travel as
    # one packed buffer (jaxpaged.packed).
    params = jax.tree.unflatten(model_def.params_def, params_leaves)
    input_ids, positions, md, source_rows, *extra = unpack(packed, spec)
    # Placeholders: token t is the id the previous step sampled in row source_rows[t].
    input_ids = jnp.where(source_rows >= 0, prev_sampled[jnp.maximum(source_rows, 0)], input_ids)
    return params, input_ids, positions, md, extra


def _step(model_def, params_leaves, kv_cache, packed, prev_sampled, spec, impl, mesh, unroll,
          stacked):
    params, input_ids, positions, md, _ = _step_inputs(model_def, params_leaves, packed,
                                                       prev_sampled, spec)
    return _forward(model_def, params, kv_cache, input_ids, positions, md, impl, mesh, unroll,
                    stacked)


def _multi_step(model_def, params_leaves, kv_cache, packed, prev_sampled, packed_smd, spec,
                smd_spec, impl, mesh, unroll, stacked, num_steps: int, width: int):
    """`num_steps` decode steps in one program (a multi-step output): row s feeds its token,
    then its own samples, for `step_counts[s]` steps (0 for padding), after which it is frozen
    (re-reads its last position, writes nothing). Sampling as `sample` with the row's output
    position advancing each step; the batch has no penalties, logprobs or suppressed ids.
    -> (kv cache, i32[num_steps, S] the tokens of every step, i32[width] each row's last live
    token padded: the next step's `prev_sampled`)."""
    params, input_ids, positions, md, (step_counts,) = _step_inputs(
        model_def, params_leaves, packed, prev_sampled, spec)
    smd = unpack(packed_smd, smd_spec)
    block_size = kv_cache.block_size
    rows = jnp.arange(input_ids.shape[0])
    last_step = jnp.maximum(step_counts - 1, 0)
    # An all-greedy window (no penalties, logprobs or suppression in any window) samples the
    # greedy argmax: the model's greedy head gives it, in one launch with the LM head where
    # sampler.use_lm_head_argmax. Under a mesh the logits are gathered first, as before.
    greedy = smd.all_greedy and mesh is None

    def one_step(k, carry):
        kv_cache, ids, last_ids, tokens = carry
        live = k < step_counts
        offset = jnp.minimum(k, last_step)
        pos = positions + offset
        slots = md.block_tables[rows, pos // block_size] * block_size + pos % block_size
        step_md = dataclasses.replace(md, slot_mapping=jnp.where(live, slots, PAD_SLOT_ID),
                                      kv_lens=jnp.where(step_counts > 0, md.kv_lens + offset, 0))
        kv_cache, out = _forward(model_def, params, kv_cache, ids, pos, step_md, impl, mesh,
                                 unroll, stacked, greedy)
        if greedy:
            new = out
        else:  # nothing is suppressed in a window: no copy of the logits for it
            new = sample(out, dataclasses.replace(smd, output_positions=smd.output_positions + k),
                         suppress=False).sampled_token_ids
        return (kv_cache, jnp.where(live, new, ids), jnp.where(live, new, last_ids),
                tokens.at[k].set(new))

    tokens = jnp.zeros((num_steps, input_ids.shape[0]), jnp.int32)
    kv_cache, _, last_ids, tokens = jax.lax.fori_loop(
        0, num_steps, one_step, (kv_cache, input_ids, input_ids, tokens))
    return kv_cache, tokens, jnp.pad(last_ids, (0, width - last_ids.shape[0]))


_compile_count = [0]  # every XLA backend compile in this process


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compile_count[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)

_jit_forward = jax.jit(_step, static_argnames=("model_def", "spec", "impl", "mesh", "unroll",
                                               "stacked"),
                       donate_argnums=(2,))


def _sample_padded(logits, packed, spec, width: int):
    """`sample` of the packed metadata, plus its token ids padded to `width` rows (the next
    step's `prev_sampled`) and the suppressed logits, which nobody reads: returning them lets
    the donated input alias them, so the suppression writes in place (sampler.sample)."""
    out, logits = sample(logits, unpack(packed, spec), return_logits=True)
    return out, jnp.pad(out.sampled_token_ids, (0, width - out.sampled_token_ids.shape[0])), logits


_jit_multi_step = jax.jit(_multi_step, static_argnames=(
    "model_def", "spec", "smd_spec", "impl", "mesh", "unroll", "stacked", "num_steps", "width"),
    donate_argnums=(2,))


# The forward's logits are donated: the sampler is their last reader.
_jit_sample = jax.jit(_sample_padded, static_argnames=("spec", "width"), donate_argnums=0)
_jit_prompt_logprobs = jax.jit(compute_logprobs, static_argnames=("num",))
_jit_take_rows = jax.jit(lambda x, rows: x[rows])


def enable_compilation_cache() -> None:
    """Keep compiled bucket programs on disk, so a second start-up's warm-up mostly loads them.
    Off with JAXPAGED_COMPILATION_CACHE=0; a cache dir the user set for jax is left alone."""
    if os.environ.get("JAXPAGED_COMPILATION_CACHE", "1") == "0" or \
            jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, *, num_blocks: int, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 attention_impl: str, mesh: Mesh | None = None, num_scheduler_steps: int = 1):
        """`loaded`'s parameters must already sit on `mesh` (`sharding.shard_model`).
        `num_scheduler_steps` > 1: the scheduler may hand over multi-step decode outputs of
        that many steps (warm-up compiles their programs)."""
        enable_compilation_cache()
        cfg = loaded.config
        self.loaded, self.impl, self.mesh = loaded, attention_impl, mesh
        # Read once here and passed as a static argument, so it is part of each program's key.
        self.stacked_matmul = stacked_matmul_setting()
        self.unroll_setting = unroll_setting(self.stacked_matmul)
        self._params_leaves, params_def = jax.tree.flatten(loaded.params)
        self._model_def = ModelDef(loaded.graphdef, params_def)
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_cache = KVCache.zeros(cfg.num_hidden_layers, num_blocks, block_size,
                                      cfg.num_key_value_heads, cfg.head_dim, loaded.dtype,
                                      kv_cache_sharding(mesh))
        self.token_buckets = make_buckets(max_num_batched_tokens,
                                          min(MIN_TOKEN_BUCKET, max_num_batched_tokens))
        self.seq_buckets = make_buckets(max_num_seqs, min(MIN_SEQ_BUCKET, max_num_seqs))
        self.max_num_seqs = max_num_seqs
        self.num_scheduler_steps = num_scheduler_steps
        self.vocab_size = cfg.vocab_size
        self.num_logprobs = min(MAX_LOGPROBS, cfg.vocab_size)  # top-N width of prompt logprobs
        self._compiles_at_warmup: int | None = None
        # Where the forward leaves logits: the sampler is compiled for exactly that placement.
        self._logits_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        # The last dispatched step's sampled ids (padded to max_num_seqs) and each sampling
        # request's row in them: where placeholders of the next step come from.
        self._prev_sampled = jnp.zeros(max_num_seqs, jnp.int32, device=self._logits_sharding)
        self._prev_rows: dict[str, int] = {}
        # Block tables and sampler constants kept across steps (rows grow on demand).
        self._batch = InputBatch(self.max_blocks_per_seq, NUM_SAMPLER_CONSTANTS, max_num_seqs)
        self._launcher: ThreadPoolExecutor | None = None
        if dispatch_thread_setting():
            self._launcher = ThreadPoolExecutor(1, thread_name_prefix="jaxpaged-dispatch")
            weakref.finalize(self, self._launcher.shutdown, wait=False)
            sys.setswitchinterval(switch_interval_setting())

    # -- shapes --------------------------------------------------------------------------

    def _mixed_shape(self, num_tokens: int, prompt_logprobs: bool) -> BucketShape:
        T = bucket_for(num_tokens, self.token_buckets)
        S = bucket_for(min(T, self.max_num_seqs), self.seq_buckets)
        return BucketShape(T, S, T if prompt_logprobs else S, False)

    def bucket_shapes(self) -> list[BucketShape]:
        shapes = [BucketShape(S, S, S, True) for S in self.seq_buckets]
        for T in self.token_buckets:
            shapes += [self._mixed_shape(T, False), self._mixed_shape(T, True)]
        return list(dict.fromkeys(shapes))

    # -- warm-up -------------------------------------------------------------------------

    def _empty_step(self, shape: BucketShape):
        return build_step_inputs([], [], [], self.block_size, num_tokens=shape.num_tokens,
                                 num_seqs=shape.num_seqs,
                                 max_blocks_per_seq=self.max_blocks_per_seq, logits_indices=[],
                                 num_logits=shape.num_logits, decode_only=shape.decode_only)

    def _precompile(self) -> None:
        """Compile every program of warm-up concurrently: XLA compiles outside the GIL, so the
        threads divide warm-up time by the cores available. One queue, the slowest programs
        first (the window programs and the unrolled decode steps, then the other forwards,
        then the samplers and prompt-logprobs programs), so no thread idles at a phase's end
        while another finishes a long compile. The sequential pass in `warmup` then finds each
        program already compiled."""
        shapes = sorted(self.bucket_shapes(), key=lambda shape: not shape.decode_only)

        def logits(rows: int) -> jax.ShapeDtypeStruct:  # the forward's: in the model's dtype
            return jax.ShapeDtypeStruct((rows, self.vocab_size), self.loaded.dtype,
                                        sharding=self._logits_sharding)

        def rows(n: int) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((n,), jnp.int32)

        prompt_logprobs = [shape for shape in shapes if shape.num_logits != shape.num_seqs]
        jobs = ([functools.partial(self.lower_multi_step, S, smd)
                 for S, smd in self._multi_step_variants()]
                + [functools.partial(self.lower_forward, shape) for shape in shapes]
                + [functools.partial(_jit_sample.lower, logits(S), *pack(smd),
                                     width=self.max_num_seqs)
                   for S in self.seq_buckets
                   for smd in sampling_metadata_variants(S, self.vocab_size, self.max_model_len)]
                + [functools.partial(_jit_prompt_logprobs.lower, logits(shape.num_logits),
                                     rows(shape.num_logits), num=self.num_logprobs)
                   for shape in prompt_logprobs]
                + [functools.partial(_jit_take_rows.lower, logits(shape.num_logits),
                                     rows(shape.num_seqs)) for shape in prompt_logprobs])
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda lower: lower().compile(), jobs))

    def lower_forward(self, shape: BucketShape) -> jax.stages.Lowered:
        """The forward program of one bucket, lowered (not compiled) for its empty step."""
        packed, spec = pack((*self._empty_step(shape), _no_sources(shape.num_tokens)))
        return _jit_forward.lower(self._model_def, self._params_leaves, self.kv_cache, packed,
                                  self._prev_sampled, spec, self.impl, self.mesh,
                                  self.unrolls(shape.decode_only), self.stacked_matmul)

    def _multi_step_variants(self) -> list[tuple[int, SamplingMetadata]]:
        """(S, inert sampling metadata) of every multi-step program: each decode bucket with
        each sampler variant a multi-step batch can have (no penalties, no logprobs)."""
        if self.num_scheduler_steps == 1:
            return []
        return [(S, smd) for S in self.seq_buckets
                for smd in sampling_metadata_variants(S, self.vocab_size, self.max_model_len)
                if smd.no_penalties and not smd.max_num_logprobs]

    def _empty_multi_step(self, S: int) -> tuple[np.ndarray, tuple]:
        shape = BucketShape(S, S, S, True)
        return pack((*self._empty_step(shape), _no_sources(S), np.zeros(S, np.int32)))

    def lower_multi_step(self, S: int, smd: SamplingMetadata) -> jax.stages.Lowered:
        """The multi-step program of decode bucket S and `smd`'s sampler variant, lowered."""
        packed, spec = self._empty_multi_step(S)
        smd_buf, smd_spec = pack(smd)
        return _jit_multi_step.lower(
            self._model_def, self._params_leaves, self.kv_cache, packed, self._prev_sampled,
            smd_buf, spec=spec, smd_spec=smd_spec, impl=self.impl, mesh=self.mesh,
            unroll=self.unrolls(True), stacked=self.stacked_matmul,
            num_steps=self.num_scheduler_steps, width=self.max_num_seqs)

    def warmup(self) -> tuple[int, float]:
        """Compile every bucket's forward, every sampler variant and every multi-step window
        program; -> (count, seconds)."""
        start, count = time.perf_counter(), 0
        self._precompile()
        for shape in self.bucket_shapes():
            packed, spec = pack((*self._empty_step(shape), _no_sources(shape.num_tokens)))
            self.kv_cache, logits = self._run_forward(packed, spec, shape.decode_only)
            count += 1
            if shape.num_logits != shape.num_seqs:  # the prompt-logprobs variant
                jax.block_until_ready(_jit_prompt_logprobs(
                    logits, np.zeros(shape.num_logits, np.int32), num=self.num_logprobs))
                jax.block_until_ready(_jit_take_rows(logits, np.zeros(shape.num_seqs, np.int32)))
                count += 2
        for S in self.seq_buckets:
            for smd in sampling_metadata_variants(S, self.vocab_size, self.max_model_len):
                logits = jnp.zeros((S, self.vocab_size), self.loaded.dtype,
                                   device=self._logits_sharding)
                jax.block_until_ready(_jit_sample(logits, *pack(smd), width=self.max_num_seqs)[:2])
                count += 1
        for S, smd in self._multi_step_variants():
            packed, spec = self._empty_multi_step(S)
            self.kv_cache, tokens, _ = self._run_multi_step(packed, spec, pack(smd))
            jax.block_until_ready(tokens)
            count += 1
        self._compiles_at_warmup = _compile_count[0]
        return count, time.perf_counter() - start

    @property
    def num_compiles_since_warmup(self) -> int | None:
        """XLA compiles in this process since warm-up ended (None before warm-up)."""
        if self._compiles_at_warmup is None:
            return None
        return _compile_count[0] - self._compiles_at_warmup

    def _run_forward(self, packed, spec, decode_only: bool):
        """The jitted forward of one step's packed inputs (`pack((ids, positions, metadata,
        source_rows))`); -> (kv cache, logits)."""
        return _jit_forward(self._model_def, self._params_leaves, self.kv_cache, packed,
                            self._prev_sampled, spec, self.impl, self.mesh,
                            self.unrolls(decode_only), self.stacked_matmul)

    def _run_multi_step(self, packed, spec, packed_smd):
        """The jitted multi-step program; -> (kv cache, tokens [K, S], next prev_sampled)."""
        smd_buf, smd_spec = packed_smd
        return _jit_multi_step(self._model_def, self._params_leaves, self.kv_cache, packed,
                               self._prev_sampled, smd_buf, spec=spec, smd_spec=smd_spec,
                               impl=self.impl, mesh=self.mesh, unroll=self.unrolls(True),
                               stacked=self.stacked_matmul, num_steps=self.num_scheduler_steps,
                               width=self.max_num_seqs)

    def unrolls(self, decode_only: bool) -> bool:
        """Whether a step of this kind runs its layers unrolled (see `unroll_setting`)."""
        return self.unroll_setting == "1" or (self.unroll_setting == "decode" and decode_only)

    # -- one step ------------------------------------------------------------------------

    def _shape_for(self, sched: SchedulerOutput, want_plp: bool, one_token_each: bool
                   ) -> BucketShape:
        """The bucket of a step; `one_token_each`: every scheduled request feeds one token."""
        if not want_plp and one_token_each:
            S = bucket_for(len(sched.scheduled_requests), self.seq_buckets)
            return BucketShape(S, S, S, True)
        return self._mixed_shape(sched.total_num_scheduled_tokens, want_plp)

    def dispatch(self, sched: SchedulerOutput, rows: Mapping[str, SamplingRow],
                 prompt_logprobs: Mapping[str, list[int]]) -> StepHandle:
        """Enqueue one step on the device and return without waiting. `rows` holds the
        sampling inputs of requests that sample this step; `prompt_logprobs` maps requests
        that want prompt logprobs to their prompt token ids. Placeholder tokens must be
        sampled by the step dispatched just before this one."""
        self.update_states(sched)
        reqs = sched.scheduled_requests
        want_plp = any(r.request_id in prompt_logprobs for r in reqs) if prompt_logprobs \
            else False
        # One pass over the requests (this runs for each of them every step): their tokens,
        # the row of each one's last token, the rows fed a placeholder (with the request that
        # sampled it last step), the sampling rows and this step's sampling requests' rows.
        token_ids, starts, last_rows, sampling_rows = [], [], [], []
        fed_rows, fed_ids, sampled_rows = [], [], {}
        end, one_token_each = -1, True
        for s, r in enumerate(reqs):
            ids = r.token_ids
            token_ids.append(ids)
            starts.append(r.start_pos)
            n = len(ids)
            end += n
            last_rows.append(end)
            if n != 1:
                one_token_each = False
            if ids[-1] == PLACEHOLDER_TOKEN_ID:
                fed_rows.append(end)
                fed_ids.append(r.request_id)
            if r.sample:
                sampling_rows.append(rows.get(r.request_id))
                sampled_rows[r.request_id] = s
            else:
                sampling_rows.append(None)
        shape = self._shape_for(sched, want_plp, one_token_each)
        batch_rows = self._batch.rows(reqs)
        ids, pos, md = build_step_inputs(
            token_ids, starts,
            self._batch.block_tables(batch_rows, shape.num_seqs),
            self.block_size, num_tokens=shape.num_tokens, num_seqs=shape.num_seqs,
            max_blocks_per_seq=self.max_blocks_per_seq,
            logits_indices=list(range(last_rows[-1] + 1)) if want_plp else last_rows,
            num_logits=shape.num_logits, decode_only=shape.decode_only)
        source_rows = _no_sources(shape.num_tokens)
        if fed_ids:
            prev = self._prev_rows
            unknown = [rid for rid in fed_ids if rid not in prev]
            if unknown:
                raise ValueError(f"{unknown[0]!r} feeds a placeholder, but the previous step "
                                 f"did not sample it")
            source_rows[fed_rows] = [prev[rid] for rid in fed_ids]
        S = shape.num_seqs
        real = [(b, row) for b, row in zip(batch_rows, sampling_rows) if row is not None]
        constants = self._batch.sampler_constants([b for b, _ in real],
                                                  [row.sampling_params for _, row in real])
        smd = build_sampling_metadata(sampling_rows, S, self.vocab_size, self.max_model_len,
                                      constants)
        plp_inputs, prompt_rows = None, {}
        if want_plp:
            next_ids, prompt_rows = self._prompt_logprobs_inputs(shape, reqs, pos,
                                                                 prompt_logprobs)
            plp_inputs = next_ids, np.pad(last_rows, (0, S - len(reqs)))
        self._prev_rows = sampled_rows
        # Packed here, so that the dispatch thread holds the GIL as briefly as it can.
        if sched.num_steps != 1:
            launch = self._launch_multi_step
            args = self._multi_step_args(sched, shape, ids, pos, md, source_rows, smd)
        else:
            launch = self._launch
            args = (*pack((ids, pos, md, source_rows)), md.decode_only, pack(smd), plp_inputs)
        if self._launcher is not None:
            launched = self._launcher.submit(launch, *args)
        else:
            launched = Future()
            launched.set_result(launch(*args))
        return StepHandle(sched, launched, pos, prompt_rows)

    def _multi_step_args(self, sched, shape, ids, pos, md, source_rows, smd) -> tuple:
        if sched.num_steps != self.num_scheduler_steps or not shape.decode_only:
            raise ValueError(f"a multi-step output of {sched.num_steps} steps needs a decode-only "
                             f"step of num_scheduler_steps={self.num_scheduler_steps}")
        if not smd.no_penalties or smd.max_num_logprobs or \
                np.any(smd.suppressed_token_ids >= 0):
            raise ValueError("a multi-step output cannot use penalties, logprobs or min_tokens")
        counts = np.zeros(shape.num_seqs, np.int32)
        counts[:len(sched.scheduled_requests)] = [r.num_steps for r in sched.scheduled_requests]
        return (*pack((ids, pos, md, source_rows, counts)), pack(smd))

    def _launch_multi_step(self, packed, spec, packed_smd):
        """`_launch` of a multi-step output; -> (its device tokens [K, S], None)."""
        self.kv_cache, tokens, self._prev_sampled = self._run_multi_step(packed, spec,
                                                                         packed_smd)
        return tokens, None

    def _launch(self, packed, spec, decode_only, packed_smd, plp_inputs):
        """Enqueue a step's device work: forward, prompt logprobs, sampler; -> the device
        (SamplerOutput, LogprobsTensors or None). On the dispatch thread when there is one."""
        self.kv_cache, logits = self._run_forward(packed, spec, decode_only)
        plp = None
        if plp_inputs is not None:
            next_ids, last_rows = plp_inputs
            plp = _jit_prompt_logprobs(logits, next_ids, num=self.num_logprobs)
            logits = _jit_take_rows(logits, last_rows)
        sampled, self._prev_sampled, _ = _jit_sample(logits, *packed_smd,
                                                     width=self.max_num_seqs)
        return sampled, plp

    def update_states(self, sched: SchedulerOutput) -> None:
        """Forget the requests `sched` reports finished or preempted. `dispatch` does it; the
        engine calls it for the outputs it does not dispatch (those that schedule nothing)."""
        self._batch.release(sched.finished_req_ids)
        self._batch.release(sched.preempted_req_ids)

    def fetch(self, handle: StepHandle) -> ModelRunnerOutput:
        """Wait for a dispatched step; its one device-to-host transfer."""
        sampled, plp = jax.device_get(handle.launched.result())
        reqs, pos = handle.sched.scheduled_requests, handle.positions
        out = ModelRunnerOutput({}, {}, {})
        if handle.sched.num_steps != 1:  # tokens [K, S]: each request's first num_steps
            columns = sampled.T.tolist()
            out.sampled_token_ids = {r.request_id: columns[s][:r.num_steps]
                                     for s, r in enumerate(reqs)}
            return out
        # Plain ints in one call: indexing the array costs ~0.1 us a row more.
        token_ids = sampled.sampled_token_ids.tolist()
        out.sampled_token_ids = {r.request_id: t for r, t in zip(reqs, token_ids) if r.sample}
        if sampled.topk_token_ids.shape[1]:
            for s, r in enumerate(reqs):
                if r.sample:
                    out.logprobs[r.request_id] = (
                        float(sampled.sampled_logprobs[s]), int(sampled.sampled_token_ranks[s]),
                        sampled.topk_token_ids[s], sampled.topk_logprobs[s])
        if plp is not None:
            for rid, rows_ in handle.prompt_rows.items():
                out.prompt_logprobs[rid] = (
                    pos[rows_] + 1, plp.token_logprobs[rows_], plp.token_ranks[rows_],
                    plp.topk_token_ids[rows_], plp.topk_logprobs[rows_])
        return out

    def _prompt_logprobs_inputs(self, shape, reqs, pos, prompt_logprobs):
        """Score each prompt token given what precedes it: row i (position p) scores the
        prompt token at p + 1. -> (the token each logits row scores, {request id: rows})."""
        next_ids = np.zeros(shape.num_logits, np.int32)
        positions: dict[str, np.ndarray] = {}
        lo = 0
        for r in reqs:
            prompt = prompt_logprobs.get(r.request_id)
            if prompt is not None:
                rows_ = np.arange(lo, lo + len(r.token_ids))
                rows_ = rows_[pos[rows_] + 1 < len(prompt)]
                next_ids[rows_] = np.asarray(prompt)[pos[rows_] + 1]
                positions[r.request_id] = rows_
            lo += len(r.token_ids)
        return next_ids, positions


def unroll_setting(stacked_matmul: bool = False) -> str:
    """Which steps run the layer loop unrolled (see jaxpaged.models.llama), from
    JAXPAGED_UNROLL_LAYERS: "0" none, "1" all, "decode" only decode-only steps (the steady
    state; their few buckets keep warm-up short). Unset: "decode" where decode steps take the
    stacked-weight path (`stacked_matmul`, on for a GPU), else "0".

    With the stacked path an unrolled decode step launches no loop bookkeeping and no per-layer
    slices (norm scales, the layer index): on an H100, llama-3.2-1b's decode step went from
    5.27 to 4.56 ms (host-bound: 4.59 -> 4.06 ms of host time a step, fewer launches to
    enqueue) and output throughput +10%, with no longer a cold warm-up (52.5 vs 57.6 s;
    benchmarks/NOTES_engine.md). Without it, unrolling everything made an H100 warm-up 30x
    longer (343 s for llama-3.2-1b's 103 programs: XLA's GEMMs autotune for every layer)."""
    setting = os.environ.get("JAXPAGED_UNROLL_LAYERS")
    if setting is None:
        return "decode" if stacked_matmul else "0"
    if setting not in ("0", "1", "decode"):
        raise ValueError(f"JAXPAGED_UNROLL_LAYERS={setting!r}; allowed: 0, 1, decode")
    return setting


def dispatch_thread_setting() -> bool:
    """Whether each step's jitted calls run on a worker thread: JAXPAGED_DISPATCH_THREAD=1 or
    0; unset, on for a GPU backend.

    Enqueueing a decode step's ~190 kernels takes the host ~1.2 ms a step on an H100 machine,
    spent inside XLA with the GIL released; on a worker thread it overlaps with the calling
    thread's Python (planning the next step, applying the last one). llama-3.2-1b on an H100,
    issue 5's workload, four interleaved A/B pairs on two machines (benchmarks/NOTES_engine.md,
    eighth session): the calling thread's busy time 3.97-4.69 -> 2.60-3.35 ms a step, output
    34,248-37,145 -> 37,908-40,544 tok/s (seven of eight threaded runs; one at 33,891)."""
    return on_for_gpu("JAXPAGED_DISPATCH_THREAD")


def switch_interval_setting() -> float:
    """Python's thread switch interval, in seconds, that a runner with a dispatch thread sets
    for the whole process (and leaves set), from JAXPAGED_SWITCH_INTERVAL_US (default 200 us;
    50 us measured the same). The dispatch thread needs the GIL briefly before and after each
    enqueue; with Python's default 5 ms it would wait that long for the busy calling thread,
    leaving the device idle."""
    setting = os.environ.get("JAXPAGED_SWITCH_INTERVAL_US", "200")
    try:
        micros = float(setting)
    except ValueError:
        raise ValueError(f"JAXPAGED_SWITCH_INTERVAL_US={setting!r} is not a number of "
                         f"microseconds") from None
    if not micros > 0:
        raise ValueError(f"JAXPAGED_SWITCH_INTERVAL_US must be > 0; got {micros}")
    return micros * 1e-6


def _no_sources(num_tokens: int) -> np.ndarray:
    """`source_rows` of a step without placeholders."""
    return np.full(num_tokens, -1, np.int32)
