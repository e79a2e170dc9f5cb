"""The decode layer loop's seven projections: XLA on scanned weights vs stacked_matmul.

For each model's decode shapes, a `lax.scan` over all L layers does q, k, v, o, gate, up, down
(with a cheap dependency between layers, as a real layer has, so nothing is hoisted), in:

  (a) xla-scan     jnp.dot on the weights the scan slices out of the stacks (the model's path
                   before stacked_matmul, and still on the CPU: XLA copies each layer's
                   matrices before the GEMMs)
  (b) xla-unroll   the same scan with unroll=True (static slices, no copies, long compiles)
  (c) stacked-*    pallas_kernels.stacked_matmul reading each layer's weights in place, seven
                   launches a layer: the defaults, then a sweep of tile and launch settings
  (d) fused-*      four launches a layer, as the model's JAXPAGED_STACKED_MATMUL=1 path:
                   stacked_matmul_fused for q/k/v and for silu(gate) * up (its silu_mul
                   epilogue), stacked_matmul for o and down; each setting applies to all four.
                   Its err vs xla is not zero in bf16: the epilogue takes gate and up in f32,
                   where XLA rounds them to bf16 first (~0.8% on the CPU smoke run, all of it
                   from that rounding)
  (e) launch-*     (only when asked: --variants launch) each of those four launches alone in
                   the scan, for each kernel of --launch-kernels: the Triton kernel (at its
                   defaults and each setting of LAUNCH_SWEEP), the Mosaic GPU kernel
                   stacked_matmul_mgpu (MGPU_LAUNCH_SWEEP) and XLA's cuBLAS GEMM on the static
                   slices of an unrolled scan; each row also has the launch's error on one layer
                   against stacked_matmul_fused_reference

Reports ms per scan (all L layers), weight bandwidth (bytes of all the weights / time), its
ratio to a device-to-device copy's bandwidth measured in the same run (read + write bytes), the
compile seconds, and each stacked variant's error against xla-scan and every variant's against
the same scan in f32 (the scale for the former: bf16 roundings drift over L chained layers).
The JSON is rewritten after every row, so a run cut short keeps what it measured. One model per
run keeps a run within a few minutes (xla-unroll compiles for long; --quick sweeps fewer
settings).

    PYTHONPATH=. python benchmarks/stacked_matmul.py --models llama-3.2-1b --json "$OUT/"
    PYTHONPATH=. python benchmarks/stacked_matmul.py --interpret --small   # CPU smoke test
    PYTHONPATH=. python benchmarks/stacked_matmul.py --models llama-3.1-8b --tokens 256 \
        --variants launch --launch-kernels triton:0 mgpu xla --min-seconds 0.2 --json "$OUT/"
"""

import argparse
import functools
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.bench_common import env_info, format_table, slug, write_json
from pallas_kernels import stacked_matmul, stacked_matmul_fused, stacked_matmul_fused_reference
from pallas_kernels.stacked_matmul_mgpu import stacked_matmul_mgpu

