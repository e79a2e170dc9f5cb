"""`AsyncLLMEngine`: one `LLMEngine` driven by its own thread, fed by asyncio request handlers.

`LLMEngine` is not thread-safe, so exactly one thread (the engine loop) ever touches it. Handlers
talk to that thread through a command queue (add, abort, stop) and get outputs back on their
own asyncio queue, filled with `loop.call_soon_threadsafe`. Requests from every client join the
same engine steps: that is the continuous batching.

Invariants: every request added is either finished by the engine (its last output is delivered,
then its stream is forgotten) or failed at once (the error is delivered instead); a consumer
that stops listening before its requests finish aborts them, which frees their KV blocks.
"""

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from jaxpaged.engine import LLMEngine
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import SchedulerStats

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclasses.dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine,
                 on_finished: Callable[[RequestOutput], None] | None = None,
                 on_stats: Callable[[SchedulerStats], None] | None = None):
        self.engine = engine
        self._on_finished = on_finished
        self._on_stats = on_stats
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # why the engine loop died, if it did

    # -- lifecycle (any thread) --------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="jaxpaged-engine",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # -- requests (asyncio side) -------------------------------------------------------

    async def generate(self, requests: list[EngineRequest],
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of `requests` as the engine produces them (the latest of each
        when several arrived at once), until all have finished. A request the engine rejects
        raises its ValueError here. Leaving early (a disconnect, a cancellation) aborts the
        unfinished ones."""
        if not self.is_healthy:
            raise EngineDeadError(f"the engine loop is not running: {self.error!r}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        arrival = time.time() if arrival_time is None else arrival_time
        unfinished = {r.request_id for r in requests}
        self._commands.put(("add", requests, stream, arrival))
        try:
            while unfinished:
                latest = await self._next_batch(stream.queue)
                if latest is None:
                    continue
                for output in latest:
                    if output.finished:
                        unfinished.discard(output.request_id)
                    yield output
        finally:
            if unfinished:
                self.abort(list(unfinished))

    async def _next_batch(self, q: asyncio.Queue) -> list[RequestOutput] | None:
        """The newest output of each request that has news; None after a quiet second."""
        try:
            # Never wait unboundedly: a loop that died or stopped before it saw our "add"
            # would otherwise leave this client hanging.
            items = [await asyncio.wait_for(q.get(), timeout=1.0)]
        except TimeoutError:
            if not self.is_healthy:
                raise EngineDeadError(f"the engine loop is not running: {self.error!r}")
            return None
        while not q.empty():
            items.append(q.get_nowait())
        for item in items:
            if isinstance(item, BaseException):
                raise item
        latest: dict[str, RequestOutput] = {}
        for output in items:  # outputs are cumulative: only the newest of each matters
            latest[output.request_id] = output
        return list(latest.values())

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    # -- the engine loop (engine thread) -----------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._handle_commands(block=idle):
                    break
                # Stats after the commands too: a request just added shows as waiting at
                # once, not only after the (possibly long) step that schedules it.
                self._publish_stats()
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                    self._publish_stats()
        except Exception as e:  # a bug in the engine: fail every waiting client, loudly
            logger.exception("engine loop died")
            self.error = e
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"engine loop died: {e!r}"))
            self._streams.clear()
        finally:
            self._fail_pending()

    def _publish_stats(self) -> None:
        if self._on_stats is not None:
            self._on_stats(self.engine.get_stats())

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False on "stop"."""
        try:
            command = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "abort":
                self.engine.abort_request(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, requests: list[EngineRequest], stream: _Stream, arrival: float) -> None:
        added = []
        for r in requests:
            try:
                self.engine.add_request(r.request_id, r.prompt_token_ids, r.params,
                                        arrival_time=arrival)
            except ValueError as e:
                # All or nothing: the client gets one error, not a partial answer.
                self.engine.abort_request(added)
                for request_id in added:
                    self._streams.pop(request_id, None)
                stream.put(e)
                return
            added.append(r.request_id)
            self._streams[r.request_id] = stream

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = (self._streams.pop(output.request_id, None) if output.finished
                      else self._streams.get(output.request_id))
            if output.finished and self._on_finished is not None:
                self._on_finished(output)
            if stream is not None:
                stream.put(output)

    def _fail_pending(self) -> None:
        """On stop: end every waiting client with an error instead of leaving it hanging."""
        for stream in self._streams.values():
            stream.put(EngineDeadError("the server is shutting down"))
        self._streams.clear()
