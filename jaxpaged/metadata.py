"""Per-step device inputs of the model forward (STYLE rule 7).

One flat, ragged batch: T token slots, S sequence slots, both padded up to a bucket.
Tokens of sequence s occupy rows ``cu_q_lens[s]:cu_q_lens[s + 1]``. Padding is inert by
construction: padded tokens have ``slot_mapping == PAD_SLOT_ID`` (never written to the cache),
padded sequences have ``q_len == 0`` and ``kv_len == 0`` (never attended), and padded rows of
``block_tables`` point at block 0, which the block manager reserves as the null block.
"""

import dataclasses
import itertools

import jax
import numpy as np

from jaxpaged.block_manager import NULL_BLOCK_ID
from jaxpaged.buckets import PAD_SLOT_ID


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # i32[T]: flat cache slot (block * block_size + offset), PAD_SLOT_ID for padding
    block_tables: jax.Array  # i32[S, max_blocks_per_seq]: physical block ids, NULL_BLOCK_ID past the end
    kv_lens: jax.Array  # i32[S]: tokens in the cache once this step's tokens are written, 0 for padding
    cu_q_lens: jax.Array  # i32[S + 1]: prefix sums of each sequence's new-token count
    logits_indices: jax.Array  # i32[R]: rows of the flat batch whose logits the forward returns
    # Static: every real sequence has exactly one new token and token i belongs to sequence i,
    # which lets the GPU path use the decode kernel. Part of the compiled shape's key.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))


def build_step_inputs(token_ids: list[list[int]], start_positions: list[int],
                      block_tables: list[list[int]] | tuple[np.ndarray, np.ndarray],
                      block_size: int, *, num_tokens: int, num_seqs: int,
                      max_blocks_per_seq: int, logits_indices: list[int], num_logits: int,
                      decode_only: bool = False,
                      ) -> tuple[np.ndarray, np.ndarray, AttentionMetadata]:
    """Host-side (NumPy) inputs for one step, padded to the bucket sizes given.

    Sequence s feeds `token_ids[s]`, which sit at positions `start_positions[s]` onwards and are
    written into its blocks `block_tables[s]`. `block_tables` may also come already padded, as
    (i32[num_seqs, max_blocks_per_seq] tables, i32[n] blocks per real sequence), the way
    `InputBatch.block_tables` gathers them. Returns (input_ids, positions, metadata).
    """
    # Vectorised over the batch (a Python loop per sequence cost ~5 us each, 1.3 ms at 256).
    n = len(token_ids)
    q_lens = np.fromiter(map(len, token_ids), np.int32, n)
    total = int(q_lens.sum())
    if total > num_tokens or n > num_seqs:
        raise ValueError(f"step of {total} tokens / {n} seqs exceeds the bucket "
                         f"({num_tokens} tokens / {num_seqs} seqs)")
    starts = np.fromiter(start_positions, np.int32, n)
    if isinstance(block_tables, tuple):
        tables, table_lens = block_tables
        if tables.shape != (num_seqs, max_blocks_per_seq) or table_lens.shape != (n,):
            raise ValueError(f"padded block tables of shape {tables.shape} with {table_lens.shape} "
                             f"lengths; expected ({num_seqs}, {max_blocks_per_seq}) and ({n},)")
    else:
        tables, table_lens = _padded_tables(block_tables, num_seqs, max_blocks_per_seq)
    cu_q_lens = np.full(num_seqs + 1, total, np.int32)
    cu_q_lens[0] = 0
    cu_q_lens[1:n + 1] = np.cumsum(q_lens)
    kv_lens = np.zeros(num_seqs, np.int32)
    kv_lens[:n] = starts + q_lens
    seq_of = np.repeat(np.arange(n), q_lens)  # the sequence of each real token
    pos = np.arange(total, dtype=np.int32) - cu_q_lens[seq_of] + starts[seq_of]
    if np.any(pos // block_size >= table_lens[seq_of]):
        raise ValueError("a block table does not cover its sequence's new tokens")
    input_ids = np.zeros(num_tokens, np.int32)
    input_ids[:total] = np.fromiter(itertools.chain.from_iterable(token_ids), np.int32, total)
    positions = np.zeros(num_tokens, np.int32)
    positions[:total] = pos
    slot_mapping = np.full(num_tokens, PAD_SLOT_ID, np.int32)
    slot_mapping[:total] = tables[seq_of, pos // block_size] * block_size + pos % block_size
    rows = np.zeros(num_logits, np.int32)
    rows[:len(logits_indices)] = logits_indices
    md = AttentionMetadata(slot_mapping, tables, kv_lens, cu_q_lens, rows, decode_only)
    return input_ids, positions, md


def _padded_tables(block_tables: list[list[int]], num_seqs: int,
                   max_blocks_per_seq: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(block_tables)
    table_lens = np.fromiter(map(len, block_tables), np.int32, n)
    tables = np.full((num_seqs, max_blocks_per_seq), NULL_BLOCK_ID, np.int32)
    if table_lens.size and table_lens.max() > max_blocks_per_seq:
        raise ValueError(f"a block table has {table_lens.max()} blocks, more than "
                         f"max_blocks_per_seq={max_blocks_per_seq}")
    rows_of = np.repeat(np.arange(n), table_lens)
    cols_of = np.arange(rows_of.size) - np.repeat(np.cumsum(table_lens) - table_lens, table_lens)
    tables[rows_of, cols_of] = np.fromiter(itertools.chain.from_iterable(block_tables),
                                           np.int32, rows_of.size)
    return tables, table_lens
