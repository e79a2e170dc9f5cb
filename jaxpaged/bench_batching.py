"""`batching`: the experiment of Anyscale's continuous-batching study, on one engine.

1000 prompts of 512 tokens; output lengths from an exponential distribution of mean 128,
capped at 32, 128, 512 or 1536 (one row per cap). Three schedulers share the same engine,
kernels and KV memory (the engine's `num_kv_blocks`):

  static   a batch is admitted only when the previous one has finished entirely;
  reserve  continuous batching without paging: a request is admitted only when a contiguous
           region of prompt + max_tokens KV slots is free;
  paged    the engine's own paged continuous batching.

How `static` and `reserve` are built on the paged engine: the bench keeps the queue and hands
a request to the engine only when its admission policy allows; the engine then admits it at
once. Memory is accounted, outside the engine, as a first-fit allocator of contiguous block
ranges over the same number of blocks the engine has (`ContiguousAllocator`): each admitted
request reserves `ceil((prompt + max_tokens) / block_size)` consecutive blocks until it
finishes, so external fragmentation (free blocks in holes too small for the next request)
limits admission as it would without paging. Since a request never holds more paged blocks
than its region, the engine underneath never runs short. `max_tokens` is the cap: a scheduler
without paging must reserve for the longest output it may have to produce. The sampled length
stands in for where the model would emit EOS: the engine is told to stop there (dummy
weights cannot be made to emit EOS on cue), and only `paged` benefits from not knowing it.
`static` uses the same reservation, held by the whole batch until its last request ends (as
a padded static batch holds its KV); its finished rows leave the engine's batch instead of
computing padding, so its compute is kinder than HF's.

KV waste, per scheduler, summed over engine steps: (reserved - used) / reserved, where used
is each live request's computed tokens and reserved is its region (static, reserve) or its
paged blocks (paged).
"""

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from jaxpaged.bench_common import (StepRecorder, capped_exponential, env_info, format_table,
                                   random_workload, slug, write_json)

SCHEDULERS = ("static", "reserve", "paged")