# L layers; D model; F MLP; Q = N * H query width; KV = K * H key/value width.
MODELS = {
    "llama-3.2-1b": dict(L=16, D=2048, F=8192, Q=2048, KV=512),
    "llama-3.1-8b": dict(L=32, D=4096, F=14336, Q=4096, KV=1024),
}
SMALL_MODELS = {"tiny": dict(L=2, D=64, F=128, Q=64, KV=32)}
NAMES = ("q", "k", "v", "o", "gate", "up", "down")
# stacked_matmul settings tried after its defaults ({}); block_t is capped at T's power of two.
# Defaults (T >= 128): block_t 128, block_n 64, block_k 64, 4 warps, stages from shared memory,
# D_in split only when fewer than 264 programs. Shared memory of each setting, from Triton 3.8
# for sm_90: 64-192 KB, so fewer stages also means two programs per SM instead of one.
SWEEP = [
    dict(block_n=128),
    dict(block_n=32),
    dict(num_stages=3),
    dict(block_k=128),
    dict(block_k=256),
    dict(num_warps=8),
    dict(num_stages=2),
    dict(num_stages=5, block_t=64),
    dict(num_splits=1),
    dict(block_t=64),
    dict(block_t=256, num_warps=8),
    dict(block_n=128, num_warps=8, num_stages=3),
]
QUICK_SWEEP = SWEEP[:3]
# The fused kernels' settings: the split rule counts the q/k/v and gate/up programs together, so
# (1b, 8b at small T) whether to split at all is the open question; silu_mul programs stream two
# weight tiles, so fewer stages fit.
FUSED_SWEEP = [
    dict(num_splits=1),
    dict(block_n=128),
    dict(num_stages=2),
    dict(num_stages=3),
    dict(num_warps=8),
    # One T block for a whole batch of 256 (each weight tile read once, not twice through L2),
    # narrower or wider column tiles, shorter k steps.
    dict(block_t=256, num_warps=8),
    dict(block_t=256, num_warps=8, num_stages=2),
    dict(block_n=32),
    dict(block_n=32, num_splits=1),
    dict(block_n=128, num_warps=8),
    # block_k 64 is the default since the first sweep; 128 was the one before it.
    dict(block_k=128),
    dict(block_k=32),
    dict(num_stages=5),
]
QUICK_FUSED_SWEEP = FUSED_SWEEP[:1]
# The "launch" variant times each of the model's four launches a layer on its own, so that each
# can get its own setting: q/k/v fused (D_in = D), silu(gate) * up (D_in = D), o (D_in = Q) and
# down (D_in = F). Their shapes differ enough (down streams F-long columns into a narrow D_out,
# which the split rule cuts into f32 partials) that one setting need not suit all.
LAUNCHES = {
    "qkv": ("D", ("q", "k", "v"), None),
    "gate_up": ("D", ("gate", "up"), "silu_mul"),
    "o": ("Q", ("o",), None),
    "down": ("F", ("down",), None),
}
LAUNCH_SWEEP = [
    dict(num_stages=3),
    dict(num_stages=2),
    dict(num_splits=1),
    dict(num_splits=2),
    dict(num_stages=3, num_splits=1),
    dict(block_n=32),
    dict(block_n=32, num_splits=1),
    dict(block_n=128, num_warps=8),
    dict(block_t=64),
    dict(block_t=64, num_splits=1),
    dict(block_t=256, num_warps=8, num_stages=3),
    dict(num_warps=8),
    dict(block_k=128, num_stages=3),
    dict(block_k=32),
]
# stacked_matmul_mgpu settings (defaults: block_m 128, block_n 128, block_k 64, 4 steps in
# flight, one persistent program per SM, Mosaic GPU's inferred shared-memory layout), the
# settings stacked_matmul's kernel="auto" uses first. H100 runs at T 256 (e2b8138, 7bfb00e;
# NOTES_kernels): more steps in flight won at every shape; block_n 256, block_k 128, explicit
# swizzle and two programs per SM did not (dropped from the list).
MGPU_LAUNCH_SWEEP = [
    dict(max_concurrent_steps=8, block_n=64),  # auto's setting for 64-wide tiles
    dict(max_concurrent_steps=5),  # auto's setting for 128-wide tiles
    dict(warp_specialized=True, block_m=128, block_n=128),  # auto's setting for silu_mul
    dict(block_m=64, max_concurrent_steps=8, block_n=64),
    dict(block_m=64, max_concurrent_steps=6),
    dict(warp_specialized=True, block_m=256, block_n=64),
    dict(warp_specialized=True, block_m=256, block_n=64, max_concurrent_steps=3),
    dict(warp_specialized=True, block_m=256, block_n=128, max_concurrent_steps=3),
    dict(warp_specialized=True, block_m=128, block_n=64, max_concurrent_steps=6),
    dict(max_concurrent_steps=6, block_n=64),
]
# D_in split across several programs an output tile (f32 partial sums added by XLA), for the
# launches with too few output tiles to fill the SMs (llama-3.2-1b's o and down at T 256: 64
# tiles of 128 x 64), and wider tiles that re-read x less often (x is read once per column
# block). `--mgpu-sweep split` runs these instead of MGPU_LAUNCH_SWEEP.
MGPU_SPLIT_SWEEP = [
    dict(max_concurrent_steps=8, block_n=64),  # unsplit, auto's setting for 64-wide tiles
    dict(max_concurrent_steps=6, block_n=64, num_splits=2),
    dict(max_concurrent_steps=6, block_n=64, num_splits=4),
    dict(max_concurrent_steps=4, block_n=128, num_splits=2),
    dict(max_concurrent_steps=4, block_n=128, num_splits=4),
    dict(max_concurrent_steps=3, block_n=128, num_splits=8),
    dict(max_concurrent_steps=3, block_m=256, block_n=64, num_splits=4),
]
# Warp-specialized settings, D_in split or not (fourteenth session): two compute warpgroups
# share each weight tile, and wider tiles re-read x less often. `--mgpu-sweep ws`.
MGPU_WS_SWEEP = [
    dict(max_concurrent_steps=8, block_n=64),  # auto's setting for the 1B's q/k/v
    dict(max_concurrent_steps=6, block_n=64, num_splits=2),  # auto's for the 1B's o and down
    dict(warp_specialized=True, block_m=128, block_n=64, max_concurrent_steps=8),
    dict(warp_specialized=True, block_m=128, block_n=128, max_concurrent_steps=4),
    dict(warp_specialized=True, block_m=128, block_n=64, max_concurrent_steps=6, num_splits=2),
    dict(warp_specialized=True, block_m=128, block_n=128, max_concurrent_steps=4, num_splits=2),
    dict(warp_specialized=True, block_m=128, block_n=128, max_concurrent_steps=4, num_splits=4),
    dict(warp_specialized=True, block_m=128, block_n=128, max_concurrent_steps=3, num_splits=4),
    dict(warp_specialized=True, block_m=256, block_n=64, max_concurrent_steps=3, num_splits=2),
    dict(warp_specialized=True, block_m=256, block_n=64, max_concurrent_steps=3, num_splits=4),
]
VARIANTS = ("xla-scan", "xla-unroll", "stacked", "fused", "launch")


