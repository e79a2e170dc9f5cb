"""Ragged paged attention: prefill chunks, prefix-cache hits and decodes of many sequences in one launch.

Lowering: Pallas with the Triton backend (``plt.CompilerParams``), as in paged_decode_attention.py.

Design (after vLLM's triton_unified_attention and tpu-inference's ragged paged attention):
- Work is cut into q-blocks of ``block_q`` consecutive tokens of one sequence. A q-block times the
  Gp (G padded to a power of two) query heads sharing a kv head is one ``block_m = block_q * Gp``
  row tile, so each K/V tile loaded from the cache serves the whole GQA group.
- grid (K kv heads, q-blocks). The q-block -> (sequence, first token) map is a few tiny XLA ops
  over ``cu_q_lens`` (XLA dedupes them across layers); there are ``cdiv(T, block_q) + S`` program
  slots, which always leaves enough spare slots to zero-fill the padding rows past
  ``cu_q_lens[S]``, so every output row is written by exactly one program.
- KV tiles entirely at or below the q-block's first position need no causal mask and run in a
  separate unmasked loop; only the diagonal tiles pay for masking.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.paged_decode_attention import (LOG2E, _check_shapes, _next_pow2, _use_interpret,
                                                   masked_attention_reference)

# Rows of per-program metadata, each i32[num_programs].
_Q_START, _Q_END, _POS0, _KV_LEN, _SEQ = range(5)


def _ragged_kernel(
    meta_ref,  # i32[5 * num_programs]
    q_ref,  # [T*N, H]
    k_ref,  # [P*B*K, H]
    v_ref,  # [P*B*K, H]
    bt_ref,  # i32[S*max_blocks]
    o_ref,  # [T*N, H]
    *,
    sm_scale: float,
    num_programs: int,
    num_heads: int,
    num_kv_heads: int,
    group: int,
    group_pad: int,
    block_size: int,
    max_blocks: int,
    block_m: int,
    block_n: int,
):
    kh, p = pl.program_id(0), pl.program_id(1)
    head_dim = q_ref.shape[-1]
    block_q = block_m // group_pad
    q_start = meta_ref[_Q_START * num_programs + p]
    q_end = meta_ref[_Q_END * num_programs + p]
    pos0 = meta_ref[_POS0 * num_programs + p]  # cache position of the q-block's first token
    kv_len = meta_ref[_KV_LEN * num_programs + p]
    seq = meta_ref[_SEQ * num_programs + p]
    cols = jnp.arange(head_dim)[None, :]

    r = jnp.arange(block_m)
    tok, g = jax.lax.div(r, group_pad), jax.lax.rem(r, group_pad)
    row_ok = (q_start + tok < q_end) & (g < group)
    q_rows = (q_start + tok) * num_heads + kh * group + g  # [BM]
    q = plt.load(q_ref.at[q_rows[:, None], cols], mask=row_ok[:, None], other=0.0)
    q_pos = (pos0 + tok)[:, None]  # [BM, 1]
    qk_scale = sm_scale * LOG2E

    # Keys this q-block can see end at its last real token (causal) and at kv_len.
    hi = jnp.minimum(kv_len, pos0 + jnp.minimum(block_q, q_end - q_start))
    hi = jnp.maximum(hi, 0)
    num_full = jnp.minimum((pos0 + 1) // block_n, hi // block_n)
    num_tiles = pl.cdiv(hi, block_n)

    def tile(j, carry, masked: bool):
        acc, m, l = carry
        pos = j * block_n + jnp.arange(block_n)
        if masked:
            ok = pos < hi
            page = plt.load(bt_ref.at[seq * max_blocks + jax.lax.div(pos, block_size)], mask=ok, other=0)
            rows = ((page * block_size + jax.lax.rem(pos, block_size)) * num_kv_heads + kh)[:, None]
            k = plt.load(k_ref.at[rows, cols], mask=ok[:, None], other=0.0)
            v = plt.load(v_ref.at[rows, cols], mask=ok[:, None], other=0.0)
        else:
            page = bt_ref[seq * max_blocks + jax.lax.div(pos, block_size)]
            rows = ((page * block_size + jax.lax.rem(pos, block_size)) * num_kv_heads + kh)[:, None]
            k = k_ref[rows, cols]
            v = v_ref[rows, cols]
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        scores = scores * qk_scale  # [BM, BN], base 2
        if masked:
            scores = jnp.where((pos[None, :] <= q_pos) & ok[None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        prob = jnp.exp2(scores - m_new[:, None])
        l = l * alpha + prob.sum(axis=1)
        pv = jnp.dot(prob.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    carry = (
        jnp.zeros((block_m, head_dim), jnp.float32),
        jnp.full((block_m,), -jnp.inf, jnp.float32),
        jnp.zeros((block_m,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, num_full, functools.partial(tile, masked=False), carry)
    acc, _, l = jax.lax.fori_loop(num_full, num_tiles, functools.partial(tile, masked=True), carry)
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]  # spare programs: l == 0 -> zero rows
    plt.store(o_ref.at[q_rows[:, None], cols], out.astype(o_ref.dtype), mask=row_ok[:, None])


def _program_metadata(
    kv_lens: jax.Array, cu_q_lens: jax.Array, num_tokens: int, block_q: int, num_programs: int
) -> jax.Array:
    """i32[5 * num_programs]: q_start, q_end, pos0, kv_len, seq of every program slot.

    Slots past the last real q-block zero-fill the padding rows [cu_q_lens[S], T). Slots are
    numbered backwards so that the first to launch are the late q-blocks of the last sequences,
    which see the most keys: long programs first keeps the causal tail of the launch short.
    """
    num_seqs = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(pl.cdiv(q_lens, block_q))])
    slot = num_programs - 1 - jnp.arange(num_programs, dtype=jnp.int32)
    # compare_all is one fused op; the default binary search is an XLA while loop, which on the GPU
    # costs a host round trip per step (measured: 8 x 512-token prefill ran 2x slower).
    seq = jnp.searchsorted(cu_blocks[1:], slot, side="right", method="compare_all").astype(jnp.int32)
    real = seq < num_seqs
    seq_c = jnp.minimum(seq, num_seqs - 1)
    first = (slot - cu_blocks[seq_c]) * block_q  # offset of the q-block inside its sequence
    spare_start = cu_q_lens[num_seqs] + (slot - cu_blocks[num_seqs]) * block_q
    meta = [
        jnp.where(real, cu_q_lens[seq_c] + first, spare_start),
        jnp.where(real, cu_q_lens[seq_c + 1], num_tokens),
        jnp.where(real, kv_lens[seq_c] - q_lens[seq_c] + first, 0),
        jnp.where(real, kv_lens[seq_c], 0),
        seq_c,
    ]
    return jnp.concatenate(meta).astype(jnp.int32)


def default_tiles(num_tokens: int, num_seqs: int, group_pad: int, head_dim: int) -> tuple[int, int, int]:
    """(block_m, block_n, num_stages) from static shapes, fitted to H100 sweeps (NOTES_kernels.md).

    Tokens per q-block: 32 when the average chunk is long (>= 4096 tokens: more reuse of each
    K/V tile), else 16 (more programs for short chunks and few kv heads); one token per q-block
    when most sequences bring a single token (decode-like). 128-key tiles (2 stages, to fit
    shared memory) pay off only for head dim <= 64 and chunks >= 2048 tokens.
    """
    avg_q_len = num_tokens / max(num_seqs, 1)
    if avg_q_len < 8:
        return max(16, group_pad), 64, 3
    block_q = 32 if avg_q_len >= 4096 else 16
    block_m = max(group_pad, min(128, max(16, group_pad * block_q)))
    if head_dim <= 64 and avg_q_len >= 2048:
        return block_m, 128, 2
    return block_m, 64, 3


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "interpret", "block_m", "block_n", "num_warps", "num_stages"),
)
def ragged_paged_attention_tuned(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> jax.Array:
    """``ragged_paged_attention`` with its tile and launch parameters exposed (for benchmarks)."""
    _check_shapes(q, k_cache, v_cache, block_tables)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    if cu_q_lens.shape != (num_seqs + 1,) or kv_lens.shape != (num_seqs,):
        raise ValueError(
            f"need kv_lens i32[S] and cu_q_lens i32[S+1] for S={num_seqs}; "
            f"got {kv_lens.shape} and {cu_q_lens.shape}"
        )
    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    default_m, default_n, default_stages = default_tiles(num_tokens, num_seqs, group_pad, head_dim)
    block_m = default_m if block_m is None else block_m
    block_n = default_n if block_n is None else block_n
    num_stages = default_stages if num_stages is None else num_stages
    if block_m < 16 or block_m % group_pad or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= max(16, {group_pad})")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if num_tokens == 0:
        return q
    block_q = block_m // group_pad
    num_programs = pl.cdiv(num_tokens, block_q) + num_seqs
    meta = _program_metadata(
        kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32), num_tokens, block_q, num_programs
    )
    kernel = functools.partial(
        _ragged_kernel,
        sm_scale=float(sm_scale),
        num_programs=num_programs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        group=group,
        group_pad=group_pad,
        block_size=block_size,
        max_blocks=max_blocks,
        block_m=block_m,
        block_n=block_n,
    )
    out = pl.pallas_call(
        kernel,
        # CUDA starts blocks x-fastest: all kv heads of one q-block together, q-blocks in slot
        # order, and slots run from the costliest q-block (see _program_metadata).
        grid=(num_kv_heads, num_programs),
        out_shape=jax.ShapeDtypeStruct((num_tokens * num_heads, head_dim), q.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_use_interpret(interpret),
        name="ragged_paged_attention",
    )(
        meta,
        q.reshape(-1, head_dim),
        k_cache.reshape(-1, head_dim),
        v_cache.reshape(-1, head_dim),
        block_tables.astype(jnp.int32).reshape(-1),
    )
    return out.reshape(q.shape)


def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [P, B, K, H]
    v_cache: jax.Array,  # [P, B, K, H]
    block_tables: jax.Array,  # i32[S, max_blocks]
    kv_lens: jax.Array,  # i32[S]
    cu_q_lens: jax.Array,  # i32[S+1]
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H] in q.dtype; rows >= cu_q_lens[S] are 0
    """Causal attention of each sequence's q_len newest tokens over its kv_lens[s] cached positions."""
    return ragged_paged_attention_tuned(
        q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, sm_scale=sm_scale, interpret=interpret
    )


def ragged_paged_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pure-jnp ragged attention: every token against its own sequence's gathered pages."""
    del interpret
    _check_shapes(q, k_cache, v_cache, block_tables)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if num_tokens == 0:
        return q
    t = jnp.arange(num_tokens)
    seq = jnp.searchsorted(cu_q_lens, t, side="right", method="compare_all") - 1
    seq = jnp.clip(seq, 0, num_seqs - 1)  # [T]
    real = t < cu_q_lens[num_seqs]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    q_pos = kv_lens[seq] - q_lens[seq] + (t - cu_q_lens[seq])  # [T]
    k = k_cache[block_tables[seq]].reshape(num_tokens, -1, num_kv_heads, head_dim).astype(jnp.float32)
    v = v_cache[block_tables[seq]].reshape(num_tokens, -1, num_kv_heads, head_dim).astype(jnp.float32)
    kv_pos = jnp.arange(k.shape[1])
    valid = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_lens[seq][:, None]) & real[:, None]
    return masked_attention_reference(q, k, v, valid, sm_scale)
