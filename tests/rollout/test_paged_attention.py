"""Paged attention: the torch references against dense per-sequence attention (CPU), and the Triton
kernels against the references (GPU, `pytest -m gpu`).

Caches are built the way the engine builds them: each sequence's tokens go through `write_kv` into
blocks drawn from a shuffled pool, the last block part-filled, the cache's free slots full of noise
and unused block-table entries set to -1, so any read outside a sequence's tokens shows up.
"""

from __future__ import annotations

import pytest
import torch

from agentrl.rollout.backends.embedded.kernels import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    write_kv,
    write_kv_reference,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def build_paged_cache(lens, num_kv_heads, head_dim, block_size, gen, dtype=torch.float32, spare_blocks=5,
                      extra_width=2):
    """Dense per-sequence K/V and the same tokens in a shuffled paged cache (built on CPU).

    Returns (k_cache, v_cache, block_table, dense_k, dense_v); dense_k[b] is [lens[b], Hkv, D].
    """
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + spare_blocks
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)  # noise in free slots
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    table = torch.full((len(lens), max(per_seq, default=0) + extra_width), -1, dtype=torch.int32)
    dense_k, dense_v, slots = [], [], []
    for b, n in enumerate(lens):
        table[b, :per_seq[b]] = torch.tensor([pool.pop() for _ in range(per_seq[b])], dtype=torch.int32)
        pos = torch.arange(n)
        slots.append(table[b, pos // block_size].long() * block_size + pos % block_size)
        dense_k.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
        dense_v.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
    write_kv_reference(k_cache, v_cache, torch.cat(dense_k), torch.cat(dense_v), torch.cat(slots))
    return k_cache, v_cache, table, dense_k, dense_v


def dense_attention(q, k, v, q_pos, scale):
    """Obviously-correct causal attention in float64. q: [n, Hq, D], k/v: [L, Hkv, D], q_pos: [n]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    visible = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]  # [n, L]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v)


# ---------------------------------------------------------------------------------------------
# CPU: references.
# ---------------------------------------------------------------------------------------------

def test_write_kv_puts_each_token_in_its_slot_and_skips_negative_slots():
    k_cache = torch.zeros(4, 16, 2, 8)
    v_cache = torch.zeros(4, 16, 2, 8)
    k = torch.randn(3, 2, 8)
    v = torch.randn(3, 2, 8)
    # slot = block * 16 + offset: 53 -> block 3 offset 5; 16 -> block 1 offset 0; -1 -> skipped.
    write_kv(k_cache, v_cache, k, v, torch.tensor([53, 16, -1]))
    assert torch.equal(k_cache[3, 5], k[0]) and torch.equal(v_cache[3, 5], v[0])
    assert torch.equal(k_cache[1, 0], k[1]) and torch.equal(v_cache[1, 0], v[1])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2  # nothing else written


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size",
                         [(14, 2, 64, 16), (4, 4, 32, 8), (6, 2, 24, 5)])
def test_decode_reference_matches_dense_attention(num_q_heads, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(0)
    lens = [1, 7, 16, 17, 40, 33]  # block-aligned and not, single-token
    k_cache, v_cache, table, dense_k, dense_v = build_paged_cache(lens, num_kv_heads, head_dim, block_size, gen)
    q = torch.randn(len(lens), num_q_heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), scale)
    for b, n in enumerate(lens):
        want = dense_attention(q[b:b + 1], dense_k[b], dense_v[b], torch.tensor([n - 1]), scale)[0]
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)


def test_decode_reference_gives_zeros_for_an_empty_sequence():
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, table, _, _ = build_paged_cache([5, 9], 2, 16, 4, gen)
    q = torch.randn(2, 4, 16, generator=gen)
    out = paged_decode_attention_reference(q, k_cache, v_cache, table, torch.tensor([0, 9], dtype=torch.int32), 0.25)
    assert torch.equal(out[0], torch.zeros(4, 16)) and torch.isfinite(out).all()


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size", [(14, 2, 64, 16), (4, 4, 32, 8)])
def test_prefill_reference_matches_dense_attention_with_cached_prefixes(num_q_heads, num_kv_heads, head_dim,
                                                                      block_size):
    gen = torch.Generator().manual_seed(2)
    lens = [5, 40, 33, 16, 21]
    q_lens = [5, 3, 33, 1, 0]  # whole prompt, prefix hit, whole, one token, nothing new
    k_cache, v_cache, table, dense_k, dense_v = build_paged_cache(lens, num_kv_heads, head_dim, block_size, gen)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, k_cache, v_cache, table, cu, torch.tensor(lens, dtype=torch.int32), scale,
                                  max(q_lens), max(lens))
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        q_pos = torch.arange(n - nq, n)  # the new tokens are the last nq positions
        want = dense_attention(q[cu[b]:cu[b + 1]], dense_k[b], dense_v[b], q_pos, scale)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), want, atol=1e-5, rtol=1e-5)


def test_prefill_of_one_token_equals_decode():
    gen = torch.Generator().manual_seed(3)
    lens = [3, 18, 31]
    k_cache, v_cache, table, _, _ = build_paged_cache(lens, 2, 16, 4, gen)
    q = torch.randn(3, 6, 16, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    decode = paged_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, 0.25)
    prefill = paged_prefill_attention_reference(q, k_cache, v_cache, table, torch.arange(4, dtype=torch.int32),
                                                seq_lens, 0.25)
    torch.testing.assert_close(prefill, decode, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,max_tokens,expected", [(8, 32768, 32), (16, 16384, 16), (64, 4352, 4),
                                                        (256, 768, 1), (64, 512, 4), (1, 64, 1)])
def test_default_split_count_keeps_about_four_programs_per_sm(batch, max_tokens, expected):
    # 132 SMs (an H200), 2 KV heads: the counts the H200 sweep of bench/paged_attention.py --long chose.
    from agentrl.rollout.backends.embedded.kernels.paged_attention import default_num_splits
    assert default_num_splits(batch, 2, max_tokens, 132) == expected


def test_mismatched_heads_are_rejected_with_the_shapes():
    k_cache = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        paged_decode_attention(torch.zeros(1, 4, 8), k_cache, k_cache, torch.zeros(1, 1, dtype=torch.int32),
                               torch.ones(1, dtype=torch.int32), 1.0)


# ---------------------------------------------------------------------------------------------
# GPU: Triton kernels against the references (bf16, Qwen2-0.5B heads: 14 query, 2 KV, dim 64).
# ---------------------------------------------------------------------------------------------

def _random_lens(gen, batch, max_len):
    return torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()


def _to_cuda(*tensors):
    return [t.cuda() for t in tensors]


def _assert_close_bf16(out, ref, what):
    diff = (out.float() - ref.float()).abs()
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-12)).item()
    print(f"{what}: max abs diff {diff.max().item():.3g}, rel {rel:.2g}")
    assert torch.isfinite(out).all(), what
    assert diff.max().item() < 3e-2 and rel < 1e-2, what


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,max_len,heads", [
    (1, 4096, (14, 2, 64)), (3, 37, (14, 2, 64)), (64, 512, (14, 2, 64)), (256, 700, (14, 2, 64)),
    (17, 4096, (14, 2, 64)), (8, 1000, (32, 8, 128)), (5, 300, (8, 8, 64))])
@pytest.mark.parametrize("num_splits", [None, 1, 4, 32])
def test_triton_decode_matches_reference(batch, max_len, heads, num_splits):
    num_q_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(batch * 7 + max_len)
    lens = _random_lens(gen, batch, max_len)
    k_cache, v_cache, table, _, _ = build_paged_cache(lens, num_kv_heads, head_dim, 16, gen, torch.bfloat16)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(torch.bfloat16)
    q, k_cache, v_cache, table, seq_lens = _to_cuda(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, scale, num_splits=num_splits)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, scale)
    _assert_close_bf16(out, ref, f"decode B={batch} max_len={max_len} heads={heads} splits={num_splits}")


@gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_triton_decode_gives_zeros_for_padding_rows(num_splits):
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, table, _, _ = build_paged_cache([300, 20, 5], 2, 64, 16, gen, torch.bfloat16)
    table[1] = -1  # a padding row of a CUDA-graph batch: no blocks, seq_len 0
    q = torch.randn(3, 14, 64, generator=gen).to(torch.bfloat16)
    q, k_cache, v_cache, table, seq_lens = _to_cuda(q, k_cache, v_cache, table, torch.tensor([300, 0, 5],
                                                                                          dtype=torch.int32))
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, num_splits=num_splits)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    _assert_close_bf16(out, ref, f"decode with a padding row, splits={num_splits}")


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,max_len,heads", [(1, 4096, (14, 2, 64)), (9, 300, (14, 2, 64)),
                                                 (40, 1100, (14, 2, 64)), (4, 700, (32, 8, 128))])
def test_triton_prefill_matches_reference(batch, max_len, heads):
    num_q_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(batch + max_len)
    lens = _random_lens(gen, batch, max_len)
    # Half the sequences prefill everything, half only a random tail after a cached prefix.
    q_lens = [n if b % 2 else int(torch.randint(0, n + 1, (1,), generator=gen)) for b, n in enumerate(lens)]
    k_cache, v_cache, table, _, _ = build_paged_cache(lens, num_kv_heads, head_dim, 16, gen, torch.bfloat16)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(torch.bfloat16)
    q, k_cache, v_cache, table, cu, seq_lens = _to_cuda(q, k_cache, v_cache, table, cu,
                                                        torch.tensor(lens, dtype=torch.int32))
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, k_cache, v_cache, table, cu, seq_lens, scale, max(q_lens), max(lens))
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, table, cu, seq_lens, scale)
    _assert_close_bf16(out, ref, f"prefill B={batch} max_len={max_len} heads={heads}")


@gpu
@needs_cuda
@pytest.mark.parametrize("tile", [(64, 64, 4, 2, False, False), (64, 64, 4, 2, True, False),
                                  (64, 64, 4, 2, True, True), (128, 64, 8, 3, True, True),
                                  (128, 128, 8, 3, True, False), (64, 128, 4, 3, True, True),
                                  (128, 32, 4, 3, True, False)])
def test_triton_prefill_tiles_match_reference_at_long_prefixes(tile, monkeypatch):
    # Every tile shape the bench sweeps, over chunks that start mid-block after long cached prefixes
    # (the unmasked blocks below the diagonal and the masked ones on it both in play).
    from agentrl.rollout.backends.embedded.kernels import paged_attention as pa
    for name, value in zip(pa.PREFILL_KNOBS, tile):
        monkeypatch.setattr(pa, name, value)
    gen = torch.Generator().manual_seed(sum(tile[:4]))
    lens, q_lens = [12001, 5000, 700, 4133], [3001, 5000, 1, 77]
    k_cache, v_cache, table, _, _ = build_paged_cache(lens, 2, 64, 16, gen, torch.bfloat16)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), 14, 64, generator=gen).to(torch.bfloat16)
    q, k_cache, v_cache, table, cu, seq_lens = _to_cuda(q, k_cache, v_cache, table, cu,
                                                        torch.tensor(lens, dtype=torch.int32))
    out = paged_prefill_attention(q, k_cache, v_cache, table, cu, seq_lens, 0.125, max(q_lens), max(lens))
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, table, cu, seq_lens, 0.125)
    _assert_close_bf16(out, ref, f"prefill tile {tile}")


@gpu
@needs_cuda
def test_triton_write_kv_matches_reference():
    gen = torch.Generator().manual_seed(4)
    k_cache = torch.randn(50, 16, 2, 64, generator=gen).to(torch.bfloat16).cuda()
    v_cache = torch.randn(50, 16, 2, 64, generator=gen).to(torch.bfloat16).cuda()
    k, v = (torch.randn(300, 2, 64, generator=gen).cuda() for _ in range(2))  # float32 in, bf16 cache
    slots = torch.randperm(800, generator=gen)[:300].cuda()
    slots[::7] = -1
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(want_k, want_v, k, v, slots)
    write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@gpu
@needs_cuda
def test_triton_decode_replays_in_a_cuda_graph_with_new_lengths():
    gen = torch.Generator().manual_seed(5)
    lens = _random_lens(gen, 32, 900)
    k_cache, v_cache, table, _, _ = build_paged_cache(lens, 2, 64, 16, gen, torch.bfloat16)
    q = torch.randn(32, 14, 64, generator=gen).to(torch.bfloat16)
    q, k_cache, v_cache, table, seq_lens = _to_cuda(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
    run = lambda: paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for step in range(3):  # new queries and shorter lengths, written in place, as the engine does
        q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
        seq_lens.copy_((seq_lens - 5 * step).clamp_min(1))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, run()), f"replay {step} differs from an eager call"