@dataclass
class ContiguousAllocator:
    """First-fit allocation of contiguous block ranges in [0, num_blocks)."""

    num_blocks: int
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (start, length)

    def allocate(self, request_id: str, length: int) -> bool:
        """Reserve `length` consecutive blocks at the lowest address that fits; False (and
        nothing changed) when no hole is large enough."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        start = 0
        for lo, n in sorted(self.regions.values()):
            if lo - start >= length:
                break
            start = max(start, lo + n)
        if start + length > self.num_blocks:
            return False
        self.regions[request_id] = (start, length)
        return True

    def free(self, request_id: str) -> None:
        del self.regions[request_id]

    @property
    def reserved_blocks(self) -> int:
        return sum(n for _, n in self.regions.values())


@dataclass
class KVWaste:
    """(reserved - used) / reserved, summed over steps."""

    reserved: int = 0
    used: int = 0

    def add(self, reserved: int, used: int) -> None:
        if used > reserved:
            raise ValueError(f"used {used} tokens exceed the {reserved} reserved")
        self.reserved += reserved
        self.used += used

    @property
    def fraction(self) -> float:
        return (self.reserved - self.used) / self.reserved if self.reserved else 0.0


SMALL_BATCH = 16  # decode-only steps below this many sequences count as the drain


@dataclass
class RunStats:
    scheduler: str
    cap: int
    elapsed_s: float = 0.0
    output_tokens: int = 0
    num_steps: int = 0
    batch_sum: int = 0
    max_batch: int = 0
    waste: KVWaste = field(default_factory=KVWaste)
    num_preemptions: int = 0
    # Per step with any decoding request: how many decoded (continuous batching mixes
    # prefill chunks into most steps, so decode-only steps alone would show only the tail).
    decode_batches: list[int] = field(default_factory=list)
    # Where the time went: steps that prefilled (chunks of prompts, decodes mixed in) and
    # decode-only steps, the latter also split at SMALL_BATCH (the drain: the long outputs
    # that run on after the queue is empty).
    mixed_s: float = 0.0
    decode_only_s: float = 0.0
    small_batch_s: float = 0.0
    num_mixed_steps: int = 0

    def row(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "cap": self.cap, "elapsed_s": self.elapsed_s,
                "output_tokens": self.output_tokens,
                "output_tokens_per_s": self.output_tokens / self.elapsed_s,
                "mean_batch": self.batch_sum / max(self.num_steps, 1),
                "max_batch": self.max_batch, "num_steps": self.num_steps,
                "mean_decode_batch": (sum(self.decode_batches) / len(self.decode_batches)
                                      if self.decode_batches else 0.0),
                "kv_waste": self.waste.fraction, "num_preemptions": self.num_preemptions,
                "mixed_steps_s": self.mixed_s, "num_mixed_steps": self.num_mixed_steps,
                "decode_only_steps_s": self.decode_only_s,
                f"decode_only_under_{SMALL_BATCH}_seqs_s": self.small_batch_s}


def region_blocks(prompt_len: int, max_tokens: int, block_size: int) -> int:
    return math.ceil((prompt_len + max_tokens) / block_size)


def run_scheduler(engine: Any, name: str, prompts: list[list[int]], output_lens: list[int],
                  cap: int) -> RunStats:
    """Serve every request under scheduler `name`; the engine must be idle on entry."""
    from jaxpaged import SamplingParams

    sched, B = engine.scheduler, engine.config.block_size
    alloc = ContiguousAllocator(engine.num_kv_blocks - 1)
    stats = RunStats(name, cap)
    queue = [(f"{name}-{cap}-{i}", p, n) for i, (p, n) in enumerate(zip(prompts, output_lens))]
    queue.reverse()  # pop() from the end = FIFO
    live: set[str] = set()
    preemptions0 = sched.num_preemptions

    def admit() -> None:
        while queue and len(live) < engine.max_num_seqs:
            rid, prompt, n = queue[-1]
            if name != "paged" and not alloc.allocate(rid, region_blocks(len(prompt), cap, B)):
                break
            queue.pop()
            live.add(rid)
            engine.add_request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True,
                                                           temperature=0.0))

    bar = tqdm(total=len(queue), desc=f"{name:>7} cap {cap}", leave=False)
    recorder = StepRecorder(engine)
    t0 = time.perf_counter()
    while queue or live or engine.has_unfinished_requests():  # the last finishes are reported
        if name != "static" or not live:  # static admits only between batches
            admit()  # paged: all the engine can hold; its own scheduler decides
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                if name != "static":  # a static batch holds its memory until it ends
                    alloc.regions.pop(out.request_id, None)
                stats.output_tokens += len(out.outputs[0].token_ids)
                bar.update(1)
        _account(stats, sched, alloc, B, name)
        if not live:
            alloc.regions.clear()
    stats.elapsed_s = time.perf_counter() - t0
    recorder.uninstall()
    bar.close()
    stats.decode_batches = [s.num_decode_seqs for s in recorder.steps if s.num_decode_seqs]
    for s in recorder.steps:
        if s.decode_only:
            stats.decode_only_s += s.seconds
            stats.small_batch_s += s.seconds if s.num_seqs < SMALL_BATCH else 0.0
        else:
            stats.mixed_s += s.seconds
            stats.num_mixed_steps += 1
    stats.num_preemptions = sched.num_preemptions - preemptions0
    return stats


def _account(stats: RunStats, sched: Any, alloc: ContiguousAllocator, B: int,
             name: str) -> None:
    running = sched.running
    stats.num_steps += 1
    stats.batch_sum += len(running)
    stats.max_batch = max(stats.max_batch, len(running))
    if name == "paged":
        stats.waste.add(sum(len(r.block_ids) for r in running) * B,
                        sum(r.num_computed_tokens for r in running))
        return
    used = 0
    for rid in alloc.regions:
        # The engine's id of an n=1 request's only child (tests catch a change: used = 0).
        request = sched.requests.get(f"{rid}#0")
        used += request.num_computed_tokens if request is not None else 0
    stats.waste.add(alloc.reserved_blocks * B, used)


def run_batching(args: argparse.Namespace,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every cap under every scheduler on one engine; `on_row` gets the partial result after
    each run (so a run cut short by a time limit still leaves its rows)."""
    from jaxpaged.bench_throughput import build_llm, engine_summary, model_config

    config = model_config(args)
    info = env_info()
    # Random prompts never share blocks; without the prefix cache the block accounting of
    # all three schedulers is the same simple one.
    args.enable_prefix_caching = False
    llm = build_llm(args)
    engine = llm.llm_engine
    need = args.input_len + max(args.caps)
    if need > engine.max_model_len:
        raise ValueError(f"--input-len + the largest cap = {need} exceeds max_model_len="
                         f"{engine.max_model_len}; pass --max-model-len {need} or more")
    prompts = random_workload(args.num_prompts, args.input_len, 1, 0.0, config.vocab_size,
                              args.seed).prompts
    r: dict[str, Any] = {
        "benchmark": "batching", **info, "model": args.model or "SmolLM2-135M-Instruct",
        "load_format": args.load_format, "args": vars(args), "engine": engine_summary(llm),
        "kv_capacity_tokens": (engine.num_kv_blocks - 1) * engine.config.block_size,
        "rows": []}
    for cap in args.caps:
        lens = capped_exponential(args.num_prompts, args.mean_output_len, cap, args.seed)
        for name in args.schedulers:
            stats = run_scheduler(engine, name, prompts, lens, cap)
            row = stats.row() | {"mean_output_len": sum(lens) / len(lens)}
            r["rows"].append(row)
            r["paged_over_reserve"] = _ratios(r["rows"], "paged", "reserve")
            r["paged_over_static"] = _ratios(r["rows"], "paged", "static")
            r["compiles_after_warmup"] = engine.runner.num_compiles_since_warmup
            tqdm.write(f"cap {cap:>5} {name:>7}: {row['output_tokens_per_s']:,.0f} output tok/s,"
                       f" decode batch {row['mean_decode_batch']:.1f}, KV waste "
                       f"{row['kv_waste']:.1%}; {row['elapsed_s']:.1f} s: prefilling steps "
                       f"{row['mixed_steps_s']:.1f} s, decode-only {row['decode_only_steps_s']:.1f}"
                       f" s (under {SMALL_BATCH} sequences {stats.small_batch_s:.1f} s)")
            if on_row is not None:
                on_row(r)
    return r


