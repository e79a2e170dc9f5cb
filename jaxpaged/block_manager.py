"""Paged KV-cache bookkeeping: which physical blocks each request holds, plus the prefix cache.

Host-only module: plain Python + NumPy, never imports ``jax``. It plays the parts of vLLM V1's
``KVCacheManager`` and ``BlockPool`` for one uniform full-attention cache.

Invariants (``check_invariants`` verifies them):
  * Block ``NULL_BLOCK_ID`` (0) is reserved for padding: never free, never handed out.
  * Every other block is either in the free queue with ``ref_cnt == 0`` or held with
    ``ref_cnt > 0``; ``ref_cnt`` equals the number of live requests whose ``block_ids``
    contain it. Hence ``num_free_blocks + num_held_blocks == num_blocks - 1``.
  * A block has a ``block_hash`` iff ``cached_block_hash_to_block`` maps that hash to it. Only
    full blocks whose KV has been computed get a hash, so a prefix hit never reads
    unwritten KV.
  * A freed block keeps its hash and stays hittable until it is reused for a new allocation.
    The free queue is LRU: allocation takes the least recently freed block, and a request's
    blocks are freed tail first, so a prompt's shared head outlives its private tail.

A block hash is a 128-bit BLAKE2b digest of (parent block's hash, this block's token ids), so
equal hashes mean equal whole prefixes, not just equal blocks.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from jaxpaged.sequence import Request

# The reserved block that padded block-table rows point at (same value as jaxpaged.metadata).
NULL_BLOCK_ID = 0

BlockHash = bytes


def hash_block_tokens(parent_block_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: it depends on every token of the prefix."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_block_hash or b"")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def update_block_hashes(request: Request, block_size: int) -> None:
    """Extend ``request.block_hashes`` to cover every full block of its known tokens."""
    tokens = request.all_token_ids
    hashes = request.block_hashes
    for i in range(len(hashes), len(tokens) // block_size):
        parent = hashes[i - 1] if i > 0 else None
        hashes.append(hash_block_tokens(parent, tokens[i * block_size : (i + 1) * block_size]))


@dataclass(slots=True)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


@dataclass(slots=True)
class PrefixCacheStats:
    """Counted in tokens, once per admission (a resume after preemption counts again)."""

    queries: int = 0  # tokens of admitted requests that could read the cache
    hits: int = 0  # of which found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    """Allocates blocks to requests and shares computed full blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Insertion order is LRU order: the first key is evicted first.
        self.free_block_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached_block_hash_to_block: dict[BlockHash, int] = {}
        # request_id -> how many leading blocks of its table are already cached (or were hits).
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    def reads_prefix_cache(self, request: Request) -> bool:
        """Whether ``request`` may take prefix hits. Prompt logprobs need the logits of every
        prompt position, so such a request computes its whole prompt (it still fills the cache)."""
        prompt_logprobs = getattr(request.sampling_params, "prompt_logprobs", None)
        return self.enable_prefix_caching and prompt_logprobs is None

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take, including freed blocks still in the prefix cache."""
        return len(self.free_block_queue)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (all but the null block) held by requests."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of ``request``'s tokens: (block ids, number of tokens).

        Never the whole sequence: at least one token is left to compute so that logits exist.
        Pure lookup: nothing is reserved until ``allocate_slots`` takes the blocks.
        """
        if not self.reads_prefix_cache(request):
            return [], 0
        update_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        computed = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block_id = self.cached_block_hash_to_block.get(block_hash)
            if block_id is None:
                break
            computed.append(block_id)
        return computed, len(computed) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> bool:
        """Give ``request`` blocks for ``new_computed_blocks`` (prefix hits, taken at admission
        only) followed by ``num_new_tokens`` tokens to compute. False, changing nothing, when
        there are not enough free blocks."""
        if not new_computed_blocks and request.block_ids and 0 <= num_new_tokens and (
                request.num_computed_tokens + num_new_tokens
                <= len(request.block_ids) * self.block_size):
            return True  # the common decode step: its blocks already have room
        new_computed_blocks = new_computed_blocks or []
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if new_computed_blocks and request.block_ids:
            raise ValueError(
                f"new_computed_blocks given for {request.request_id!r}, which already holds blocks"
            )
        num_hit_tokens = len(new_computed_blocks) * self.block_size
        num_tokens = request.num_computed_tokens + num_hit_tokens + num_new_tokens
        num_required = -(-num_tokens // self.block_size)
        num_new_blocks = max(0, num_required - len(request.block_ids) - len(new_computed_blocks))
        # Hits on freed cached blocks take them out of the free queue too.
        num_evictable_hits = sum(self.blocks[b].ref_cnt == 0 for b in new_computed_blocks)
        if num_new_blocks + num_evictable_hits > self.num_free_blocks:
            return False

        if not request.block_ids and self.reads_prefix_cache(request):
            self.prefix_cache_stats.queries += request.num_tokens
            self.prefix_cache_stats.hits += num_hit_tokens
        for block_id in new_computed_blocks:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free_block_queue[block_id]
            block.ref_cnt += 1
        request.block_ids.extend(new_computed_blocks)
        if new_computed_blocks:
            self.num_cached_blocks[request.request_id] = len(new_computed_blocks)
        request.block_ids.extend(self._pop_free_block() for _ in range(num_new_blocks))
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_block_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict it from the prefix cache
            del self.cached_block_hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Enter the full blocks among ``request``'s first ``num_computed_tokens`` tokens into
        the prefix cache. Call it once their KV has been written."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(request.block_ids))
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        update_block_hashes(request, self.block_size)
        for i in range(start, num_full):
            block = self.blocks[request.block_ids[i]]
            block_hash = request.block_hashes[i]
            # A duplicate (two requests computed the same prefix) stays uncached: one block
            # per hash keeps the map and the blocks' hashes in one-to-one correspondence.
            if block.block_hash is None and block_hash not in self.cached_block_hash_to_block:
                block.block_hash = block_hash
                self.cached_block_hash_to_block[block_hash] = block.block_id
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop ``request``'s hold on its blocks, tail first, and empty its block table."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue[block_id] = None
        request.block_ids.clear()
        self.num_cached_blocks.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only possible (True) when no block is held."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    def check_invariants(self, requests: Iterable[Request]) -> None:
        """Raise RuntimeError if the module invariants fail; ``requests`` are all live ones."""
        holders = [0] * self.num_blocks
        for request in requests:
            if len(set(request.block_ids)) != len(request.block_ids):
                raise RuntimeError(f"{request.request_id!r} holds a block twice: {request.block_ids}")
            for block_id in request.block_ids:
                holders[block_id] += 1
        if holders[NULL_BLOCK_ID] or NULL_BLOCK_ID in self.free_block_queue:
            raise RuntimeError("the null block was handed out or freed")
        for block in self.blocks[1:]:
            is_free = block.block_id in self.free_block_queue
            if block.ref_cnt != holders[block.block_id] or is_free != (block.ref_cnt == 0):
                raise RuntimeError(
                    f"block {block.block_id}: ref_cnt={block.ref_cnt}, "
                    f"held by {holders[block.block_id]} requests, in free queue={is_free}"
                )
            cached_id = self.cached_block_hash_to_block.get(block.block_hash) if block.block_hash else None
            if block.block_hash is not None and cached_id != block.block_id:
                raise RuntimeError(f"block {block.block_id} has a hash the prefix cache maps elsewhere")
        for block_hash, block_id in self.cached_block_hash_to_block.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise RuntimeError(f"prefix cache maps a hash to block {block_id}, which has another")
