"""The attention seam: write this step's keys and values into the paged cache, then attend.

The model calls `paged_attention` once per layer. The cache holds every layer,
`[L, P, B, K, H]`; kernels see one flat page pool `[L * P, B, K, H]` and block ids offset by
`layer * P`, which is a free reshape, so no layer slice of the cache is ever copied.
`impl` picks the implementation: "reference" (the kernels' pure-jnp references, any backend)
or "pallas" (the kernels; interpreted on the CPU). `mesh` (tensor parallelism, see
`jaxpaged.sharding`) runs either one per KV-head shard.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import pallas_kernels
from pallas_kernels.paged_decode_attention import apply_rotate_half
from jaxpaged.metadata import AttentionMetadata
from jaxpaged.settings import switch
from jaxpaged.sharding import KV_CACHE_SPEC, TP_AXIS

ATTENTION_IMPLS = ("reference", "pallas")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, P, B, K, H]
    v: jax.Array  # [L, P, B, K, H]

    @classmethod
    def zeros(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
              head_dim: int, dtype: jnp.dtype,
              sharding: NamedSharding | None = None) -> "KVCache":
        """With `sharding`, each device allocates only its own heads' share."""
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype, device=sharding),
                   jnp.zeros(shape, dtype, device=sharding))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def fused_kv_write_setting() -> bool:
    """JAXPAGED_FUSED_KV_WRITE: "1" (default) has the decode-attention kernel write this step's
    keys and values into the cache (one launch a layer instead of two, on decode-only steps);
    "0" runs the separate KV-write kernel first, as prefill and mixed steps always do. On an
    H100 (benchmarks/NOTES_engine.md, thirteenth session) it made llama-3.2-1b's step 3.49 ms
    against 3.53-3.54 ms, two interleaved rounds."""
    return switch("JAXPAGED_FUSED_KV_WRITE", True)


def fused_rope_setting() -> bool:
    """JAXPAGED_FUSED_ROPE: "1" (default) rotates q inside the decode kernel and k inside the
    KV-write kernel; "0" rotates both with XLA before the kernels (one fusion each a layer; kept
    to measure the difference). The reference impl always rotates with XLA."""
    return os.environ.get("JAXPAGED_FUSED_ROPE", "1") != "0"


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: KVCache,
                    layer: jax.Array | int, md: AttentionMetadata, impl: str = "reference",
                    mesh: Mesh | None = None,
                    rope: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache]:
    """q [T, N, H], k/v [T, K, H] of one layer -> (attention output [T, N, H], updated cache).
    `rope` (cos, sin f32[T, H]): q and k are rotate-half RoPE'd here first (None: they already
    are); the Pallas path does it inside its kernels (see fused_rope_setting).

    With a mesh (tensor parallelism) the same body runs once per shard through `shard_map`:
    q, k, v split on their head axis, the cache on K, the metadata replicated. Heads never
    meet across shards in attention, so no collective is needed here."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r}; allowed: {ATTENTION_IMPLS}")
    _, P, B, _, H = kv_cache.k.shape
    slots = jnp.where(md.slot_mapping < 0, -1, md.slot_mapping + layer * P * B)
    block_tables = md.block_tables + layer * P
    attend = functools.partial(_write_and_attend, impl=impl, decode_only=md.decode_only,
                               sm_scale=1.0 / (H ** 0.5),
                               fused_rope=impl == "pallas" and fused_rope_setting(),
                               fused_write=impl == "pallas" and fused_kv_write_setting())
    if mesh is not None:
        heads, rep = PartitionSpec(None, TP_AXIS, None), PartitionSpec()
        # check_vma off: pallas_call does not type its outputs as varying over the mesh axis.
        attend = jax.shard_map(attend, mesh=mesh, check_vma=False,
                               in_specs=(heads, heads, heads, KV_CACHE_SPEC, KV_CACHE_SPEC,
                                         rep, rep, rep, rep, rep),
                               out_specs=(heads, KV_CACHE_SPEC, KV_CACHE_SPEC))
    out, k_cache, v_cache = attend(q, k, v, kv_cache.k, kv_cache.v, slots, block_tables,
                                   md.kv_lens, md.cu_q_lens, rope)
    return out, KVCache(k_cache, v_cache)


def _write_and_attend(q, k, v, k_cache, v_cache, slots, block_tables, kv_lens, cu_q_lens, rope,
                      *, impl: str, decode_only: bool, sm_scale: float, fused_rope: bool,
                      fused_write: bool):
    """One shard's (or the whole model's) write + attention over the flat page pool."""
    L, P, B, K, H = k_cache.shape
    k_pool = k_cache.reshape(L * P, B, K, H)
    v_pool = v_cache.reshape(L * P, B, K, H)
    if rope is not None and not fused_rope:
        q, k = apply_rotate_half(q, *rope), apply_rotate_half(k, *rope)
        rope = None
    if impl == "reference":
        k_pool, v_pool = pallas_kernels.write_kv_cache_reference(k, v, k_pool, v_pool, slots)
        out = pallas_kernels.ragged_paged_attention_reference(
            q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, sm_scale=sm_scale)
    elif decode_only and fused_write:
        out, k_pool, v_pool = pallas_kernels.paged_decode_attention(
            q, k_pool, v_pool, block_tables, kv_lens, rope, (k, v, slots), sm_scale=sm_scale)
    else:
        k_pool, v_pool = pallas_kernels.write_kv_cache(k, v, k_pool, v_pool, slots, rope)
        if decode_only:
            out = pallas_kernels.paged_decode_attention(
                q, k_pool, v_pool, block_tables, kv_lens, rope, sm_scale=sm_scale)
        else:
            if rope is not None:  # the ragged kernel takes q already rotated
                q = apply_rotate_half(q, *rope)
            out = pallas_kernels.ragged_paged_attention(
                q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, sm_scale=sm_scale)
    return out, k_pool.reshape(L, P, B, K, H), v_pool.reshape(L, P, B, K, H)