def weight_dims(shape: dict) -> dict[str, tuple[int, int]]:
    """Each projection's (D_in, D_out) for a MODELS entry."""
    D, F, Q, KV = (shape[k] for k in ("D", "F", "Q", "KV"))
    return dict(q=(D, Q), k=(D, KV), v=(D, KV), o=(Q, D), gate=(D, F), up=(D, F), down=(F, D))


def make_weights(shape: dict, dtype, seed: int = 0) -> dict[str, jax.Array]:
    """The stacks [L, D_in, D_out], drawn on the device (14 GB for llama-3.1-8b)."""
    L, dims = shape["L"], weight_dims(shape)
    keys = jax.random.split(jax.random.key(seed), len(NAMES))
    return {n: jax.jit(lambda key, s=dims[n]: (jax.random.normal(key, (L, *s), jnp.float32)
                                               * s[0] ** -0.5).astype(dtype))(k)
            for n, k in zip(NAMES, keys)}


def layer(h: jax.Array, mm, qkv=None, silu_mul=None) -> jax.Array:
    """One decoder layer's projections; mm(x, name) is x @ this layer's weight `name`; qkv(x)
    and silu_mul(x), when given, replace the q/k/v and the silu(gate) * up matmuls."""
    q, k, v = qkv(h) if qkv else (mm(h, "q"), mm(h, "k"), mm(h, "v"))
    # Attention stand-in: the output depends on k and v, as it would, for the price of a mean.
    a = q * (1 + k.mean(axis=-1, keepdims=True) + v.mean(axis=-1, keepdims=True))
    h = h + mm(a, "o")
    g = silu_mul(h) if silu_mul else jax.nn.silu(mm(h, "gate")) * mm(h, "up")
    h = h + mm(g, "down")
    h32 = h.astype(jnp.float32)
    return (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + 1e-6)).astype(h.dtype)


def xla_scan(h: jax.Array, ws: dict[str, jax.Array], unroll: bool) -> jax.Array:
    def body(h, w):
        return layer(h, lambda x, n: jnp.dot(x, w[n])), None

    return jax.lax.scan(body, h, ws, unroll=unroll)[0]


def f32_scan(h: jax.Array, ws: dict[str, jax.Array]) -> jax.Array:
    """The accuracy reference: xla-scan with every matmul and activation in f32 (weights upcast
    one layer at a time, full-precision dots), rounded to bf16 only at the end."""
    def body(h, w):
        return layer(h, lambda x, n: jnp.dot(x, w[n].astype(jnp.float32),
                                             precision=jax.lax.Precision.HIGHEST)), None

    return jax.lax.scan(body, h.astype(jnp.float32), ws)[0].astype(h.dtype)


def stacked_scan(h: jax.Array, ws: dict[str, jax.Array], tuning: dict) -> jax.Array:
    num_layers = ws["q"].shape[0]

    def body(h, layer_id):
        return layer(h, lambda x, n: stacked_matmul(x, ws[n], layer_id, **tuning)), None

    return jax.lax.scan(body, h, jnp.arange(num_layers, dtype=jnp.int32))[0]


