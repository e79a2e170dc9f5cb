"""Shared pieces of `jaxpaged-bench`: workloads, the environment stamp, the step recorder,
statistics and reports.

Host-side and light: importing this module never imports jax (the Hugging Face peer process
imports it and must leave the GPU to torch). `env_info` imports jax only when called.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Random prompts avoid the lowest ids (special tokens of most vocabularies) and the top of the
# vocabulary (Llama 3's reserved special tokens sit at 128000 and above).
_RANDOM_TOKEN_LOW = 100
_RANDOM_TOKEN_TOP_MARGIN = 300


# -- workloads -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """The same prompts and output lengths are given to jaxpaged and to every peer."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    def head(self, n: int | None) -> "Workload":
        return self if n is None else Workload(self.prompts[:n], self.output_lens[:n])


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's random-dataset lengths: uniform in [len * (1 - r), len * (1 + r)], inclusive."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    return max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))


def random_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    in_lens = rng.integers(in_lo, in_hi + 1, num_prompts)
    out_lens = rng.integers(out_lo, out_hi + 1, num_prompts)
    top = max(_RANDOM_TOKEN_LOW + 1, vocab_size - _RANDOM_TOKEN_TOP_MARGIN)
    low = min(_RANDOM_TOKEN_LOW, top - 1)
    prompts = [rng.integers(low, top, n).tolist() for n in in_lens]
    return Workload(prompts, [int(n) for n in out_lens])


def jsonl_workload(path: str, num_prompts: int, output_len: int,
                   tokenize: Callable[[str], list[int]] | None) -> Workload:
    """One JSON object per line: `prompt_token_ids` (or `prompt`, tokenized here) and an
    optional `output_len` (else --output-len)."""
    prompts, out_lens = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt_token_ids" in record:
                ids = [int(t) for t in record["prompt_token_ids"]]
            elif "prompt" in record:
                if tokenize is None:
                    raise ValueError(f"{path}:{lineno}: a text prompt needs a model with a "
                                     f"tokenizer; give prompt_token_ids instead")
                ids = tokenize(record["prompt"])
            else:
                raise ValueError(f"{path}:{lineno}: needs 'prompt_token_ids' or 'prompt'")
            prompts.append(ids)
            out_lens.append(int(record.get("output_len", output_len)))
            if len(prompts) == num_prompts:
                break
    if not prompts:
        raise ValueError(f"--dataset {path} holds no prompts")
    return Workload(prompts, out_lens)


def capped_exponential(num: int, mean: float, cap: int, seed: int) -> list[int]:
    """Output lengths of the Anyscale continuous-batching study: exponential with the given
    mean, at least 1, at most `cap` (draws above the cap are set to it, not redrawn)."""
    if mean <= 0 or cap < 1:
        raise ValueError(f"mean must be > 0 and cap >= 1, got mean={mean}, cap={cap}")
    draws = np.random.default_rng(seed).exponential(mean, num)
    return np.clip(np.ceil(draws), 1, cap).astype(int).tolist()


