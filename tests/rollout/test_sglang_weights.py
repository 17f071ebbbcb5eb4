"""Weights for the sglang backend (agentrl/rollout/backends/sglang/weights.py): the safetensors folder a
server loads, and the rendezvous of the trainer's end of the NCCL weights group (run here with gloo
between two real processes; the NCCL path itself needs GPUs and SGLang)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from agentrl.rollout.backends.managed import free_port
from agentrl.rollout.backends.sglang.weights import WeightFolder, tensors_for_engine


def test_weight_folder_writes_loadable_versions_and_keeps_only_the_current(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()  # tied: one storage
    folder = WeightFolder(str(tmp_path / "w"), tiny_model_dir)
    first = folder.write(sd, 1)
    folder.keep_only(first)
    second = folder.write({k: v + 1 for k, v in sd.items()}, 2)
    folder.keep_only(second)
    assert os.listdir(tmp_path / "w") == [os.path.basename(second)] and folder.current == second
    loaded = load_file(os.path.join(second, "model.safetensors"))
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k] + 1) for k in sd)
    assert sorted(os.listdir(second)) == ["config.json", "generation_config.json", "model.safetensors"]
    reloaded = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32)  # a model directory HF reads too
    assert torch.equal(reloaded.model.norm.weight, sd["model.norm.weight"] + 1)
    folder.cleanup()
    assert os.path.exists(tmp_path / "w")  # a folder the caller gave is theirs to delete


def test_tensors_for_engine_are_detached_pairs():
    w = torch.ones(2, requires_grad=True)
    pairs = tensors_for_engine({"a": w * 2, "n": 3})
    assert [n for n, _ in pairs] == ["a"] and not pairs[0][1].requires_grad


def test_weights_group_rendezvous_and_broadcast_between_two_processes(tmp_path):
    """Rank 0 (`weights_group`, the trainer's end) broadcasts to rank 1 (SGLang's end, played here by
    the same function), over gloo on 127.0.0.1: the rendezvous, prefix store and group creation work."""
    port = free_port()
    script = textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        from agentrl.rollout.backends.sglang.weights import weights_group
        rank = int(sys.argv[1])
        pg = weights_group("127.0.0.1", {port}, 2, rank=rank, backend="gloo", timeout_s=60)
        t = torch.arange(6, dtype=torch.float32) if rank == 0 else torch.zeros(6)
        dist.broadcast(t, src=0, group=pg)
        print("got", t.tolist(), flush=True)
        dist.barrier(group=pg)  # neither rank tears gloo down while the other still talks (aborted under load)
        import os
        os._exit(0)  # skip the group's destructor at exit ("terminate called without an active exception")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "got [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]" in out
