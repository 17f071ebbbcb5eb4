"""Turn a scheduler `StepPlan` into the tensors of one model step.

Tokens are laid out flat: the decode group first (chunks of one token), then the prefill group
(longer chunks), which is the order `attention.StepMetadata` expects. Sampled rows keep the
plan's order, so the sampled tokens line up with `Scheduler.finish_step`. Index arithmetic is
done in numpy on the host and copied to the device once per tensor.

Letters: N new tokens, S sampled rows, Bd / Bp decode / prefill sequences, T longest chunk,
M block-table width, P block size.
"""

from __future__ import annotations

import numpy as np
import torch

from agentrl.rollout.backends.attention import StepMetadata
from agentrl.rollout.backends.model_runner import StepInputs
from agentrl.rollout.backends.scheduler import Chunk, StepPlan


def _to(a: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype, non_blocking=True)


def _prefill_meta(chunks: list[Chunk], block_table: np.ndarray, P: int, device: torch.device) -> dict:
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    lens = np.array([c.n for c in chunks], dtype=np.int64)
    ends = starts + lens
    rows = np.array([c.seq.row for c in chunks], dtype=np.int64)
    T, Mp = int(lens.max()), int(-(-ends.max() // P))
    t = np.arange(T)
    cu = np.concatenate([[0], np.cumsum(lens)])
    inside = t[None, :] < lens[:, None]  # [Bp, T]
    pad_src = np.where(inside, cu[:-1, None] + t[None, :], 0)  # [Bp, T]
    return dict(
        prefill_block_table=_to(block_table[rows, :Mp], device, torch.int32),
        prefill_seq_lens=_to(ends, device, torch.int32),
        prefill_cu_q=_to(cu, device, torch.int32),
        prefill_pad_src=_to(pad_src.reshape(-1), device, torch.long),
        prefill_pad_valid=_to(np.flatnonzero(inside.reshape(-1)), device, torch.long),
        prefill_q_pos=_to(starts[:, None] + t[None, :], device, torch.long),
        max_q=T, max_k=int(ends.max()),
    )


def build_step_inputs(plan: StepPlan, block_table: np.ndarray, block_size: int, device: torch.device) -> StepInputs:
    """Tensors for `plan`; `block_table` is the scheduler's `[rows, M]` int32 table."""
    P = block_size
    dec = [c for c in plan.chunks if c.n == 1]
    pre = [c for c in plan.chunks if c.n > 1]
    ids = [c.seq.tokens[c.start] for c in dec]
    pos = [c.start for c in dec]
    last = {c.seq: i for i, c in enumerate(dec)}
    row_of_token = [c.seq.row for c in dec]
    for c in pre:
        ids += c.seq.tokens[c.start:c.start + c.n]
        pos += range(c.start, c.start + c.n)
        row_of_token += [c.seq.row] * c.n
        last[c.seq] = len(ids) - 1
    logits_index = [last[c.logits_from or c.seq] for c in plan.chunks if c.sample]
    pos_np = np.array(pos, dtype=np.int64)
    slots = block_table[np.array(row_of_token, dtype=np.int64), pos_np // P].astype(np.int64) * P + pos_np % P
    Bd = len(dec)
    meta = dict(decode_block_table=None, decode_seq_lens=None, prefill_block_table=None, prefill_seq_lens=None,
                prefill_cu_q=None, prefill_pad_src=None, prefill_pad_valid=None, prefill_q_pos=None)
    if Bd:
        lens = pos_np[:Bd] + 1
        rows = np.array(row_of_token[:Bd], dtype=np.int64)
        meta["decode_block_table"] = _to(block_table[rows, : int(-(-lens.max() // P))], device, torch.int32)
        meta["decode_seq_lens"] = _to(lens, device, torch.int32)
    if pre:
        meta.update(_prefill_meta(pre, block_table, P, device))
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True),
        positions=_to(pos_np, device, torch.long),
        logits_index=torch.tensor(logits_index, dtype=torch.long).to(device, non_blocking=True),
        meta=StepMetadata(slots=_to(slots, device, torch.long), num_decode=Bd, **meta),
    )
