"""Running the engine's steps on the device and reading their sampled tokens back.

The engine thread (`embedded.py`) decides what runs; `DeviceSteps` runs it:
- the forward pass, replayed from a CUDA graph when the step is decode-only and a bucket fits
  (`cuda_graphs.py`), eager otherwise;
- the copy-on-write block copies and the sampling;
- a non-blocking copy of the sampled tokens and logprobs to pinned host memory, marked by an event.

A launched step is an `InFlight`: nothing waits for it until `complete`.

Async steps: `speculate` launches the step that follows a launched one before that one's tokens
are on the host (`Scheduler.speculate` plans it: the decodes of the sequences the launched step
samples, and with prefill speculation the next prefill chunks and admissions too). The decodes'
input ids are copied on the device from the launched step's sampled ids. The host's bookkeeping
of step t (stop checks, finished requests, the next launch) then runs while the device computes
step t+1, instead of the device idling through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentrl.rollout.backends.embedded.cuda_graphs import DecodeGraphs
from agentrl.rollout.backends.embedded.kv_cache import PagedKVCache
from agentrl.rollout.backends.embedded.model_runner import ModelRunner
from agentrl.rollout.backends.embedded.sampling import SamplingBatch, sample
from agentrl.rollout.backends.embedded.scheduler import Scheduler
from agentrl.rollout.backends.embedded.sequences import Sequence as Seq
from agentrl.rollout.backends.embedded.sequences import StepPlan
from agentrl.rollout.backends.embedded.step_inputs import build_step_inputs
from agentrl.rollout.backends.embedded.transfer import to_device


@dataclass(eq=False)
class InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    plan: StepPlan
    tokens: torch.Tensor  # [S] int64 on the device (a speculative next step reads its input ids here)
    host: torch.Tensor  # [2, S] float64: tokens and logprobs, on the host once `event` has completed
    event: torch.cuda.Event | None
    version: int  # weight version that computed the step


class DeviceSteps:
    """The KV cache, the CUDA graphs and the launch / speculate / complete cycle of one engine.

    Args:
        runner: The model runner.
        block_size: Tokens per KV block.
        max_batch_size: Most sequences in a step (the largest graph bucket).
        cuda_graphs: Replay decode-only steps from CUDA graphs (CUDA only).
    """

    def __init__(self, runner: ModelRunner, block_size: int, max_batch_size: int, cuda_graphs: bool):
        self.runner = runner
        self.device = runner.device
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.cuda_graphs = cuda_graphs
        self.cache: PagedKVCache | None = None
        self.graphs: DecodeGraphs | None = None  # built with the cache; they read its addresses
        self.counts = {"steps": 0, "graph_steps": 0, "speculative_steps": 0, "speculative_prefills": 0,
                       "dropped_rows": 0}

    def allocate(self, num_blocks: int, table_width: int) -> None:
        """Create the KV cache (and the graphs, which read its addresses) unless it exists."""
        if self.cache is None:
            self.cache = self.runner.new_cache(num_blocks, self.block_size)
            if self.cuda_graphs:
                self.graphs = DecodeGraphs(self.runner, self.cache, self.max_batch_size, table_width)

    def release(self) -> None:
        """Drop the KV cache and the graphs (`sleep`); `allocate` makes new ones."""
        self.cache = self.graphs = None

    def launch(self, plan: StepPlan, sched: Scheduler, version: int, fed: torch.Tensor | None = None) -> InFlight:
        """Queue the forward and the sampling of `plan` on the device; nothing waits for them here.

        `fed`: the token ids of the plan's first `len(fed)` chunks (decodes) as a device tensor (a
        speculative step: the host has not seen them).
        """
        rows = [c for c in plan.chunks if c.sample]
        graphs = self.graphs
        if graphs is not None and graphs.bucket(len(plan.chunks)) and DecodeGraphs.decode_only(plan.chunks):
            logits = graphs.run(plan.chunks, sched.block_table, fed)  # [N, V]
            if len(rows) < len(plan.chunks):  # a one-token prefill chunk that does not sample
                keep = [i for i, c in enumerate(plan.chunks) if c.sample]
                logits = logits.index_select(0, to_device(torch.tensor(keep), self.device))
            self.counts["graph_steps"] += 1
        else:
            inputs = build_step_inputs(plan, sched.block_table, self.block_size, self.device,
                                       0 if fed is None else fed.shape[0])
            if fed is not None:
                inputs.input_ids[:fed.shape[0]].copy_(fed)
            logits = self.runner.forward(inputs, self.cache)  # [S, V]
        self.cache.copy_blocks(plan.copies)
        batch = SamplingBatch.build([c.seq.payload.sampling for c in rows],
                                    [c.start + c.n - c.seq.prompt_len for c in rows], self.device)
        tokens, logprobs = sample(logits, batch)
        packed = torch.stack([tokens.double(), logprobs.double()])  # [2, S]
        event = None
        if self.device.type == "cuda":  # copy back without waiting; `event` marks when it has landed
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = packed
        self.counts["steps"] += 1
        return InFlight(plan, tokens, host, event, version)

    def speculate(self, current: InFlight, sched: Scheduler, version: int) -> InFlight | None:
        """Launch the decode step after `current` before `current`'s tokens reach the host (or None)."""
        spec = sched.speculate(current.plan)
        if spec is None:
            return None
        plan, src = spec
        fed = current.tokens[:len(src)] if src == list(range(len(src))) else \
            current.tokens.index_select(0, to_device(torch.tensor(src), self.device))
        self.counts["speculative_steps"] += 1
        self.counts["speculative_prefills"] += len(src) < len(plan.chunks)
        return self.launch(plan, sched, version, fed)

    def complete(self, step: InFlight, sched: Scheduler) -> tuple[list[Seq], int]:
        """Wait for `step`'s sampled tokens and record them.

        Returns:
            (the sequences that finished, the number of tokens kept: rows of sequences that had
            already finished when the step was read are dropped).
        """
        if step.event is not None:
            step.event.synchronize()
        host = step.host.tolist()
        sampled = [c for c in step.plan.chunks if c.sample]
        live = sum(1 for c in sampled if c.seq.finish_reason is None)
        self.counts["dropped_rows"] += len(sampled) - live
        return sched.finish_step(step.plan, [int(t) for t in host[0]], host[1], step.version), live
