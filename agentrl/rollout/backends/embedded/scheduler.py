"""Continuous batching over the paged KV cache: who runs in the next model step, with how many tokens.

Every step the scheduler builds one flat batch: one token for each decoding sequence, then chunks
of prompts still being prefilled, up to `max_step_tokens`. Sequences join at any step (admission)
and leave the moment they finish, returning their blocks. Admission is bounded by the KV budget:
a waiting request is admitted only when the blocks for its whole prompt are free (first come,
first served), and a running sequence that needs a block when none is left preempts the youngest
running sequence, which frees its blocks and waits to be recomputed (its full blocks usually stay
in the prefix cache, so recomputation is mostly cache hits). The oldest sequence always makes
progress, so there is no livelock, and memory never exceeds the pool.

Shared prefixes are computed once:
- a prompt whose leading full blocks are in the prefix cache takes them and skips their prefill;
- a prompt identical to one whose prefill ends in this step is *forked* from it: it shares its
  full blocks, gets a copy of its partial last block, and samples from the same logits row;
- a prompt whose next uncached block is being computed right now by another sequence waits a
  step, then finds it in the cache.

Pure Python with a numpy block table, no tensors: the model runner turns a `StepPlan` into tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.kv_cache import NULL_BLOCK, BlockAllocator, block_hashes
from agentrl.rollout.backends.embedded.sequences import Chunk, Sequence, StepPlan

__all__ = ["Chunk", "Scheduler", "Sequence", "StepPlan"]  # the plan's types live in sequences.py


class Scheduler:
    """Decides each step's batch and keeps sequences, blocks and the block table consistent.

    Args:
        allocator: The block pool.
        max_num_seqs: Most sequences running at once (rows of the block table).
        max_step_tokens: Most tokens computed in one step (decodes count one each).
        max_model_len: Longest sequence; sets the block table's width.
        admit_wait_steps: While every running sequence is decoding, hold new requests back for up to
            this many steps (or until a quarter of the running count is waiting) so that they are
            prefilled together: a step that prefills is eager, a decode-only step replays a CUDA graph
            several times faster, so admitting each trickling request at once (multi-turn episodes whose
            tool calls return at different times) would make nearly every step an eager one. 0 admits
            at once (the CPU default, where no step is replayed).
        prefill_speculation: `speculate` also plans prefill chunks and admissions (see there).
    """

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_step_tokens: int, max_model_len: int,
                 admit_wait_steps: int = 0, prefill_speculation: bool = False):
        self.alloc = allocator
        self.bs = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.block_table = np.full((max_num_seqs, -(-max_model_len // self.bs)), NULL_BLOCK, dtype=np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._inflight: dict[int, Sequence] = {}  # hash of a block being prefilled -> its owner
        self.counters = {"preemptions": 0, "forks": 0, "deferrals": 0, "held_admissions": 0}
        self.admit_wait_steps = admit_wait_steps
        self.prefill_speculation = prefill_speculation
        self.steps = 0  # schedule() calls and speculative steps that admit

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        need = -(-(len(seq.tokens) + 1) // self.bs)
        if need > self.alloc.capacity:
            raise EngineError(f"a sequence of {len(seq.tokens)} tokens needs {need} KV blocks; the cache has "
                              f"{self.alloc.capacity}. Raise kv_cache_tokens or shorten the prompt")
        seq.queued_at = self.steps
        self.waiting.append(seq)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Pick this step's chunks: running sequences first (preempting on a full cache), then admissions."""
        plan = StepPlan([])
        self.steps += 1
        budget = self.max_step_tokens
        preempted = False
        bs, chunks = self.bs, plan.chunks
        for seq in list(self.running):  # per-step hot loop (a decode step visits every running sequence)
            if seq.row < 0:  # preempted earlier in this loop
                continue
            start, total = seq.num_computed, len(seq.tokens)
            n = min(total - start, budget)
            if n <= 0:
                continue
            if start + n > len(seq.blocks) * bs and not self._grow(seq, start + n):
                preempted = True
                continue
            chunks.append(Chunk(seq, start, n, start + n == total))
            budget -= n
        if not preempted:
            self._admit(plan, budget)
        return plan

    def _grow_from_free(self, seq: Sequence, upto: int) -> bool:
        """Give `seq` blocks for `upto` tokens from free blocks only (no preemption); False if too few are free."""
        need = -(-upto // self.bs) - len(seq.blocks)
        if need > self.alloc.num_free:
            return False
        if need > 0:
            self._append_blocks(seq, self.alloc.allocate(need))
        return True

    def _grow(self, seq: Sequence, upto: int) -> bool:
        """Give `seq` blocks for `upto` tokens, preempting the youngest sequences; False if `seq` itself went."""
        need = -(-upto // self.bs) - len(seq.blocks)
        while need > self.alloc.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            self._append_blocks(seq, self.alloc.allocate(need))
        return True

    def _hold_admissions(self, plan: StepPlan) -> bool:
        """True to leave the waiting requests for a later step (see `admit_wait_steps`)."""
        if not self.admit_wait_steps or not plan.chunks or any(c.n != 1 for c in plan.chunks):
            return False  # nothing running, or this step is eager anyway: admit now
        if len(self.waiting) >= max(1, len(self.running) // 4):
            return False
        return self.steps - self.waiting[0].queued_at < self.admit_wait_steps

    def _admit(self, plan: StepPlan, budget: int) -> None:
        if not self.waiting:
            return
        if self._hold_admissions(plan):
            self.counters["held_admissions"] += 1
            return
        finishing: dict[int, list[Sequence]] = {}  # sequences whose last token is computed in this step
        for c in plan.chunks:
            # (A speculative decode row computes a token the host has not seen: its logits follow
            # len(tokens) + 1 tokens, so it is no parent for a fork of `tokens`.)
            if c.sample and c.n and c.start + c.n == len(c.seq.tokens):
                finishing.setdefault(len(c.seq.tokens), []).append(c.seq)
        deferred: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            parent = next((p for p in finishing.get(len(seq.tokens), ()) if p.tokens == seq.tokens), None)
            if parent is not None:
                if not self._fork(plan, seq, parent):
                    break
            elif budget <= 0:
                break
            else:
                status = self._admit_one(plan, seq, budget)
                if status == "full":
                    break
                if status == "deferred":
                    deferred.append(self.waiting.popleft())
                    continue
                budget -= plan.chunks[-1].n
                if plan.chunks[-1].sample:
                    finishing.setdefault(len(seq.tokens), []).append(seq)
            self.waiting.popleft()
            plan.admitted += 1
        self.waiting.extendleft(reversed(deferred))

    def _admit_one(self, plan: StepPlan, seq: Sequence, budget: int) -> str:
        """Admit `seq` with its cached prefix; returns `ok`, `full` (no room) or `deferred`."""
        L = len(seq.tokens)
        if len(seq.hashes) < L // self.bs:
            seq.hashes += block_hashes(seq.tokens, self.bs, len(seq.hashes), seq.hashes[-1] if seq.hashes else None)
        hits = self.alloc.match(seq.hashes[: (L - 1) // self.bs])  # keep >= 1 token to compute: its logits
        missing = seq.hashes[len(hits):]
        if missing and self._inflight.get(missing[0], seq) is not seq:
            self.counters["deferrals"] += 1
            return "deferred"
        need = -(-L // self.bs) - len(hits)
        reserve = max(1, self.alloc.capacity // 100) if self.running else 0  # headroom for decodes to grow
        if need + reserve > self.alloc.num_free - self.alloc.num_evictable_in(hits):
            return "full"
        self.alloc.share(hits)
        self._take_row(seq)
        self._append_blocks(seq, hits + self.alloc.allocate(need))
        seq.num_computed, seq.num_registered = len(hits) * self.bs, len(hits)
        if seq.cached_tokens < 0:
            seq.cached_tokens = seq.num_computed
        for h in missing:
            self._inflight.setdefault(h, seq)
        n = min(L - seq.num_computed, budget)
        plan.chunks.append(Chunk(seq, seq.num_computed, n, seq.num_computed + n == L))
        self.running.append(seq)
        return "ok"

    def _fork(self, plan: StepPlan, seq: Sequence, parent: Sequence) -> bool:
        """Start `seq` (same tokens as `parent`) from the KV `parent` computes in this step."""
        L = len(seq.tokens)
        full, tail = divmod(L, self.bs)
        if tail and self.alloc.num_free < 1:
            return False
        shared = parent.blocks[:full]
        self.alloc.share(shared)
        self._take_row(seq)
        own = self.alloc.allocate(1) if tail else []
        if tail:
            plan.copies.append((parent.blocks[full], own[0]))
        self._append_blocks(seq, shared + own)
        seq.hashes = parent.hashes[:full]
        seq.num_computed, seq.num_registered = L, full
        if seq.cached_tokens < 0:
            seq.cached_tokens = L
        plan.chunks.append(Chunk(seq, L, 0, True, logits_from=parent))
        self.running.append(seq)
        self.counters["forks"] += 1
        return True

    def speculate(self, plan: StepPlan) -> tuple[StepPlan, list[int]] | None:
        """The step after `plan`, planned before `plan`'s sampled tokens are known.

        Lets the engine launch step t+1 while step t is still on the device. Every sequence that
        samples in `plan` and will still be running afterwards decodes one token: the one `plan`
        samples, which the engine feeds on the device (these rows come first). A sequence whose
        `plan` token is its last by length is left out; one that stops on a stop token or string is
        only known later, so its row is computed and then dropped by `finish_step`.

        With `prefill_speculation` on, the step also goes on with what needs no sampled token: the
        next chunks of prompts being prefilled (their tokens are on the host), running sequences
        `plan` left out, and admissions of waiting requests, within `max_step_tokens`, as
        `schedule` would. Without it, it returns None where requests wait or a prompt is still
        being prefilled. Either way it returns None where a new block would need a preemption.

        Returns:
            (the plan, `src`): `src[j]` is the index among `plan`'s sampled rows of the token that
            chunk j computes, for the first `len(src)` chunks (the fed ones).
        """
        prefill = self.prefill_speculation
        if self.waiting and not prefill:
            return None
        chunks, src, rest, row = [], [], [], -1
        for c in plan.chunks:
            seq = c.seq
            row += c.sample
            if seq.finish_reason is not None:
                continue
            start = c.start + c.n  # the first token `plan` does not compute
            if not c.sample:  # a prompt still being prefilled
                if not prefill:
                    return None
                rest.append((seq, start))
                continue
            if start + 1 - seq.prompt_len >= seq.max_new:
                continue
            if not self._grow_from_free(seq, start + 1):
                return None  # blocks taken so far stay with their sequences: the next step needs them too
            chunks.append(Chunk(seq, start, 1, True))
            src.append(row)
        if prefill:
            return self._speculate_prefill(plan, chunks, src, rest)
        return (StepPlan(chunks), src) if chunks else None

    def _speculate_prefill(self, plan: StepPlan, chunks: list[Chunk], src: list[int],
                           rest: list[tuple[Sequence, int]]) -> tuple[StepPlan, list[int]] | None:
        """`speculate`'s prefill part: after the fed decodes in `chunks`, the next chunks of `rest`
        (sequence, first token not yet computed) and of running sequences `plan` left out, then admissions."""
        spec = StepPlan(chunks)
        in_plan = {id(c.seq) for c in plan.chunks}
        rest += [(seq, seq.num_computed) for seq in self.running if id(seq) not in in_plan]
        budget = self.max_step_tokens - len(chunks)
        for seq, start in rest:
            n = min(len(seq.tokens) - start, budget)
            if n <= 0:
                continue
            if not self._grow_from_free(seq, start + n):
                return None
            chunks.append(Chunk(seq, start, n, start + n == len(seq.tokens)))
            budget -= n
        self.steps += 1
        self._admit(spec, budget)
        return (spec, src) if spec.chunks else None

    def finish_step(self, plan: StepPlan, tokens: list[int], logprobs: list[float], version: int) -> list[Sequence]:
        """Record the step: computed tokens, newly full blocks, sampled tokens. Returns finished sequences.

        A chunk whose sequence finished after the step was planned (a speculative step's row for a
        sequence that stopped, or one aborted meanwhile) is skipped: its output is dropped.
        """
        done = []
        i, bs = 0, self.bs
        for c in plan.chunks:  # per-step hot loop: plain attribute access, no properties
            seq = c.seq
            if seq.finish_reason is not None:
                i += c.sample
                continue
            if c.n:
                seq.num_computed += c.n
                if seq.num_computed // bs > seq.num_registered:
                    self._register_full_blocks(seq)
            if not c.sample:
                continue
            tok = tokens[i]
            seq.tokens.append(tok)
            seq.logprobs.append(logprobs[i])
            seq.versions.append(version)
            i += 1
            if tok in seq.stop_token_ids or (seq.stop_check is not None and seq.stop_check(seq)):
                self.finish(seq, "stop")
            elif len(seq.tokens) - seq.prompt_len >= seq.max_new:
                self.finish(seq, "length")
            else:
                continue
            done.append(seq)
        return done

    # -- leaving -------------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (running or waiting) and free its blocks at once."""
        seq.finish_reason = reason
        if seq.row >= 0:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)

    def abort_where(self, pred: Callable[[Sequence], bool]) -> list[Sequence]:
        """Finish every sequence matching `pred` with reason `abort`; returns them."""
        out = [s for s in [*self.running, *self.waiting] if pred(s)]
        for s in out:
            self.finish(s, "abort")
        return out

    def reset_prefix_cache(self) -> None:
        """Forget cached KV (it is stale after a weight update); running sequences stop registering."""
        self.alloc.reset_prefix_cache()
        self._inflight.clear()
        for s in [*self.running, *self.waiting]:
            s.cacheable = False

    # -- internals -------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = seq.num_registered = 0
        self.waiting.appendleft(seq)
        self.counters["preemptions"] += 1

    def _release(self, seq: Sequence) -> None:
        for h in seq.hashes[seq.num_registered:]:
            if self._inflight.get(h) is seq:
                del self._inflight[h]
        self.alloc.release(seq.blocks)
        self.block_table[seq.row, : len(seq.blocks)] = NULL_BLOCK
        self._free_rows.append(seq.row)
        seq.blocks, seq.row = [], -1

    def _take_row(self, seq: Sequence) -> None:
        seq.row = self._free_rows.pop()

    def _append_blocks(self, seq: Sequence, blocks: list[int]) -> None:
        n = len(seq.blocks)
        self.block_table[seq.row, n:n + len(blocks)] = blocks
        seq.blocks += blocks

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed // self.bs
        if len(seq.hashes) < full:
            seq.hashes += block_hashes(seq.tokens[: full * self.bs], self.bs, len(seq.hashes),
                                       seq.hashes[-1] if seq.hashes else None)
        for i in range(seq.num_registered, full):
            h = seq.hashes[i]
            if seq.cacheable:
                self.alloc.register(seq.blocks[i], h)
            if self._inflight.get(h) is seq:
                del self._inflight[h]
        seq.num_registered = full
