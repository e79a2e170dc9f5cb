"""Tensor parallelism on JAX's own sharding: the mesh, one PartitionSpec per parameter, the KV
cache's sharding and the checks that a model can be split.

Megatron-style over one mesh axis, `tp`: QKV and gate/up projections are column-parallel
(split on their output features), the output and down projections row-parallel (split on their
input features), the embedding and LM head vocabulary-parallel; norms are replicated. The KV
cache `[L, P, B, K, H]` is split on K, and the attention seam runs its kernels per shard through
`shard_map` (q split on N, k/v and the cache on K), so a shard only ever reads its own heads.
XLA inserts the all-reduces after the row-parallel matmuls; the stacked-weight decode path
(`models/llama.py`) runs its projection kernels per shard too, on slices given by `param_spec`,
and all-reduces with an explicit psum. The scheduler and block manager see none of this: page
ids mean the same on every shard.

Invariants:
  * tensor_parallel_size == 1 means no mesh at all: the unsharded code path, unchanged.
  * tp <= num_attention_heads; a larger tp is refused by `validate_tensor_parallel` (at least
    tp - N shards would hold nothing but padding).
  * Heads that do not split are padded with zero heads (`padded_head_counts`, `pad_heads`) to
    the fewest K' >= K KV heads with K' % tp == 0 or tp % K' == 0, and (K' * G) % tp == 0 for
    the group size G = N / K, which stays the same: N' = K' * G. The new KV heads and their G
    query heads are appended after the real ones, so query head n still meets KV head n // G;
    a padded query head attends to zero keys and values, outputs exactly 0 and meets zero rows
    of o_proj, so the model computes the same function. Padding costs K' / K - 1 more KV cache.
  * Then either K' % tp == 0 (KV heads split) or tp % K' == 0 (each KV head replicated tp / K'
    times, as vLLM does, so every shard holds exactly one).
  * A weight dimension that tp does not divide (an odd vocabulary or MLP width) is replicated
    instead of split: slower, never wrong.
"""

import dataclasses
import functools
import itertools
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpaged.config import ModelConfig

logger = logging.getLogger(__name__)

TP_AXIS = "tp"
# The KV cache [L, P, B, K, H] is split on its KV-head axis.
KV_CACHE_SPEC = PartitionSpec(None, None, None, TP_AXIS, None)
# Whole host tensors by parameter path, as weights.flatten_state returns them.
Flat = dict[tuple[str, ...], np.ndarray]

# Module name -> the axis of its weights split over the mesh, counted from the end so the
# stacked layer axis in front does not matter. Linear kernels are [in, out], biases [out],
# the embedding table [V, D].
_COLUMN, _ROW = -1, -2
_SPLIT_AXIS = {
    "q_proj": _COLUMN, "k_proj": _COLUMN, "v_proj": _COLUMN,
    "gate_proj": _COLUMN, "up_proj": _COLUMN,
    "o_proj": _ROW, "down_proj": _ROW,
    "embed_tokens": -2,  # [V, D]: vocabulary-parallel
    "lm_head": _COLUMN,  # [D, V]: vocabulary-parallel
}


