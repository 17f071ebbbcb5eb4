#!/usr/bin/env bash
# FSDP2 on 2 GPUs vs one GPU, same batch, bf16 mixed precision, random-init Qwen2-0.5B shape.
# Run on the device (nvidia-h200-x2):  bash bench/fsdp_parity_gpu.sh $OUT
set -euo pipefail
out=${1:-/tmp/fsdp_parity}
mkdir -p "$out"
export PYTHONPATH=.
python3 - <<'PY'
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
Qwen2ForCausalLM(cfg).save_pretrained("/tmp/qwen2-0.5b-random")
PY
for mp in bf16 none; do
common="--model /tmp/qwen2-0.5b-random --device cuda --mixed-precision $mp --groups 8 --per-group 4 --max-len 768 --micro-batch-tokens 8192 --lr 0.05"
python3 tests/trainer/fsdp_parity.py $common --out "/tmp/ref.json"
torchrun --standalone --nproc-per-node 2 tests/trainer/fsdp_parity.py $common --out "/tmp/fsdp.json"
python3 - "$out" "$mp" <<'PY'
import json, sys, torch
from transformers import AutoModelForCausalLM
out, mp = sys.argv[1], sys.argv[2]
ref, got = (json.load(open(f"/tmp/{n}.json")) for n in ("ref", "fsdp"))
start = AutoModelForCausalLM.from_pretrained("/tmp/qwen2-0.5b-random").state_dict()
a, b = torch.load("/tmp/ref.json.pt"), torch.load("/tmp/fsdp.json.pt")
da = torch.cat([(a[k].double() - start[k].double()).flatten() for k in start])
db = torch.cat([(b[k].double() - start[k].double()).flatten() for k in start])
cos = (da @ db / (da.norm() * db.norm())).item()
rel = ((da - db).norm() / da.norm()).item()
report = {"ref_loss": ref["loss"], "fsdp_loss": got["loss"], "loss_rel_diff": abs(ref["loss"] - got["loss"]) / abs(ref["loss"]),
          "ref_grad_norm": ref["grad_norm"], "fsdp_grad_norm": got["grad_norm"], "update_cosine": cos, "update_rel_diff": rel,
          "tokens": ref["trained_tokens"], "world_size": got["world_size"], "mixed_precision": mp}
print(json.dumps(report, indent=1))
json.dump(report, open(f"{out}/parity_{mp}.json", "w"), indent=1)
PY
done
