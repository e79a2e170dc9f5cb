"""`jaxpaged.serve` end to end on loopback: the official `openai` client against one in-process
server (uvicorn in a background thread, on a free port) gets the same greedy text as
`LLM.generate` / `LLM.chat`, streamed or not; 64 concurrent streams are batched together and
clients that hang up free their KV blocks; bad requests get OpenAI's 400/401 error bodies and
the server keeps serving."""

import argparse
import asyncio
import dataclasses
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from jaxpaged import LLM, LLMEngine, SamplingParams, bench_serving
from jaxpaged.serve import add_cli_args, build_app, engine_config_from_args
from jaxpaged.serve_engine import AsyncLLMEngine, EngineDeadError, EngineRequest

API_KEY = "sk-test"
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was",
           "The three primary colors are"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "Name a prime number."}]]
MANY = [f"Here is a short fact about the number {i}:" for i in range(64)]


@dataclasses.dataclass
class Server:
    url: str
    model: str
    engine: LLMEngine


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=256, warmup=False, dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    # Same config (shapes) as the reference LLM, so the two share jit compilations; same
    # weights without a second load.
    engine = LLMEngine(llm.llm_engine.config, loaded=llm.llm_engine.model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(build_app(engine, api_key=API_KEY), log_level="warning",
                                       timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", engine.model.name, engine)
    uv.should_exit = True
    thread.join(20)
    sock.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics:\n{text}")


def wait_for(what: str, read, want, timeout: float = 30.0) -> None:
    """Polls `read()` until it returns `want` (the engine thread applies aborts between steps)."""
    deadline = time.monotonic() + timeout
    while (got := read()) != want:
        assert time.monotonic() < deadline, f"{what}: got {got}, want {want}"
        time.sleep(0.1)


def wait_until_idle(server: Server) -> None:
    """No request running or waiting and no KV block held: every abort freed its blocks."""
    wait_for("running, waiting, KV-cache usage", lambda: [metric(server, name) for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")],
        [0, 0, 0])


# -- correctness against LLM.generate ------------------------------------------------------

def test_completions_match_llm_generate(llm, server, client):
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model=server.model, prompt=prompt,
                                        max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        stream = client.completions.create(model=server.model, prompt=prompt,
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
        assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
    raw = httpx.post(server.url + "/v1/completions", timeout=60,
                     headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"prompt": PROMPTS[0], "max_tokens": 2, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    # Several prompts in one request: one choice each, in order.
    batch = client.completions.create(model=server.model, prompt=PROMPTS,
                                      max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == texts(expected)


def test_chat_matches_llm_chat(llm, server, client):
    expected = llm.chat(CHATS, GREEDY, use_tqdm=False)
    for messages, want in zip(CHATS, expected):
        got = client.chat.completions.create(model=server.model, messages=messages,
                                             max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].message.content == want.outputs[0].text
        assert got.choices[0].message.role == "assistant"
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            stream=True)]
        assert "".join(deltas) == want.outputs[0].text


def test_sampling_fields_logprobs_and_n(server, client):
    got = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=4,
                                    temperature=0.8, top_p=0.9, seed=7, n=2, logprobs=2,
                                    presence_penalty=0.5, frequency_penalty=0.5,
                                    extra_body={"top_k": 20, "min_p": 0.05, "ignore_eos": True})
    assert sorted(c.index for c in got.choices) == [0, 1]
    for choice in got.choices:
        assert len(choice.logprobs.tokens) == 4 and len(choice.logprobs.top_logprobs[0]) >= 2
    again = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=4,
                                      temperature=0.8, top_p=0.9, seed=7, n=2, logprobs=2,
                                      presence_penalty=0.5, frequency_penalty=0.5,
                                      extra_body={"top_k": 20, "min_p": 0.05, "ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in got.choices]  # seeded
    stop = client.completions.create(model=server.model, prompt="1, 2, 3, 4,", max_tokens=16,
                                     temperature=0, stop=["7"])
    assert "7" not in stop.choices[0].text and stop.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model=server.model, messages=CHATS[0], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    assert len(chat.choices[0].logprobs.content) == 3
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3


# -- many clients at once ------------------------------------------------------------------

async def _stream_text(client: openai.AsyncOpenAI, model: str, prompt: str,
                       hang_up_after: int | None = None) -> str:
    stream = await client.completions.create(model=model, prompt=prompt, stream=True,
                                             max_tokens=MAX_TOKENS if hang_up_after is None
                                             else 48, temperature=0, extra_body={
                                                 "ignore_eos": hang_up_after is not None})
    text, chunks = "", 0
    async for chunk in stream:
        text += chunk.choices[0].text
        chunks += 1
        if chunks == hang_up_after:
            await stream.close()  # drops the connection mid-generation
            break
    return text


async def _many_clients(server: Server, hang_ups: set[int]) -> list[str]:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                  max_retries=0, timeout=120) as client:
        return await asyncio.gather(*[
            _stream_text(client, server.model, p, 2 if i in hang_ups else None)
            for i, p in enumerate(MANY)])


def test_64_concurrent_streams_then_16_hang_ups_free_their_blocks(llm, server):
    expected = texts(llm.generate(MANY, GREEDY, use_tqdm=False))
    assert asyncio.run(_many_clients(server, set())) == expected
    aborts_before = _aborts(server)
    hang_ups = set(range(0, 64, 4))
    got = asyncio.run(_many_clients(server, hang_ups))
    assert [g for i, g in enumerate(got) if i not in hang_ups] == \
        [e for i, e in enumerate(expected) if i not in hang_ups]
    wait_for("aborted requests", lambda: _aborts(server) - aborts_before, len(hang_ups))
    wait_until_idle(server)
    assert metric(server, "vllm:time_to_first_token_seconds_count") >= 128
    assert metric(server, "vllm:e2e_request_latency_seconds_count") >= 128


def test_non_streaming_client_that_hangs_up_is_aborted(server):
    aborts_before = _aborts(server)
    body = {"prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=1),
                   headers={"Authorization": f"Bearer {API_KEY}"})
    wait_for("aborted requests", lambda: _aborts(server) - aborts_before, 1)
    wait_until_idle(server)


def _aborts(server: Server) -> float:
    try:
        return metric(server, "vllm:request_success_total", 'finished_reason="abort"')
    except AssertionError:
        return 0.0


# -- bad requests --------------------------------------------------------------------------

BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", '{"prompt": "hi", "max_tokens": ', None),
    "not an object": ("/v1/completions", '["hi"]', None),
    "wrong type": ("/v1/completions", '{"prompt": "hi", "max_tokens": "8"}', "max_tokens"),
    "unknown field": ("/v1/completions", '{"prompt": "hi", "max_tokenz": 8}', "max_tokenz"),
    "out of range": ("/v1/completions", '{"prompt": "hi", "temperature": 7}', "temperature"),
    "unknown model": ("/v1/completions", '{"prompt": "hi", "model": "gpt-9"}', "model"),
    "prompt too long": ("/v1/completions", json.dumps({"prompt": "hello " * 300}), "prompt"),
    "no room for max_tokens": ("/v1/completions", '{"prompt": "hi", "max_tokens": 1000}',
                               "max_tokens"),
    "out-of-vocab ids": ("/v1/completions", '{"prompt": [1, 99999999]}', "prompt"),
    "empty prompt": ("/v1/completions", '{"prompt": ""}', "prompt"),
    "out-of-vocab stop id": ("/v1/completions", '{"prompt": "hi", "stream": true, '
                             '"stop_token_ids": [99999999]}', "stop_token_ids"),
    "no messages": ("/v1/chat/completions", '{"messages": []}', "messages"),
    "bad role": ("/v1/chat/completions", '{"messages": [{"role": "robot", "content": "x"}]}',
                 "messages"),
    "chat too long": ("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hello " * 300}]}), "messages"),
}