def validate_tensor_parallel(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raise ValueError, naming both numbers, when tp exceeds the model's query heads. Any
    smaller tp works, by padding heads where they do not split (`padded_head_counts`)."""
    tp, N = tensor_parallel_size, config.num_attention_heads
    if tp > N:
        raise ValueError(
            f"tensor_parallel_size={tp} exceeds this model's num_attention_heads={N}: at least "
            f"{tp - N} shards would hold only zero padding heads; use at most {N}")


def padded_head_counts(config: ModelConfig, tensor_parallel_size: int) -> tuple[int, int]:
    """(N', K'): the query and KV head counts after zero-padding for tp shards, the group
    size G = N / K unchanged. (N, K) itself when the heads already split or replicate."""
    validate_tensor_parallel(config, tensor_parallel_size)
    tp, K = tensor_parallel_size, config.num_key_value_heads
    G = config.num_attention_heads // K
    # Ends by K' = tp * ceil(K / tp) at the latest, which satisfies both conditions.
    K2 = next(k for k in itertools.count(K) if (k % tp == 0 or tp % k == 0) and k * G % tp == 0)
    return K2 * G, K2


def make_mesh(tensor_parallel_size: int) -> Mesh | None:
    """A one-axis mesh over the first tp devices (all hosts' devices once
    `jax.distributed.initialize` has run); None for tp == 1."""
    if tensor_parallel_size == 1:
        return None
    devices = jax.devices()
    if tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} exceeds the {len(devices)} "
            f"{jax.default_backend()} devices visible to JAX")
    if jax.process_count() > 1 and tensor_parallel_size != len(devices):
        # Every process runs the same steps, so each must own a part of the mesh.
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size}: across {jax.process_count()} "
            f"processes it must equal the {len(devices)} devices they hold together")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP_AXIS,))


@functools.cache  # param_spec also runs at trace time (the stacked projections): say it once
def _say_replicated(path: str, axis: int, shape: tuple[int, ...], tp: int) -> None:
    logger.info("%s: dimension %d of %s is not divisible by tensor_parallel_size=%d; "
                "replicated", path, shape[axis], shape, tp)


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], tp: int) -> PartitionSpec:
    """The PartitionSpec of one parameter, from its path (e.g. layers/self_attn/q_proj/kernel)."""
    module = next((p for p in reversed(path) if p in _SPLIT_AXIS), None)
    if module is None or (path[-1] == "bias" and _SPLIT_AXIS[module] == _ROW):
        return PartitionSpec()  # norms, and row-parallel biases (added after the all-reduce)
    axis = len(shape) - 1 if path[-1] == "bias" else len(shape) + _SPLIT_AXIS[module]
    if shape[axis] % tp:
        _say_replicated("/".join(path), axis, tuple(shape), tp)
        return PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    spec[axis] = TP_AXIS
    return PartitionSpec(*spec)


def param_shardings(params, mesh: Mesh):
    """A pytree of NamedSharding matching `params` (an nnx.State)."""
    tp = mesh.shape[TP_AXIS]

    def sharding(path, leaf) -> NamedSharding:
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        names = names[:-1] if names[-1] == "value" else names  # the nnx.Variable's field
        return NamedSharding(mesh, param_spec(names, leaf.shape, tp))

    return jax.tree_util.tree_map_with_path(sharding, params)


def kv_cache_sharding(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, KV_CACHE_SPEC)


def gather_logits(logits: jax.Array, mesh: Mesh) -> jax.Array:
    """[R, V] logits of the vocabulary-parallel head -> replicated on every device. Pinning
    them split on V first makes XLA gather R x V logits, not the V x D head's weights."""
    if logits.shape[-1] % mesh.shape[TP_AXIS] == 0:
        logits = jax.lax.with_sharding_constraint(
            logits, NamedSharding(mesh, PartitionSpec(None, TP_AXIS)))
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))


def load_mesh(config: ModelConfig, mesh: Mesh | None) -> Mesh | None:
    """The mesh a loader places weights on as it reads them: None without one, or when heads
    must be padded or KV heads replicated first (`shard_model` does both from whole tensors).
    Validates before any weight is read, so a model that cannot be split fails fast."""
    if mesh is None:
        return None
    tp = mesh.shape[TP_AXIS]
    _, K2 = padded_head_counts(config, tp)
    return mesh if K2 == config.num_key_value_heads and K2 % tp == 0 else None


