"""The attention seam: write this step's keys and values into the paged cache, then attend.

The model calls `paged_attention` once per layer. The cache holds every layer,
`[L, P, B, K, H]`; kernels see one flat page pool `[L * P, B, K, H]` and block ids offset by
`layer * P`, which is a free reshape, so no layer slice of the cache is ever copied.
`impl` picks the implementation: "reference" (the kernels' pure-jnp references, any backend)
or "pallas" (the kernels; interpreted on the CPU).
"""

import dataclasses

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxpaged.metadata import AttentionMetadata

ATTENTION_IMPLS = ("reference", "pallas")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, P, B, K, H]
    v: jax.Array  # [L, P, B, K, H]

    @classmethod
    def zeros(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
              head_dim: int, dtype: jnp.dtype) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: KVCache,
                    layer: jax.Array, md: AttentionMetadata,
                    impl: str = "reference") -> tuple[jax.Array, KVCache]:
    """q [T, N, H], k/v [T, K, H] of one layer -> (attention output [T, N, H], updated cache)."""
    L, P, B, K, H = kv_cache.k.shape
    k_pool = kv_cache.k.reshape(L * P, B, K, H)
    v_pool = kv_cache.v.reshape(L * P, B, K, H)
    slots = jnp.where(md.slot_mapping < 0, -1, md.slot_mapping + layer * P * B)
    block_tables = md.block_tables + layer * P
    sm_scale = 1.0 / (H ** 0.5)
    if impl == "reference":
        k_pool, v_pool = pallas_kernels.write_kv_cache_reference(k, v, k_pool, v_pool, slots)
        out = pallas_kernels.ragged_paged_attention_reference(
            q, k_pool, v_pool, block_tables, md.kv_lens, md.cu_q_lens, sm_scale=sm_scale)
    elif impl == "pallas":
        k_pool, v_pool = pallas_kernels.write_kv_cache(k, v, k_pool, v_pool, slots)
        if md.decode_only:
            out = pallas_kernels.paged_decode_attention(
                q, k_pool, v_pool, block_tables, md.kv_lens, sm_scale=sm_scale)
        else:
            out = pallas_kernels.ragged_paged_attention(
                q, k_pool, v_pool, block_tables, md.kv_lens, md.cu_q_lens, sm_scale=sm_scale)
    else:
        raise ValueError(f"attention impl={impl!r}; allowed: {ATTENTION_IMPLS}")
    new_cache = KVCache(k_pool.reshape(L, P, B, K, H), v_pool.reshape(L, P, B, K, H))
    return out, new_cache
