"""Build a tiny tool-calling chat model from nothing, for the CPU quickstart and the tests.

No model hub is reachable, so the recipe makes everything locally:

1. a byte-level BPE tokenizer trained on the environment's own text (digits split one by one),
   with ChatML-style special tokens and a chat template that renders tool schemas and tool turns;
2. a small Qwen2-architecture transformer with random weights;
3. a short supervised warm start on demonstrations from the environment's scripted solver, so
   that RL begins from a policy that succeeds some of the time.

Usage: `agentrl tiny-model --out models/tiny-calculator` (see `build_tiny_model`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agentrl.envs.core import Env, Message
from agentrl.envs.registration import make
from agentrl.errors import ConfigError
from agentrl.rollout.chat import ChatRenderer
from agentrl.trainer.actor import shift_to_next_token, token_logprobs
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.packing import pack_sequences

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

# ChatML with tools. The system turn lists each tool compactly as a signature line
# (`name(arg: type, ...): description`) to keep prompts short for a tiny model; tool results come
# back as `tool` turns, and calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif -%}"
    "{%- if sys or tools %}{{ '<|im_start|>system\\n' + sys }}"
    "{%- if tools %}{{ '\\nTools:' }}{% for t in tools %}{% set f = t['function'] if 'function' in t else t %}"
    "{{ '\\n' + f['name'] + '(' }}{% for k, v in f['parameters']['properties'].items() %}"
    "{{ (', ' if not loop.first else '') + k + ': ' + (v['type'] if 'type' in v else 'any') }}{% endfor %}"
    "{{ '): ' + f['description'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endif -%}"
    "{%- for m in rest %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


@dataclass(frozen=True)
class TinyModelShape:
    """Size of the tiny transformer (defaults: about 1M parameters, fast on two CPU cores)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 1024
    vocab_size: int = 1024


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE over `corpus`, digits one token each, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # One token per digit: copying a number (from the question into a tool call, from the tool's
    # output into the answer) is then the same simple operation for every number.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        unk_token=None, clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def scripted_episode(env: Env, renderer: ChatRenderer, seed: int, rng: random.Random, tool_use_prob: float,
                     max_turns: int = 4, max_tokens: int | None = None) -> tuple[list[int], list[int], list[Message]]:
    """Run the env's scripted solver for up to `max_turns` turns: (token ids, loss mask, messages).

    The ids and mask are cut at `max_tokens` (the model's positions), the messages are not.
    """
    obs, _ = env.reset(seed=seed, options={"split": "train"})
    messages = list(obs)
    ids = renderer.prompt_ids(messages)
    mask = [0] * len(ids)
    last_output = None
    for _ in range(max_turns):
        action = env.scripted_action(rng, tool_use_prob=tool_use_prob, last_tool_output=last_output)
        turn = renderer.assistant_ids(action)
        ids += turn
        mask += [1] * len(turn)
        messages.append(Message("assistant", action))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
        messages += obs
        last_output = obs[0].content if obs else None
        suffix = renderer.observation_ids(obs)
        ids += suffix
        mask += [0] * len(suffix)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask, messages


def text_corpus(env: Env, episodes: int, seed: int) -> list[str]:
    """Text the tokenizer learns from: scripted episodes laid out the way the chat template renders
    them (without the special tokens), so frequent stretches such as the tool list become few tokens."""
    rng = random.Random(seed)
    tools = "\nTools:" + "".join(
        "\n{name}({args}): {description}".format(
            name=f["name"], description=f["description"],
            args=", ".join(f"{k}: {v.get('type', 'any')}" for k, v in f["parameters"]["properties"].items()))
        for f in (s["function"] for s in env.tool_schemas()))
    corpus = []
    for i in range(episodes):
        obs, _ = env.reset(seed=10_000_000 + i, options={"split": "train"})
        parts = [f"{m.role}\n{m.content}" + (tools if m.role == "system" else "") for m in obs]
        last = None
        for _ in range(4):
            action = env.scripted_action(rng, tool_use_prob=0.5, last_tool_output=last)
            parts.append(f"assistant\n{action}")
            obs, _, done, trunc, _ = env.step(action)
            if done or trunc:
                break
            parts += [f"{m.role}\n{m.content}" for m in obs]
            last = obs[0].content
        corpus.append("\n".join(parts) + "\n")
    return corpus


def supervised_warm_start(model, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
                          batch_seqs: int, seed: int, log_every: int = 50) -> list[float]:
    """Cross-entropy on the masked (assistant) tokens of `examples`; returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    losses = []
    for step in range(steps):
        pick = torch.randint(len(examples), (batch_seqs,), generator=gen).tolist()
        seqs = [examples[i][0] for i in pick]
        packed = pack_sequences(seqs)
        mask = packed.pack([shift_to_next_token(examples[i][1]) for i in pick])
        logp, _ = token_logprobs(model, packed)
        loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  sft step {step + 1}/{steps}  loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    model.eval()
    return losses


def build_tiny_model(out: str | Path, env_id: str = "calculator-v0", *, shape: TinyModelShape = TinyModelShape(),
                     demos: int | None = None, tool_use_prob: float = 0.5, sft_steps: int = 2000, lr: float = 1e-3,
                     batch_seqs: int = 16, seed: int = 0, corpus_episodes: int = 3000, demo_turns: int = 4) -> Path:
    """Make tokenizer + model + supervised warm start and save them (HF format) under `out`.

    `demos` defaults to `sft_steps * batch_seqs`: every step sees fresh demonstrations. With a few
    thousand demonstrations repeated for several epochs the tiny model memorises answers instead of
    learning to copy numbers, and never succeeds on held-out tasks. `corpus_episodes` scripted
    episodes train the tokenizer (fewer for envs whose tools are slow, e.g. a sandbox per call).
    Each demonstration plays up to `demo_turns` turns (more for many-turn games, whose goal is
    further than four moves away), cut at the model's `shape.max_positions` tokens.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    out = Path(out)
    torch.manual_seed(seed)
    env = make(env_id)
    if not hasattr(env, "scripted_action"):
        raise ConfigError(f"{env_id!r} has no scripted_action(); the tiny-model recipe imitates it")
    tokenizer = train_tokenizer(text_corpus(env, corpus_episodes, seed), shape.vocab_size)
    renderer = ChatRenderer(tokenizer, env.tool_schemas())
    rng = random.Random(seed)
    demos = demos if demos is not None else sft_steps * batch_seqs
    examples = [scripted_episode(env, renderer, seed=i, rng=rng, tool_use_prob=tool_use_prob, max_turns=demo_turns,
                                 max_tokens=shape.max_positions)[:2] for i in range(demos)]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True, eos_token_id=renderer.end_of_turn_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config._attn_implementation = register_varlen_attention()
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, {demos} demonstrations "
          f"(tool use {tool_use_prob:.0%})", flush=True)
    supervised_warm_start(model, examples, steps=sft_steps, lr=lr, batch_seqs=batch_seqs, seed=seed)
    model.config._attn_implementation = "sdpa"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved tiny model to {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out
