"""The paged KV cache: a fixed pool of blocks, reference counts, and a prefix cache of full blocks.

Memory is a pool of `num_blocks` blocks of `block_size` token slots each, so a sequence holds
exactly `ceil(tokens / block_size)` blocks, never a slot per possible token. Blocks are reference
counted: GRPO's n samples of one prompt and a multi-turn episode's next turn share the blocks of
their common prefix instead of recomputing and storing them again.

The prefix cache works like vLLM's automatic prefix caching: a *full* block is named by a hash
of (the previous block's hash, its token ids), so equal hashes mean equal token prefixes. When
the last reference to a hashed block is dropped the block is not wiped: it waits in an LRU list
and is handed back to any later request whose prompt starts with the same tokens, until a fresh
allocation needs the space (least recently freed first). Block 0 is never handed out: padded
block-table entries point at it, so reads through padding stay in bounds and finite.

`PagedKVCache` owns the tensors (one K and one V per layer, `[num_blocks, block_size, H_kv, D]`);
`BlockAllocator` owns the bookkeeping and has no tensors, so the scheduler is testable without
a model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.transfer import to_device

NULL_BLOCK = 0


def block_hashes(tokens: Sequence[int], block_size: int, start: int = 0, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `tokens` from block index `start` on.

    `parent` is the hash of block `start - 1` (None for the first block). Block i's hash covers
    tokens `[0, (i + 1) * block_size)`, because it folds in every earlier block through `parent`.
    """
    out: list[int] = []
    for i in range(start, len(tokens) // block_size):
        parent = hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out


class BlockAllocator:
    """Reference-counted blocks with a hash-keyed prefix cache and LRU eviction.

    Args:
        num_blocks: Size of the pool, including the reserved null block 0.
        block_size: Token slots per block.
        enable_prefix_caching: Off: freed blocks go straight back to the free list.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise EngineError(f"the KV cache needs at least 2 blocks (one is reserved); got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, oldest first
        # A stack: the most recently freed block is reused first, while it is still in the CPU caches.
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))
        self.peak_used = 0

    @property
    def capacity(self) -> int:
        """Blocks that requests can use (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get now: never used, or cached but unreferenced."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.capacity - self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks (ref 1 each), evicting least recently freed cached blocks if needed."""
        if n > self.num_free:
            raise EngineError(f"KV cache out of blocks: asked for {n}, {self.num_free} free of {self.capacity}")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of[b]]
                self.hash_of[b] = None
            self.ref[b] = 1
            out.append(b)
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def match(self, hashes: Sequence[int]) -> list[int]:
        """The blocks caching the longest leading run of `hashes` (not yet referenced by the caller)."""
        out = []
        if self.enable_prefix_caching:
            for h in hashes:
                b = self.cached.get(h)
                if b is None:
                    break
                out.append(b)
        return out

    def num_evictable_in(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` sit unreferenced in the LRU list (taking them shrinks `num_free`)."""
        return sum(1 for b in blocks if self.ref[b] == 0)

    def share(self, blocks: Iterable[int]) -> None:
        """Add a reference to each block (a cache hit or a fork); revives blocks waiting in the LRU."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block. Tail blocks are released first so they are evicted first."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] > 0:
                continue
            if self.ref[b] < 0:
                raise EngineError(f"block {b} released more often than taken (allocator bug)")
            if self.hash_of[b] is not None:
                self.evictable[b] = None
            else:
                self.free.append(b)

    def register(self, block: int, block_hash: int) -> bool:
        """Make a full, computed block findable by its hash; False if caching is off or the hash is taken."""
        if not self.enable_prefix_caching or block_hash in self.cached or self.hash_of[block] is not None:
            return False
        self.cached[block_hash] = block
        self.hash_of[block] = block_hash
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash (new weights make old KV stale); unreferenced cached blocks become free."""
        for b in self.evictable:
            self.free.append(b)
        self.evictable.clear()
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks


class PagedKVCache:
    """Per-layer K and V tensors, `[num_blocks, block_size, H_kv, D]` each.

    Zero-initialised: padded block-table entries and masked slots are read by the CPU attention
    path (a masked score is dropped, but `0 * NaN` from uninitialised memory would not be).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks `src -> dst` in every layer (copy-on-write of a shared partial block)."""
        if not pairs:
            return
        src, dst = to_device(torch.tensor(pairs, dtype=torch.long).t().contiguous(), self.k[0].device)
        for k, v in zip(self.k, self.v):
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))
