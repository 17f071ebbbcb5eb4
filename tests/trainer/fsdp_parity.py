"""One policy update (or, with --critic, one critic update), single-process or FSDP2-sharded over N
ranks, written to a JSON file.

Run alone for the reference, or under torchrun for the sharded update; the two files must agree:

    python tests/trainer/fsdp_parity.py --model DIR --out ref.json
    torchrun --nproc-per-node 2 tests/trainer/fsdp_parity.py --model DIR --out fsdp.json

Each rank takes its share of the batch's rows (whole GRPO groups), so the sharded job sees the same
batch as the reference. The optimizer is SGD: the parameter change is then lr x gradient exactly,
so comparing parameters after the step compares gradients (AdamW's first step would only show signs).
Used by tests/trainer/test_fsdp.py on CPU (gloo) and on two GPUs (NCCL) by hand; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agentrl.trainer.attention import register_varlen_attention  # noqa: E402
from agentrl.trainer.batch import TrainBatch  # noqa: E402
from agentrl.trainer.critic import critic_update, load_critic  # noqa: E402
from agentrl.trainer.fsdp import full_state_dict, rank, shard_policy, shard_value_model, world_size  # noqa: E402
from agentrl.trainer.update import LossSettings, policy_update  # noqa: E402


def make_batch(vocab: int, groups: int, per_group: int, seed: int, max_len: int) -> TrainBatch:
    """Random token sequences (prompt + response) with plausible rollout logprobs and advantages."""
    rng = random.Random(seed)
    ids, masks, logps, versions, groups_of, advs = [], [], [], [], [], []
    for g in range(groups):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(4, 12))]
        for _ in range(per_group):
            resp = [rng.randrange(vocab) for _ in range(rng.randint(3, max_len - len(prompt)))]
            p = len(prompt)
            ids.append(prompt + resp)
            masks.append([0] * p + [1] * len(resp))
            logps.append([0.0] * p + [-rng.uniform(3.0, 6.0) for _ in resp])
            versions.append([-1] * p + [0] * len(resp))
            groups_of.append(g)
            advs.append(rng.uniform(-1.5, 1.5))
    batch = TrainBatch.from_rows(ids, masks, logps, versions, [0.0] * len(ids), groups_of)
    return batch.with_(advantages=torch.tensor(advs).unsqueeze(1) * batch.mask)  # [B, T]


def with_value_targets(batch: TrainBatch, seed: int) -> TrainBatch:
    """The batch with random old values and returns on its model tokens (what GAE would fill)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch.mask.shape, generator=gen) * 0.2 * batch.mask
    returns = (values + torch.randn(batch.mask.shape, generator=gen)) * batch.mask
    return batch.with_(values=values, returns=returns)


def critic_step(model_path: str, batch: TrainBatch, sharded: bool, args) -> tuple[dict, dict]:
    """One SGD step of a critic started from the policy's backbone with a random head; (metrics, weights)."""
    critic = load_critic(model_path, dtype=torch.float32, device=args.device,
                         attn_implementation=register_varlen_attention())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        critic.value_head.weight.copy_(torch.randn(critic.value_head.weight.shape, generator=gen) * 0.3)
    if sharded:
        shard_value_model(critic, mixed_precision=args.mixed_precision)
    optimizer = torch.optim.SGD(critic.parameters(), lr=args.lr)
    metrics = critic_update(critic, optimizer, batch, clip=0.2, micro_batch_tokens=args.micro_batch_tokens,
                            grad_clip=1e9)
    return metrics, full_state_dict(critic)


def rank_rows(batch: TrainBatch, r: int, world: int) -> list[int]:
    """The rows of rank `r`: whole groups, dealt out in turn."""
    groups = sorted(set(batch.group_ids.tolist()))
    mine = set(groups[r::world])
    return [i for i, g in enumerate(batch.group_ids.tolist()) if g in mine]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", default="none", choices=["none", "bf16"])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--micro-batch-tokens", type=int, default=96)
    ap.add_argument("--agg-mode", default="token_mean")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--critic", action="store_true", help="update a critic instead of the policy")
    args = ap.parse_args()

    sharded = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    device = args.device
    if sharded:
        backend = "nccl" if device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    torch.manual_seed(0)
    if args.critic:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(args.model).vocab_size
        batch = with_value_targets(make_batch(vocab, args.groups, args.per_group, seed=1, max_len=args.max_len), seed=2)
        if sharded:
            batch = batch.rows(rank_rows(batch, rank(), world_size()))
        metrics, state = critic_step(args.model, batch, sharded, args)
        _write(args.out, metrics, state, sharded)
        return
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation=register_varlen_attention()).to(device)
    batch = make_batch(model.config.vocab_size, args.groups, args.per_group, seed=1, max_len=args.max_len)
    if sharded:
        shard_policy(model, mixed_precision=args.mixed_precision)
        batch = batch.rows(rank_rows(batch, rank(), world_size()))
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" and not sharded else None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    settings = LossSettings(agg_mode=args.agg_mode, entropy_coef=0.01)
    metrics = policy_update(model, optimizer, batch, settings, micro_batch_tokens=args.micro_batch_tokens,
                            grad_clip=1e9, logprob_chunk=32, compute_dtype=dtype)
    _write(args.out, metrics, full_state_dict(model), sharded)


def _write(out: str, metrics: dict, state: dict, sharded: bool) -> None:
    if rank() == 0:
        torch.save(state, out + ".pt")
        Path(out).write_text(json.dumps({"world_size": world_size(), **metrics}, indent=1))
    if sharded:
        # Both ranks leave together: a rank tearing gloo down while the other is still saving could
        # abort at exit ("terminate called without an active exception", seen under load).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
