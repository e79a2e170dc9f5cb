"""Per-request sampling parameters, vLLM's ``SamplingParams`` with the same names and ranges.

Validated once at construction: every out-of-range or contradictory value raises ``ValueError``
naming the field, the value given and what is allowed. Normalisation happens here too, so the
rest of the engine sees one spelling per meaning: ``top_k`` of -1 becomes 0 (off), ``stop`` is
always a list, ``stop_token_ids`` a de-duplicated list, a ``seed`` of -1 becomes ``None``, and a
greedy request (``temperature == 0``) has its top-k/top-p/min-p switched off.

Host only: no ``jax`` import.
"""

import dataclasses
import enum
import logging
import math
from functools import cached_property

logger = logging.getLogger(__name__)

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
_SAMPLING_EPS = 1e-5
# Positive temperatures below this overflow the softmax in f32; vLLM raises them to it.
_MIN_TEMPERATURE = 1e-2
# vLLM's OpenAI-compatible range.
_MAX_TEMPERATURE = 2.0
# Upper bound on `logprobs` and `prompt_logprobs` (vLLM's default --max-logprobs is 20). The
# sampler computes a fixed top-MAX_LOGPROBS on the device, so this is also a compile-shape bound.
MAX_LOGPROBS = 20


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _require_int(name: str, value: object, allowed: str) -> int:
    # bool is an int subclass; `n=True` is a bug in the caller, not a request for one sample.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int ({allowed}), got {value!r} ({type(value).__name__}).")
    return value


def _require_float(name: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number ({allowed}), got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite ({allowed}), got {value!r}.")
    return float(value)


def _out_of_range(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completions. Field meanings follow vLLM.

    ``max_tokens=None`` means "until the context is full"; the engine resolves it against
    ``max_model_len`` minus the prompt length. ``seed=None`` means the engine draws a seed when
    the request arrives, so every request has a reproducible stream of random numbers.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._normalise()
        self._verify_sampling()
        self._verify_lengths()
        self._verify_logprobs()
        self._verify_stops()
        if self.sampling_type == SamplingType.GREEDY:
            # Truncation cannot change an argmax; switching it off lets greedy batches compile
            # the cheap sampler variant.
            self._set(top_p=1.0, top_k=0, min_p=0.0)
            if self.n > 1:
                raise ValueError(f"n must be 1 when temperature is 0 (greedy), got n={self.n}.")

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _normalise(self) -> None:
        temperature = _require_float("temperature", self.temperature, f"in [0, {_MAX_TEMPERATURE}]")
        if 0.0 < temperature < _MIN_TEMPERATURE:
            logger.warning("temperature %s raised to %s to keep the softmax finite.", temperature, _MIN_TEMPERATURE)
            temperature = _MIN_TEMPERATURE
        self._set(temperature=temperature)
        # vLLM accepts top_k=-1 as "off"; store the one spelling 0.
        if _require_int("top_k", self.top_k, "0 or -1 for off, or >= 1") == -1:
            self._set(top_k=0)
        if self.seed is not None and _require_int("seed", self.seed, "an int or None") == -1:
            self._set(seed=None)
        if self.stop is None:
            self._set(stop=[])
        elif isinstance(self.stop, str):
            self._set(stop=[self.stop])
        elif isinstance(self.stop, (list, tuple)):
            self._set(stop=list(self.stop))
        else:
            raise ValueError(f"stop must be a str, a list of str or None, got {self.stop!r}.")
        if self.stop_token_ids is None:
            self._set(stop_token_ids=[])
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self._set(stop_token_ids=list(dict.fromkeys(self.stop_token_ids)))
        else:
            raise ValueError(f"stop_token_ids must be a list of int or None, got {self.stop_token_ids!r}.")
        # vLLM accepts `logprobs=True` and reads it as 1.
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is True:
                self._set(**{name: 1})

    def _verify_sampling(self) -> None:
        if _require_int("n", self.n, ">= 1") < 1:
            raise _out_of_range("n", self.n, ">= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _require_float(name, getattr(self, name), "in [-2, 2]")
            if not -2.0 <= value <= 2.0:
                raise _out_of_range(name, value, "in [-2, 2]")
            self._set(**{name: value})
        repetition_penalty = _require_float("repetition_penalty", self.repetition_penalty, "> 0")
        if repetition_penalty <= 0.0:
            raise _out_of_range("repetition_penalty", repetition_penalty, "> 0 (1 = off)")
        self._set(repetition_penalty=repetition_penalty)
        if not 0.0 <= self.temperature <= _MAX_TEMPERATURE:
            raise _out_of_range("temperature", self.temperature, f"in [0, {_MAX_TEMPERATURE}] (0 = greedy)")
        top_p = _require_float("top_p", self.top_p, "in (0, 1]")
        if not 0.0 < top_p <= 1.0:
            raise _out_of_range("top_p", top_p, "in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise _out_of_range("top_k", self.top_k, "0 or -1 for off, or >= 1")
        min_p = _require_float("min_p", self.min_p, "in [0, 1]")
        if not 0.0 <= min_p <= 1.0:
            raise _out_of_range("min_p", min_p, "in [0, 1] (0 = off)")
        self._set(top_p=top_p, min_p=min_p)

    def _verify_lengths(self) -> None:
        if self.max_tokens is not None and _require_int("max_tokens", self.max_tokens, ">= 1 or None") < 1:
            raise _out_of_range("max_tokens", self.max_tokens, ">= 1 or None")
        if _require_int("min_tokens", self.min_tokens, ">= 0") < 0:
            raise _out_of_range("min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got min_tokens={self.min_tokens}."
            )

    def _verify_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            allowed = f"None or an int in [0, {MAX_LOGPROBS}]"
            if value is not None and not 0 <= _require_int(name, value, allowed) <= MAX_LOGPROBS:
                raise _out_of_range(name, value, allowed)

    def _verify_stops(self) -> None:
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got stop={self.stop!r}.")
        for token_id in self.stop_token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(
                    f"stop_token_ids must contain only non-negative ints, got stop_token_ids={self.stop_token_ids!r}."
                )
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")

    def verify(self, vocab_size: int) -> None:
        """Checks that need the model: token ids index the logits, so they must be in the vocab."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be < vocab_size={vocab_size}, got out-of-vocab ids {bad}.")

    @cached_property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def uses_penalties(self) -> bool:
        """Repetition, frequency or presence penalty: sampling reads every previous token."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @cached_property
    def sampler_constants(self) -> tuple[float, ...]:
        """What the sampler reads from these params, computed once: the per-request values
        temperature, top_k, top_p, min_p, presence, frequency and repetition penalty, then the
        flags greedy, penalties, truncation (top-k or top-p on a sampled row) and logprobs
        asked, and min_tokens. A batch's rows stack into one array in a single NumPy call,
        whether its requests share one SamplingParams or each has its own."""
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.presence_penalty,
                self.frequency_penalty, self.repetition_penalty, self.is_greedy,
                self.uses_penalties,
                not self.is_greedy and (self.top_k != 0 or self.top_p != 1.0),
                self.logprobs is not None, self.min_tokens)

    @property
    def output_text_buffer_length(self) -> int:
        """Characters a stream holds back so a half-generated stop string is never shown."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0
