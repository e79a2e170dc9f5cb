"""InputBatch: block-table rows kept across steps equal the tables rebuilt from scratch."""

import random
from dataclasses import dataclass

import numpy as np
import pytest

from jaxpaged.block_manager import NULL_BLOCK_ID
from jaxpaged.input_batch import InputBatch
from jaxpaged.metadata import _padded_tables


@dataclass
class Sched:  # the fields InputBatch reads of a ScheduledRequest
    request_id: str
    block_ids: list[int]
    admitted: bool = False


def test_rows_follow_growing_tables_and_fresh_admissions():
    batch = InputBatch(max_blocks_per_seq=4, num_constants=2, capacity=2)
    a, b = Sched("a", [5], admitted=True), Sched("b", [7, 8], admitted=True)
    rows = batch.rows([a, b])
    assert len(set(rows)) == 2
    a.admitted = b.admitted = False
    a.block_ids = [5, 6]  # grew a block
    tables, lens = batch.block_tables(batch.rows([a, b]), num_seqs=3)
    np.testing.assert_array_equal(tables, [[5, 6, 0, 0], [7, 8, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(lens, [2, 2])
    # Resumed after preemption with other blocks, fewer of them: the row starts afresh.
    b2 = Sched("b", [9], admitted=True)
    tables, lens = batch.block_tables(batch.rows([b2]), num_seqs=1)
    np.testing.assert_array_equal(tables, [[9, NULL_BLOCK_ID, NULL_BLOCK_ID, NULL_BLOCK_ID]])


def test_a_table_longer_than_a_row_is_refused_by_name():
    batch = InputBatch(max_blocks_per_seq=2, num_constants=1, capacity=1)
    with pytest.raises(ValueError, match=r"request 'big' holds 3 KV blocks; .* room for 2"):
        batch.rows([Sched("big", [1, 2, 3], admitted=True)])


def test_rows_are_reused_after_release_and_grow_past_capacity():
    batch = InputBatch(max_blocks_per_seq=2, num_constants=1, capacity=1)
    reqs = [Sched(str(i), [i + 1], admitted=True) for i in range(3)]
    rows = batch.rows(reqs)  # three requests in a batch of capacity one: it grows
    assert sorted(rows) == [0, 1, 2] and batch.num_rows_held == 3
    tables, _ = batch.block_tables(rows, 3)
    np.testing.assert_array_equal(tables[:, 0], [1, 2, 3])
    batch.release(["0", "2", "never-seen"])
    assert batch.num_rows_held == 1
    new = batch.rows([Sched("x", [9], admitted=True)])
    assert new[0] in (rows[0], rows[2])
    tables, lens = batch.block_tables(new, 1)
    np.testing.assert_array_equal(tables, [[9, NULL_BLOCK_ID]])


@pytest.mark.parametrize("seed", range(5))
def test_random_lifecycles_match_tables_built_from_scratch(seed):
    """Requests join, grow, get preempted (released and later re-admitted with new blocks) and
    finish; every step's gathered tables equal the ones flattened from the lists."""
    rng = random.Random(seed)
    batch = InputBatch(max_blocks_per_seq=6, num_constants=1, capacity=2)
    live: dict[str, Sched] = {}
    next_id, next_block = 0, 1
    for _ in range(200):
        event = rng.random()
        if event < 0.3 or not live:
            live[str(next_id)] = Sched(str(next_id), [next_block], admitted=True)
            next_id, next_block = next_id + 1, next_block + 1
        elif event < 0.4:  # finished or preempted: released; a preempted one comes back
            rid = rng.choice(sorted(live))
            batch.release([rid])
            if rng.random() < 0.5:
                live[rid] = Sched(rid, [next_block], admitted=True)
                next_block += 1
            else:
                del live[rid]
        for s in live.values():
            if not s.admitted and len(s.block_ids) < 6 and rng.random() < 0.3:
                s.block_ids = s.block_ids + [next_block]
                next_block += 1
        scheduled = [s for s in live.values() if rng.random() < 0.8]  # some skip a step
        rows = batch.rows(scheduled)
        got = batch.block_tables(rows, len(scheduled) + 1)
        want = _padded_tables([s.block_ids for s in scheduled], len(scheduled) + 1, 6)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        for s in scheduled:
            s.admitted = False
