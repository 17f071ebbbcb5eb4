"""Continuous batching decisions, checked step by step without a model (sampled tokens are made up)."""

from __future__ import annotations

import pytest

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.kv_cache import BlockAllocator
from agentrl.rollout.backends.embedded.scheduler import Scheduler, Sequence


def make(blocks: int = 64, block_size: int = 4, max_seqs: int = 8, step_tokens: int = 64,
         prefill_speculation: bool = False) -> Scheduler:
    return Scheduler(BlockAllocator(blocks + 1, block_size), max_seqs, step_tokens, max_model_len=256,
                     prefill_speculation=prefill_speculation)


def seq(i: int, prompt: list[int], max_new: int = 4) -> Sequence:
    return Sequence(i, list(prompt), max_new=max_new)


def step(s: Scheduler, token: int = 7):
    """One model step: schedule, pretend to run it, feed back `token` for every sampled row."""
    plan = s.schedule()
    n = sum(c.sample for c in plan.chunks)
    done = s.finish_step(plan, [token] * n, [-0.5] * n, version=0)
    assert s.alloc.num_used <= s.alloc.capacity
    return plan, done


def test_requests_join_and_leave_at_every_step():
    s = make()
    a = seq(0, [1, 2, 3, 4, 5], max_new=3)
    s.add(a)
    plan, _ = step(s)
    assert [(c.seq, c.n, c.sample) for c in plan.chunks] == [(a, 5, True)]
    b = seq(1, [9, 9, 9], max_new=5)
    s.add(b)
    plan, _ = step(s)  # a decodes while b is prefilled in the same step
    assert [(c.seq, c.n) for c in plan.chunks] == [(a, 1), (b, 3)]
    used_with_a = s.alloc.num_used
    _, done = step(s)
    assert done == [a] and a.finish_reason == "length" and a.output == [7, 7, 7]
    assert a.row == -1 and s.alloc.num_used < used_with_a  # a's blocks came back at once
    while s.has_work:
        step(s)
    assert b.output == [7] * 5 and s.alloc.num_used == 0


def test_long_prompts_are_prefilled_in_chunks_within_the_step_budget():
    s = make(step_tokens=8)
    a = seq(0, list(range(20)))
    s.add(a)
    sizes = [step(s)[0].chunks[0].n for _ in range(3)]
    assert sizes == [8, 8, 4] and a.output == [7]  # only the chunk that ends the prompt samples


def test_admission_waits_for_blocks_first_come_first_served():
    s = make(blocks=4)  # 4 blocks of 4 tokens
    a, b, c = seq(0, list(range(12)), max_new=2), seq(1, list(range(8))), seq(2, [1])
    for x in (a, b, c):
        s.add(x)
    plan, _ = step(s)
    assert [ch.seq for ch in plan.chunks] == [a]  # b needs 2 blocks (+1 kept for growth); c waits behind b
    step(s)
    assert a.finish_reason == "length"
    plan, _ = step(s)
    assert [ch.seq for ch in plan.chunks] == [b, c]


def test_a_full_cache_preempts_the_youngest_which_resumes_later():
    s = make(blocks=6)  # 24 token slots for two sequences that want 2 * (4 + 12) = 32
    a, b = seq(0, [1, 2, 3, 4], max_new=12), seq(1, [5, 6, 7, 8], max_new=12)
    s.add(a)
    s.add(b)
    steps = 0
    while s.has_work:
        step(s, token=steps % 50 + 10)
        steps += 1
        assert steps < 100
    assert s.counters["preemptions"] >= 1
    assert a.num_output == 12 and b.num_output == 12  # both finish; b recomputed its tokens after preemption
    assert s.alloc.peak_used <= s.alloc.capacity


def test_identical_prompts_in_one_step_are_forked_from_one_prefill():
    s = make(block_size=4)
    group = [seq(i, list(range(10)), max_new=2) for i in range(4)]  # 2 full blocks + a 2-token tail
    for g in group:
        s.add(g)
    plan, _ = step(s)
    assert [c.n for c in plan.chunks] == [10, 0, 0, 0]  # one prefill
    assert all(c.logits_from is group[0] for c in plan.chunks[1:])
    assert len(plan.copies) == 3  # each fork gets its own copy of the partial tail block
    shared = group[0].blocks[:2]
    assert all(g.blocks[:2] == shared for g in group) and all(s.alloc.ref[b] == 4 for b in shared)
    assert [g.cached_tokens for g in group] == [0, 10, 10, 10] and s.counters["forks"] == 3
    assert all(g.output == [7] for g in group)


def test_a_prefix_being_computed_defers_its_twin_one_step():
    s = make(block_size=4)
    a, b = seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9]), seq(1, [1, 2, 3, 4, 5, 6, 7, 8, 20, 21])
    s.add(a)
    s.add(b)
    plan, _ = step(s)
    assert [c.seq for c in plan.chunks] == [a] and s.counters["deferrals"] == 1
    plan, _ = step(s)
    assert [(c.seq, c.start, c.n) for c in plan.chunks] == [(a, 9, 1), (b, 8, 2)]  # b skips a's 2 blocks
    assert b.cached_tokens == 8 and b.blocks[:2] == a.blocks[:2]


