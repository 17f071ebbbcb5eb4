"""Hugging Face references for the engine tests: greedy decoding, teacher-forced logprobs, and a
greedy comparison that tells a real disagreement from a numerical near-tie.

The reference is always HF in float32 on the CPU. On the CPU the engine agrees with it to ~1e-6,
so greedy paths are identical. On a GPU, kernels that sum in another order move logits slightly,
enough to flip an argmax where HF's two best tokens are that close; comparing tokens alone would
then fail on a correct engine, and loosening the comparison would hide a wrong one.
`assert_greedy_matches` does neither: it checks the engine's logprob of every token it chose
against HF's teacher-forced logprob (within `tol`), and where the greedy paths part it requires
that HF's best token beat the engine's choice by at most `tie_tol` nats at that step.
"""

from __future__ import annotations

import torch


def hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    """HF `generate`, greedy, exactly `new` tokens (no stop token)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def teacher_forced_logprobs(hf, prompt: list[int], output, temperature: float = 1.0) -> torch.Tensor:
    """Trainer-style: one forward over prompt + output; log_softmax(logits / T) before each output token. [T_out, V]."""
    ids = torch.tensor([list(prompt) + list(output)])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()  # [T_out, V]
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_logprobs_match(hf, prompt: list[int], tokens, logprobs, temperature: float, tol: float,
                          what: str = "") -> None:
    """The engine's logprobs of its tokens equal HF's teacher-forced ones within `tol`."""
    ref = teacher_forced_logprobs(hf, prompt, tokens, temperature)
    want = ref.gather(-1, torch.tensor(list(tokens)).unsqueeze(-1)).squeeze(-1)
    diff = (torch.tensor(list(logprobs)) - want).abs()
    assert diff.max() < tol, (f"{what}logprobs differ from HF's teacher-forced ones by up to {diff.max():.2e} "
                              f"(tolerance {tol:.0e}) at token {int(diff.argmax())} of {len(tokens)}")


def assert_greedy_matches(hf, prompt: list[int], tokens, logprobs, tol: float, tie_tol: float, what: str = "") -> None:
    """Greedy output of the engine == HF `generate`'s, up to a near-tie (see the module docstring)."""
    tokens = list(tokens)
    assert_logprobs_match(hf, prompt, tokens, logprobs, 1.0, tol, what)
    ref = hf_greedy(hf, prompt, len(tokens))
    d = common_prefix(tokens, ref)
    if d == len(tokens):
        return
    # Up to d both paths are the same tokens, so HF's distribution at step d is well defined.
    lp = teacher_forced_logprobs(hf, prompt, tokens[:d + 1])[d]  # [V]
    gap = float(lp.max() - lp[tokens[d]])
    assert gap <= tie_tol, (f"{what}greedy tokens part from HF generate's at token {d}: engine {tokens[d]}, HF "
                            f"{ref[d]}, which HF prefers by {gap:.2e} nats (a near-tie would be <= {tie_tol:.0e})\n"
                            f"engine {tokens}\nHF     {ref}")