def fused_scan(h: jax.Array, ws: dict[str, jax.Array], tuning: dict) -> jax.Array:
    num_layers = ws["q"].shape[0]

    def body(h, layer_id):
        def mm(x, n):
            return stacked_matmul(x, ws[n], layer_id, **tuning)

        def qkv(x):
            return stacked_matmul_fused(x, (ws["q"], ws["k"], ws["v"]), layer_id, **tuning)

        def silu_mul(x):
            return stacked_matmul_fused(x, (ws["gate"], ws["up"]), layer_id,
                                        epilogue="silu_mul", **tuning)

        return layer(h, mm, qkv, silu_mul), None

    return jax.lax.scan(body, h, jnp.arange(num_layers, dtype=jnp.int32))[0]


def launch_outputs(h: jax.Array, stacks: tuple[jax.Array, ...], layer_id, epilogue: str | None,
                   kernel: str, tuning: dict) -> tuple[jax.Array, ...]:
    """One launch's outputs for one layer. kernel: "triton" (stacked_matmul), "mgpu"
    (stacked_matmul_mgpu), "auto" (the model's choice between them) or "xla" (jnp.dot on the
    layer's slice: inside an unrolled scan cuBLAS reads the weights in place)."""
    if kernel == "mgpu":
        outs = stacked_matmul_mgpu(h, stacks, layer_id, epilogue=epilogue, **tuning)
    elif kernel == "auto":  # what the model runs: Triton or Mosaic GPU by mosaic_settings
        outs = stacked_matmul_fused(h, stacks, layer_id, epilogue=epilogue, kernel="auto",
                                    **tuning)
    elif kernel == "xla":
        outs = tuple(jnp.dot(h, w[layer_id]) for w in stacks)
        if epilogue:
            outs = (jax.nn.silu(outs[0].astype(jnp.float32)) * outs[1]).astype(h.dtype)
    elif len(stacks) == 1:
        outs = (stacked_matmul(h, stacks[0], layer_id, **tuning),)
    else:
        outs = stacked_matmul_fused(h, stacks, layer_id, epilogue=epilogue, **tuning)
    return (outs,) if epilogue else tuple(outs)


def launch_scan(h: jax.Array, ws: dict[str, jax.Array], names: tuple[str, ...],
                epilogue: str | None, tuning: dict, kernel: str = "triton") -> jax.Array:
    """One of the model's launches (LAUNCHES) in each of the L layers, alone. Each layer's input
    depends on the last one's output through a row mean (a few microseconds, the same for every
    setting), so nothing is hoisted or dropped."""
    num_layers = ws[names[0]].shape[0]

    def body(h, layer_id):
        outs = launch_outputs(h, tuple(ws[n] for n in names), layer_id, epilogue, kernel, tuning)
        dep = sum(o.astype(jnp.float32).mean(axis=-1, keepdims=True) for o in outs)
        return (h.astype(jnp.float32) + 1e-3 * dep).astype(h.dtype), None

    return jax.lax.scan(body, h, jnp.arange(num_layers, dtype=jnp.int32),
                        unroll=kernel == "xla")[0]


def launch_error(h: jax.Array, ws: dict[str, jax.Array], names: tuple[str, ...],
                 epilogue: str | None, kernel: str, tuning: dict) -> float:
    """The launch's relative error on the last layer against stacked_matmul_fused_reference."""
    stacks, last = tuple(ws[n] for n in names), jnp.int32(ws[names[0]].shape[0] - 1)
    outs = jax.jit(functools.partial(launch_outputs, epilogue=epilogue, kernel=kernel,
                                     tuning=tuning))(h, stacks, last)
    ref = stacked_matmul_fused_reference(h, stacks, last, epilogue=epilogue)
    ref = (ref,) if epilogue else ref
    return max(rel_err(o, r) for o, r in zip(outs, ref))


