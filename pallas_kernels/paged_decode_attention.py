"""Paged decode attention: one new query token per sequence against a paged KV cache.

Lowering: Pallas with the Triton backend (``plt.CompilerParams``). It is the lowering that runs
both in the CPU interpreter and on the H100 with gathered (paged) loads; see
benchmarks/NOTES_kernels.md for the measurements behind the choice.

Design (after vLLM's unified attention and FlashDecoding):
- grid (K kv heads, S sequences, splits), kv heads fastest: the K programs of a sequence run
  together and read the same pages (1-2% faster than sequences fastest at batch 256 on the
  H100, NOTES_kernels). The G = N / K query heads that share a kv head are packed into the M
  dimension of the matmuls and padded to Gp >= 16 rows (Triton's minimum).
- With ``rope`` (cos, sin per sequence), q is rotated (rotate-half RoPE) after its load, so the
  model launches no separate RoPE kernel for it.
- With ``write`` (this step's k, v and slots), the kernel also writes the new row into the
  cache (aliased, in place) and attends it as the softmax's starting state, its cache reads
  stopping one position short; one launch instead of the KV write's and this one.
- Tiles of 32 keys at head dim 64 or less, 64 above (``default_block_n``): over a pool of more
  than 4 GiB the Triton lowering computes 64-bit offsets, and 64 keys at head dim 64 then need
  one register too many for 8 programs an SM.
- Pages are followed at token granularity: each of the ``block_n`` keys of a tile looks up its
  page in the block table, so any block size works and a tile may span several pages.
- When S * K programs cannot fill the GPU, the KV length is split across ``splits`` programs,
  each taking an equal share of the step's longest row (not of the block table's width, which
  follows max_model_len); each writes its normalised partial output and base-2 log-sum-exp,
  merged afterwards.
- All loads and stores use integer-array indexers so that masked accesses behave the same in
  the interpreter and on the GPU: masked keys read as 0 and never touch unused cache slots,
  which may hold anything (NaN in the tests).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

LOG2E = math.log2(math.e)
# Measured on the H100 (benchmarks/NOTES_kernels.md): with 256 or more (sequence, kv head)
# programs one launch keeps the GPU busy and splitting only adds the merge; below that, split
# the KV length until about 512 programs run, each with at least 128 keys.
_SPLIT_BELOW_PROGRAMS = 256
_TARGET_PROGRAMS = 512
_MIN_SPLIT_TOKENS = 128


def default_block_n(head_dim: int) -> int:
    """Keys per tile: 32 at head dim 64 or less, else 64; JAXPAGED_DECODE_BLOCK_N overrides.

    Measured on the H100 at the engine's batch-256 shapes (benchmarks/NOTES_kernels.md, twelfth
    session): with a page pool over 4 GiB, as the engine's, Pallas's Triton lowering computes
    64-bit offsets and the head-dim-64 kernel at 64 keys a tile takes 65 registers, losing an
    eighth of its occupancy (llama-3.2-1b's shape: 125 us against 119 with a small pool); at 32
    keys it takes 118 us. At head dim 128 the two tiles measure the same."""
    setting = os.environ.get("JAXPAGED_DECODE_BLOCK_N")
    if setting is not None:
        if setting not in ("16", "32", "64", "128"):
            raise ValueError(f"JAXPAGED_DECODE_BLOCK_N={setting!r}; allowed: 16, 32, 64, 128")
        return int(setting)
    return 32 if head_dim <= 64 else 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _use_interpret(interpret: bool) -> bool:
    # Callers on a CPU-only host get the interpreter without asking.
    return interpret or jax.default_backend() == "cpu"


def _check_shapes(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array) -> None:
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [P, B, K, H]; got {k_cache.shape} and {v_cache.shape}")
    num_heads, head_dim = q.shape[-2:]
    _, _, num_kv_heads, cache_head_dim = k_cache.shape
    if head_dim != cache_head_dim:
        raise ValueError(f"q head dim {head_dim} != cache head dim {cache_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads N={num_heads} must be a multiple of kv heads K={num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim H={head_dim} must be a power of two >= 16 (Triton tile rule)")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be i32[S, max_blocks]; got shape {block_tables.shape}")


def _check_rope(rope, num_rows: int, head_dim: int) -> None:
    if rope is None:
        return
    if len(rope) != 2 or any(t.shape != (num_rows, head_dim) for t in rope):
        raise ValueError(f"rope must be (cos, sin), each [{num_rows}, {head_dim}]; got "
                         f"{[getattr(t, 'shape', None) for t in rope]}")


def _check_write(write, num_seqs: int, k_cache: jax.Array) -> None:
    if write is None:
        return
    _, _, num_kv_heads, head_dim = k_cache.shape
    if len(write) != 3:
        raise ValueError("write must be (k, v, slot_mapping)")
    k, v, slots = write
    if k.shape != (num_seqs, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"write's k and v must both be [S={num_seqs}, K={num_kv_heads}, "
                         f"H={head_dim}]; got {k.shape} and {v.shape}")
    if slots.shape != (num_seqs,):
        raise ValueError(f"write's slot_mapping must be i32[S={num_seqs}]; got shape {slots.shape}")


def apply_rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout) of x [T, heads, H] with cos, sin [T, H],
    computed in f32 and rounded to x's dtype: the kernels' reference."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, None, :] + rotated.astype(jnp.float32) * sin[:, None, :]
    return out.astype(x.dtype)


def rotate_half_in_kernel(load, cols, cos, sin, dtype, x=None):
    """Rotate-half RoPE inside a Triton kernel, as ``apply_rotate_half`` (f32, then rounded to
    ``dtype``): ``load(c)`` loads the rows at head columns ``c`` [1, H], once as they are (unless
    given as ``x``) and once with the halves swapped; cos and sin broadcast against them."""
    head_dim = cols.shape[-1]
    half = head_dim // 2
    x = load(cols) if x is None else x
    x_swap = load(jax.lax.rem(cols + half, head_dim))
    sin = jnp.where(cols < half, -1.0, 1.0) * sin
    return (x.astype(jnp.float32) * cos + x_swap.astype(jnp.float32) * sin).astype(dtype)


def _decode_kernel(
    q_ref,  # [S*N, H]
    k_ref,  # [P*B*K, H]
    v_ref,  # [P*B*K, H]
    bt_ref,  # i32[S*max_blocks]
    lens_ref,  # i32[S]
    *refs,  # [i32[1] tokens a split when split], [cos, sin f32[S, H] with rope],
    #         [new k, new v [S*K, H], slots i32[S] with write],
    #         o [S*N, H] or f32[splits*S*N, H], [lse when split], [k, v caches out with write]
    rope: bool,
    write: bool,
    sm_scale: float,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    group: int,
    group_pad: int,
    block_size: int,
    max_blocks: int,
    block_n: int,
    split_tokens: int | None,
    heads_fastest: bool,
):
    if heads_fastest:
        kh, s, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    else:
        s, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[-1]
    kv_len = lens_ref[s]
    cols = jnp.arange(head_dim)[None, :]

    refs = list(refs)
    if split_tokens is None:  # split: the tokens a split covers, from this step's longest row
        split_tokens = refs.pop(0)[0]
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
    kn_ref, vn_ref, slot_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if write else (None,) * 3
    ko_ref, vo_ref = (refs.pop(-2), refs.pop(-1)) if write else (None, None)
    o_ref, *lse_ref = refs

    g = jnp.arange(group_pad)
    row_ok = g < group
    q_rows = s * num_heads + kh * group + g  # [Gp]
    def load_q(c):
        return plt.load(q_ref.at[q_rows[:, None], c], mask=row_ok[:, None], other=0.0)

    # Every load of the prologue is issued before any arithmetic waits on one, so their
    # latencies overlap instead of adding up before the loop's first loads.
    swapped = jax.lax.rem(cols + head_dim // 2, head_dim)  # rotate-half's other half
    q = load_q(cols)
    if rope:  # at this sequence's position
        q_swap = load_q(swapped)
        at_s = (jnp.zeros_like(cols) + s, cols)
        cos, sin = plt.load(cos_ref.at[at_s]), plt.load(sin_ref.at[at_s])
    if write:
        new_at = (jnp.zeros_like(cols) + (s * num_kv_heads + kh), cols)
        k_new = plt.load(kn_ref.at[new_at])  # [1, H]
        k_swap = plt.load(kn_ref.at[new_at[0], swapped]) if rope else None
        v_new = plt.load(vn_ref.at[new_at]).astype(vo_ref.dtype)
        slot = slot_ref[s]
    if rope:
        q = rotate_half_in_kernel(lambda _: q_swap, cols, cos, sin, q_ref.dtype, x=q)

    start = sp * split_tokens
    end = jnp.minimum(kv_len, start + split_tokens)
    qk_scale = sm_scale * LOG2E  # scores in base 2 so the softmax uses exp2
    init = (
        jnp.zeros((group_pad, head_dim), jnp.float32),
        jnp.full((group_pad,), -jnp.inf, jnp.float32),
        jnp.zeros((group_pad,), jnp.float32),
    )
    if write:
        # This step's key and value of (sequence, kv head): stored into the cache slot by the
        # split that holds the last position, and attended first, as the running softmax's
        # starting state, so nothing extra stays live across the loop (held in registers through
        # it, the first version cost occupancy: NOTES_kernels, twelfth session). The cache reads
        # stop before that position, so no program reads a row while it is written. A row
        # without a slot (padding, or a row frozen in a multi-step window) reads its last
        # position from the cache as before.
        if rope:
            k_new = rotate_half_in_kernel(lambda _: k_swap, cols, cos, sin, ko_ref.dtype, x=k_new)
        k_new = k_new.astype(ko_ref.dtype)
        last = kv_len - 1
        fresh = slot >= 0
        mine = fresh & (start <= last) & (last < start + split_tokens)
        dst_at = (jnp.zeros_like(cols) + jnp.where(mine, slot * num_kv_heads + kh, 0), cols)
        store_mask = mine & (cols >= 0)
        plt.store(ko_ref.at[dst_at], k_new, mask=store_mask)
        plt.store(vo_ref.at[dst_at], v_new, mask=store_mask)
        end = jnp.where(fresh, jnp.minimum(end, last), end)
        # One key: m = its score, l = exp2(0) = 1, acc = 1 * v (p rounded as the tiles round it).
        score = (q.astype(jnp.float32) * k_new.astype(jnp.float32)).sum(axis=1) * qk_scale  # [Gp]
        init = (jnp.where(mine, v_new.astype(jnp.float32), 0.0) + init[0],
                jnp.where(mine, score, init[1]), jnp.where(mine, 1.0, init[2]))
    num_tiles = pl.cdiv(jnp.maximum(end - start, 0), block_n)

    def body(j, carry):
        acc, m, l = carry
        pos = start + j * block_n + jnp.arange(block_n)  # [BN] cache positions
        valid = pos < end
        page = plt.load(bt_ref.at[s * max_blocks + jax.lax.div(pos, block_size)], mask=valid, other=0)
        rows = ((page * block_size + jax.lax.rem(pos, block_size)) * num_kv_heads + kh)[:, None]
        k = plt.load(k_ref.at[rows, cols], mask=valid[:, None], other=0.0)  # [BN, H]
        v = plt.load(v_ref.at[rows, cols], mask=valid[:, None], other=0.0)
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        scores = jnp.where(valid[None, :], scores * qk_scale, -jnp.inf)  # [Gp, BN]
        m_new = jnp.maximum(m, scores.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(scores - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    acc, m, l = jax.lax.fori_loop(0, num_tiles, body, init)
    # An empty range (padded row, or a split past the end) leaves l == 0: write 0, never 0/0.
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    if not lse_ref:
        plt.store(o_ref.at[q_rows[:, None], cols], out.astype(o_ref.dtype), mask=row_ok[:, None])
        return
    part_rows = sp * (num_seqs * num_heads) + q_rows
    plt.store(o_ref.at[part_rows[:, None], cols], out, mask=row_ok[:, None])
    lse = jnp.where(l > 0.0, m + jnp.log2(jnp.where(l > 0.0, l, 1.0)), -jnp.inf)
    plt.store(lse_ref[0].at[part_rows], lse, mask=row_ok)


def _merge_splits(parts: jax.Array, lse: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Log-sum-exp merge of per-split outputs: parts f32[splits, S, N, H], lse f32[splits, S, N]."""
    lse_max = lse.max(axis=0)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp2(lse - lse_max[None])  # empty splits weigh exactly 0
    denom = w.sum(axis=0)
    # Written as broadcast-multiply-and-reduce, not einsum: XLA fuses it into one reduction instead
    # of launching a batched matmul for a tiny contraction.
    out = (w[..., None] * parts).sum(axis=0) / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    return out.astype(dtype)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_tokens: int, block_n: int) -> int:
    """KV splits per (sequence, kv head) so that small batches still fill the GPU."""
    programs = num_seqs * num_kv_heads
    if programs >= _SPLIT_BELOW_PROGRAMS:
        return 1
    most = max(1, max_tokens // max(_MIN_SPLIT_TOKENS, block_n))
    return max(1, min(pl.cdiv(_TARGET_PROGRAMS, programs), most))


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "interpret", "block_n", "num_splits", "num_warps", "num_stages",
                     "heads_fastest"),
)
def paged_decode_attention_tuned(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    write: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    heads_fastest: bool = True,
):
    """``paged_decode_attention`` with its tile and launch parameters exposed (for benchmarks);
    ``block_n`` None: ``default_block_n``."""
    _check_shapes(q, k_cache, v_cache, block_tables)
    num_seqs, num_heads, head_dim = q.shape
    num_pages, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    if block_tables.shape[0] != num_seqs or kv_lens.shape != (num_seqs,):
        # One query row per sequence: a token bucket larger than the sequence bucket would read
        # block tables and lengths out of bounds.
        raise ValueError(
            f"decode needs q [S, N, H] with block_tables [S, max_blocks] and kv_lens [S]; got q "
            f"{q.shape}, block_tables {block_tables.shape}, kv_lens {kv_lens.shape}"
        )
    _check_rope(rope, num_seqs, head_dim)
    _check_write(write, num_seqs, k_cache)
    group = num_heads // num_kv_heads
    group_pad = max(16, _next_pow2(group))
    if block_n is None:
        block_n = default_block_n(head_dim)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    max_tokens = max_blocks * block_size
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_tokens, block_n)
    # Split, each split covers a share of this step's longest row, not of the table's width: a
    # table sized for a long max_model_len would otherwise leave most splits empty and the
    # rows' tokens in a few programs.
    split_len = ()
    if num_splits > 1:
        longest = jnp.max(kv_lens.astype(jnp.int32))
        per_split = (longest + num_splits - 1) // num_splits
        split_len = (jnp.reshape((per_split + block_n - 1) // block_n * block_n, (1,)),)

    kernel = functools.partial(
        _decode_kernel,
        rope=rope is not None,
        write=write is not None,
        sm_scale=float(sm_scale),
        num_seqs=num_seqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        group=group,
        group_pad=group_pad,
        block_size=block_size,
        max_blocks=max_blocks,
        block_n=block_n,
        split_tokens=None if num_splits > 1 else max_tokens,
        heads_fastest=heads_fastest,
    )
    rows = num_seqs * num_heads
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((rows, head_dim), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits * rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits * rows,), jnp.float32),
        ]
    flat_k, flat_v = k_cache.reshape(-1, head_dim), v_cache.reshape(-1, head_dim)
    tables = () if rope is None else (rope[0].astype(jnp.float32), rope[1].astype(jnp.float32))
    new_kv, aliases = (), {}
    if write is not None:
        k_new, v_new, slots = write
        new_kv = (k_new.reshape(-1, head_dim), v_new.reshape(-1, head_dim), slots.astype(jnp.int32))
        out_shape += [jax.ShapeDtypeStruct(flat_k.shape, flat_k.dtype),
                      jax.ShapeDtypeStruct(flat_v.shape, flat_v.dtype)]
        aliases = {1: len(out_shape) - 2, 2: len(out_shape) - 1}  # the caches, in place
    result = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_seqs, num_splits) if heads_fastest else (num_seqs, num_kv_heads, num_splits),
        out_shape=tuple(out_shape),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_use_interpret(interpret),
        name="paged_decode_attention",
    )(
        q.reshape(rows, head_dim),
        flat_k,
        flat_v,
        block_tables.astype(jnp.int32).reshape(-1),
        kv_lens.astype(jnp.int32),
        *split_len,
        *tables,
        *new_kv,
    )
    if num_splits == 1:
        out = result[0].reshape(q.shape)
    else:
        parts = result[0].reshape(num_splits, num_seqs, num_heads, head_dim)
        out = _merge_splits(parts, result[1].reshape(num_splits, num_seqs, num_heads), q.dtype)
    if write is None:
        return out
    return out, result[-2].reshape(k_cache.shape), result[-1].reshape(v_cache.shape)


