"""Trainer throughput: Hugging Face padded batches + SDPA vs agentrl packed varlen, on one batch.

One fixed batch of variable-length sequences (lengths uniform in [min_len, max_len], seeded) is
trained for a few full steps (forward, loss = -sum(mask * advantage * logprob) / mask tokens,
backward, gradient clipping, AdamW step) by each variant:

- `padded`: right padding to the longest sequence of each micro-batch, an attention mask,
  `attn_implementation="sdpa"`, full logits [B, L, V] -> float32 log_softmax, gradient
  checkpointing. Micro-batches take sequences in batch order while B * L stays within the token
  budget (padding counts against the budget, so the baseline gets the same memory).
  `padded_sorted` is the same with sequences sorted by length first (HF's `group_by_length`).
- `packed_ckpt` / `packed`: agentrl's path, `pack_by_token_budget` + `pack_sequences`,
  `agentrl_varlen` attention and chunked `token_logprobs`, with and without gradient checkpointing.
- `packed_compiled`: `packed` with `train.compile` on, as the trainer runs it: each decoder block
  compiled with `torch.compile` (HF's eager norms, rotary embedding and SwiGLU fused) and the
  [C, V] kernels of `token_logprobs` compiled.

Each variant reports real (non-padding) tokens/s, step time, peak memory and MFU; MFU divides the
model FLOPs of the real tokens by the step time and by a bf16 matmul rate measured in the same run.
A second measurement compares the peak memory of `token_logprobs` forward+backward at one micro-batch
with the vocabulary projection chunked and unchunked.

Letters: B sequences in a micro-batch, L its longest sequence, N packed tokens, V vocabulary,
E hidden size, C logprob chunk.

Example:
    PYTHONPATH=. python3 bench/train.py --json out.json          # GPU, Qwen2-0.5B shape, bf16
    PYTHONPATH=. python3 bench/train.py --tiny --device cpu      # seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from agentrl.trainer.actor import token_logprobs
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.packing import PackedBatch, pack_by_token_budget, pack_sequences
from agentrl.trainer.policy import compile_blocks

VARIANTS = ("padded", "padded_sorted", "packed_ckpt", "packed", "packed_compiled")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(tiny: bool):
    """Qwen2-0.5B's shape (random weights), or a tiny one for CPU smoke runs."""
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, tie_word_embeddings=True)


def build_model(cfg, attn: str, device: torch.device, dtype: torch.dtype, grad_ckpt: bool, seed: int):
    """Random-init causal LM (same weights for every variant: same seed), in train mode."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype)
    model.config.use_cache = False
    if grad_ckpt:
        # transformers >= 5.2x renamed it; the device's 5.17 has only the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return model.train()


@dataclass(frozen=True)
class Batch:
    """One RL batch: token ids, a loss mask and an advantage per sequence (next-token layout)."""

    seqs: list[list[int]]
    masks: list[list[float]]  # 1.0 where position j's next token is trained; last position 0
    advantages: list[float]

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.seqs]


def make_batch(num_tokens: int, min_len: int, max_len: int, vocab: int, seed: int) -> Batch:
    """Sequences with lengths uniform in [min_len, max_len] until `num_tokens` is reached."""
    g = torch.Generator().manual_seed(seed)
    seqs, masks, advs, total = [], [], [], 0
    while total < num_tokens:
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        seqs.append(torch.randint(0, vocab, (n,), generator=g).tolist())
        mask = (torch.rand(n, generator=g) < 0.5).float()
        mask[-1] = 0.0
        masks.append(mask.tolist())
        advs.append(float(torch.randn((), generator=g)))
        total += n
    return Batch(seqs, masks, advs)


def padded_micro_batches(lengths: Sequence[int], budget: int, sort: bool) -> list[list[int]]:
    """Consecutive groups with (group size) * (longest in group) <= budget; padding counts."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else range(len(lengths))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * max(lengths[j] for j in groups[-1] + [i]) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _padded_tensors(batch: Batch, idx: list[int], device) -> dict[str, torch.Tensor]:
    longest = max(batch.lengths[i] for i in idx)
    ids = torch.zeros(len(idx), longest, dtype=torch.long)  # [B, L]
    attn = torch.zeros(len(idx), longest, dtype=torch.long)  # [B, L]
    weight = torch.zeros(len(idx), longest)  # [B, L]: mask * advantage
    for row, i in enumerate(idx):
        n = batch.lengths[i]
        ids[row, :n] = torch.tensor(batch.seqs[i])
        attn[row, :n] = 1
        weight[row, :n] = torch.tensor(batch.masks[i]) * batch.advantages[i]
    return {"ids": ids.to(device), "attn": attn.to(device), "weight": weight.to(device)}


