"""Sampling on the device: logits in, next tokens and their logprobs out, one row per request.

``sample`` follows vLLM V1's order: logprobs of the raw logits; min-tokens suppression of stop
ids; repetition/frequency/presence penalties; greedy argmax; temperature; min-p; top-k; top-p;
a random draw. Greedy rows take the argmax of the penalised logits.

Randomness is per row: ``key = fold_in(key(seed), output_position)``, so a request's token
depends only on its own seed, how many tokens it has produced and its logits, never on the other
rows or the batch size. Recomputing a preempted request replays the same tokens.

Shapes are fixed per (R, V, max_model_len) bucket; data-dependent choices that would change the
compiled program are static fields of ``SamplingMetadata`` so cheap batches (all greedy, no
penalties, no truncation, no logprobs) compile the cheap variant. ``sampling_metadata_variants``
lists every variant for warm-up.

Padded rows are greedy no-ops: temperature 0, no penalties, nothing suppressed.
"""

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.sampling_params import _SAMPLING_EPS, MAX_LOGPROBS, SamplingParams
from jaxpaged.settings import switch
from pallas_kernels import argmax_rows, lm_head_argmax, lm_head_argmax_supports

# Width of `suppressed_token_ids`: EOS plus stop_token_ids of a request still under min_tokens.
# Fixed so one compile serves every batch; a request with more stop ids is rejected.
MAX_SUPPRESSED_TOKEN_IDS = 32

# Rows of logits scored at once by compute_logprobs (bounds its temporaries).
LOGPROBS_CHUNK_ROWS = 512

# Device arrays inside jit, NumPy arrays from the host builder.
Array = jax.Array | np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    temperature: Array  # f32[R]: 0 = greedy (padding rows too)
    top_k: Array  # i32[R]: 0 = off
    top_p: Array  # f32[R]: 1 = off
    min_p: Array  # f32[R]: 0 = off
    presence_penalties: Array  # f32[R]: 0 = off, applies to output tokens
    frequency_penalties: Array  # f32[R]: 0 = off, applies to output tokens
    repetition_penalties: Array  # f32[R]: 1 = off, applies to prompt and output tokens
    seeds: Array  # u32[R]: low 32 bits of the request's seed
    output_positions: Array  # i32[R]: index of the token being sampled among the request's outputs
    token_ids: Array  # i32[R, L]: prompt then output tokens, -1 padded; L = max_model_len, or 0 if no_penalties
    num_prompt_tokens: Array  # i32[R]: how many leading entries of token_ids are the prompt
    suppressed_token_ids: Array  # i32[R, MAX_SUPPRESSED_TOKEN_IDS]: ids masked to -inf (min_tokens), -1 padded
    # Static: part of the compiled program's key.
    all_greedy: bool = dataclasses.field(default=True, metadata=dict(static=True))
    no_penalties: bool = dataclasses.field(default=True, metadata=dict(static=True))
    no_top_k_top_p: bool = dataclasses.field(default=True, metadata=dict(static=True))
    # Width k of the top-logprobs outputs: 0, or min(MAX_LOGPROBS, V) when any row wants logprobs.
    max_num_logprobs: int = dataclasses.field(default=0, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogprobsTensors:
    token_logprobs: jax.Array  # f32[R]: logprob of the given token
    token_ranks: jax.Array  # i32[R]: 1-based rank of the given token (tokens at least as likely)
    topk_token_ids: jax.Array  # i32[R, k]: most likely tokens, best first
    topk_logprobs: jax.Array  # f32[R, k]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    sampled_token_ids: jax.Array  # i32[R]
    # With max_num_logprobs == 0 (no row asked for logprobs) these two are zeros, not computed.
    sampled_logprobs: jax.Array  # f32[R]: log-softmax of the raw logits at the sampled token
    sampled_token_ranks: jax.Array  # i32[R]: 1-based rank of the sampled token in the raw logits
    topk_token_ids: jax.Array  # i32[R, k], k = max_num_logprobs
    topk_logprobs: jax.Array  # f32[R, k]


def compute_logprobs(logits: jax.Array, token_ids: jax.Array, num: int) -> LogprobsTensors:
    """Logprob and rank of ``token_ids`` under ``logits`` ([R, V], any float dtype; widened to
    f32 a row at a time), plus the top ``num``.

    Used for prompt logprobs (row i's logits scored against prompt token i + 1). Rows go
    through in chunks of ``LOGPROBS_CHUNK_ROWS``: on a GPU, top-k over 8192 rows of a 128k
    vocabulary at once asked for 23 GiB of temporaries.
    """

    def one_row(args):  # lax.map vmaps it over LOGPROBS_CHUNK_ROWS rows at a time
        row, token = args
        logprobs = jax.nn.log_softmax(row.astype(jnp.float32))[None]
        return jax.tree.map(lambda x: x[0], _gather_logprobs(logprobs, token[None], num))

    return jax.lax.map(one_row, (logits, token_ids), batch_size=LOGPROBS_CHUNK_ROWS)


def _gather_logprobs(logprobs: jax.Array, token_ids: jax.Array, num: int) -> LogprobsTensors:
    token_logprobs = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)  # f32[R, 1]
    # Counting ties as ahead matches vLLM and makes the argmax rank 1.
    token_ranks = jnp.sum(logprobs >= token_logprobs, axis=-1, dtype=jnp.int32)
    topk_logprobs, topk_token_ids = jax.lax.top_k(logprobs, num)
    return LogprobsTensors(token_logprobs[:, 0], token_ranks, topk_token_ids.astype(jnp.int32), topk_logprobs)


def apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """vLLM's penalties: repetition on prompt + output tokens, presence/frequency on output only."""
    num_rows, vocab_size = logits.shape
    positions = jnp.arange(md.token_ids.shape[1])[None, :]  # i32[1, L]
    is_prompt = positions < md.num_prompt_tokens[:, None]  # bool[R, L]
    valid = md.token_ids >= 0
    rows = jnp.arange(num_rows)[:, None]
    # Invalid entries land in an extra column that is sliced off, keeping the scatter dense.
    output_ids = jnp.where(valid & ~is_prompt, md.token_ids, vocab_size)
    prompt_ids = jnp.where(valid & is_prompt, md.token_ids, vocab_size)
    output_counts = jnp.zeros((num_rows, vocab_size + 1), jnp.float32).at[rows, output_ids].add(1.0)[:, :vocab_size]
    in_prompt = jnp.zeros((num_rows, vocab_size + 1), jnp.bool_).at[rows, prompt_ids].set(True)[:, :vocab_size]
    in_output = output_counts > 0
    repetition = jnp.where(in_prompt | in_output, md.repetition_penalties[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - md.frequency_penalties[:, None] * output_counts
    return logits - md.presence_penalties[:, None] * in_output.astype(jnp.float32)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks to -inf every token outside the row's top-k, then outside its top-p nucleus.

    Both cuts become a logit threshold, so tokens tied with the last kept token are kept too.
    """
    vocab_size = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1, descending=True)  # f32[R, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab_size), vocab_size)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # f32[R, 1]
    sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
    # before it is below top_p, so the most likely token always stays.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum(mass_before < top_p[:, None], axis=-1)
    nucleus = jnp.take_along_axis(sorted_logits, (num_kept - 1)[:, None], axis=-1)
    # With top_p = 1 the nucleus can run into the -inf tail; top-k's cut still holds.
    threshold = jnp.maximum(nucleus, kth)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    # p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p); min_p = 0 keeps everything.
    max_logits = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits - max_logits >= jnp.log(min_p)[:, None], logits, -jnp.inf)


def _random_sample(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    temperature = jnp.where(md.temperature < _SAMPLING_EPS, 1.0, md.temperature)
    logits = apply_min_p(logits / temperature[:, None], md.min_p)
    if not md.no_top_k_top_p:
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)

    def row_noise(seed: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.gumbel(key, (logits.shape[-1],), jnp.float32)

    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
    noise = jax.vmap(row_noise)(md.seeds, md.output_positions)  # f32[R, V]
    return jnp.argmax(logits + noise, axis=-1)


def sample(logits: jax.Array, md: SamplingMetadata, return_logits: bool = False,
           suppress: bool = True) -> SamplerOutput | tuple[SamplerOutput, jax.Array]:
    """Draws one token per row of ``logits`` ([R, V] in the model's dtype, widened to f32
    here); jit it with ``md`` as an argument. ``return_logits`` also returns the logits after
    the min_tokens suppression, in their own dtype: a jit that donates ``logits`` and returns
    them aliases the two, so the suppression writes its -inf in place and, without logprobs or
    penalties, the step reads the logits once (no f32 copy of them reaches memory).
    ``suppress=False`` skips the suppression (and its copy of the logits where they are not
    donated): for callers whose rows are all past their min_tokens."""
    num_rows, vocab_size = logits.shape
    raw_logits = logits  # the reported logprobs are of these, before suppression and penalties
    if not suppress:
        out = _sample(logits, raw_logits, md)
        return (out, logits) if return_logits else out
    suppressed = jnp.where(md.suppressed_token_ids >= 0, md.suppressed_token_ids, vocab_size)
    # -inf is exact in every float dtype, so suppressing before widening changes nothing.
    suppressed_logits = logits.at[jnp.arange(num_rows)[:, None], suppressed].set(-jnp.inf,
                                                                                 mode="drop")
    out = _sample(suppressed_logits, raw_logits, md)
    return (out, suppressed_logits) if return_logits else out


def use_argmax_kernel() -> bool:
    """JAXPAGED_ARGMAX_KERNEL: "1"/"0" force it; unset, on for a process with one GPU. With
    several devices (tensor parallelism) XLA's argmax stays: the kernel has no partitioning
    rule and was not measured there."""
    return switch("JAXPAGED_ARGMAX_KERNEL",
                  lambda: jax.default_backend() == "gpu" and jax.device_count() == 1,
                  " (unset: on for one GPU)")


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """The first index of each row's maximum, as ``jnp.argmax``; through
    ``pallas_kernels.argmax_rows``, which splits each row over many programs, where
    ``use_argmax_kernel``: on an H100, XLA's argmax of a batch-256 step's [256, 128256] logits
    took 34 us and the kernel 28 (benchmarks/argmax_variants.py)."""
    if use_argmax_kernel():
        return argmax_rows(logits)
    return jnp.argmax(logits, axis=-1)


# A greedy head's fused launch pays off from this many rows: on an H100 it beat XLA's GEMM +
# argmax_rows at T 64 and 256 on the llama-3.2-1b and qwen3-0.6b heads (5-16 %), tied at T 64
# on llama-3.1-8b's and lost 1-4 % at T 8 (benchmarks/lm_head_variants.py; NOTES_kernels,
# sixteenth section).
LM_HEAD_ARGMAX_MIN_TOKENS = 64


def use_lm_head_argmax(num_tokens: int, hidden_size: int, vocab_size: int, dtype) -> bool:
    """JAXPAGED_LM_HEAD_ARGMAX: "1"/"0" force ``pallas_kernels.lm_head_argmax`` for an all-greedy
    step's head (where its shape allows); unset, on for a process with one GPU from
    LM_HEAD_ARGMAX_MIN_TOKENS rows."""
    if not lm_head_argmax_supports(hidden_size, vocab_size, dtype):
        return False
    return switch("JAXPAGED_LM_HEAD_ARGMAX",
                  lambda: (jax.default_backend() == "gpu" and jax.device_count() == 1
                           and num_tokens >= LM_HEAD_ARGMAX_MIN_TOKENS),
                  " (unset: on for one GPU)")


def greedy_head(x: jax.Array, weight: jax.Array, transposed: bool) -> jax.Array:
    """i32[R]: the greedy tokens of hidden states ``x`` [R, D] under an LM head ``weight`` ([V, D]
    with ``transposed``, a tied embedding table; else [D, V]): ``greedy_tokens`` of the logits
    the model's head makes, or, where ``use_lm_head_argmax``, the same tokens from one launch
    that never writes the logits."""
    vocab_size = weight.shape[0] if transposed else weight.shape[1]
    if use_lm_head_argmax(x.shape[0], x.shape[1], vocab_size, x.dtype):
        return lm_head_argmax(x, weight, transposed=transposed)
    return greedy_tokens(jnp.dot(x, weight.T if transposed else weight)).astype(jnp.int32)


def _sample(logits: jax.Array, raw_logits: jax.Array, md: SamplingMetadata) -> SamplerOutput:
    """`sample` after the suppression: `logits` suppressed, in the model's dtype (widened to
    f32 here where penalties or a random draw need it); `raw_logits` as given, for the
    reported logprobs."""
    num_rows = logits.shape[0]
    if md.no_penalties:
        # Widening to f32 is exact: the argmax of the logits as they are is the f32 one, and
        # reading them once in their own dtype is the cheapest greedy step.
        sampled = greedy_tokens(logits)
        logits = logits.astype(jnp.float32)
    else:
        logits = apply_penalties(logits.astype(jnp.float32), md)
        sampled = greedy_tokens(logits)
    if not md.all_greedy:
        sampled = jnp.where(md.temperature < _SAMPLING_EPS, sampled, _random_sample(logits, md))
    sampled = sampled.astype(jnp.int32)
    if not md.max_num_logprobs:
        # Nobody reads them: skip the log-softmax, rank and top-k passes over the R x V logits
        # (four reads of 128 MB at batch 256 of a 128k vocabulary).
        zeros = jnp.zeros(num_rows, jnp.float32)
        return SamplerOutput(sampled, zeros, jnp.zeros(num_rows, jnp.int32),
                             jnp.zeros((num_rows, 0), jnp.int32), jnp.zeros((num_rows, 0), jnp.float32))
    lp = _gather_logprobs(jax.nn.log_softmax(raw_logits.astype(jnp.float32), axis=-1), sampled,
                          md.max_num_logprobs)
    return SamplerOutput(sampled, lp.token_logprobs, lp.token_ranks, lp.topk_token_ids, lp.topk_logprobs)


# ---------------------------------------------------------------------------------------------
# Host side: per-request inputs -> NumPy SamplingMetadata, transferred with the step's inputs.


@dataclasses.dataclass(slots=True)  # not frozen: the engine keeps one per completion and
# updates num_pending_tokens each step
class SamplingRow:
    """What the sampler needs from one request (one completion) at a step.

    ``seed`` is required: the engine uses ``sampling_params.seed`` when given (plus the
    completion's index for n > 1, so siblings differ) and otherwise draws one at arrival.
    ``token_ids`` is the prompt followed by the outputs so far; it is only copied when the batch
    uses penalties, but its length always gives the output position. A NumPy array makes that
    copy a memcpy; a Python list costs about 30 ns a token (256 rows of 3,000 tokens: ~28 ms).
    ``num_pending_tokens`` counts outputs sampled by a step still in flight (async
    scheduling): they count toward the output position and min_tokens, but penalties need
    their ids, so a row with pending tokens cannot use penalties.
    """

    sampling_params: SamplingParams
    seed: int
    token_ids: Sequence[int]
    num_prompt_tokens: int
    eos_token_id: int | None = None
    num_pending_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")
        if not 0 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(
                f"num_prompt_tokens must be in [0, len(token_ids)={len(self.token_ids)}], got {self.num_prompt_tokens}."
            )
        if self.num_pending_tokens < 0:
            raise ValueError(f"num_pending_tokens must be >= 0, got {self.num_pending_tokens}.")
        if self.num_pending_tokens and self.sampling_params.uses_penalties:
            raise ValueError("penalties need every output id: a row with pending tokens cannot use them.")

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens + self.num_pending_tokens

    def suppressed_token_ids(self) -> list[int]:
        """EOS and stop ids while min_tokens is not reached (vLLM suppresses EOS even with ignore_eos)."""
        if self.num_output_tokens >= self.sampling_params.min_tokens:
            return []
        ids = list(self.sampling_params.stop_token_ids)
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        return ids


def _padded_metadata(num_rows: int, history_len: int) -> dict[str, np.ndarray]:
    return dict(
        temperature=np.zeros(num_rows, np.float32),
        top_k=np.zeros(num_rows, np.int32),
        top_p=np.ones(num_rows, np.float32),
        min_p=np.zeros(num_rows, np.float32),
        presence_penalties=np.zeros(num_rows, np.float32),
        frequency_penalties=np.zeros(num_rows, np.float32),
        repetition_penalties=np.ones(num_rows, np.float32),
        seeds=np.zeros(num_rows, np.uint32),
        output_positions=np.zeros(num_rows, np.int32),
        token_ids=np.full((num_rows, history_len), -1, np.int32),
        num_prompt_tokens=np.zeros(num_rows, np.int32),
        suppressed_token_ids=np.full((num_rows, MAX_SUPPRESSED_TOKEN_IDS), -1, np.int32),
    )


def _check_suppressed(i: int, suppressed: list[int], vocab_size: int) -> None:
    if len(suppressed) > MAX_SUPPRESSED_TOKEN_IDS:
        raise ValueError(
            f"rows[{i}] has {len(suppressed)} EOS/stop token ids to suppress under min_tokens, "
            f"at most MAX_SUPPRESSED_TOKEN_IDS={MAX_SUPPRESSED_TOKEN_IDS} are supported."
        )
    if any(not 0 <= t < vocab_size for t in suppressed):
        raise ValueError(f"rows[{i}] stop/EOS token ids {suppressed} must be in [0, vocab_size={vocab_size}).")


# SamplingMetadata fields filled from the first columns of SamplingParams.sampler_constants; the
# flags greedy, penalties, truncation, logprobs and min_tokens follow them.
_PARAM_FIELDS = ("temperature", "top_k", "top_p", "min_p", "presence_penalties",
                 "frequency_penalties", "repetition_penalties")
NUM_SAMPLER_CONSTANTS = len(_PARAM_FIELDS) + 5


def build_sampling_metadata(
    rows: Sequence[SamplingRow | None], num_rows_padded: int, vocab_size: int, max_model_len: int,
    constants: np.ndarray | None = None,
) -> SamplingMetadata:
    """NumPy ``SamplingMetadata`` for one step; row i describes logits row i, None is padding.

    Rows past ``len(rows)`` are padding too. Static flags are derived from the real rows.
    Filled a column at a time from every row's ``SamplingParams.sampler_constants`` stacked
    into one array: per-row scalar stores cost ~1.3 ms a step at 256 rows, and a batch whose
    requests each bring their own (equal) SamplingParams is the usual case. ``constants``, when
    given, is that array already made (f64[real rows, NUM_SAMPLER_CONSTANTS], the real rows in
    order), as the runner keeps it across steps.
    """
    if len(rows) > num_rows_padded:
        raise ValueError(f"got {len(rows)} rows, more than num_rows_padded={num_rows_padded}.")
    index = [i for i, row in enumerate(rows) if row is not None]
    real = [rows[i] for i in index]
    lengths = [len(row.token_ids) + row.num_pending_tokens for row in real]
    if lengths and max(lengths) > max_model_len:
        j = max(range(len(real)), key=lengths.__getitem__)
        raise ValueError(
            f"rows[{index[j]}].token_ids has {len(real[j].token_ids)} (+ {real[j].num_pending_tokens} "
            f"pending) tokens, more than max_model_len={max_model_len}."
        )
    if constants is None:
        consts = np.array([row.sampling_params.sampler_constants for row in real],
                          np.float64).reshape(len(real), NUM_SAMPLER_CONSTANTS)
    elif constants.shape != (len(real), NUM_SAMPLER_CONSTANTS):
        raise ValueError(f"constants has shape {constants.shape}; expected "
                         f"({len(real)}, {NUM_SAMPLER_CONSTANTS}), one row per real row")
    else:
        consts = constants
    greedy, penalties, truncation, logprobs, min_tokens = consts[:, len(_PARAM_FIELDS):].T
    no_penalties = not penalties.any()
    # Without penalties the history is never read; a zero-width array saves the transfer.
    arrays = _padded_metadata(num_rows_padded, 0 if no_penalties else max_model_len)
    if real:
        # Usually every row samples: a slice then, else the row indices converted once.
        at = slice(0, len(real)) if index[-1] == len(real) - 1 else np.asarray(index)
        for j, field in enumerate(_PARAM_FIELDS):
            arrays[field][at] = consts[:, j]
        arrays["seeds"][at] = [row.seed % 2**32 for row in real]
        num_prompt = np.fromiter([row.num_prompt_tokens for row in real], np.int32, len(real))
        arrays["num_prompt_tokens"][at] = num_prompt
        # SamplingRow.num_output_tokens for every row at once.
        arrays["output_positions"][at] = np.asarray(lengths, np.int32) - num_prompt
    for k in np.flatnonzero(min_tokens).tolist():  # rows still under min_tokens suppress ids
        i, ids = index[k], real[k].suppressed_token_ids()
        _check_suppressed(i, ids, vocab_size)
        arrays["suppressed_token_ids"][i, : len(ids)] = ids
    if not no_penalties:
        for i, row in zip(index, real):
            arrays["token_ids"][i, : len(row.token_ids)] = row.token_ids
    return SamplingMetadata(
        **arrays,
        all_greedy=bool(greedy.all()),
        no_penalties=no_penalties,
        no_top_k_top_p=not truncation.any(),
        # Always the full width when any row asks, so the logprob count never forces a compile.
        max_num_logprobs=min(MAX_LOGPROBS, vocab_size) if logprobs.any() else 0,
    )


def sampling_metadata_variants(num_rows_padded: int, vocab_size: int, max_model_len: int) -> list[SamplingMetadata]:
    """Inert metadata for every compiled variant of ``sample`` at this shape, for warm-up."""
    k = min(MAX_LOGPROBS, vocab_size)
    variants = []
    for all_greedy, no_penalties, no_top_k_top_p, max_num_logprobs in itertools.product(
        (True, False), (True, False), (True, False), (0, k)
    ):
        if all_greedy and not no_top_k_top_p:
            continue  # the builder never emits it: greedy rows switch truncation off
        arrays = _padded_metadata(num_rows_padded, max_model_len if not no_penalties else 0)
        variants.append(SamplingMetadata(**arrays, all_greedy=all_greedy, no_penalties=no_penalties,
                                         no_top_k_top_p=no_top_k_top_p, max_num_logprobs=max_num_logprobs))
    return variants