def paged_decode_attention(
    q: jax.Array,  # [S, N, H]
    k_cache: jax.Array,  # [P, B, K, H]
    v_cache: jax.Array,  # [P, B, K, H]
    block_tables: jax.Array,  # i32[S, max_blocks]
    kv_lens: jax.Array,  # i32[S], 0 for padded rows
    rope: tuple[jax.Array, jax.Array] | None = None,  # cos, sin f32[S, H]
    write: tuple[jax.Array, jax.Array, jax.Array] | None = None,  # k, v [S, K, H], slots i32[S]
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
):  # [S, N, H] in q.dtype; with write, (that, k_cache, v_cache)
    """Attention of each sequence's one new token over its ``kv_lens[s]`` cached positions.
    With ``rope``, q is first rotated (rotate-half RoPE, ``apply_rotate_half``) in the kernel.

    With ``write`` = (k, v, slot_mapping), the kernel also does ``write_kv_cache``'s work for
    this step (one row per sequence; k rotated when ``rope`` is given; slot -1 skips the row)
    and returns the caches too, updated in place when they are donated: the sequence's last
    position (``kv_lens[s] - 1``) is then this step's token, attended from the kernel's
    registers. One launch instead of two a layer."""
    # The tile is chosen here, outside the jit, so that JAXPAGED_DECODE_BLOCK_N is read at each
    # call rather than frozen into the first trace.
    return paged_decode_attention_tuned(
        q, k_cache, v_cache, block_tables, kv_lens, rope, write, sm_scale=sm_scale,
        interpret=interpret, block_n=default_block_n(q.shape[-1]),
    )


