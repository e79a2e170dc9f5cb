"""`jaxpaged-bench serving`: load-test a running OpenAI-compatible server, as vLLM's
`benchmark_serving.py` does.

    jaxpaged serve --port 8000 &
    python -m jaxpaged.bench_serving --url http://127.0.0.1:8000 --num-prompts 64 \\
        --request-rate 4 --output-len 64

Requests leave at `--request-rate` per second as a Poisson process (exponential gaps), or all
at once with the default `inf`; each streams its answer (SSE), so the client sees every token
arrive. Reported, per request then summarised: TTFT (time to first token), TPOT (time per output
token after the first), ITL (gap between streamed chunks), E2EL (end-to-end latency), as mean,
median and p99, plus request and token throughput. Token counts are the server's own (`usage`).

Prompts: a built-in set of real questions and instructions, cycled when more are asked for, or
`--dataset-path` (a ShareGPT JSON file, or JSONL rows with "prompt"). Client side only: no jax.
"""

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROMPTS = [
    "Explain the difference between a process and a thread in an operating system.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What causes the seasons on Earth?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Give me three tips for improving my sleep.",
    "How does a hash table handle collisions?",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "What is the capital of Australia, and why isn't it Sydney?",
    "Write a haiku about autumn leaves.",
    "Explain what a neural network is to a ten-year-old.",
    "List the planets of the solar system in order from the Sun.",
    "What are the main differences between TCP and UDP?",
    "Suggest a name for a coffee shop that also sells books.",
    "How do vaccines train the immune system?",
    "Write a SQL query that returns the ten most recent orders.",
    "Why is the sky blue?",
    "Give a short recipe for pancakes.",
    "What is the Pythagorean theorem? Give an example.",
    "Describe the water cycle.",
    "Write a polite email declining a meeting invitation.",
    "What is the difference between weather and climate?",
    "Explain recursion with a simple example.",
    "What were the main causes of the First World War?",
    "How do I reverse a linked list in place?",
]


@dataclasses.dataclass(frozen=True, slots=True)
class RequestInput:
    prompt: str
    output_len: int


@dataclasses.dataclass(slots=True)
class RequestResult:
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds from sending to the first chunk with text
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between later chunks
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0


def load_prompts(path: str | None, num_prompts: int, output_len: int,
                 seed: int) -> list[RequestInput]:
    """`num_prompts` requests; ShareGPT rows keep their reply length (in tokens, estimated at
    four characters each since the client has no tokenizer), capped at `output_len`."""
    if path is None:
        pairs = [(p, output_len) for p in PROMPTS]
    else:
        pairs = _read_dataset(Path(path), output_len)
        random.Random(seed).shuffle(pairs)
    if not pairs:
        raise SystemExit(f"--dataset-path {path}: no usable prompts in it")
    return [RequestInput(*pairs[i % len(pairs)]) for i in range(num_prompts)]