def padded_loss(model, mb: dict[str, torch.Tensor], denom: float) -> torch.Tensor:
    """The usual HF recipe: full logits, float32 log_softmax, gather the next tokens."""
    logits = model(input_ids=mb["ids"], attention_mask=mb["attn"]).logits  # [B, L, V]
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # [B, L, V]
    targets = torch.roll(mb["ids"], -1, dims=1)  # [B, L]; last column is masked by `weight`
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L]
    return -(logp * mb["weight"]).sum() / denom


def _packed_tensors(batch: Batch, idx: list[int], device) -> tuple[PackedBatch, torch.Tensor]:
    packed = pack_sequences([batch.seqs[i] for i in idx], device=device)
    weight = packed.pack([[m * batch.advantages[i] for m in batch.masks[i]] for i in idx])  # [N]
    return packed, weight


def packed_loss(model, mb: tuple[PackedBatch, torch.Tensor], denom: float, chunk: int,
                compiled: bool = False) -> torch.Tensor:
    packed, weight = mb
    logp, _ = token_logprobs(model, packed, 1.0, chunk, compiled=compiled)  # [N]
    return -(logp * weight).sum() / denom


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, loss_fn: Callable, micro_batches: list, denom: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro_batches:
        loss = loss_fn(model, mb, denom)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(total)


def model_flops(cfg, lengths: Sequence[int]) -> float:
    """Training FLOPs of the real tokens (no recomputation, no padding counted).

    6 * (non-embedding params + lm_head params) per token, plus causal attention:
    per layer and sequence of n tokens, QK^T and AV cost 4 * E * (keys seen) forward, x3 with the
    backward, and the keys seen sum to n(n+1)/2 under a causal mask: 6 * layers * E * n(n+1).
    """
    e, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = e // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = e * e * 2 + e * kv * 2 + 3 * e * f  # q, o, k, v projections and the MLP
    dense = layers * per_layer + v * e  # + lm_head (tied or not, it is a matmul)
    attn = sum(6 * layers * e * n * (n + 1) for n in lengths)
    return 6.0 * dense * sum(lengths) + attn


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best dense matmul rate in TFLOP/s over `repeats` rounds of 10 products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * size**3 / best / 1e12


