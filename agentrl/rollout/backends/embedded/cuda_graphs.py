"""CUDA graphs of the engine's decode steps: one captured forward pass per batch-size bucket.

A decode step (every running sequence adds exactly one token) launches ~15 kernels per layer;
at small batches the GPU would mostly wait for Python to launch them. A CUDA graph replays the
whole forward with one launch. Graphs read fixed addresses, so each step's inputs are written
into static buffers first: the host packs token ids, positions, cache slots, sequence lengths
and block-table rows into one pinned int64 buffer, one non-blocking copy moves it to the
device, and two small device copies turn lengths and table into the int32 the kernels read.

A step of n sequences replays the graph of the smallest bucket b >= n; rows n..b-1 are padding
(slot -1: nothing is written to the cache; length 0: attention gives zeros; token 0 at
position 0), and their logits are ignored. The block table always has its full width
(`max_model_len / block_size` blocks), so the decode kernel's shape-derived split count is
fixed per bucket and one graph serves every sequence length.

Graphs are captured lazily, the first time a bucket is used (an eager warm-up run compiles the
Triton kernels for that shape first): ~0.1-0.3 s per bucket. They share one memory pool, and the
logits of all buckets are rows of one static `[max_bucket, V]` buffer (78 MB in bf16 for a
151,936-token vocabulary at 256 rows), so the memory cost is that buffer plus the largest
bucket's activations. They read weights and KV cache by address: in-place weight updates keep
them valid; a new KV cache (after `sleep`) or moved weights need new graphs (the engine drops
them and recaptures on demand).

Letters: B largest bucket, b a bucket, n sequences in the step, M block-table width, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from agentrl.rollout.backends.embedded.attention import StepMetadata
from agentrl.rollout.backends.embedded.kv_cache import PagedKVCache
from agentrl.rollout.backends.embedded.model_runner import ModelRunner, StepInputs
from agentrl.rollout.backends.embedded.sequences import Chunk


def batch_buckets(max_batch: int) -> list[int]:
    """Bucket sizes up to `max_batch`: 1, 2, 4, 8, then every 16 up to 256, then every 32.

    Padding wastes at most 15 rows (31 above 256), while small batches keep tight buckets.
    """
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    b = 16
    while b < max_batch:
        sizes.append(b)
        b += 16 if b < 256 else 32
    return sizes + [max_batch]


class DecodeGraphs:
    """Captured decode forwards for one model, one KV cache and one block-table width.

    Args:
        runner: The model runner (its weights are read by address at replay).
        cache: The KV cache the graphs write and read.
        max_batch: Most sequences in a step (the largest bucket).
        table_width: Block-table width M (the scheduler's table has this many columns).
    """

    def __init__(self, runner: ModelRunner, cache: PagedKVCache, max_batch: int, table_width: int):
        self.runner, self.cache = runner, cache
        self.buckets = batch_buckets(max_batch)
        B, M = self.buckets[-1], table_width
        self.B, self.M, self.P = B, M, cache.k[0].shape[1]
        dev = runner.device
        # Host layout (int64): ids [B] | positions [B] | slots [B] | lengths [B] | table [B * M].
        # Two pinned copies used in turn: the engine stages step t+1 while step t's upload may
        # still be queued behind earlier work on the device.
        self._hosts = [torch.zeros(4 * B + B * M, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._views = [self._host_views(h) for h in self._hosts]
        self._uploaded = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        self.dev = torch.zeros_like(self._hosts[0], device=dev)
        self.ids, self.pos, self.slots = (self.dev[i * B:(i + 1) * B] for i in range(3))
        self._lens64, self._table64 = self.dev[3 * B:4 * B], self.dev[4 * B:].view(B, M)
        self.lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self.table = torch.zeros(B, M, dtype=torch.int32, device=dev)
        self.logits = torch.empty(B, runner.lm_head.shape[0], dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def bucket(self, n: int) -> int | None:
        """The smallest bucket holding `n` rows (None if larger than every bucket)."""
        if n > self.B:
            return None
        return next(b for b in self.buckets if b >= n)

    @staticmethod
    def decode_only(chunks: list[Chunk]) -> bool:
        """True if every chunk computes exactly one token (no prefill chunk, no fork)."""
        return all(c.n == 1 for c in chunks)

    def run(self, chunks: list[Chunk], block_table: np.ndarray, fed: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the decode forward of `chunks` (all `n == 1`); returns logits [n, V] (a view).

        `block_table` is the scheduler's `[rows, M]` int32 table. `fed`: the token ids of the first
        `len(fed)` rows as a device tensor (a speculative step, whose tokens the host does not have yet).
        """
        n = len(chunks)
        b = self.bucket(n)
        self._select_host()
        self._stage(chunks, block_table, b, 0 if fed is None else fed.shape[0])
        self._upload()
        if fed is not None:
            self.ids[:fed.shape[0]].copy_(fed)
        if b not in self.graphs:
            self._capture(b)
        self.graphs[b].replay()
        return self.logits[:n]

    def _select_host(self) -> None:
        """Take the next pinned buffer, once the upload that last read it has run."""
        self._turn ^= 1
        self._uploaded[self._turn].synchronize()
        self.host = self._hosts[self._turn]
        self.h_ids, self.h_pos, self.h_slots, self.h_lens, self.h_table = self._views[self._turn]

    def _host_views(self, host: torch.Tensor) -> tuple[np.ndarray, ...]:
        """numpy views (ids, positions, slots, lengths, table) of one pinned input buffer."""
        h, B = host.numpy(), self.B
        return (*(h[i * B:(i + 1) * B] for i in range(4)), h[4 * B:].reshape(B, self.M))

    def _stage(self, chunks: list[Chunk], block_table: np.ndarray, b: int, fed: int = 0) -> None:
        """Write the step's inputs into the pinned host buffer; rows n..b-1 become padding, and the
        ids of the first `fed` rows are written on the device later."""
        n, P = len(chunks), self.P
        pos = np.fromiter((c.start for c in chunks), np.int64, n)
        rows = np.fromiter((c.seq.row for c in chunks), np.int64, n)
        self.h_ids[:fed] = 0
        self.h_ids[fed:n] = [c.seq.tokens[c.start] for c in chunks[fed:]]
        self.h_pos[:n] = pos
        self.h_slots[:n] = block_table[rows, pos // P].astype(np.int64) * P + pos % P
        self.h_lens[:n] = pos + 1
        self.h_table[:n] = block_table[rows]
        self.h_ids[n:b] = self.h_pos[n:b] = self.h_lens[n:b] = 0
        self.h_slots[n:b] = -1
        self.h_table[n:b] = 0

    def _upload(self) -> None:
        # Stream order keeps the device buffers safe: this copy runs after the last replay read them.
        self.dev.copy_(self.host, non_blocking=True)
        self._uploaded[self._turn].record()
        self.lens.copy_(self._lens64)
        self.table.copy_(self._table64)

    def _inputs(self, b: int) -> StepInputs:
        meta = StepMetadata(slots=self.slots[:b], num_decode=b, decode_block_table=self.table[:b],
                            decode_seq_lens=self.lens[:b], prefill_block_table=None, prefill_seq_lens=None,
                            prefill_cu_q=None, prefill_pad_src=None, prefill_pad_valid=None, prefill_q_pos=None)
        return StepInputs(input_ids=self.ids[:b], positions=self.pos[:b], logits_index=None, meta=meta)

    def _capture(self, b: int) -> None:
        import time

        t0 = time.perf_counter()
        inp = self._inputs(b)
        # Warm up on a side stream (compiles the Triton kernels for this shape, primes cuBLAS).
        # The staged rows are real: writing their K/V now is harmless (the replay writes the same).
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            self.runner.forward(inp, self.cache, out=self.logits[:b])
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.runner.forward(inp, self.cache, out=self.logits[:b])
        self.graphs[b] = graph
        self.capture_seconds += time.perf_counter() - t0
