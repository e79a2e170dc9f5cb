import pytest

from jaxpaged.block_manager import NULL_BLOCK_ID, BlockManager, hash_block_tokens, update_block_hashes
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.sequence import Request

BS = 4


def make_request(request_id: str, prompt: list[int], **params) -> Request:
    return Request(request_id, prompt, SamplingParams(**params))


def admit(bm: BlockManager, req: Request) -> int:
    """Admit like the scheduler does, compute the whole prompt, cache it. Returns hit tokens."""
    blocks, num_hit = bm.get_computed_blocks(req)
    assert bm.allocate_slots(req, req.num_tokens - num_hit, blocks)
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req, req.num_computed_tokens)
    return num_hit


def test_null_block_id_matches_metadata_value():
    assert NULL_BLOCK_ID == 0


def test_allocate_and_free_conserve_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.num_free_blocks == 7 and bm.usage == 0.0
    a, b = make_request("a", list(range(9))), make_request("b", list(range(100, 104)))
    assert bm.allocate_slots(a, 9)
    assert len(a.block_ids) == 3 and NULL_BLOCK_ID not in a.block_ids
    assert bm.allocate_slots(b, 4)
    assert bm.num_free_blocks == 3 and bm.usage == pytest.approx(4 / 7)
    bm.check_invariants([a, b])
    # Growing by one token within the last block needs no new block; crossing a boundary does.
    a.num_computed_tokens = 9
    assert bm.allocate_slots(a, 3) and len(a.block_ids) == 3
    assert bm.allocate_slots(a, 4) and len(a.block_ids) == 4
    bm.free(a)
    bm.free(b)
    assert a.block_ids == [] and bm.num_free_blocks == 7
    bm.check_invariants([])


def test_failed_allocation_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(8)))
    assert bm.allocate_slots(a, 8)
    b = make_request("b", list(range(8)))
    assert not bm.allocate_slots(b, 8)
    assert b.block_ids == [] and bm.num_free_blocks == 1
    bm.check_invariants([a, b])


def test_block_zero_is_never_handed_out():
    bm = BlockManager(num_blocks=5, block_size=1)
    req = make_request("a", [1, 2, 3, 4])
    assert bm.allocate_slots(req, 4)
    assert sorted(req.block_ids) == [1, 2, 3, 4]
    assert not bm.allocate_slots(make_request("b", [1]), 1)


def test_hashes_are_chained():
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    parent_a, parent_b = hash_block_tokens(None, [0, 0]), hash_block_tokens(None, [0, 1])
    assert hash_block_tokens(parent_a, [5, 6]) != hash_block_tokens(parent_b, [5, 6])
    req = make_request("a", list(range(10)))
    update_block_hashes(req, BS)
    assert len(req.block_hashes) == 2  # only full blocks
    assert req.block_hashes[1] == hash_block_tokens(req.block_hashes[0], [4, 5, 6, 7])


def test_prefix_hit_shares_blocks_and_counts_stats():
    bm = BlockManager(num_blocks=16, block_size=BS)
    shared = list(range(8))
    a = make_request("a", shared + [50, 51, 52])
    assert admit(bm, a) == 0
    b = make_request("b", shared + [60])
    assert admit(bm, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[i].ref_cnt for i in a.block_ids[:2]] == [2, 2]
    bm.check_invariants([a, b])
    assert bm.prefix_cache_stats.queries == 11 + 9
    assert bm.prefix_cache_stats.hits == 8
    assert bm.prefix_cache_stats.hit_rate == pytest.approx(8 / 20)


def test_hit_never_covers_the_whole_sequence():
    bm = BlockManager(num_blocks=16, block_size=BS)
    admit(bm, make_request("a", list(range(8))))
    b = make_request("b", list(range(8)))
    blocks, num_hit = bm.get_computed_blocks(b)
    assert num_hit == 4 and len(blocks) == 1  # the last token must be computed for logits


def test_only_computed_blocks_are_cached():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request("a", list(range(12)))
    assert bm.allocate_slots(a, 12)
    assert bm.get_computed_blocks(make_request("b", list(range(13))))[1] == 0
    a.num_computed_tokens = 5
    bm.cache_blocks(a, 5)
    assert bm.get_computed_blocks(make_request("c", list(range(13))))[1] == 4


def test_freed_cached_blocks_are_hit_until_evicted_lru():
    bm = BlockManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    a = make_request("a", list(range(8)) + [99])
    admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4  # cached but free: counted as free
    # Still hittable after free; taking a free cached block removes it from the free queue.
    b = make_request("b", list(range(8)) + [98])
    assert admit(bm, b) == 8
    assert bm.num_free_blocks == 4 - 3
    bm.free(b)
    # Blocks were freed tail first, so the head block is the most recently used: allocating
    # 3 fresh blocks evicts the never-cached one, the tail, then block 2 of the prefix.
    c = make_request("c", [7] * 12)
    assert bm.allocate_slots(c, 12)
    d = make_request("d", list(range(8)) + [97])
    assert bm.get_computed_blocks(d)[1] == 4
    bm.check_invariants([c])
    bm.free(c)
    e = make_request("e", [6] * 16)
    assert bm.allocate_slots(e, 16)  # evicts everything
    assert bm.get_computed_blocks(d)[1] == 0
    assert set(bm.cached_block_hash_to_block.values()) <= set(e.block_ids)
    bm.check_invariants([e])


def test_allocation_counts_hits_on_free_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS)  # 3 usable
    a = make_request("a", list(range(8)) + [1])
    admit(bm, a)
    bm.free(a)
    b = make_request("b", list(range(8)) + [1, 2, 3, 4, 5, 6, 7, 8])
    blocks, num_hit = bm.get_computed_blocks(b)
    assert num_hit == 8
    # 2 hit blocks (both free) + 2 new blocks > 3 free blocks.
    assert not bm.allocate_slots(b, b.num_tokens - num_hit, blocks)
    assert b.block_ids == [] and bm.num_free_blocks == 3
    bm.check_invariants([])


def test_duplicate_blocks_stay_consistent():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(9)))
    for req in (a, b):  # both computed the same prefix before either was cached
        assert bm.allocate_slots(req, 9)
    for req in (a, b):
        req.num_computed_tokens = 9
        bm.cache_blocks(req, 9)
    assert len(bm.cached_block_hash_to_block) == 2
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])


def test_prefix_caching_off_and_prompt_logprobs_skip_hits():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    admit(bm, make_request("a", list(range(9))))
    assert bm.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert bm.cached_block_hash_to_block == {}

    bm = BlockManager(num_blocks=16, block_size=BS)
    admit(bm, make_request("a", list(range(9))))
    assert bm.get_computed_blocks(make_request("b", list(range(9)), prompt_logprobs=1)) == ([], 0)
    assert bm.get_computed_blocks(make_request("c", list(range(9)), prompt_logprobs=0)) == ([], 0)
    assert bm.get_computed_blocks(make_request("d", list(range(9))))[1] == 8


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(bm, a)
    assert not bm.reset_prefix_cache()
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    bm.check_invariants([])


def test_check_invariants_catches_a_leak():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    assert bm.allocate_slots(a, 9)
    with pytest.raises(RuntimeError, match="ref_cnt=1, held by 0"):
        bm.check_invariants([])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_blocks": 1, "block_size": 4}, "num_blocks"), ({"num_blocks": 4, "block_size": 0}, "block_size")],
)
def test_constructor_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockManager(**kwargs)


def test_allocate_slots_validation():
    bm = BlockManager(num_blocks=8, block_size=BS)
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.allocate_slots(make_request("a", [1]), -1)