def _read_dataset(path: Path, output_len: int) -> list[tuple[str, int]]:
    if not path.is_file():
        raise SystemExit(f"--dataset-path {path}: no such file")
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [(r["prompt"], int(r.get("output_len", output_len))) for r in rows
                if isinstance(r, dict) and isinstance(r.get("prompt"), str)]
    pairs = []
    for row in json.loads(text):  # ShareGPT: the first human turn and the reply to it
        turns = row.get("conversations", []) if isinstance(row, dict) else []
        if len(turns) >= 2 and isinstance(turns[0].get("value"), str):
            reply = turns[1].get("value") or ""
            pairs.append((turns[0]["value"], max(4, min(output_len, len(reply) // 4))))
    return pairs


async def arrivals(num: int, request_rate: float, rng: random.Random) -> AsyncIterator[int]:
    """Yields 0..num-1 at Poisson arrival times (all at once for an infinite rate)."""
    for i in range(num):
        yield i
        if math.isfinite(request_rate) and i < num - 1:
            await asyncio.sleep(rng.expovariate(request_rate))


def _payload(req: RequestInput, model: str, chat: bool, temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": temperature, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


async def send_request(client: httpx.AsyncClient, endpoint: str, body: dict[str, Any],
                       chat: bool) -> RequestResult:
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.success = result.ttft > 0.0
        if not result.success:
            result.error = "the stream ended without any text"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {"ttft": [r.ttft for r in ok], "tpot": tpot,
              "itl": [x for r in ok for x in r.itl], "e2el": [r.latency for r in ok]}
    for name, values in series.items():
        arr = np.asarray(values or [float("nan")]) * 1000.0  # milliseconds, as vLLM prints
        summary[f"mean_{name}_ms"] = float(arr.mean())
        summary[f"median_{name}_ms"] = float(np.percentile(arr, 50))
        summary[f"p99_{name}_ms"] = float(np.percentile(arr, 99))
    errors = [r.error for r in results if not r.success]
    summary["first_error"] = errors[0] if errors else None
    return summary


def print_report(s: dict[str, Any]) -> None:
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", s["duration_s"]),
            ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"]),
            ("Total token throughput (tok/s)", s["total_token_throughput"])]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    print(f"{' Serving Benchmark Result ':=^60}")
    for label, value in rows:
        print(f"{label + ':':<44}{value:>16.2f}" if isinstance(value, float)
              else f"{label + ':':<44}{value:>16}")
    for key, title in titles.items():
        print(f"{' ' + title + ' ':-^60}")
        for stat in ("mean", "median", "p99"):
            print(f"{f'{stat.capitalize()} {key.upper()} (ms):':<44}"
                  f"{s[f'{stat}_{key}_ms']:>16.2f}")
    print("=" * 60)
    if s["first_error"]:
        print(f"first error: {s['first_error']}")


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        model = args.model or await _served_model(client)
        chat = "chat" in args.endpoint
        requests = load_prompts(args.dataset_path, args.num_prompts, args.output_len, args.seed)
        # One request first: a wrong URL, key or model fails here, in a second, and clearly.
        probe = await send_request(client, args.endpoint, _payload(
            dataclasses.replace(requests[0], output_len=2), model, chat, args.temperature), chat)
        if not probe.success:
            raise SystemExit(f"test request to {args.url}{args.endpoint} failed: {probe.error}")
        limit = asyncio.Semaphore(args.max_concurrency or len(requests))

        async def one(req: RequestInput) -> RequestResult:
            async with limit:
                return await send_request(client, args.endpoint,
                                          _payload(req, model, chat, args.temperature), chat)

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(requests[i]))
                 async for i in arrivals(len(requests), args.request_rate,
                                         random.Random(args.seed))]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary.update(model=model, endpoint=args.endpoint, num_prompts=args.num_prompts,
                   request_rate=args.request_rate, max_concurrency=args.max_concurrency)
    return summary


async def _served_model(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError) as e:
        raise SystemExit(f"could not list the server's models at /v1/models: {e}") from e


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--endpoint", default="/v1/completions",
                        choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals; inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="at most this many requests in flight")
    parser.add_argument("--output-len", type=int, default=128,
                        help="tokens per answer (the server is asked to ignore EOS)")
    parser.add_argument("--dataset-path", default=None,
                        help="ShareGPT .json or .jsonl with 'prompt' (default: built-in prompts)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--result-json", default=None, help="also write the summary here")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "output_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.request_rate > 0:
        raise SystemExit(f"--request-rate must be > 0 (inf: all at once), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit(f"--max-concurrency must be >= 1, got {args.max_concurrency}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Mounts this benchmark as `jaxpaged-bench serving`."""
    parser = subparsers.add_parser("serving", help="load-test an OpenAI-compatible server",
                                   description=__doc__.splitlines()[0])
    add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check_args(args)
    summary = asyncio.run(benchmark(args))
    print_report(summary)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = add_cli_args(argparse.ArgumentParser(prog="python -m jaxpaged.bench_serving",
                                                  description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
