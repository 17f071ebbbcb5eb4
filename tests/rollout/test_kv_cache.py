"""Block pool, reference counts, prefix cache and LRU eviction of the paged KV cache."""

from __future__ import annotations

import pytest
import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.kv_cache import BlockAllocator, PagedKVCache, block_hashes


def test_block_hashes_name_whole_prefixes():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)  # full blocks [1,2] [3,4] [5,6]; the 7 is a partial block
    assert len(a) == 3
    assert block_hashes([1, 2, 3, 4, 9, 9], 2)[:2] == a[:2]  # same prefix, same names
    b = block_hashes([0, 2, 3, 4, 5, 6], 2)
    assert all(x != y for x, y in zip(a, b))  # a different first block renames every later block
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, start=1, parent=a[0]) == a[1:]  # resumable from a parent


def test_allocate_release_and_reference_counts():
    alloc = BlockAllocator(num_blocks=5, block_size=4)  # block 0 is reserved: 4 usable
    assert alloc.capacity == 4 and alloc.num_free == 4
    got = alloc.allocate(3)
    assert 0 not in got and len(set(got)) == 3 and alloc.num_used == 3
    alloc.share(got[:2])  # a second sequence shares two of them
    alloc.release(got)
    assert alloc.num_used == 2  # the shared two are still referenced
    alloc.release(got[:2])
    assert alloc.num_used == 0 and alloc.num_free == 4 and alloc.peak_used == 3
    with pytest.raises(EngineError, match="out of blocks"):
        alloc.allocate(5)
    with pytest.raises(EngineError, match="released more often"):
        alloc.release([got[0]])


def test_prefix_cache_hits_and_lru_eviction_of_tail_blocks_first():
    alloc = BlockAllocator(num_blocks=5, block_size=2)
    hashes = block_hashes([1, 2, 3, 4, 5, 6], 2)
    blocks = alloc.allocate(3)
    for b, h in zip(blocks, hashes):
        assert alloc.register(b, h)
    assert alloc.match(hashes) == blocks
    alloc.release(blocks)  # all unreferenced, still cached; released tail first
    assert alloc.num_free == 4 and alloc.match(hashes) == blocks
    fresh = alloc.allocate(2)  # one never-used block, then the LRU victim: the tail block
    assert blocks[2] in fresh and alloc.match(hashes) == blocks[:2]
    alloc.share(alloc.match(hashes))  # a hit revives cached blocks out of the LRU list
    assert alloc.num_free == 0 and alloc.num_used == 4


def test_register_refuses_duplicates_and_is_off_without_caching():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    a, b = alloc.allocate(2)
    assert alloc.register(a, 123) and not alloc.register(b, 123)  # one block per hash
    off = BlockAllocator(num_blocks=4, block_size=2, enable_prefix_caching=False)
    c = off.allocate(1)[0]
    assert not off.register(c, 123) and off.match([123]) == []


def test_reset_prefix_cache_forgets_every_hash():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    a, b = alloc.allocate(2)
    alloc.register(a, 1)
    alloc.register(b, 2)
    alloc.release([a])
    alloc.reset_prefix_cache()
    assert alloc.match([1]) == [] and alloc.match([2]) == []
    assert alloc.num_free == 2  # the unreferenced cached block went back to the free list
    alloc.release([b])
    assert alloc.num_free == 3


def test_paged_cache_tensors_and_block_copies():
    cache = PagedKVCache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8,
                         dtype=torch.float32, device=torch.device("cpu"))
    assert cache.k[0].shape == (6, 4, 2, 8) and len(cache.v) == 2
    assert float(cache.k[1].abs().sum()) == 0.0  # zeroed: masked reads stay finite
    cache.k[1][2] = 1.5
    cache.v[0][2] = -2.0
    cache.copy_blocks([(2, 5)])
    assert torch.equal(cache.k[1][5], cache.k[1][2]) and torch.equal(cache.v[0][5], cache.v[0][2])
    # 2 (K and V) * 3 layers * 2 heads * 64 dims * 2 bytes
    assert PagedKVCache.bytes_per_token(3, 2, 64, torch.bfloat16) == 1536