def write_profile(step: Callable, device: torch.device, path: str) -> None:
    """One profiled step: the kernels that take the most device time, as a table in `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(events.table(sort_by=key, row_limit=60, max_name_column_width=90))


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # memory is only measured there; a full gc costs seconds on a busy CPU
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_variant(name: str, cfg, batch: Batch, opts, device: torch.device, dtype: torch.dtype) -> dict:
    """Warm up, then time `opts.steps` training steps of one variant on the whole batch."""
    padded = name.startswith("padded")
    grad_ckpt = (not opts.no_grad_ckpt) if padded else (name == "packed_ckpt" or opts.grad_ckpt_all)
    attn = "sdpa" if padded else register_varlen_attention()
    _free(device)
    model = build_model(cfg, attn, device, dtype, grad_ckpt, opts.seed)
    compiled = name == "packed_compiled"
    if compiled:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    denom = float(sum(sum(m) for m in batch.masks))
    if padded:
        groups = padded_micro_batches(batch.lengths, opts.micro_batch_tokens, sort=name == "padded_sorted")
        mbs = [_padded_tensors(batch, g, device) for g in groups]
        computed = sum(int(mb["ids"].numel()) for mb in mbs)
        loss_fn = padded_loss
    else:
        groups = pack_by_token_budget(batch.lengths, opts.micro_batch_tokens)
        mbs = [_packed_tensors(batch, g, device) for g in groups]
        computed = sum(batch.lengths)

        def loss_fn(m, mb, d):
            return packed_loss(m, mb, d, opts.chunk, compiled)
    times, losses = [], []
    try:
        for _ in range(opts.warmup):
            train_step(model, optimizer, loss_fn, mbs, denom)
        for _ in range(opts.steps):
            sync(device)
            t0 = time.perf_counter()
            losses.append(train_step(model, optimizer, loss_fn, mbs, denom))
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        del model, optimizer, mbs
        _free(device)
        return {"variant": name, "grad_ckpt": grad_ckpt, "oom": True}
    if opts.profile == name:
        write_profile(lambda: train_step(model, optimizer, loss_fn, mbs, denom), device, opts.profile_out)
    step = statistics.median(times)
    real = sum(batch.lengths)
    result = {
        "variant": name, "grad_ckpt": grad_ckpt, "attn": attn, "micro_batches": len(mbs),
        "real_tokens": real, "computed_tokens": computed, "padding_fraction": 1 - real / computed,
        "step_s": step, "step_s_all": times, "tokens_per_s": real / step, "peak_mem_gib": _peak_gib(device),
        "model_tflops_per_s": model_flops(cfg, batch.lengths) / step / 1e12, "loss_first": losses[0],
        "loss_finite": all(math.isfinite(x) for x in losses), "oom": False,
    }
    del model, optimizer, mbs
    _free(device)
    return result


def logprob_memory(cfg, opts, device: torch.device, dtype: torch.dtype, grad_ckpt: bool) -> dict:
    """Peak memory of one `token_logprobs` forward+backward at `opts.lp_tokens` packed tokens.

    Chunked (each of `opts.lp_chunks`) vs unchunked (one chunk of all N tokens: the full [N, V]
    float32 logits). Peaks are absolute (model, grads and all) and above the memory held before.
    """
    model = build_model(cfg, register_varlen_attention(), device, dtype, grad_ckpt, opts.seed)
    batch = make_batch(opts.lp_tokens, opts.min_len, opts.max_len, cfg.vocab_size, opts.seed + 1)
    idx = pack_by_token_budget(batch.lengths, opts.lp_tokens)[0]  # first-fit fills the first bin
    packed, weight = _packed_tensors(batch, idx, device)
    out = {"tokens": packed.num_tokens, "grad_ckpt": grad_ckpt, "runs": []}
    for chunk in [*opts.lp_chunks, packed.num_tokens]:
        model.zero_grad(set_to_none=True)
        _free(device)
        base = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        sync(device)
        t0 = time.perf_counter()
        try:
            packed_loss(model, (packed, weight), 1.0, chunk).backward()
            sync(device)
            peak = _peak_gib(device)
        except torch.OutOfMemoryError:  # the unchunked [N, V] float32 logits may not fit at all
            model.zero_grad(set_to_none=True)
            _free(device)
            out["runs"].append({"chunk": chunk, "unchunked": chunk >= packed.num_tokens, "oom": True})
            continue
        out["runs"].append({"chunk": chunk, "unchunked": chunk >= packed.num_tokens, "peak_gib": peak,
                            "above_base_gib": None if peak is None else peak - base,
                            "time_s": time.perf_counter() - t0})
    unchunked = out["runs"][-1].get("peak_gib")
    for run in out["runs"]:
        run["peak_vs_unchunked"] = None if unchunked is None or run.get("oom") else run["peak_gib"] / unchunked
    del model
    _free(device)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="params, grads, optimizer states and compute (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch for a CPU smoke run")
    p.add_argument("--tokens", type=int, default=None, help="real tokens in the batch (65536; 2048 with --tiny)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="token budget per micro-batch (16384; 512)")
    p.add_argument("--min-len", type=int, default=None, help="shortest sequence (128; 16 with --tiny)")
    p.add_argument("--max-len", type=int, default=None, help="longest sequence (2048; 256 with --tiny)")
    p.add_argument("--chunk", type=int, default=2048, help="token_logprobs chunk size")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; 1 with --tiny)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--no-grad-ckpt", action="store_true", help="padded baseline without gradient checkpointing")
    p.add_argument("--grad-ckpt-all", action="store_true", help="gradient checkpointing in every variant")
    p.add_argument("--lp-tokens", type=int, default=None, help="tokens for the logprob memory test (16384; 512)")
    p.add_argument("--lp-chunks", default=None, help="chunk sizes for the memory test (2048,4096; 128)")
    p.add_argument("--skip-lp-memory", action="store_true")
    p.add_argument("--matmul-size", type=int, default=None, help="square matmul for the peak rate (8192; 256)")
    p.add_argument("--profile", default=None, help="profile one extra step of this variant")
    p.add_argument("--profile-out", default="train_profile.txt", help="where the profile table goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    tiny = {"tokens": 2048, "micro_batch_tokens": 512, "min_len": 16, "max_len": 256, "warmup": 1,
            "lp_tokens": 512, "lp_chunks": "128", "matmul_size": 256}
    full = {"tokens": 65536, "micro_batch_tokens": 16384, "min_len": 128, "max_len": 2048, "warmup": 2,
            "lp_tokens": 16384, "lp_chunks": "2048,4096", "matmul_size": 8192}
    for key, value in (tiny if a.tiny else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.lp_chunks = [int(c) for c in a.lp_chunks.split(",")]
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    if a.dtype is None:
        a.dtype = "bf16" if a.device.startswith("cuda") else "fp32"
    return a


def _describe_peak(run: dict) -> str:
    if run.get("oom"):
        return "out of memory"
    if run["peak_gib"] is None:
        return "n/a (CPU)"
    share = run["peak_vs_unchunked"]
    return (f"{run['peak_gib']:.2f} GiB ({run['above_base_gib']:.2f} above base), "
            + ("unchunked ran out of memory" if share is None else f"{share:.1%} of unchunked"))


def _ratio(results: dict, num: str, den: str, key: str) -> float | None:
    a, b = results.get(num, {}).get(key), results.get(den, {}).get(key)
    return None if a is None or not b else a / b


def main(argv: Sequence[str] | None = None) -> dict:
    opts = parse_args(argv)
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    cfg = model_config(opts.tiny)
    batch = make_batch(opts.tokens, opts.min_len, opts.max_len, cfg.vocab_size, opts.seed)
    peak = matmul_peak(device, dtype, opts.matmul_size)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}),"
          f" {opts.dtype}, {len(batch.seqs)} sequences, {sum(batch.lengths)} real tokens, "
          f"micro-batch budget {opts.micro_batch_tokens}; {opts.matmul_size}^3 matmul peak {peak:.4g} TFLOP/s")
    results: dict[str, dict] = {}
    for name in opts.variants:
        try:
            r = run_variant(name, cfg, batch, opts, device, dtype)
        except Exception as e:  # noqa: BLE001 - e.g. Inductor failing on one prototype; report and go on
            print(f"{name:14s} failed: {type(e).__name__}: {e}")
            results[name] = {"variant": name, "error": f"{type(e).__name__}: {e}", "oom": False}
            _free(device)
            continue
        results[name] = r
        if r["oom"]:
            print(f"{name:14s} ckpt={str(r['grad_ckpt']):5s} out of memory")
            continue
        r["mfu"] = r["model_tflops_per_s"] / peak
        mem = "n/a (CPU)" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
        print(f"{name:14s} ckpt={str(r['grad_ckpt']):5s} mb={r['micro_batches']:3d} pad={r['padding_fraction']:5.1%} "
              f"step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:10.0f} real tok/s  peak {mem}  "
              f"{r['model_tflops_per_s']:6.1f} TFLOP/s  MFU {r['mfu']:5.1%}")
    packed = [v for v in ("packed", "packed_ckpt", "packed_compiled") if v in results]
    best = max(packed, key=lambda v: results[v].get("tokens_per_s", 0.0)) if packed else None
    ratios = {}
    for base in ("padded", "padded_sorted"):
        for v in ("packed", "packed_ckpt", "packed_compiled"):
            speed = _ratio(results, v, base, "tokens_per_s")
            if speed is not None:
                ratios[f"{v}/{base}"] = {"tokens_per_s": speed, "peak_mem": _ratio(results, v, base, "peak_mem_gib")}
                mem = ratios[f"{v}/{base}"]["peak_mem"]
                print(f"ratio {v}/{base}: {speed:.2f}x real tok/s, peak memory "
                      f"{'n/a' if mem is None else f'{mem:.2f}x'}")
    lp = {}
    if not opts.skip_lp_memory:
        for ckpt in (True, False):
            lp["ckpt" if ckpt else "no_ckpt"] = m = logprob_memory(cfg, opts, device, dtype, ckpt)
            for run in m["runs"]:
                mem = _describe_peak(run)
                print(f"token_logprobs fwd+bwd {m['tokens']} tokens, model ckpt={ckpt}, "
                      f"chunk {run['chunk']:6d}{' (unchunked)' if run['unchunked'] else ''}: peak {mem}")
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "dtype": opts.dtype, "matmul_tflops": peak, "config": {
               k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "vocab_size")},
           "options": {k: v for k, v in vars(opts).items() if k != "json"}, "batch": {
               "sequences": len(batch.seqs), "real_tokens": sum(batch.lengths)},
           "flops_per_step": model_flops(cfg, batch.lengths), "variants": results, "ratios": ratios,
           "best_packed": best, "logprob_memory": lp}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
