"""build_step_inputs (vectorised over the batch) against a per-sequence loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.buckets import PAD_SLOT_ID
from jaxpaged.metadata import build_step_inputs


def loop_reference(token_ids, starts, tables, block_size, T, S, width, rows, R):
    ids, pos, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.full(T, PAD_SLOT_ID, np.int32)
    bt, kv, cu = np.zeros((S, width), np.int32), np.zeros(S, np.int32), np.zeros(S + 1, np.int32)
    lo = 0
    for s, (t, start, table) in enumerate(zip(token_ids, starts, tables)):
        for i, tok in enumerate(t):
            p = start + i
            ids[lo + i], pos[lo + i] = tok, p
            slots[lo + i] = table[p // block_size] * block_size + p % block_size
        lo += len(t)
        cu[s + 1:] = lo
        bt[s, :len(table)] = table
        kv[s] = start + len(t)
    logits = np.zeros(R, np.int32)
    logits[:len(rows)] = rows
    return ids, pos, slots, bt, kv, cu, logits


@st.composite
def steps(draw):
    block_size = draw(st.sampled_from([1, 4, 16]))
    n = draw(st.integers(0, 6))
    token_ids, starts, tables = [], [], []
    for _ in range(n):
        start = draw(st.integers(0, 40))
        q = draw(st.integers(1, 9))
        need = -(-(start + q) // block_size)
        extra = draw(st.integers(0, 2))
        token_ids.append(draw(st.lists(st.integers(0, 999), min_size=q, max_size=q)))
        starts.append(start)
        tables.append(draw(st.lists(st.integers(1, 500), min_size=need + extra, max_size=need + extra)))
    return block_size, token_ids, starts, tables


@settings(max_examples=150, deadline=None)
@given(steps(), st.integers(0, 3), st.integers(0, 2))
def test_matches_a_per_sequence_loop(step, pad_tokens, pad_seqs):
    block_size, token_ids, starts, tables = step
    total = sum(map(len, token_ids))
    T, S = total + pad_tokens, len(token_ids) + pad_seqs
    width = max([len(t) for t in tables], default=0) + 1
    rows = list(range(total))
    ids, pos, md = build_step_inputs(token_ids, starts, tables, block_size, num_tokens=T,
                                     num_seqs=S, max_blocks_per_seq=width, logits_indices=rows,
                                     num_logits=max(T, 1))
    want = loop_reference(token_ids, starts, tables, block_size, T, S, width, rows, max(T, 1))
    got = (ids, pos, md.slot_mapping, md.block_tables, md.kv_lens, md.cu_q_lens, md.logits_indices)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # The same step from tables already padded (as the runner's InputBatch gathers them).
    padded = (want[3], np.array([len(t) for t in tables], np.int32).reshape(-1))
    ids2, pos2, md2 = build_step_inputs(token_ids, starts, padded, block_size, num_tokens=T,
                                        num_seqs=S, max_blocks_per_seq=width,
                                        logits_indices=rows, num_logits=max(T, 1))
    for g, w in zip((ids2, pos2, md2.slot_mapping, md2.block_tables, md2.kv_lens), got):
        np.testing.assert_array_equal(g, w)


def test_a_block_table_too_short_is_an_error():
    with pytest.raises(ValueError, match="does not cover"):
        build_step_inputs([[1, 2, 3]], [15], [[7]], 16, num_tokens=4, num_seqs=1,
                          max_blocks_per_seq=2, logits_indices=[2], num_logits=1)