def bench_launches(model: str, shape: dict, num_tokens: int, ws, copy_tbps: float,
                   args) -> list:
    """Each launch of LAUNCHES alone, for each kernel of --launch-kernels at its defaults and
    each setting of its sweep."""
    rows = []
    sweeps = {"triton": LAUNCH_SWEEP[:3] if args.quick else LAUNCH_SWEEP,
              "mgpu": MGPU_LAUNCH_SWEEP[:3] if args.quick else MGPU_LAUNCH_SWEEP, "xla": [],
              "auto": []}
    if args.mgpu_sweep == "split":
        sweeps["mgpu"] = MGPU_SPLIT_SWEEP
    elif args.mgpu_sweep == "ws":
        sweeps["mgpu"] = MGPU_WS_SWEEP
    kernels = [k.partition(":") for k in args.launch_kernels]  # "mgpu:4": its first 4 settings
    for launch, (d_in, names, epilogue) in LAUNCHES.items():
        if args.launches and launch not in args.launches:
            continue
        h = jax.random.normal(jax.random.key(num_tokens), (num_tokens, shape[d_in]),
                              jnp.float32).astype(ws["q"].dtype)
        weight_bytes = sum(ws[n].nbytes for n in names)
        for kernel, _, limit in kernels:
            scan = functools.partial(launch_scan, names=names, epilogue=epilogue, kernel=kernel)
            prefix = "launch" if kernel == "triton" else f"launch-{kernel}"
            sweep = sweeps[kernel][:int(limit)] if limit else sweeps[kernel]
            for label, fn, tuning in kernel_variants(prefix, scan, sweep, args.interpret,
                                                     with_tuning=True):
                row = measure(label, lambda x, fn=fn: fn(x, ws), h, weight_bytes, copy_tbps,
                              args)
                if row.pop("_out", None) is not None:
                    row["rel_err"] = launch_error(h, ws, names, epilogue, kernel, tuning)
                row.update(model=model, T=num_tokens, launch=launch, kernel=kernel, tuning={
                           k: v for k, v in tuning.items() if k != "interpret"},
                           weight_GB=weight_bytes / 1e9)
                print_row(f"{model} T={num_tokens} {launch} {label}", row)
                rows.append(row)
    return rows


def launch_summary(rows: list[dict]) -> str:
    """Per (model, T, launch): each kernel's defaults, and the best setting overall."""
    table = []
    for key in dict.fromkeys((r["model"], r["T"], r["launch"]) for r in rows if "launch" in r):
        group = [r for r in rows if (r["model"], r["T"], r.get("launch")) == key and "ms" in r]
        base = next((r for r in group if r["variant"] == "launch-default"), None)
        best = min(group, key=lambda r: r["ms"], default=None)
        picks = [r for r in group if r["variant"].endswith("-default")]
        if best is not None and best not in picks:
            picks.append({**best, "variant": "best " + best["variant"]})
        table += [[*key, r["variant"], r["ms"], r["of_copy"], r.get("rel_err"),
                   base["ms"] / r["ms"] if base else None] for r in picks]
    return format_table(["model", "T", "launch", "variant", "ms/scan", "of copy", "rel err",
                         "vs triton default"], table)


def kernel_variants(prefix: str, scan, sweep: list[dict], interpret: bool,
                    with_tuning: bool = False) -> list:
    """(label, jitted scan) for the defaults and each setting of `sweep` (with_tuning: (label,
    jitted scan, tuning))."""
    variants = []
    for tuning in [{}] + sweep:
        label = prefix + "-" + (",".join(f"{k}={v}" for k, v in tuning.items()) or "default")
        tuning = {**tuning, "interpret": True} if interpret else tuning
        fn = jax.jit(functools.partial(scan, tuning=tuning))
        variants.append((label, fn, tuning) if with_tuning else (label, fn))
    return variants


def time_calls(fn, x, min_calls: int, min_seconds: float) -> float:
    """Median seconds per call of x = fn(x), calls queued back to back (the host enqueues the
    next while the device runs one), over batches of `min_calls` and at least `min_seconds`."""
    jax.block_until_ready(fn(x))
    times: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        y = x
        for _ in range(min_calls):
            y = fn(y)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t0) / min_calls)
    return statistics.median(times)