def paged_decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    write: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
):
    """Pure-jnp decode attention: gather each sequence's pages, mask past kv_len, f32 softmax.
    With ``write``: ``write_kv_cache_reference`` first, and the caches returned too."""
    del interpret
    _check_shapes(q, k_cache, v_cache, block_tables)
    num_seqs, num_heads, head_dim = q.shape
    _check_rope(rope, num_seqs, head_dim)
    if write is not None:
        from pallas_kernels.kv_cache_write import write_kv_cache_reference  # (it imports us)

        _check_write(write, num_seqs, k_cache)
        k_cache, v_cache = write_kv_cache_reference(*write[:2], k_cache, v_cache, write[2], rope)
        out = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, kv_lens, rope,
                                               sm_scale=sm_scale)
        return out, k_cache, v_cache
    if rope is not None:
        q = apply_rotate_half(q, *rope)
    _, block_size, num_kv_heads, _ = k_cache.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    k = k_cache[block_tables].reshape(num_seqs, -1, num_kv_heads, head_dim).astype(jnp.float32)
    v = v_cache[block_tables].reshape(num_seqs, -1, num_kv_heads, head_dim).astype(jnp.float32)
    valid = jnp.arange(k.shape[1])[None, :] < kv_lens[:, None]  # [S, max_tokens]
    return masked_attention_reference(q, k, v, valid, sm_scale)


def masked_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
                               sm_scale: float) -> jax.Array:
    """Row r of q [R, N, H] attends to its gathered keys/values [R, C, K, H] where
    valid [R, C]; a row with no valid key gives zeros. f32 softmax, full-precision matmuls."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    # Unused slots may hold anything (NaN included): zero them rather than rely on masking.
    k = jnp.where(valid[:, :, None, None], k, 0.0)
    v = jnp.where(valid[:, :, None, None], v, 0.0)
    qg = q.astype(jnp.float32).reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("rkgh,rckh->rkgc", qg, k, precision="highest") * sm_scale
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
    l = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("rkgc,rckh->rkgh", p / jnp.where(l == 0.0, 1.0, l), v, precision="highest")
    return out.reshape(q.shape).astype(q.dtype)