# -- environment ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    """`git describe`-like short hash, "+dirty" if the tree has changes; JAXPAGED_GIT_REV
    overrides it (the GPU machine gets a copy of the tree without .git)."""
    if os.environ.get("JAXPAGED_GIT_REV"):
        return os.environ["JAXPAGED_GIT_REV"]
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                             capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def host_python_ms(repeats: int = 3) -> float:
    """Milliseconds for a fixed piece of plain Python (dict and list work of the kind the
    scheduler does), best of `repeats`: the engine's host-bound steps scale with it, and the
    device machines' CPUs differ from one lease to the next, so results record it."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        table: dict[int, list[int]] = {}
        for i in range(100_000):
            row = table.setdefault(i & 255, [])
            row.append(i)
            if len(row) > 16:
                row.clear()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def env_info() -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    card = cpu_model() if device.platform == "cpu" else device.device_kind
    return {"card": card, "platform": device.platform, "num_devices": jax.device_count(),
            "jax_version": jax.__version__, "git_revision": git_revision(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host_cpu": cpu_model(), "host_python_ms": round(host_python_ms(), 2)}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


class ThreadUsage:
    """The calling thread's CPU time and context switches over a `with` block (Linux's
    RUSAGE_THREAD; elsewhere nothing is recorded). Against the block's wall time it tells a
    host that works more (CPU time grows) from one that waits or is pushed off its core
    (voluntary switches: it blocked; involuntary: the OS ran something else there)."""

    def __enter__(self) -> "ThreadUsage":
        self._t0, self._r0 = time.perf_counter(), _thread_rusage()
        return self

    def __exit__(self, *exc) -> None:
        wall, r1 = time.perf_counter() - self._t0, _thread_rusage()
        self.result = None if r1 is None or self._r0 is None else {
            "wall_s": wall,
            "cpu_s": (r1.ru_utime + r1.ru_stime) - (self._r0.ru_utime + self._r0.ru_stime),
            "voluntary_switches": r1.ru_nvcsw - self._r0.ru_nvcsw,
            "involuntary_switches": r1.ru_nivcsw - self._r0.ru_nivcsw,
            "last_cpu": _current_cpu(), "cpus_allowed": len(os.sched_getaffinity(0))}


def _thread_rusage():
    import resource

    who = getattr(resource, "RUSAGE_THREAD", None)
    return None if who is None else resource.getrusage(who)


def _current_cpu() -> int | None:
    """The CPU this thread last ran on (Linux), or None."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


# -- the step recorder -----------------------------------------------------------------------


def timed(fn: Callable, add: Callable[[float], None],
          clock: Callable[[], float] = time.perf_counter) -> Callable:
    """`fn`, with the seconds of each call by `clock` (wall time unless given, e.g.
    `time.thread_time` for the calling thread's CPU time) passed to `add`."""
    def wrapper(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            add(clock() - t0)
    return wrapper


@dataclass(slots=True)
class StepRecord:
    seconds: float  # wall time of the engine.step() call that scheduled it
    num_seqs: int  # requests scheduled
    num_tokens: int  # tokens scheduled
    decode_only: bool  # every scheduled request fed exactly one token
    num_decode_seqs: int  # scheduled requests that fed one token (decoding, mixed steps too)
    context_tokens: int  # KV positions read by attention, summed over scheduled requests
    kv_usage: float  # block-manager usage right after schedule() (the step's peak)
    dispatch_seconds: float  # of which in runner.dispatch (inputs built, device work enqueued)
    wait_seconds: float  # of which in runner.fetch: the host waiting for the device
    # The call of the jitted forward alone: the launches XLA enqueues (or the host blocked
    # inside that call), as against the host's own Python around it. Part of dispatch_seconds
    # without a dispatch thread; with one it runs on that thread, outside dispatch_seconds.
    forward_seconds: float = 0.0


@dataclass
class StepRecorder:
    """Times every `engine.step()` and notes what the scheduler planned in it.

    Installs itself as instance attributes over `engine.step`, `engine.scheduler.schedule`,
    `engine.runner.dispatch`, `engine.runner._run_forward` (and `_run_multi_step`) and
    `engine.runner.fetch` (the engine's own code is untouched; `LLM.generate` calls them
    through the instances), so one
    `generate` call is measured as it runs. The step time minus the wait time is the host's
    own work; with async scheduling (one step in flight while the next is planned) a step that
    waits is bound by the device. A call that scheduled two steps (the first one, with async
    scheduling) records each with half its time; a multi-step output of K decode steps is
    recorded as K steps, each with a K-th of its share. `uninstall()` restores them.
    """

    engine: Any
    steps: list[StepRecord] = field(default_factory=list)
    _plans: list = field(default_factory=list)  # (plan, KV usage) scheduled in this call
    _dispatch: float = 0.0
    _wait: float = 0.0
    _forward: float = 0.0

    def __post_init__(self) -> None:
        scheduler, engine, runner = self.engine.scheduler, self.engine, self.engine.runner
        schedule, step = scheduler.schedule, engine.step
        dispatch, fetch, run_forward = runner.dispatch, runner.fetch, runner._run_forward
        run_multi_step = runner._run_multi_step

        def recorded_schedule():
            plan = schedule()
            self._plans.append((plan, scheduler.block_manager.usage))
            return plan

        def adding_to(total: str) -> Callable[[float], None]:  # seconds -> self.<total>
            return lambda s: setattr(self, total, getattr(self, total) + s)

        def timed_step():
            self._dispatch = self._wait = self._forward = 0.0
            self._plans = []
            t0 = time.perf_counter()
            out = step()
            dt = time.perf_counter() - t0
            plans = [(p, u) for p, u in self._plans if not p.is_empty]
            # A multi-step output counts as its num_steps decode steps, sharing its time.
            k = sum(p.num_steps for p, _ in plans)
            for plan, usage in plans:
                reqs = plan.scheduled_requests
                num_decode = sum(len(r.token_ids) == 1 for r in reqs)
                context = sum(r.start_pos + len(r.token_ids) for r in reqs)
                tokens = plan.total_num_scheduled_tokens
                for j in range(plan.num_steps):
                    if j:  # a window's step j: a token and a KV position for each live request
                        tokens = sum(r.num_steps > j for r in reqs)
                        context += tokens
                    self.steps.append(StepRecord(
                        dt / k, len(reqs), tokens, num_decode == len(reqs), num_decode, context,
                        usage, self._dispatch / k, self._wait / k, self._forward / k))
            return out

        scheduler.schedule, engine.step = recorded_schedule, timed_step
        runner.dispatch = timed(dispatch, adding_to("_dispatch"))
        runner.fetch = timed(fetch, adding_to("_wait"))
        runner._run_forward = timed(run_forward, adding_to("_forward"))
        runner._run_multi_step = timed(run_multi_step, adding_to("_forward"))

    def uninstall(self) -> None:
        del self.engine.scheduler.schedule
        del self.engine.step
        del self.engine.runner.dispatch
        del self.engine.runner.fetch
        del self.engine.runner._run_forward
        del self.engine.runner._run_multi_step

    @property
    def peak_kv_usage(self) -> float:
        return max((s.kv_usage for s in self.steps), default=0.0)

    def decode_steps(self, num_seqs: int | None = None) -> list[StepRecord]:
        """Decode-only steps; with `num_seqs`, only those at exactly that batch size."""
        return [s for s in self.steps if s.decode_only
                and (num_seqs is None or s.num_seqs == num_seqs)]


# -- statistics and reports -------------------------------------------------------------------


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": math.nan for p in ps}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(arr, p)) for p in ps}
    out["mean"] = float(arr.mean())
    return out


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (readable as plain text too)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def read_json_results(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Benchmark results written by `write_json`, in the order given."""
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    return results


def write_json(result: dict[str, Any], path: str | None, default_name: str) -> str | None:
    """Write `result` to `path`; a directory (existing, or ending in '/') gets `default_name`
    inside it. Returns the file written, or None when `path` is None."""
    if path is None:
        return None
    if path.endswith("/") or os.path.isdir(path):
        path = os.path.join(path, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, argparse.Namespace):
        return vars(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