# Arguments that may differ between runs merged into one table: the caps each run measured
# and where it wrote its files.
_MERGE_FREE_ARGS = {"caps", "json", "plot"}


def _setup(r: dict[str, Any]) -> dict[str, Any]:
    """What must match for runs to merge: card, model and engine (less its measured warm-up
    time), KV capacity and arguments (less _MERGE_FREE_ARGS)."""
    return {"card": r["card"], "model": r["model"],
            "engine": {k: v for k, v in r["engine"].items() if k != "warmup_s"},
            "kv_capacity_tokens": r["kv_capacity_tokens"],
            "args": {k: v for k, v in r["args"].items() if k not in _MERGE_FREE_ARGS}}


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One batching result from runs that measured different caps of the same experiment
    (same card, model, engine and workload arguments), e.g. caps split over calls that each
    fit a time limit. Refuses runs that differ in anything else, or that repeat a cap."""
    first = results[0]
    same = _setup(first)
    for r in results[1:]:
        other = _setup(r)
        for key in ("card", "model", "engine", "kv_capacity_tokens"):
            if other[key] != same[key]:
                raise ValueError(f"cannot merge batching runs with different {key}: "
                                 f"{same[key]!r} vs {other[key]!r}")
        a, b = same["args"], other["args"]
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"cannot merge batching runs whose arguments differ: {diff}")
    rows = [row for r in results for row in r["rows"]]
    keys = [(row["cap"], row["scheduler"]) for row in rows]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"cannot merge batching runs that repeat (cap, scheduler): {repeated}")
    rows.sort(key=lambda row: row["cap"])
    merged = dict(first, rows=rows, args=dict(first["args"], caps=sorted({c for c, _ in keys})),
                  git_revision=",".join(dict.fromkeys(str(r["git_revision"]) for r in results)),
                  compiles_after_warmup=max(r["compiles_after_warmup"] for r in results))
    merged["paged_over_reserve"] = _ratios(rows, "paged", "reserve")
    merged["paged_over_static"] = _ratios(rows, "paged", "static")
    return merged


# What runs of a KV-size sweep must share (their KV cache size is what varies).
_SWEEP_ARGS = ("model", "dtype", "block_size", "num_prompts", "input_len", "mean_output_len",
               "max_num_seqs", "max_num_batched_tokens", "seed", "temperature")


def kv_sweep(results: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """Paged over reserving continuous batching at `cap` as the KV cache changes size: one row
    per run that measured both (each run at its own --num-kv-blocks), smallest cache first.
    Runs must share card and workload; they may come from different revisions (each row names
    its own). `reserved_regions` is how many prompt + cap regions the cache holds."""
    if not results:
        raise ValueError("no runs given")
    first = results[0]
    rows = []
    for r in results:
        diff = [k for k in _SWEEP_ARGS if r["args"].get(k) != first["args"].get(k)]
        if r["card"] != first["card"]:
            diff.insert(0, "card")
        if diff:
            raise ValueError(f"cannot sweep batching runs that differ in {diff}")
        by = {x["scheduler"]: x for x in r["rows"] if x["cap"] == cap}
        if "reserve" not in by or "paged" not in by:
            continue
        reserve, paged = by["reserve"], by["paged"]
        args = r["args"]
        region = region_blocks(args["input_len"], cap, args["block_size"]) * args["block_size"]
        rows.append({
            "kv_capacity_tokens": r["kv_capacity_tokens"],
            "num_kv_blocks": args["num_kv_blocks"],
            "reserved_regions": r["kv_capacity_tokens"] // region,
            "reserve_tok_s": reserve["output_tokens_per_s"],
            "reserve_decode_batch": reserve["mean_decode_batch"],
            "paged_tok_s": paged["output_tokens_per_s"],
            "paged_decode_batch": paged["mean_decode_batch"],
            "paged_preemptions": paged["num_preemptions"],
            "paged_kv_waste": paged["kv_waste"],
            "paged_over_reserve": paged["output_tokens_per_s"] / reserve["output_tokens_per_s"],
            "git_revision": r["git_revision"],
        })
    if not rows:
        raise ValueError(f"no run measured both reserve and paged at cap {cap}")
    return sorted(rows, key=lambda row: row["kv_capacity_tokens"])


def kv_sweep_table(rows: list[dict[str, Any]]) -> str:
    return format_table(
        ["KV tokens (blocks)", "reserved regions", "reserve tok/s (batch)",
         "paged tok/s (batch)", "paged preemptions", "paged KV waste", "paged / reserve", "git"],
        [(f"{r['kv_capacity_tokens']:,} ({r['num_kv_blocks']:,})", r["reserved_regions"],
          f"{r['reserve_tok_s']:,.0f} ({r['reserve_decode_batch']:.0f})",
          f"{r['paged_tok_s']:,.0f} ({r['paged_decode_batch']:.0f})", r["paged_preemptions"],
          f"{r['paged_kv_waste']:.1%}", f"{r['paged_over_reserve']:.2f}x", r["git_revision"])
         for r in rows])


def plot_kv_sweep(rows: list[dict[str, Any]], cap: int, title: str, path: str,
                  shade: tuple[int, int] | None = None) -> None:
    """Both throughputs and their ratio against the KV cache's usable tokens; `shade` marks a
    range of KV sizes (tokens) on the ratio panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["kv_capacity_tokens"] for r in rows]
    fig, (ax, ratio) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(x, [r["reserve_tok_s"] for r in rows], "o-", label="continuous, reserving (no paging)")
    ax.plot(x, [r["paged_tok_s"] for r in rows], "o-", label="continuous, paged")
    ax.set(xscale="log", xlabel="KV cache, usable tokens", ylabel="output tokens/s",
           title=f"{title}, cap {cap}")
    ax.legend()
    ratio.plot(x, [r["paged_over_reserve"] for r in rows], "o-", color="C2")
    ratio.axhline(2.0, color="grey", linestyle="--", linewidth=1)
    if shade is not None:
        ratio.axvspan(*shade, color="grey", alpha=0.15, label="the study's KV cache (approx.)")
        ratio.legend()
    ratio.set(xscale="log", xlabel="KV cache, usable tokens", ylabel="paged / reserving",
              title="throughput ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ratios(rows: list[dict[str, Any]], a: str, b: str) -> dict[str, float]:
    by = {(r["cap"], r["scheduler"]): r["output_tokens_per_s"] for r in rows}
    return {str(cap): by[cap, a] / by[cap, b] for cap, s in by if s == a and (cap, b) in by}


def batching_table(r: dict[str, Any]) -> str:
    caps = sorted({row["cap"] for row in r["rows"]})
    names = [s for s in SCHEDULERS if any(row["scheduler"] == s for row in r["rows"])]
    by = {(row["cap"], row["scheduler"]): row for row in r["rows"]}
    headers = ["cap", "mean out"] + [f"{s} tok/s (decode batch)" for s in names] + \
        [f"{s} KV waste" for s in names] + ["paged / reserve"]
    rows = []
    for cap in caps:
        first = by[cap, names[0]]
        cells = [cap, f"{first['mean_output_len']:.0f}"]
        cells += [f"{by[cap, s]['output_tokens_per_s']:,.0f} "
                  f"({by[cap, s]['mean_decode_batch']:.0f})" for s in names]
        cells += [f"{by[cap, s]['kv_waste']:.1%}" for s in names]
        ratio = r["paged_over_reserve"].get(str(cap))
        cells.append(f"{ratio:.2f}x" if ratio else "-")
        rows.append(cells)
    return format_table(headers, rows)


def plot(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = sorted({row["cap"] for row in r["rows"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in SCHEDULERS:
        rows = sorted((row for row in r["rows"] if row["scheduler"] == name),
                      key=lambda row: row["cap"])
        if not rows:
            continue
        x = [row["cap"] for row in rows]
        ax1.plot(x, [row["output_tokens_per_s"] for row in rows], "o-", label=name)
        ax2.plot(x, [row["mean_decode_batch"] for row in rows], "o-", label=name)
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "mean decoding batch per step")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(caps, [str(c) for c in caps])
        ax.set_xlabel("output-length cap (max_tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{r['model']} on {r['card']}: {r['args']['num_prompts']} prompts of "
                 f"{r['args']['input_len']} tokens, KV {r['kv_capacity_tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict[str, Any]:
    def save(r: dict[str, Any]) -> str | None:
        return write_json(r, args.json, f"batching_{slug(str(r['model']))}_{slug(r['card'])}.json")

    r = run_batching(args, on_row=save)
    name = f"batching_{slug(str(r['model']))}_{slug(r['card'])}"
    path = save(r)
    png = args.plot or (os.path.splitext(path)[0] + ".png" if path else name + ".png")
    plot(r, png)
    print("\n" + batching_table(r))
    print(f"\nplot: {png}" + (f"\nwrote {path}" if path else ""))
    return r
