"""The built-in PyTorch engine: batched sampling with a KV cache over any HF causal LM.

It runs wherever SGLang and vLLM are not installed (CPU, tests, laptops). Requests that arrive
while the event loop is busy are gathered into one batch; the batch is prefilled once (left
padded), then decoded step by step with the model's KV cache, every row with its own sampling
parameters. The forward passes run in a worker thread, so tools keep running while it decodes.

This first version batches in waves (a batch runs until its last row finishes); continuous
batching and a paged cache come later without changing the `Engine` contract.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from agentrl.errors import EngineError
from agentrl.rollout.engine import EngineStats, Generation, SamplingParams


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    future: asyncio.Future


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return (tokens [B], logprobs [B]).

    Args:
        logits: [B, V] next-token logits.
        temperature: [B]; 0 means greedy.
        top_p: [B] nucleus mass in (0, 1].
        generators: per-row RNGs (None: the global RNG).
    """
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)  # [B, V]
    logprobs_all = torch.log_softmax(scaled, dim=-1)  # [B, V]
    probs = logprobs_all.exp()
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p.unsqueeze(-1)  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if all(g is None for g in generators):
        tokens[:] = torch.multinomial(probs, 1).squeeze(-1)
    else:
        for i, g in enumerate(generators):
            tokens[i] = torch.multinomial(probs[i], 1, generator=g).squeeze(-1)
    tokens = torch.where(greedy, logits.argmax(-1), tokens)
    return tokens, logprobs_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class EmbeddedEngine:
    """A pure-PyTorch engine.

    Args:
        model: A path to a Hugging Face causal LM directory, or a loaded model.
        device: Where to run (`cpu`, `cuda`).
        dtype: Weights dtype (float32 on CPU keeps logprobs exact).
        max_batch_size: Most sequences decoded together.
        max_model_len: Longest prompt + response accepted.

    Example:
        >>> engine = EmbeddedEngine("runs/tiny-model")                            # doctest: +SKIP
        >>> gen = await engine.generate([1, 2, 3], SamplingParams(max_tokens=8))   # doctest: +SKIP
    """

    def __init__(self, model, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_size: int = 256, max_model_len: int = 4096):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.config._attn_implementation = "sdpa"
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.pad_id = 0
        self.weight_version = 0
        self.stats = EngineStats()
        self._pending: list[_Request] = []
        self._worker: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._abort = threading.Event()
        self._lock = threading.Lock()

    # -- the Engine contract -----------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Generation:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EngineError("prompt_ids is empty; a request needs at least one token")
        if len(prompt) >= self.max_model_len:
            raise EngineError(f"prompt has {len(prompt)} tokens; max_model_len is {self.max_model_len}")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        fut = loop.create_future()
        self._pending.append(_Request(prompt, sampling, fut))
        self._wakeup.set()
        return await fut

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy new weights in place (between batches; the lock keeps a batch from seeing half)."""
        with self._lock, torch.no_grad():
            missing, unexpected = self.model.load_state_dict(dict(state_dict), strict=False)
            if unexpected or [k for k in missing if "rotary" not in k]:
                raise EngineError(f"weights do not match the engine's model: missing={missing[:5]} unexpected={unexpected[:5]}")
            self.weight_version = version

    def sleep(self) -> None:
        """Nothing is cached between batches in this version, so there is nothing to free."""

    def wake(self) -> None:
        """Counterpart of `sleep`."""

    def abort(self) -> None:
        """Stop the running batch; its requests return what they have with finish_reason `abort`."""
        self._abort.set()

    # -- batching ------------------------------------------------------------------------------
    async def _serve(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Let every coroutine that is about to submit do so, so they share one batch.
            for _ in range(3):
                await asyncio.sleep(0)
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size :]
                try:
                    outs = await asyncio.to_thread(self._run_batch, [(r.prompt_ids, r.sampling) for r in batch])
                except Exception as exc:  # a failed batch fails its requests, not the engine
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                    continue
                for r, out in zip(batch, outs):
                    if not r.future.done():
                        r.future.set_result(out)

    @torch.no_grad()
    def _run_batch(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Generation]:
        with self._lock:
            t0 = time.perf_counter()
            self._abort.clear()
            outs = self._decode(requests)
            self.stats.batches += 1
            self.stats.requests += len(requests)
            self.stats.prompt_tokens += sum(len(p) for p, _ in requests)
            self.stats.generated_tokens += sum(len(o.token_ids) for o in outs)
            self.stats.generate_seconds += time.perf_counter() - t0
            return outs

    def _decode(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Generation]:
        B = len(requests)
        dev = self.device
        lengths = [len(p) for p, _ in requests]
        width = max(lengths)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, width), dtype=torch.long)
        for i, (p, _) in enumerate(requests):  # left padding keeps every row's last token in the last column
            input_ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, W]
        temperature = torch.tensor([s.temperature for _, s in requests], device=dev)
        top_p = torch.tensor([s.top_p for _, s in requests], device=dev)
        gens = [None if s.seed is None else torch.Generator(device=dev).manual_seed(s.seed) for _, s in requests]
        budget = [min(s.max_tokens, self.max_model_len - n) for (_, s), n in zip(requests, lengths)]
        stops = [set(s.stop_token_ids) for _, s in requests]
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_lps: list[list[float]] = [[] for _ in range(B)]
        reason: list[str | None] = [None] * B
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = positions[:, -1:] + 1  # [B, 1]
        while True:
            tokens, lps = sample_tokens(logits, temperature, top_p, gens)
            tok_list, lp_list = tokens.tolist(), lps.tolist()
            for i in range(B):
                if reason[i] is not None:
                    continue
                out_tokens[i].append(tok_list[i])
                out_lps[i].append(lp_list[i])
                if tok_list[i] in stops[i]:
                    reason[i] = "stop"
                elif len(out_tokens[i]) >= budget[i]:
                    reason[i] = "length"
            if self._abort.is_set():
                reason = [r or "abort" for r in reason]
            if all(r is not None for r in reason):
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=attn, position_ids=next_pos,
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
        return [Generation(tuple(t), tuple(lp), r or "length", self.weight_version)
                for t, lp, r in zip(out_tokens, out_lps, reason)]