def pad_heads(flat: Flat, config: ModelConfig, tensor_parallel_size: int
              ) -> tuple[Flat, ModelConfig]:
    """Append zero heads up to `padded_head_counts`: (N' - N) * H zero output columns of
    q_proj, (K' - K) * H of k_proj and v_proj (kernels [.., D, out] and biases [.., out]),
    (N' - N) * H zero input rows of o_proj [.., N * H, D]. -> (new flat, padded config);
    the same objects when nothing needs padding."""
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    N2, K2 = padded_head_counts(config, tensor_parallel_size)
    if K2 == K:
        return flat, config
    extra = {"q_proj": (N2 - N) * H, "k_proj": (K2 - K) * H, "v_proj": (K2 - K) * H}
    padded = dict(flat)
    for path, arr in flat.items():
        module, leaf = path[-2], path[-1]
        if module in extra:
            axis, width = arr.ndim - 1, extra[module]  # output features, kernel or bias
        elif module == "o_proj" and leaf == "kernel":
            axis, width = arr.ndim - 2, (N2 - N) * H  # input features
        else:
            continue
        pad = [(0, 0)] * arr.ndim
        pad[axis] = (0, width)
        padded[path] = np.pad(arr, pad)
    logger.warning("num_attention_heads=%d and num_key_value_heads=%d do not split over "
                   "tensor_parallel_size=%d: padded with zero heads to %d and %d (same outputs; "
                   "the KV cache holds %.0f%% more per token)", N, K, tensor_parallel_size, N2,
                   K2, 100 * (K2 / K - 1))
    return padded, dataclasses.replace(config, num_attention_heads=N2, num_key_value_heads=K2,
                                       head_dim=H)


def replicate_kv_heads(flat: Flat, config: ModelConfig, tensor_parallel_size: int
                       ) -> tuple[Flat, ModelConfig]:
    """When tp is a multiple of K, repeat each KV head tp / K times in k_proj and v_proj (and
    their biases), as vLLM does, so every shard holds one. Query head n still meets KV head
    n // (N / K): the copies sit next to each other. -> (new flat, config with K = tp); the
    same objects when K splits."""
    tp, K, H = tensor_parallel_size, config.num_key_value_heads, config.head_dim
    if K % tp == 0:
        return flat, config
    repeats = tp // K
    replicated = dict(flat)
    for path, arr in flat.items():
        if path[-2] in ("k_proj", "v_proj"):
            heads = arr.reshape(*arr.shape[:-1], K, H)
            replicated[path] = np.repeat(heads, repeats, axis=-2).reshape(*arr.shape[:-1],
                                                                          tp * H)
    logger.info("num_key_value_heads=%d < tensor_parallel_size=%d: each KV head replicated %d "
                "times (the KV cache holds %d heads)", K, tp, repeats, tp)
    return replicated, dataclasses.replace(config, num_key_value_heads=tp)


def shard_model(loaded, mesh: Mesh | None):
    """Validate, pad heads and replicate KV heads where needed, and place the parameters on
    the mesh (a no-op for parameters a loader already placed there). -> a LoadedModel whose
    params are sharded jax.Arrays (the same object for mesh None)."""
    from jaxpaged.weights import flatten_state, to_state

    if mesh is None:
        return loaded
    tp = mesh.shape[TP_AXIS]
    if load_mesh(loaded.config, mesh) is None:  # validates; None: heads to pad or replicate
        flat, config = pad_heads(flatten_state(loaded.params), loaded.config, tp)
        flat, config = replicate_kv_heads(flat, config, tp)
        # Straight from the host to the shards: no device holds the whole model.
        graphdef, params = to_state(config, flat, loaded.dtype, mesh)
        return dataclasses.replace(loaded, config=config, graphdef=graphdef, params=params)
    params = jax.device_put(loaded.params, param_shardings(loaded.params, mesh))
    return dataclasses.replace(loaded, params=params)


def initialize_distributed() -> None:
    """Join a multi-host JAX runtime when JAXPAGED_COORDINATOR_ADDRESS, JAXPAGED_NUM_PROCESSES
    and JAXPAGED_PROCESS_ID are set (see docs/tensor_parallel.md); otherwise do nothing. Must
    run before anything touches a JAX device."""
    address = os.environ.get("JAXPAGED_COORDINATOR_ADDRESS")
    if address is None or jax.distributed.is_initialized():
        return
    try:
        num_processes = int(os.environ["JAXPAGED_NUM_PROCESSES"])
        process_id = int(os.environ["JAXPAGED_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"JAXPAGED_COORDINATOR_ADDRESS={address!r} is set, so "
                         f"JAXPAGED_NUM_PROCESSES and JAXPAGED_PROCESS_ID must be integers "
                         f"({e})") from None
    jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
