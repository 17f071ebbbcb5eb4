"""The CPU attention of the built-in engine (`SdpaPagedAttention`) against the slow torch references.

The mixed decode + prefill step is covered in test_embedded.py; these tests cover the decode path's
two implementations (block-diagonal matmuls for few KV heads, SDPA for many), the reuse of its
scratch buffers from one step to the next, and sliding windows and soft-capped scores (Mistral,
Gemma 2) against a slow one-query-at-a-time reference.
"""

from __future__ import annotations

import pytest
import torch

from agentrl.rollout.backends.embedded.attention import SdpaPagedAttention
from agentrl.rollout.backends.embedded.kernels import paged_decode_attention_reference
from agentrl.rollout.backends.embedded.scheduler import Chunk, Sequence, StepPlan
from agentrl.rollout.backends.embedded.step_inputs import build_step_inputs


def _decode_step(lens: list[int], table, P: int):
    """Step inputs of one decode token for each sequence, sequence i owning row i of `table`."""
    seqs = [Sequence(i, list(range(n)), max_new=1, row=i) for i, n in enumerate(lens)]
    return build_step_inputs(StepPlan([Chunk(s, n - 1, 1, True) for s, n in zip(seqs, lens)]), table, P,
                             torch.device("cpu"))


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 1), (4, 2), (8, 4), (4, 4), (16, 8)])
def test_decode_matches_the_reference(num_q_heads, num_kv_heads):
    # (16, 8) takes the SDPA path (more than 4 KV heads); the others the block-diagonal matmuls.
    torch.manual_seed(0)
    P, D = 4, 8
    table = torch.randperm(63).add(1).numpy().reshape(7, 9).astype("int32")
    k_cache, v_cache = torch.randn(64, P, num_kv_heads, D), torch.randn(64, P, num_kv_heads, D)
    inp = _decode_step([1, 9, 13, 36, 4], table, P)
    q = torch.randn(5, num_q_heads, D)
    got = SdpaPagedAttention()(q, k_cache, v_cache, inp.meta, D ** -0.5)
    m = inp.meta
    want = paged_decode_attention_reference(q, k_cache, v_cache, m.decode_block_table, m.decode_seq_lens, D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_scratch_buffers_are_reused_across_batch_sizes():
    # A large step then a smaller one: the second reads the first's buffers (the block-diagonal
    # query buffer must still be zero off its diagonal) and must not see any of its values.
    torch.manual_seed(1)
    P, Hq, Hkv, D = 4, 4, 2, 8
    table = torch.randperm(63).add(1).numpy().reshape(7, 9).astype("int32")
    k_cache, v_cache = torch.randn(64, P, Hkv, D), torch.randn(64, P, Hkv, D)
    attn = SdpaPagedAttention()
    for lens in ([30, 9, 13, 36, 4, 17, 25], [3, 5], [33, 2, 8]):
        inp = _decode_step(lens, table, P)
        q = torch.randn(len(lens), Hq, D)
        got = attn(q, k_cache, v_cache, inp.meta, D ** -0.5)
        m = inp.meta
        want = paged_decode_attention_reference(q, k_cache, v_cache, m.decode_block_table, m.decode_seq_lens,
                                                D ** -0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _slow_attention(q, k_cache, v_cache, table, positions, rows, scale, window, softcap):
    """One query at a time: keys 0..pos of its sequence (only the last `window` with a window),
    scores scaled then capped as HF's eager attention does, softmax, weighted values. [N, Hq, D]."""
    P, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for i, (pos, row) in enumerate(zip(positions, rows)):
        first = 0 if window is None else max(0, pos - window + 1)
        keys = torch.arange(first, pos + 1)
        blocks = torch.as_tensor(table[row])[keys // P].long()
        k, v = k_cache[blocks, keys % P], v_cache[blocks, keys % P]  # [n, Hkv, D]
        G = q.shape[1] // Hkv
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [n, Hq, D]
        scores = torch.einsum("hd,nhd->hn", q[i], k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out[i] = torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), v)
    return out


@pytest.mark.parametrize("num_kv_heads", [2, 8])  # the block-diagonal decode path, and SDPA
@pytest.mark.parametrize("window,softcap", [(5, None), (None, 1.5), (5, 1.5), (64, None)])
def test_window_and_softcap_match_a_slow_reference(num_kv_heads, window, softcap):
    # Two decodes and two prefill chunks, one after a cached prefix: windows cut into both, and
    # a window wider than every sequence must equal full attention.
    torch.manual_seed(2)
    P, Hq, D = 4, 2 * num_kv_heads, 8
    table = torch.randperm(63).add(1).numpy().reshape(7, 9).astype("int32")
    k_cache, v_cache = torch.randn(64, P, num_kv_heads, D), torch.randn(64, P, num_kv_heads, D)
    seqs = [Sequence(i, list(range(n)), max_new=1, row=i) for i, n in enumerate([9, 13, 11, 6])]
    chunks = [Chunk(seqs[0], 8, 1, True), Chunk(seqs[1], 12, 1, True), Chunk(seqs[2], 4, 7, True),
              Chunk(seqs[3], 0, 6, True)]
    inp = build_step_inputs(StepPlan(chunks), table, P, torch.device("cpu"))
    q = 2 * torch.randn(inp.input_ids.shape[0], Hq, D)  # large enough scores for the cap to bite
    got = SdpaPagedAttention()(q, k_cache, v_cache, inp.meta, D ** -0.5, window=window, softcap=softcap)
    positions = [c.start + t for c in chunks for t in range(c.n)]
    rows = [c.seq.row for c in chunks for _ in range(c.n)]
    want = _slow_attention(q, k_cache, v_cache, table, positions, rows, D ** -0.5, window, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
