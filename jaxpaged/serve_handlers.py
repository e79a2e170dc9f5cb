"""`OpenAIServing`: /v1/completions and /v1/chat/completions on top of `AsyncLLMEngine`.

Every check that can fail (model name, prompt, context length, sampling fields) runs before a
request reaches the engine, so a bad request is a 400 and never costs an engine step. Streams
send OpenAI's server-sent events: one chunk per new piece of text, finishing with
`data: [DONE]`. Text is the engine's cumulative `text` diffed against what was already sent, so
the detokenizer's held-back partial stop strings never leak into a stream.

A client that goes away aborts its requests: Starlette cancels a streaming response when the
client disconnects (ASGI spec < 2.4, as uvicorn reports), which unwinds
`AsyncLLMEngine.generate`; a non-streaming request races its own disconnect listener.
"""

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError

from jaxpaged.openai_protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      chat_logprobs, completion_logprobs, random_id,
                                      response_header, usage)
from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.serve_engine import AsyncLLMEngine, EngineDeadError, EngineRequest

# Status nginx uses for "client closed the request"; nobody reads it, but logs do.
_CLIENT_CLOSED = 499


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str):
        self.engine = engine
        self.served_model_name = served_model_name
        llm = engine.engine
        # The engine thread detokenizes with llm.tokenizer while handlers tokenize here; a
        # private copy keeps the two threads off one (Rust-side mutable) tokenizer object.
        self.tokenizer = copy.deepcopy(llm.tokenizer)
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.model.config.vocab_size

    # -- checks shared by both endpoints ---------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(f"The model `{model}` does not exist; this server serves "
                           f"`{self.served_model_name}`", param="model", code="model_not_found")

    def _check_ids(self, ids: list[int], max_tokens: int | None, prompt: str = "prompt") -> int:
        """Returns max_tokens resolved against the room the prompt leaves. `prompt` names the
        field the prompt came from, for the error."""
        if not ids:
            raise APIError("prompt is empty: it must have at least one token", param=prompt)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(f"prompt token ids {bad[:8]} are outside the vocabulary "
                           f"[0, {self.vocab_size})", param=prompt)
        room = self.max_model_len - len(ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            wanted = len(ids) + (max_tokens or 1)
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. "
                           f"However, you requested {wanted} tokens ({len(ids)} in the prompt, "
                           f"{max_tokens or 1} for the completion). Please reduce the length of "
                           f"the prompt or of max_tokens.", param="max_tokens" if room >= 1
                           else prompt, code="context_length_exceeded")
        return room if max_tokens is None else max_tokens

    def _params(self, req: CompletionRequest | ChatCompletionRequest, ids: list[int],
                max_tokens: int | None, logprobs: int | None,
                prompt: str = "prompt") -> SamplingParams:
        params = req.sampling_params(self._check_ids(ids, max_tokens, prompt), logprobs)
        try:
            params.verify(self.vocab_size)  # the engine would, but after the 200 of a stream
        except ValueError as e:
            raise APIError(str(e), param="stop_token_ids") from e
        return params

    def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer (dummy weights): give the prompt as a "
                           "list of token ids", param="prompt")
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    # -- /v1/completions -------------------------------------------------------------------

    async def create_completion(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.echo or req.suffix:
            raise APIError("echo and suffix are not supported", param="echo" if req.echo
                           else "suffix")
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError("prompt is empty", param="prompt")
        ids = [self._tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
        response_id = random_id("cmpl")
        requests = [EngineRequest(f"{response_id}-{i}", p,
                                  self._params(req, p, req.max_tokens, req.logprobs))
                    for i, p in enumerate(ids)]
        header = response_header("text_completion", response_id, self.served_model_name)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._completion_chunks(requests, header, req, include_usage))
        outputs = await self._collect(requests, raw)
        if outputs is None:
            return Response(status_code=_CLIENT_CLOSED)
        choices = [self._completion_choice(c, p * req.n + c.index, req.logprobs, 0)
                   for p, out in enumerate(outputs) for c in out.outputs]
        return JSONResponse({**header, "choices": choices, "usage": usage(outputs)})

    @staticmethod
    def _completion_choice(c: CompletionOutput, index: int, num_logprobs: int | None,
                           sent_tokens: int, sent_text: int = 0) -> dict[str, Any]:
        logprobs = None
        if num_logprobs is not None and c.logprobs is not None:
            logprobs = completion_logprobs(c.token_ids[sent_tokens:], c.logprobs[sent_tokens:],
                                           num_logprobs, sent_text)
        return {"index": index, "text": c.text[sent_text:], "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    async def _completion_chunks(self, requests: list[EngineRequest], header: dict,
                                 req: CompletionRequest, include_usage: bool
                                 ) -> AsyncIterator[dict]:
        index_of = {r.request_id: i for i, r in enumerate(requests)}
        # (prompt, index) -> (characters, tokens, finish) already sent
        sent: dict[tuple[int, int], tuple[int, int, bool]] = {}
        finals = []
        async for out in self.engine.generate(requests):
            p = index_of[out.request_id]
            for c in out.outputs:
                prev = sent.get((p, c.index), (0, 0, False))
                if not _has_news(c, prev, req.logprobs is not None):
                    continue
                chars, tokens, _ = prev
                choice = self._completion_choice(c, p * req.n + c.index, req.logprobs, tokens,
                                                 chars)
                sent[(p, c.index)] = (len(c.text), len(c.token_ids), c.finished())
                yield {**header, "choices": [choice]}
            if out.finished:
                finals.append(out)
        if include_usage:
            yield {**header, "choices": [], "usage": usage(finals)}

    # -- /v1/chat/completions --------------------------------------------------------------

    async def create_chat_completion(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise APIError("this model has no chat template; use /v1/completions",
                           param="messages")
        try:
            text = self.tokenizer.apply_chat_template(
                [m.to_template() for m in req.messages],
                add_generation_prompt=req.add_generation_prompt, tokenize=False)
        except (TemplateError, ValueError) as e:
            raise APIError(f"the chat template rejected the messages: {e}",
                           param="messages") from e
        # The template already holds the special tokens (as in LLM.chat).
        ids = self._tokenize(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        response_id = random_id("chatcmpl")
        requests = [EngineRequest(response_id, ids, self._params(req, ids, max_tokens,
                                                                 num_logprobs, "messages"))]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            header = response_header("chat.completion.chunk", response_id,
                                     self.served_model_name)
            return _sse(self._chat_chunks(requests, header, req.n, num_logprobs, include_usage))
        outputs = await self._collect(requests, raw)
        if outputs is None:
            return Response(status_code=_CLIENT_CLOSED)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_lps(c, num_logprobs, 0), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in outputs[0].outputs]
        header = response_header("chat.completion", response_id, self.served_model_name)
        return JSONResponse({**header, "choices": choices, "usage": usage(outputs)})

    async def _chat_chunks(self, requests: list[EngineRequest], header: dict, n: int,
                           num_logprobs: int | None, include_usage: bool) -> AsyncIterator[dict]:
        for i in range(n):  # OpenAI's first chunk of each choice names the role
            yield {**header, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
        sent: dict[int, tuple[int, int, bool]] = {}  # index -> (characters, tokens, finish)
        final = None
        async for out in self.engine.generate(requests):
            for c in out.outputs:
                prev = sent.get(c.index, (0, 0, False))
                if not _has_news(c, prev, num_logprobs is not None):
                    continue
                chars, tokens, _ = prev
                sent[c.index] = (len(c.text), len(c.token_ids), c.finished())
                yield {**header, "choices": [{
                    "index": c.index, "delta": {"content": c.text[chars:]},
                    "logprobs": _chat_lps(c, num_logprobs, tokens),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
            final = out if out.finished else final
        if include_usage and final is not None:
            yield {**header, "choices": [], "usage": usage([final])}

    # -- running requests ------------------------------------------------------------------

    async def _collect(self, requests: list[EngineRequest], raw: Request
                       ) -> list[RequestOutput] | None:
        """Final outputs in request order, or None when the client left first (its requests
        are aborted by the cancellation)."""
        collect = asyncio.ensure_future(self._finals(requests))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(raw))
        await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if collect.done():
            disconnect.cancel()
            return collect.result()
        collect.cancel()
        await asyncio.gather(collect, return_exceptions=True)
        return None

    async def _finals(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        try:
            async for out in self.engine.generate(requests):
                if out.finished:
                    finals[out.request_id] = out
        except ValueError as e:  # a check the handler missed; still the client's fault
            raise APIError(str(e)) from e
        return [finals[r.request_id] for r in requests]


def _has_news(c: CompletionOutput, sent: tuple[int, int, bool], logprobs: bool) -> bool:
    """Whether a completion has anything its client has not seen: text, the finish (once,
    though an n > 1 request repeats a finished completion until its siblings finish) or, when
    logprobs are asked for, tokens whose text is still held back."""
    chars, tokens, finish_sent = sent
    if finish_sent:
        return False
    return (len(c.text) > chars or c.finish_reason is not None
            or (logprobs and len(c.token_ids) > tokens))


def _chat_lps(c: CompletionOutput, num_logprobs: int | None, sent_tokens: int) -> dict | None:
    if num_logprobs is None or c.logprobs is None:
        return None
    return chat_logprobs(c.token_ids[sent_tokens:], c.logprobs[sent_tokens:], num_logprobs)


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except (ValueError, EngineDeadError) as e:
            # Headers are gone already: the error travels in the stream, as vLLM sends it.
            body = APIError(str(e)).body() if isinstance(e, ValueError) else APIError(
                str(e), status_code=500, type="server_error").body()
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