def test_a_later_turn_reuses_the_previous_turns_blocks():
    s = make(block_size=4)
    a = seq(0, list(range(1, 11)), max_new=5)
    s.add(a)
    while s.has_work:
        step(s)
    # KV exists for 14 of a's 15 tokens (the last sampled token was never fed back): 3 full blocks.
    nxt = seq(1, a.tokens + [50, 51, 52])
    s.add(nxt)
    plan, _ = step(s)
    assert nxt.cached_tokens == 12 and plan.chunks[0].start == 12 and plan.chunks[0].n == 6


def test_reset_prefix_cache_stops_reuse():
    s = make(block_size=4)
    a = seq(0, list(range(1, 11)), max_new=1)
    s.add(a)
    step(s)
    s.reset_prefix_cache()
    b = seq(1, list(range(1, 11)), max_new=1)
    s.add(b)
    step(s)
    assert b.cached_tokens == 0


def test_abort_and_oversized_sequences():
    s = make(blocks=4)
    with pytest.raises(EngineError, match="KV blocks"):
        s.add(seq(0, list(range(16))))  # 16 tokens + 1 to sample need 5 blocks of 4
    a, b = seq(1, [1, 2, 3], max_new=50), seq(2, list(range(14)))
    s.add(a)
    s.add(b)
    step(s)
    out = s.abort_where(lambda x: True)
    assert set(out) == {a, b} and all(x.finish_reason == "abort" for x in out)
    assert a.output == [7] and b.output == [] and not s.has_work and s.alloc.num_used == 0


def test_requests_trickling_in_during_decodes_are_held_and_prefilled_together():
    """admit_wait_steps: a lone request waits while everything running decodes (graph-replayed steps),
    until admit_wait_steps pass or a quarter of the running count waits; an idle scheduler, or a step
    that prefills anyway, admits at once."""
    s = Scheduler(BlockAllocator(65, 4), 16, 64, max_model_len=256, admit_wait_steps=3)
    first = seq(0, [1, 2, 3], max_new=50)
    s.add(first)
    assert [c.seq for c in step(s)[0].chunks] == [first]  # nothing running: admitted at once
    for i in range(1, 8):  # seven more running: a quarter of eight is two
        s.add(seq(i, [i, 2, 3], max_new=50))
    step(s)  # the step still prefilling... next ones decode only
    assert len(s.running) == 8
    late = seq(8, [8, 8, 8], max_new=4)
    s.add(late)
    held = [step(s)[0] for _ in range(2)]
    assert all(all(c.n == 1 for c in p.chunks) and late not in [c.seq for c in p.chunks] for p in held)
    assert s.counters["held_admissions"] == 2
    plan, _ = step(s)  # third step since it arrived: admitted
    assert late in [c.seq for c in plan.chunks]
    # Two waiting of eight running are enough to admit both at once.
    a, b = seq(9, [9, 9, 1]), seq(10, [9, 9, 2])
    step(s)
    s.add(a)
    s.add(b)
    assert {a, b} <= {c.seq for c in step(s)[0].chunks}


def test_without_admit_wait_steps_every_request_is_admitted_at_once():
    s = make()
    s.add(seq(0, [1, 2, 3], max_new=50))
    step(s)
    late = seq(1, [4, 5, 6])
    s.add(late)
    assert late in [c.seq for c in step(s)[0].chunks] and s.counters["held_admissions"] == 0


def test_speculative_step_continues_prefills_and_admits_without_the_last_tokens():
    # speculate() plans step t+1 before step t is read back: decodes of t's sampled rows (fed on the
    # device), the next chunk of a prompt t left unfinished, and an admission of a waiting request.
    s = make(block_size=4, step_tokens=8, prefill_speculation=True)
    a, b = seq(0, list(range(6)), max_new=3), seq(1, list(range(100, 120)), max_new=2)
    s.add(a)
    s.add(b)
    t = s.schedule()  # a whole (6, samples), b's first 2 tokens
    assert [(c.seq, c.start, c.n, c.sample) for c in t.chunks] == [(a, 0, 6, True), (b, 0, 2, False)]
    late = seq(2, [5, 5, 5])
    s.add(late)
    spec, src = s.speculate(t)
    assert src == [0]
    assert [(c.seq, c.start, c.n, c.sample) for c in spec.chunks] == [(a, 6, 1, True), (b, 2, 7, False)]
    s.finish_step(t, [7], [-0.5], version=0)  # t is read back after t+1 was launched
    assert a.tokens == list(range(6)) + [7] and b.num_computed == 2
    s.finish_step(spec, [8], [-0.5], version=0)
    assert a.output == [7, 8] and b.num_computed == 9 and late in s.waiting  # no budget left for late
    t2, _ = step(s)
    assert [(c.seq, c.start, c.n) for c in t2.chunks] == [(a, 7, 1), (b, 9, 7)]


def test_a_speculative_decode_row_is_no_parent_for_a_fork():
    # A request whose tokens equal a running sequence's tokens so far must not sample from that
    # sequence's speculative row: that row follows one more token (the one being fed on the device).
    s = make(block_size=4, step_tokens=64, prefill_speculation=True)
    a = seq(0, list(range(10)), max_new=5)
    s.add(a)
    t, _ = step(s)  # a prefilled, token 7 sampled
    t = s.schedule()  # a decodes token 7 (position 10) and samples
    twin = seq(1, list(a.tokens))  # the same 11 tokens a has now
    s.add(twin)
    spec, src = s.speculate(t)
    assert s.counters["forks"] == 0 and all(c.logits_from is None for c in spec.chunks)
    assert [(c.seq, c.n) for c in spec.chunks] == [(a, 1), (twin, 3)]  # 2 blocks from the prefix cache
