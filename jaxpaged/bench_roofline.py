"""The memory roofline of a decode step: every weight and every KV position the step attends
to is read once, at the device's copy bandwidth.

Copy bandwidth is measured as `benchmarks/kernels.py` does (bytes read + written, the faster
of XLA and torch): XLA adds 1 to a large buffer in a jitted chain with optimization barriers
(so the calls neither fuse nor overlap), torch runs `dst.copy_(src)`. That script's own
function is not imported because it is GPU-only with a fixed 2 GiB buffer and lives outside
the package; this one also runs on the CPU (smaller buffer, torch optional).
"""

import statistics
import time
from typing import Any

from jaxpaged.config import ModelConfig

GPU_COPY_BYTES = 2 << 30  # 2 GiB per buffer, as benchmarks/kernels.py
CPU_COPY_BYTES = 128 << 20


def weight_bytes_per_step(config: ModelConfig, itemsize: int) -> int:
    """Bytes of weights a step reads: every parameter, except that an untied input embedding
    is only gathered (a few rows), while the LM head reads its whole matrix."""
    params = config.num_params
    if not config.tie_word_embeddings:
        params -= config.vocab_size * config.hidden_size
    return params * itemsize


def kv_bytes_per_token(config: ModelConfig, itemsize: int) -> int:
    """K and V of one position in every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def _time_xla(nbytes: int, dtype_name: str, calls: int = 4, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    x = jnp.ones((nbytes // dtype.itemsize,), dtype)
    one = jnp.asarray(1, dtype)

    def chain(a):
        for _ in range(calls):
            a = jax.lax.optimization_barrier(a + one)
        return a

    fn = jax.jit(chain)
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append((time.perf_counter() - t0) / calls)
    del x
    return statistics.median(times)


def _time_torch(nbytes: int, reps: int = 10) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times)


def copy_bandwidth(nbytes: int | None = None) -> dict[str, Any]:
    """Device copy bandwidth in GB/s (read + written bytes over time), XLA and torch."""
    import jax

    on_cpu = jax.default_backend() == "cpu"
    nbytes = nbytes or (CPU_COPY_BYTES if on_cpu else GPU_COPY_BYTES)
    moved = 2 * nbytes  # read + write
    result: dict[str, Any] = {"buffer_bytes": nbytes}
    result["xla_GBps"] = moved / _time_xla(nbytes, "float32" if on_cpu else "bfloat16") / 1e9
    t_torch = _time_torch(nbytes)
    result["torch_GBps"] = moved / t_torch / 1e9 if t_torch else None
    result["best_GBps"] = max(v for v in (result["xla_GBps"], result["torch_GBps"]) if v)
    return result


def roofline(step_seconds: float, num_seqs: int, context_tokens: int, config: ModelConfig,
             itemsize: int, copy_GBps: float, num_devices: int = 1) -> dict[str, Any]:
    """Compare a measured decode step with (weights + KV read) / copy bandwidth. With tensor
    parallelism each of `num_devices` reads its share of both at the same time, so the bytes
    are per device."""
    w = weight_bytes_per_step(config, itemsize) // num_devices
    kv = context_tokens * kv_bytes_per_token(config, itemsize) // num_devices
    bound = (w + kv) / (copy_GBps * 1e9)
    return {"num_seqs": num_seqs, "context_tokens": context_tokens, "weight_bytes": w,
            "kv_bytes": kv, "copy_GBps": copy_GBps, "roofline_s": bound,
            "step_s": step_seconds, "step_over_roofline": step_seconds / bound}
