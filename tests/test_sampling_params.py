import dataclasses
import subprocess
import sys

import pytest

from jaxpaged.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingType


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert p.sampling_type == SamplingType.RANDOM and not p.is_greedy


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_normalisation() -> None:
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[5, 3, 5], seed=-1, logprobs=True)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [5, 3] and p.seed is None
    assert p.logprobs == 1
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    temperature = SamplingParams(temperature=1).temperature
    assert temperature == 1.0 and isinstance(temperature, float)


def test_greedy_switches_off_truncation() -> None:
    p = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)
    assert p.is_greedy and p.sampling_type == SamplingType.GREEDY
    assert (p.top_k, p.top_p, p.min_p) == (0, 1.0, 0.0)


def test_sampling_type_seeded() -> None:
    assert SamplingParams(seed=7).sampling_type == SamplingType.RANDOM_SEED


def test_tiny_temperature_raised() -> None:
    assert SamplingParams(temperature=1e-3).temperature == 1e-2


def test_output_text_buffer_length() -> None:
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams().output_text_buffer_length == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(n=1.5), "n"),
        (dict(n=True), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=2.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(presence_penalty=2.1), "presence_penalty"),
        (dict(frequency_penalty=-2.1), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
        (dict(prompt_logprobs=-3), "prompt_logprobs"),
        (dict(prompt_logprobs=MAX_LOGPROBS + 1), "prompt_logprobs"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=[3]), "stop"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(stop_token_ids=7), "stop_token_ids"),
        (dict(seed="x"), "seed"),
        (dict(ignore_eos=1), "ignore_eos"),
        (dict(temperature=0.0, n=2), "n"),
    ],
)
def test_invalid_values_name_field_and_value(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert field in message
    assert repr(kwargs[field])[:8] in message or str(kwargs[field]) in message


def test_boundaries_accepted() -> None:
    SamplingParams(temperature=0.0, presence_penalty=-2.0, frequency_penalty=2.0, top_p=1.0, min_p=1.0)
    SamplingParams(temperature=2.0, top_p=1e-6, top_k=1, min_tokens=16, max_tokens=16, logprobs=0)
    SamplingParams(max_tokens=None, min_tokens=100, logprobs=MAX_LOGPROBS, prompt_logprobs=0, seed=2**40)


def test_verify_vocab() -> None:
    SamplingParams(stop_token_ids=[9]).verify(vocab_size=10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[10]).verify(vocab_size=10)


def test_host_only() -> None:
    # STYLE rule 4: parameters are host logic and must not drag jax in.
    code = "import sys, jaxpaged.sampling_params; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
