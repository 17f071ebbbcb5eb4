"""Turn a scheduler `StepPlan` into the tensors of one model step.

Tokens are laid out flat: the decode group first (chunks of one token), then the prefill group
(longer chunks), which is the order `attention.StepMetadata` expects. Sampled rows keep the
plan's order, so the sampled tokens line up with `Scheduler.finish_step`. Index arithmetic is
done in numpy on the host and copied to the device in one transfer per dtype.

Letters: N new tokens, S sampled rows, Bd / Bp decode / prefill sequences, T longest chunk,
M block-table width, P block size.
"""

from __future__ import annotations

import numpy as np
import torch

from agentrl.rollout.backends.embedded.attention import StepMetadata
from agentrl.rollout.backends.embedded.model_runner import StepInputs
from agentrl.rollout.backends.embedded.sequences import Chunk, StepPlan
from agentrl.rollout.backends.embedded.transfer import to_device


class _Pack:
    """Host arrays of one step, copied to the device in one transfer per dtype (int64, int32).

    Each `add` returns a slot; `send` concatenates, copies once (non-blocking), and hands back
    views of the device buffer, so a step costs two host-to-device copies whatever its shape.
    """

    def __init__(self) -> None:
        self.parts: dict[torch.dtype, list[np.ndarray]] = {torch.long: [], torch.int32: []}

    def add(self, a, dtype: torch.dtype) -> tuple[torch.dtype, int]:
        parts = self.parts[dtype]
        parts.append(np.asarray(a, dtype=np.int64 if dtype == torch.long else np.int32))
        return dtype, len(parts) - 1

    def send(self, device: torch.device) -> dict[torch.dtype, list[torch.Tensor]]:
        out: dict[torch.dtype, list[torch.Tensor]] = {}
        for dtype, parts in self.parts.items():
            if not parts:
                continue
            flat = to_device(torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts])), device)
            views, i = [], 0
            for p in parts:
                views.append(flat[i:i + p.size].view(p.shape))
                i += p.size
            out[dtype] = views
        return out


def _prefill_meta(chunks: list[Chunk], block_table: np.ndarray, P: int, pack: _Pack) -> dict:
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
        prefill_block_table=pack.add(block_table[rows, :Mp], torch.int32),
        prefill_seq_lens=pack.add(ends, torch.int32),
        prefill_cu_q=pack.add(cu, torch.int32),
        prefill_pad_src=pack.add(pad_src.reshape(-1), torch.long),
        prefill_pad_valid=pack.add(np.flatnonzero(inside.reshape(-1)), torch.long),
        prefill_q_pos=pack.add(starts[:, None] + t[None, :], torch.long),
    ), dict(max_q=T, max_k=int(ends.max()))


def build_step_inputs(plan: StepPlan, block_table: np.ndarray, block_size: int, device: torch.device,
                      fed: int = 0) -> StepInputs:
    """Tensors for `plan`; `block_table` is the scheduler's `[rows, M]` int32 table.

    `fed`: the first `fed` chunks are decodes whose tokens are not on the host yet (a speculative
    step): their ids are left 0 for the caller to write on the device.
    """
    P = block_size
    dec = [c for c in plan.chunks if c.n == 1]
    pre = [c for c in plan.chunks if c.n > 1]
    ids = [0] * fed + [c.seq.tokens[c.start] for c in dec[fed:]]
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
    pack = _Pack()
    slot = dict(input_ids=pack.add(ids, torch.long), positions=pack.add(pos_np, torch.long),
                logits_index=pack.add(logits_index, torch.long), slots=pack.add(slots, torch.long))
    sizes = {}
    if Bd:
        lens = pos_np[:Bd] + 1
        rows = np.array(row_of_token[:Bd], dtype=np.int64)
        slot["decode_block_table"] = pack.add(block_table[rows, : int(-(-lens.max() // P))], torch.int32)
        slot["decode_seq_lens"] = pack.add(lens, torch.int32)
    if pre:
        more, sizes = _prefill_meta(pre, block_table, P, pack)
        slot.update(more)
    sent = pack.send(device)
    t = {name: sent[dtype][i] for name, (dtype, i) in slot.items()}
    meta = StepMetadata(slots=t.pop("slots"), num_decode=Bd, **{k: t.get(k) for k in _META_TENSORS}, **sizes)
    return StepInputs(input_ids=t["input_ids"], positions=t["positions"], logits_index=t["logits_index"], meta=meta)


_META_TENSORS = ("decode_block_table", "decode_seq_lens", "prefill_block_table", "prefill_seq_lens",
                 "prefill_cu_q", "prefill_pad_src", "prefill_pad_valid", "prefill_q_pos")