def device_time_calls(fn, x, calls: int, reps: int = 3) -> tuple[float, float]:
    """(seconds per call of the stacked-matmul kernels alone, of every kernel) of x = fn(x),
    by the device's kernel time in a JAX profiler trace over `reps` chains of `calls`: without
    the launch gaps, and without what the benchmark adds around the launches (the row mean that
    chains the layers, XLA's sum of split partials, which the engine's add_rms_norm reads
    instead)."""
    from kernels import traced_kernel_seconds

    jax.block_until_ready(fn(x))
    t_end = time.perf_counter() + 0.1  # clocks up, as kernels.time_jax
    while time.perf_counter() < t_end:
        jax.block_until_ready(fn(x))

    def run():
        for _ in range(reps):
            y = x
            for _ in range(calls):
                y = fn(y)
            jax.block_until_ready(y)

    kernels = traced_kernel_seconds(run)
    matmul = sum(v for k, v in kernels.items() if k.startswith("stacked_matmul"))
    if not matmul:
        raise RuntimeError("the trace holds no stacked_matmul kernel (the device timer needs a "
                           "GPU and a Pallas launch)")
    return matmul / (reps * calls), sum(kernels.values()) / (reps * calls)


def copy_bandwidth(num_bytes: int, dtype, min_seconds: float) -> float:
    """Device-to-device copy bandwidth in TB/s, counting read + write (XLA's `a + 1`)."""
    a = jnp.ones((num_bytes // jnp.dtype(dtype).itemsize,), dtype)
    seconds = time_calls(jax.jit(lambda a: a + jnp.asarray(1, dtype)), a, 4, min_seconds)
    return 2 * a.nbytes / seconds / 1e12


def measure(name: str, fn, h: jax.Array, weight_bytes: int, copy_tbps: float, args) -> dict:
    row = {"variant": name}
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(h))
        row["compile_s"] = time.perf_counter() - t0
        if args.timer == "device":
            seconds, all_seconds = device_time_calls(fn, h, args.calls)
            row["ms_all_kernels"] = all_seconds * 1e3
        else:
            seconds = time_calls(fn, h, args.calls, args.min_seconds)
    except Exception as e:  # a tile setting the GPU cannot run: record it and go on
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        traceback.print_exc(limit=2)
        return row
    row["ms"] = seconds * 1e3
    row["weight_TBps"] = weight_bytes / seconds / 1e12
    row["of_copy"] = row["weight_TBps"] / copy_tbps
    row["_out"] = out
    return row


def print_row(prefix: str, row: dict) -> None:
    """One measured row on the console, without the keys the prefix already names."""
    print(f"{prefix}: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
        if k not in ("model", "T", "variant", "launch")), flush=True)


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_shape(model: str, shape: dict, num_tokens: int, ws, copy_tbps: float, args) -> list:
    weight_bytes = sum(w.nbytes for w in ws.values())
    h = jax.random.normal(jax.random.key(num_tokens), (num_tokens, shape["D"]), jnp.float32)
    h = h.astype(ws["q"].dtype)
    variants = []
    if "xla-scan" in args.variants:
        variants.append(("xla-scan", jax.jit(functools.partial(xla_scan, unroll=False))))
    if "xla-unroll" in args.variants:
        variants.append(("xla-unroll", jax.jit(functools.partial(xla_scan, unroll=True))))
    if "stacked" in args.variants:
        variants += kernel_variants("stacked", stacked_scan, QUICK_SWEEP if args.quick else SWEEP,
                                    args.interpret)
    if "fused" in args.variants:
        variants += kernel_variants("fused", fused_scan,
                                    QUICK_FUSED_SWEEP if args.quick else FUSED_SWEEP,
                                    args.interpret)
    # How far bf16 XLA itself is from f32 puts each kernel's distance from XLA in scale: after
    # L chained layers the roundings of two summation orders drift apart as far as bf16 does
    # from exact.
    exact = jax.jit(f32_scan)(h, ws)
    rows, baseline = [], None
    for name, fn in variants:
        row = measure(name, lambda x, fn=fn: fn(x, ws), h, weight_bytes, copy_tbps, args)
        out = row.pop("_out", None)
        if name == "xla-scan":
            baseline = out
        elif out is not None and baseline is not None:
            row["rel_err_vs_xla"] = rel_err(out, baseline)
        if out is not None:
            row["rel_err_vs_f32"] = rel_err(out, exact)
        row.update(model=model, T=num_tokens, weight_GB=weight_bytes / 1e9)
        print_row(f"{model} T={num_tokens} {name}", row)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> str:
    """Per (model, T): xla-scan, xla-unroll, and the defaults and best setting of stacked and
    of fused."""
    table = []
    for key in dict.fromkeys((r["model"], r["T"]) for r in rows):
        group = [r for r in rows if (r["model"], r["T"]) == key and "ms" in r]
        picks = [r for r in group if r["variant"].startswith("xla")]
        for kernel in ("stacked", "fused"):
            tuned = [r for r in group if r["variant"].startswith(kernel + "-")]
            best = min(tuned, key=lambda r: r["ms"], default=None)
            picks += [r for r in tuned if r["variant"] == kernel + "-default"]
            if best is not None and best["variant"] != kernel + "-default":
                picks.append({**best, "variant": "best " + best["variant"]})
        table += [[*key, r["variant"], r["ms"], r["weight_TBps"], r["of_copy"], r["compile_s"],
                   r.get("rel_err_vs_xla"), r.get("rel_err_vs_f32")] for r in picks]
    return format_table(["model", "T", "variant", "ms/scan", "weight TB/s", "of copy",
                         "compile s", "err vs xla", "err vs f32"], table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "launch"],
                   choices=list(VARIANTS))
    p.add_argument("--launch-kernels", nargs="+", default=["triton"],
                   help="kernels of the launch variant: triton, mgpu, auto, xla; KERNEL:N tries only "
                   "the first N settings of its sweep")
    p.add_argument("--launches", nargs="+", default=None, choices=list(LAUNCHES),
                   help="the launch variant times only these launches")
    p.add_argument("--mgpu-sweep", choices=("default", "split", "ws"), default="default",
                   help="the Mosaic GPU settings of the launch variant: MGPU_LAUNCH_SWEEP, "
                   "MGPU_SPLIT_SWEEP or MGPU_WS_SWEEP")
    p.add_argument("--quick", action="store_true", help=f"sweep {len(QUICK_SWEEP)} + "
                   f"{len(QUICK_FUSED_SWEEP)} settings, not {len(SWEEP)} + {len(FUSED_SWEEP)}")
    p.add_argument("--small", action="store_true", help="tiny shapes (for --interpret on a CPU)")
    p.add_argument("--interpret", action="store_true", help="run the Pallas interpreter")
    p.add_argument("--calls", type=int, default=10, help="scans queued per timed batch")
    p.add_argument("--min-seconds", type=float, default=0.5, help="timing per variant")
    p.add_argument("--json", default=None, help="file, or directory for the default name")
    p.add_argument("--timer", choices=("wall", "device"), default="wall",
                   help="wall: host clock over queued scans; device: the stacked-matmul "
                   "kernels' device time alone (profiler trace; Pallas kernels only)")
    args = p.parse_args()
    for name in args.launch_kernels:
        kernel, _, limit = name.partition(":")
        if kernel not in ("triton", "mgpu", "auto", "xla") or (limit and not limit.isdigit()):
            p.error(f"--launch-kernels {name!r}: expected triton, mgpu, auto or xla, "
                    "optionally :N")
    models = SMALL_MODELS if args.small else {m: MODELS[m] for m in args.models}
    args.models = list(models)
    if args.small:
        args.tokens = [t for t in args.tokens if t <= 32] or [8, 20]
        args.calls, args.min_seconds = min(args.calls, 2), min(args.min_seconds, 0.05)
    dtype = jnp.bfloat16
    env = env_info()
    result = {"env": env, "args": vars(args), "dtype": "bfloat16", "rows": []}
    copy_tbps = copy_bandwidth(1 << (20 if args.small else 31), dtype, args.min_seconds)
    result["copy_TBps"] = copy_tbps
    print(f"{env['card']}: copy bandwidth {copy_tbps:.3f} TB/s (read + write)", flush=True)
    default_name = f"stacked_matmul_{'_'.join(models)}_{slug(env['card'])}.json"
    for model, shape in models.items():
        ws = make_weights(shape, dtype)
        for num_tokens in args.tokens:
            if set(args.variants) - {"launch"}:
                result["rows"] += bench_shape(model, shape, num_tokens, ws, copy_tbps, args)
            if "launch" in args.variants:
                result["rows"] += bench_launches(model, shape, num_tokens, ws, copy_tbps, args)
            write_json(result, args.json, default_name)
        del ws
    path = write_json(result, args.json, default_name)
    print()
    print(f"{env['card']}, bf16, copy {copy_tbps:.2f} TB/s" + (f"; JSON: {path}" if path else ""))
    whole = [r for r in result["rows"] if "launch" not in r]
    if whole:
        print(summary(whole))
    if len(whole) < len(result["rows"]):
        print(launch_summary(result["rows"]))


if __name__ == "__main__":
    main()
