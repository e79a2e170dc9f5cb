"""`jaxpaged serve`: an OpenAI-compatible HTTP server around one `LLMEngine`, as `vllm serve`.

    jaxpaged serve --port 8000 --max-model-len 1024        # or: python -m jaxpaged.serve ...
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true`),
GET /v1/models, GET /health, GET /metrics (Prometheus). One engine thread steps every client's
requests together (`AsyncLLMEngine`); uvicorn's event loop only parses, validates and streams.
Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`.
"""

import argparse
import contextlib
import hmac
import json
import logging
import os
import time
from typing import TypeVar

from pydantic import BaseModel, ValidationError

try:
    import uvicorn
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST
except ImportError as e:  # `make run` installs the engine only
    raise ImportError(f"jaxpaged serve needs the 'serve' extra: pip install -e '.[serve]' "
                      f"({e})") from e

from jaxpaged.engine import LLMEngine
from jaxpaged.engine_config import EngineConfig
from jaxpaged.openai_protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      validation_error)
from jaxpaged.serve_engine import AsyncLLMEngine
from jaxpaged.serve_handlers import OpenAIServing
from jaxpaged.serve_metrics import ServerMetrics

logger = logging.getLogger(__name__)
_Req = TypeVar("_Req", bound=BaseModel)


async def _parse(raw: Request, model: type[_Req]) -> _Req:
    body = await raw.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"We could not parse the JSON body of your request ({e}). The body must "
                       f"be a JSON object.") from e
    if not isinstance(data, dict):
        raise APIError(f"The request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def _api_key_check(api_key: str | None):
    async def check(raw: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = raw.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           status_code=401, code="invalid_api_key")
    return check


def build_app(engine: LLMEngine, served_model_name: str | None = None,
              api_key: str | None = None) -> FastAPI:
    """The server's app; its lifespan starts and stops the engine thread. Only /v1 routes
    need the API key, as in vLLM: health checks and scrapers carry none."""
    name = served_model_name or engine.model.name
    metrics = ServerMetrics(name)
    async_engine = AsyncLLMEngine(engine, on_finished=metrics.on_finished,
                                  on_stats=metrics.on_stats)
    serving = OpenAIServing(async_engine, name)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.stop()

    app = FastAPI(title="jaxpaged", lifespan=lifespan)
    app.state.async_engine, app.state.metrics = async_engine, metrics

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse(APIError(f"internal error: {e!r}", status_code=500,
                                     type="server_error").body(), status_code=500)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(api_key))])

    @v1.post("/completions")
    async def completions(raw: Request) -> Response:
        return await serving.create_completion(await _parse(raw, CompletionRequest), raw)

    @v1.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        return await serving.create_chat_completion(await _parse(raw, ChatCompletionRequest),
                                                    raw)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "jaxpaged",
            "root": name, "max_model_len": engine.max_model_len}]}

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_healthy:
            return Response(status_code=200)
        return JSONResponse(APIError(f"engine loop is not running: {async_engine.error!r}",
                                     status_code=503, type="server_error").body(),
                            status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# -- command line ---------------------------------------------------------------------------

def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """vLLM's flag names for the server and the engine."""
    parser.add_argument("--model", default=None,
                        help="HF directory, GGUF file or preset name (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", default=None,
                        help="name clients use in 'model' (default: --model, or the model's own)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("JAXPAGED_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (env JAXPAGED_API_KEY)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    defaults = EngineConfig()
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--load-format", default=defaults.load_format)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    for flag in ("--max-num-seqs", "--max-num-batched-tokens", "--max-model-len",
                 "--num-kv-blocks"):
        parser.add_argument(flag, type=int, default=None, help="default: per platform")
    parser.add_argument("--kv-cache-memory-fraction", type=float,
                        default=defaults.kv_cache_memory_fraction)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=defaults.enable_prefix_caching)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=defaults.async_scheduling,
                        help="plan and dispatch step N + 1 while step N runs on the device")
    parser.add_argument("--num-scheduler-steps", type=int, default=defaults.num_scheduler_steps,
                        help="decode steps one scheduler output may run on the device (> 1: "
                             "multi-step decoding, tokens then stream in groups; default: 4 "
                             "on a GPU, 1 on the CPU)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction,
                        default=defaults.warmup,
                        help="compile every shape before serving (--no-warmup: on first use)")
    parser.add_argument("--attention-impl", default=defaults.attention_impl,
                        choices=["auto", "reference", "pallas"])
    parser.add_argument("--tensor-parallel-size", "-tp", type=int,
                        default=defaults.tensor_parallel_size,
                        help="GPUs of this host to split the model over")
    return parser


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, load_format=args.load_format,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, warmup=args.warmup,
        attention_impl=args.attention_impl, tensor_parallel_size=args.tensor_parallel_size,
        async_scheduling=args.async_scheduling, num_scheduler_steps=args.num_scheduler_steps)


def run_server(args: argparse.Namespace) -> None:
    try:
        engine = LLMEngine(engine_config_from_args(args))
    except (ValueError, OSError) as e:  # a bad flag or model path: one line, no traceback
        raise SystemExit(f"jaxpaged serve: {e}") from e
    if engine.mesh is not None and engine.mesh.is_multi_process:
        # Every process would need the same requests in the same order; only offline runs
        # (LLM, jaxpaged-bench, jaxpaged-eval) give them that.
        raise SystemExit("jaxpaged serve: tensor parallelism across hosts is not supported by "
                         "the server; use the devices of one host")
    app = build_app(engine, args.served_model_name or args.model, args.api_key)
    logger.info("serving %s on http://%s:%d", args.served_model_name or args.model
                or engine.model.name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)


def main(argv: list[str] | None = None) -> None:
    """`python -m jaxpaged.serve [flags]`."""
    parser = add_cli_args(argparse.ArgumentParser(prog="python -m jaxpaged.serve",
                                                  description=__doc__.splitlines()[0]))
    run_server(parser.parse_args(argv))


def cli_main(argv: list[str] | None = None) -> None:
    """The `jaxpaged` command: `jaxpaged serve [flags]`."""
    parser = argparse.ArgumentParser(prog="jaxpaged")
    commands = parser.add_subparsers(dest="command", required=True)
    add_cli_args(commands.add_parser("serve", help="OpenAI-compatible HTTP server"))
    args = parser.parse_args(argv)
    run_server(args)


if __name__ == "__main__":
    main()
