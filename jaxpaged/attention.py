"""The attention seam: write this step's keys and values into the paged cache, then attend.

The model calls `paged_attention` once per layer. The cache holds every layer,
`[L, P, B, K, H]`; kernels see one flat page pool `[L * P, B, K, H]` and block ids offset by
`layer * P`, which is a free reshape, so no layer slice of the cache is ever copied.
`impl` picks the implementation: "reference" (pure jnp, any backend) or "pallas".
"""

import dataclasses

import jax
import jax.numpy as jnp

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


def write_kv_reference(k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                       slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter k, v [T, K, H] into caches [P, B, K, H] at `slot_mapping`; -1 slots are dropped."""
    P, B, K, H = k_cache.shape
    # -1 becomes an out-of-range index, which mode="drop" skips.
    slots = jnp.where(slot_mapping < 0, P * B, slot_mapping)
    k_cache = k_cache.reshape(P * B, K, H).at[slots].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.reshape(P * B, K, H).at[slots].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache.reshape(P, B, K, H), v_cache.reshape(P, B, K, H)


def ragged_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               block_tables: jax.Array, kv_lens: jax.Array,
                               cu_q_lens: jax.Array, sm_scale: float) -> jax.Array:
    """Causal attention of flat tokens q [T, N, H] to their sequences' cached keys.

    Sequence s owns rows cu_q_lens[s]:cu_q_lens[s+1], which are the last q_len of its
    kv_lens[s] cached positions. Rows past cu_q_lens[-1] return zeros.
    """
    T, N, H = q.shape
    _, B, K, _ = k_cache.shape
    S, max_blocks = block_tables.shape
    t = jnp.arange(T)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, S - 1)  # i32[T]
    valid = t < cu_q_lens[S]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])  # i32[T]: each query's position
    keys = k_cache[block_tables[seq]].reshape(T, max_blocks * B, K, H)
    values = v_cache[block_tables[seq]].reshape(T, max_blocks * B, K, H)
    qg = q.reshape(T, K, N // K, H).astype(jnp.float32)
    scores = jnp.einsum("tkgh,tlkh->tkgl", qg, keys.astype(jnp.float32)) * sm_scale
    mask = (jnp.arange(max_blocks * B)[None, :] <= pos[:, None]) & valid[:, None]  # [T, L]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(jnp.where(valid[:, None, None, None], scores, 0.0), axis=-1)
    out = jnp.einsum("tkgl,tlkh->tkgh", probs, values.astype(jnp.float32))
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(T, N, H).astype(q.dtype)


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
        k_pool, v_pool = write_kv_reference(k, v, k_pool, v_pool, slots)
        out = ragged_attention_reference(q, k_pool, v_pool, block_tables, md.kv_lens,
                                         md.cu_q_lens, sm_scale)
    elif impl == "pallas":
        import pallas_kernels  # GPU kernels; imported lazily so the CPU path needs none of them

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