def test_bad_requests_get_400_and_the_server_keeps_serving(server, client):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        for name, (path, body, param) in BAD_REQUESTS.items():
            r = http.post(path, content=body)
            assert r.status_code == 400, (name, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param, (name, error)
            ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            assert ok.status_code == 200, (name, ok.text)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert client.completions.create(model=server.model, prompt="hi", max_tokens=1).choices


def test_api_key_models_and_health(server, client):
    for auth in (None, "Bearer wrong", f"Basic {API_KEY}"):
        r = httpx.get(server.url + "/v1/models",
                      headers={"Authorization": auth} if auth else {})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) \
            .completions.create(model=server.model, prompt="hi", max_tokens=1)
    assert [m.id for m in client.models.list()] == [server.model]
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "jaxpaged:prefix_cache_hit_rate",
                 "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:time_per_output_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket"):
        assert name in text


# -- command lines -------------------------------------------------------------------------

def test_bench_serving_reports_latencies_and_throughput(server, tmp_path, capsys):
    commands = argparse.ArgumentParser().add_subparsers()
    bench_serving.add_parser(commands)  # as `jaxpaged-bench serving` mounts it
    parser = commands.choices["serving"]
    for rate, endpoint in (("inf", "/v1/completions"), ("50", "/v1/chat/completions")):
        args = parser.parse_args(["--url", server.url, "--api-key", API_KEY, "--num-prompts",
                                  "6", "--output-len", "4", "--request-rate", rate,
                                  "--endpoint", endpoint, "--result-json",
                                  str(tmp_path / "result.json")])
        summary = args.func(args)
        assert (summary["completed"], summary["failed"]) == (6, 0), summary["first_error"]
        assert summary["total_output_tokens"] == 6 * 4  # ignore_eos: every answer is full
        assert 0 < summary["median_ttft_ms"] <= summary["median_e2el_ms"]
        assert summary["p99_tpot_ms"] > 0 and summary["output_throughput"] > 0
        assert json.loads((tmp_path / "result.json").read_text())["completed"] == 6
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_serve_flags_map_to_engine_config():
    args = add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--max-model-len", "512", "--max-num-seqs", "8", "--no-warmup",
         "--no-enable-prefix-caching", "--port", "9000", "--api-key", "k"])
    config = engine_config_from_args(args)
    assert (config.max_model_len, config.max_num_seqs, config.warmup,
            config.enable_prefix_caching) == (512, 8, False, False)
    assert (args.port, args.api_key, args.host) == (9000, "k", "127.0.0.1")


class _CrashingEngine:
    """Stands in for LLMEngine: accepts a request, then its step fails (an engine bug)."""

    def __init__(self):
        self.pending = False

    def add_request(self, *args, **kwargs) -> None:
        self.pending = True

    def has_unfinished_requests(self) -> bool:
        return self.pending

    def step(self):
        raise RuntimeError("boom")

    def abort_request(self, request_ids) -> None:
        pass


def test_an_engine_crash_fails_waiting_clients_and_health():
    engine = AsyncLLMEngine(_CrashingEngine())
    engine.start()

    async def consume() -> None:
        async for _ in engine.generate([EngineRequest("r", [1, 2], GREEDY)]):
            pass

    with pytest.raises(EngineDeadError, match="boom"):
        asyncio.run(asyncio.wait_for(consume(), timeout=30))
    assert not engine.is_healthy and isinstance(engine.error, RuntimeError)
    with pytest.raises(EngineDeadError):  # later requests are refused at once
        asyncio.run(asyncio.wait_for(consume(), timeout=30))
