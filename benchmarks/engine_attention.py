"""The decode-attention kernel on the engine's own inputs, one difference at a time.

The engine's decode attention ran ~6 us a launch slower than the kernel benchmark's at the same
context (NOTES_engine, fourteenth session), and ncu could not be pointed at the engine's launch.
This builds the engine (dummy weights) at batch --batch with prompts of --context tokens, steps
it until every request decodes, and records one engine step under the profiler while a wrapper
around ``pallas_kernels.paged_decode_attention`` copies each call's inputs to the host (q, the
step's keys, values and slots, block tables with the layer's page offset, kv_lens, RoPE tables).
Then the kernel alone (device time, interleaved rounds) on those inputs and the engine's own
page pools, against variants that each change one thing:

- ``engine``: the captured call as the engine makes it (KV write inside, pools donated);
- ``nowrite``: without the KV write inside;
- ``layer0``: the same pages of layer 0 (no page offset: lower addresses of the pool);
- ``narrow``: block tables cut to the columns the longest row needs;
- ``shuffled``: the same pages, dealt at random over the rows' positions;
- ``compact`` / ``compact_shuffled``: the pages copied into a fresh pool just large enough, in
  the engine's order / shuffled (the kernel benchmark's setting);
- ``uniform``: every row at the mean length (as the benchmark's batch);
- ``nostore``: the engine's call with the KV write's two stores dropped at trace time (wrong
  caches; tells the stores' cost from the rest of the write's);
- ``after_qkv``: the engine's call, each after a q/k/v projection of the last call's output
  (``stacked_matmul_fused`` as the model launches it, random [L, D, D_out] stacks read at
  --layer) that gives it its q and the step's key and value: the launch in the order the
  step's program runs it, still timed alone;
- ``baseline``: the engine's call through another version of the kernel's module, loaded from
  ``--baseline-module`` (e.g. the file at an older revision): an A/B of a kernel edit on the
  engine's inputs in one process.

    python benchmarks/engine_attention.py --out $OUT      # on a GPU; --layer picks the call

The first table row is the engine's in-situ time for the same launches (from the step's trace).
"""

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_profile import kernel_times  # noqa: E402
from kernels import card_name, traced_kernel_seconds  # noqa: E402

import pallas_kernels  # noqa: E402
from jaxpaged import LLM, SamplingParams  # noqa: E402
from jaxpaged.bench_common import git_revision  # noqa: E402

# The kernel's module (the package's attribute of that name is the function).
pda = importlib.import_module("pallas_kernels.paged_decode_attention")
KERNEL = "paged_decode_attention"
VARIANTS = ("engine", "nowrite", "layer0", "narrow", "shuffled", "compact", "compact_shuffled",
            "uniform", "nostore", "after_qkv")
_CAPTURED: list[dict] = []
_CAPTURING = [False]


def _store(q, block_tables, kv_lens, rope, write):
    if _CAPTURING[0]:
        _CAPTURED.append(dict(q=np.asarray(q), block_tables=np.asarray(block_tables),
                              kv_lens=np.asarray(kv_lens),
                              rope=None if rope is None else tuple(map(np.asarray, rope)),
                              write=None if write is None else tuple(map(np.asarray, write))))


def install_capture() -> None:
    """Wraps pallas_kernels.paged_decode_attention (jaxpaged.attention looks it up at trace
    time) so that every call also hands its small inputs to _store."""
    original = pallas_kernels.paged_decode_attention

    def capturing(q, k_cache, v_cache, block_tables, kv_lens, rope=None, write=None, **kw):
        jax.debug.callback(_store, q, block_tables, kv_lens, rope, write)
        return original(q, k_cache, v_cache, block_tables, kv_lens, rope, write, **kw)

    pallas_kernels.paged_decode_attention = capturing


def build_engine(args) -> LLM:
    llm = LLM(args.model, load_format="dummy", max_num_seqs=args.batch,
              max_num_batched_tokens=args.max_num_batched_tokens,
              attention_impl=args.attention_impl, warmup=not args.no_warmup)
    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.context, ignore_eos=True)
    for i in range(args.batch):
        ids = rng.integers(0, engine.model.config.vocab_size, args.context).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, params, output_kind="final_only")
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(args.warm_steps):
        engine.step()
    return llm


def capture_step(engine) -> list[float]:
    """One engine step traced with capture on -> the in-situ device times (s) of its decode
    attention launches, in launch order."""
    import tempfile

    with tempfile.TemporaryDirectory() as trace_dir:
        _CAPTURING[0] = True
        jax.profiler.start_trace(trace_dir)
        try:
            engine.step()
            jax.effects_barrier()
        finally:
            jax.profiler.stop_trace()
            _CAPTURING[0] = False
        _, _, _, events = kernel_times(trace_dir)
    launches = sorted((s, e) for s, e, name in events if name.startswith(KERNEL))
    return [(e - s) * 1e-9 for s, e in launches]


