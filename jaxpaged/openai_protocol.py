"""OpenAI's request and response shapes for `jaxpaged.serve`, as vLLM's server speaks them.

Requests are pydantic models in strict mode with unknown fields forbidden, so a wrong type or a
misspelt field is a 400 that names the field instead of a silently ignored setting. vLLM's
extensions to OpenAI's sampling fields (`top_k`, `min_p`, `ignore_eos`, ...) are accepted, as
the `openai` client's `extra_body` sends them. Responses are plain dicts: they are only ever
serialised, and their shapes are fixed by OpenAI's API reference.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxpaged.outputs import Logprob, RequestOutput
from jaxpaged.sampling_params import SamplingParams


class APIError(Exception):
    """An error answered with OpenAI's error body; `param` names the offending field."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status_code, self.param, self.code, self.type = (
            message, status_code, param, code, type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, worded for the person who wrote the request."""
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"][:1]) or None
    if err["type"] == "extra_forbidden":
        return APIError(f"Unrecognized request argument supplied: {param}", param=param)
    if err["type"] == "missing":
        return APIError(f"Missing required parameter: {param}", param=param)
    path = ".".join(str(x) for x in err["loc"])
    return APIError(f"Invalid value for {path}: {err['msg']}, got {err.get('input')!r}",
                    param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension, as are the fields below `user`
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as vLLM does
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Unset OpenAI fields take SamplingParams' defaults. Raises APIError naming the field."""
        fields = {name: getattr(self, name) for name in (
            "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids",
            "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output")}
        fields = {k: v for k, v in fields.items() if v is not None}
        try:
            return SamplingParams(**fields, max_tokens=max_tokens, logprobs=logprobs)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            raise APIError(str(e), param=field if field.isidentifier() else None) from e


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Clients echo assistant messages back with fields we have no use for (refusal, ...).
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_template(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # SmolLM2-style templates know no "developer" role; it is OpenAI's new name for system.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extension


# -- responses ----------------------------------------------------------------------------

def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids or []) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _token(lp: Logprob, token_id: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def _top(entries: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
    """The top `num` entries by rank; the sampled token is included only when it ranks."""
    ranked = [(t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= num]
    return sorted(ranked, key=lambda item: item[1].rank)[:num]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num: int,
                        text_offset: int) -> dict[str, list]:
    """The legacy completions `logprobs` object for the given tokens."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries[token_id]
        text = _token(sampled, token_id)
        tokens.append(text)
        token_lps.append(sampled.logprob)
        top = {_token(lp, t): lp.logprob for t, lp in _top(entries, num)}
        top.setdefault(text, sampled.logprob)  # vLLM lists the sampled token too
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]],
                  num: int) -> dict[str, list]:
    """The chat `logprobs` object: one entry per token with its top alternatives."""
    content = []
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries[token_id]
        text = _token(sampled, token_id)
        content.append({
            "token": text, "logprob": sampled.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": _token(lp, t), "logprob": lp.logprob,
                              "bytes": list(_token(lp, t).encode())}
                             for t, lp in _top(entries, num)]})
    return {"content": content}


def response_header(kind: str, response_id: str, model: str, created: int | None = None
                    ) -> dict[str, Any]:
    return {"id": response_id, "object": kind, "created": created or int(time.time()),
            "model": model}