def make_variant(name: str, call: dict, k_pool, v_pool, num_blocks: int, block_size: int):
    """(k_pool, v_pool, kernel kwargs) for a variant of the captured call."""
    tables, lens = np.array(call["block_tables"]), np.array(call["kv_lens"])
    used = -(-lens // block_size)  # pages each row reads
    mask = np.arange(tables.shape[1])[None, :] < used[:, None]
    kw = dict(q=jnp.asarray(call["q"]), rope=tuple(map(jnp.asarray, call["rope"])))
    write = tuple(map(jnp.asarray, call["write"])) if call["write"] is not None else None
    rng = np.random.default_rng(3)
    if name in ("engine", "nostore", "baseline", "after_qkv"):
        kw["write"] = write
    if name == "layer0":
        tables = tables - (tables[mask].min() // num_blocks) * num_blocks
    if name == "narrow":
        tables = tables[:, :max(1, int(used.max()))]
    if name == "uniform":
        lens = np.where(lens > 0, int(round(lens[lens > 0].mean())), 0)
        used = -(-lens // block_size)
        mask = np.arange(tables.shape[1])[None, :] < used[:, None]
    if name in ("shuffled", "compact_shuffled"):
        ids = tables[mask]
        tables = tables.copy()
        tables[mask] = rng.permutation(ids)
    if name.startswith("compact"):
        ids = np.unique(tables[mask])
        tables = np.where(mask, np.searchsorted(ids, tables), 0)
        gather = jax.jit(lambda c, ids: c.reshape(-1, *c.shape[2:])[ids][None])
        k_pool, v_pool = gather(k_pool, jnp.asarray(ids)), gather(v_pool, jnp.asarray(ids))
    kw.update(block_tables=jnp.asarray(tables, jnp.int32), kv_lens=jnp.asarray(lens, jnp.int32))
    return k_pool, v_pool, kw


@contextlib.contextmanager
def cache_stores_dropped(pool_rows: int):
    """While tracing: the decode kernel's stores into a ref of ``pool_rows`` rows (the caches,
    i.e. the KV write's) are dropped."""
    original = pda.plt.store

    def store(ref, *args, **kwargs):
        base = getattr(ref, "ref", ref)
        if getattr(base, "shape", (None,))[0] == pool_rows:
            return None
        return original(ref, *args, **kwargs)

    pda.plt.store = store
    try:
        yield
    finally:
        pda.plt.store = original


def load_module(path: str, name: str):
    """The Python module in the file at ``path`` (any suffix), imported as ``name``."""
    loader = importlib.machinery.SourceFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


def qkv_projection(num_layers: int, d_model: int, num_kv_heads: int, head_dim: int,
                   layer: int):  # d_model: the attention output's width, N * H
    """out [S, N, H] -> (q, k, v) through the model's q/k/v launch (random bf16 stacks)."""
    keys = jax.random.split(jax.random.key(11), 3)
    widths = (d_model, num_kv_heads * head_dim, num_kv_heads * head_dim)
    ws = tuple(0.02 * jax.random.normal(k, (num_layers, d_model, w), jnp.bfloat16)
               for k, w in zip(keys, widths))

    def project(out):
        x = out.reshape(out.shape[0], -1).astype(jnp.bfloat16)
        q, k, v = pallas_kernels.stacked_matmul_fused(x, ws, jnp.int32(layer), kernel="auto")
        return (q.reshape(out.shape), k.reshape(out.shape[0], num_kv_heads, head_dim),
                v.reshape(out.shape[0], num_kv_heads, head_dim))

    return project


def timed_chain(calls: int, drop_stores: bool = False, module=None, before=None):
    """A jitted chain of ``calls`` kernel calls, each q the last output (a barrier between);
    the caches [L, P, B, K, H] are donated and returned (the KV write updates them in place),
    seen by the kernel as one pool [L * P, B, K, H] as in the engine. ``drop_stores``: the
    kernel traced with ``cache_stores_dropped``; ``module``: the kernel from that module;
    ``before``: out -> (q, k, v) between calls (the write's key and value from it too)."""
    def attend(q, k_pool, v_pool, block_tables, kv_lens, rope, write):
        if not drop_stores:
            fn = (module or pda).paged_decode_attention
            return fn(q, k_pool, v_pool, block_tables, kv_lens, rope, write)
        pool_rows = k_pool.shape[0] * k_pool.shape[1] * k_pool.shape[2]
        with cache_stores_dropped(pool_rows):  # traced afresh (not the jitted entry's cache)
            return pda.paged_decode_attention_tuned.__wrapped__(
                q, k_pool, v_pool, block_tables, kv_lens, rope, write, sm_scale=None,
                interpret=False, block_n=pda.default_block_n(q.shape[-1]), num_splits=None,
                num_warps=4, num_stages=2, heads_fastest=True)

    def chain(k_cache, v_cache, q, block_tables, kv_lens, rope, write):
        shape = k_cache.shape
        k_pool = k_cache.reshape(-1, *shape[2:])
        v_pool = v_cache.reshape(-1, *shape[2:])
        for _ in range(calls):
            out = attend(q, k_pool, v_pool, block_tables, kv_lens, rope, write)
            if write is not None:
                out, k_pool, v_pool = out
            if before is not None:
                q, k_new, v_new = before(out)
                write = None if write is None else (k_new, v_new, write[2])
                continue
            q = jax.lax.optimization_barrier(out.astype(q.dtype))
        return k_pool.reshape(shape), v_pool.reshape(shape), q

    return jax.jit(chain, donate_argnums=(0, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--warm-steps", type=int, default=4)
    p.add_argument("--attention-impl", default="auto",
                   help="the engine's (pallas: the kernels interpreted on a CPU, a dry run)")
    p.add_argument("--no-warmup", action="store_true", help="skip the engine's warm-up (dry run)")
    p.add_argument("--layer", type=int, default=5, help="which layer's call of the step")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--baseline-module", default=None,
                   help="a version of pallas_kernels/paged_decode_attention.py (any file name) "
                   "for the baseline variant")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    install_capture()
    llm = build_engine(args)
    engine = llm.llm_engine
    in_situ = capture_step(engine)
    layers = engine.model.config.num_hidden_layers
    call = _CAPTURED[args.layer]
    runner = engine.runner
    _, P, B, _, _ = runner.kv_cache.k.shape
    k_pool, v_pool = runner.kv_cache.k, runner.kv_cache.v  # [L, P, B, K, H]
    runner.kv_cache = None  # the variants own the pools from here (the engine is done)
    lens = call["kv_lens"]
    print(f"{args.model}: batch {args.batch}, captured {len(_CAPTURED)} calls "
          f"({len(in_situ)} launches traced), layer {args.layer}: kv_lens {lens.min()}-"
          f"{lens.max()} (mean {lens.mean():.1f}), table {call['block_tables'].shape}, "
          f"write {call['write'] is not None}")
    first_step = [t * 1e6 for t in in_situ[:layers]] or [float("nan")]  # none on a CPU
    situ_us = first_step[args.layer] if len(first_step) > args.layer else float("nan")
    print(f"in situ: layer {args.layer} {situ_us:.1f} us; first step's launches "
          f"{min(first_step):.1f}-{max(first_step):.1f} us (median "
          f"{statistics.median(first_step):.1f})")
    names = args.variants.split(",")
    chains = {n: timed_chain(args.calls) for n in names}
    chains["nostore"] = timed_chain(args.calls, drop_stores=True)
    if "after_qkv" in names:
        _, num_heads, head_dim = call["q"].shape
        chains["after_qkv"] = timed_chain(args.calls, before=qkv_projection(
            layers, num_heads * head_dim, k_pool.shape[-2], head_dim, args.layer))
    if args.baseline_module:
        chains["baseline"] = timed_chain(
            args.calls, module=load_module(args.baseline_module, "paged_decode_attention_baseline"))
    pools = (k_pool, v_pool)  # donated through each chain: always the latest arrays
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            kp, vp, kw = make_variant(n, call, *pools, P, B)
            state = [kp, vp]

            def run(kw=kw, state=state):
                for _ in range(args.reps):
                    state[0], state[1], _ = chains[n](
                        state[0], state[1], kw["q"], kw["block_tables"], kw["kv_lens"],
                        kw["rope"], kw.get("write"))
                jax.block_until_ready(state)

            run()  # compile and warm
            if not n.startswith("compact"):
                pools = tuple(state)
            seconds = traced_kernel_seconds(run)
            if not n.startswith("compact"):
                pools = tuple(state)
            t = sum(v for k, v in seconds.items() if k.startswith(KERNEL))
            times[n].append(t / (args.reps * args.calls) * 1e6)
            print(f"round {r} {n}: {times[n][-1]:.1f} us", flush=True)
    rows = {n: statistics.median(v) for n, v in times.items()}
    base = rows.get("engine", next(iter(rows.values()))) or float("nan")  # 0 on a CPU
    print(f"\n{'variant':18} {'us':>7} {'vs engine':>9}")
    print(f"{'in situ':18} {situ_us:7.1f} {situ_us / base:9.3f}")
    for n, us in rows.items():
        print(f"{n:18} {us:7.1f} {us / base:9.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        rev = git_revision()
        path = os.path.join(args.out, f"engine_attention_{args.model}_{rev}.json")
        with open(path, "w") as f:
            json.dump({"card": card_name(), "jax": jax.__version__, "git_revision": rev,
                       "args": vars(args), "kv_lens": [int(x) for x in lens],
                       "table_shape": list(call["block_tables"].shape),
                       "in_situ_us": [t * 1e6 for t in in_situ], "layer_in_situ_us": situ_us,
                       "rounds_us": times, "median_us": rows}, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
