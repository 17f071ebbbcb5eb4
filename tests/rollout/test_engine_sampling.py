"""Batched sampling: truncation sets, reported logprobs, seeds, the sampled distribution, stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.sampling import SamplingBatch, StopStrings, sample, seeded_uniform, validate
from agentrl.rollout.backends.embedded.scheduler import Sequence
from agentrl.rollout.engine import SamplingParams

CPU = torch.device("cpu")
# probs = softmax([2, 1, 0, -5]) = [7.389, 2.718, 1, .0067] / 11.114 = [.6648, .2446, .0900, .0006]
LOGITS = torch.tensor([2.0, 1.0, 0.0, -5.0])


def draw(params: SamplingParams, rows: int = 2000, positions=None):
    logits = LOGITS.repeat(rows, 1)
    batch = SamplingBatch.build([params] * rows, positions or list(range(rows)), CPU)
    return sample(logits, batch)


def test_top_p_keeps_the_nucleus_only():
    # top_p=0.8: 0.6648 < 0.8 so the second token is needed; 0.9094 >= 0.8 so the third is not.
    toks, lps = draw(SamplingParams(top_p=0.8))
    assert set(toks.tolist()) == {0, 1}
    full = torch.log_softmax(LOGITS, -1)
    assert torch.allclose(lps, full[toks])  # reported logprobs are of the untruncated distribution


def test_top_k_and_min_p_sets():
    assert set(draw(SamplingParams(top_k=1))[0].tolist()) == {0}
    assert set(draw(SamplingParams(top_k=3))[0].tolist()) == {0, 1, 2}
    # min_p=0.1: keep p >= 0.0665 -> tokens 0, 1, 2 (0.0900); min_p=0.2: keep p >= 0.1330 -> 0, 1.
    assert set(draw(SamplingParams(min_p=0.1))[0].tolist()) == {0, 1, 2}
    assert set(draw(SamplingParams(min_p=0.2))[0].tolist()) == {0, 1}
    # top_k=3 then top_p=0.95 of the renormalised three (.6652, .2447, .0901): .9099 ahead of the third < .95.
    assert set(draw(SamplingParams(top_k=3, top_p=0.95))[0].tolist()) == {0, 1, 2}


def test_frequencies_follow_the_temperature_scaled_distribution():
    toks, lps = draw(SamplingParams(temperature=2.0), rows=20000)
    probs = torch.softmax(LOGITS / 2.0, -1)  # [2.718, 1.649, 1, .082] / 5.449 = [.4988, .3026, .1835, .0151]
    freq = torch.bincount(toks, minlength=4).float() / 20000
    assert (freq - probs).abs().max() < 0.015  # ~4 standard deviations of the largest cell
    assert torch.allclose(lps, torch.log(probs)[toks], atol=1e-6)


def test_seeded_rows_depend_only_on_seed_and_position():
    a = draw(SamplingParams(seed=7), rows=50)[0]
    b = draw(SamplingParams(seed=7), rows=50)[0]
    assert torch.equal(a, b)
    # Row 3 alone, at the same output position, draws the same token as inside the big batch.
    alone = sample(LOGITS.unsqueeze(0), SamplingBatch.build([SamplingParams(seed=7)], [3], CPU))[0]
    assert int(alone) == int(a[3])
    # Over many positions a seeded stream is still distributed like the model.
    freq = torch.bincount(draw(SamplingParams(seed=1), rows=20000)[0], minlength=4).float() / 20000
    assert (freq - torch.softmax(LOGITS, -1)).abs().max() < 0.015


def test_seeded_uniform_is_uniform():
    u = seeded_uniform(torch.full((10000,), 3, dtype=torch.long), torch.arange(10000))
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts - 1000).abs().max() < 150  # ~5 standard deviations (sqrt(900) = 30)


def test_greedy_rows_mix_with_sampled_rows():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)]
    toks, lps = sample(logits, SamplingBatch.build(params, [0, 0], CPU))
    assert toks.tolist() == [0, 3]
    assert lps[0].item() == pytest.approx(math.log(0.6648), abs=1e-3)  # greedy reports temperature 1


def test_validate_names_the_bad_field():
    validate(SamplingParams())
    with pytest.raises(EngineError, match="top_k"):
        validate(SamplingParams(top_k=-1))
    with pytest.raises(EngineError, match="min_p"):
        validate(SamplingParams(min_p=1.0))
    with pytest.raises(EngineError, match="temperature"):
        validate(SamplingParams(temperature=-0.1))


def test_stop_strings_watch_only_the_response(tokenizer):
    prompt = tokenizer.encode("say STOP now")
    check = StopStrings(tokenizer, ("STOP",))
    s = Sequence(0, prompt + tokenizer.encode(" fine"), max_new=10, prompt_len=len(prompt))
    assert not check(s)  # "STOP" is in the prompt only
    s.tokens += tokenizer.encode(" STOP")
    assert check(s)
    with pytest.raises(EngineError, match="tokenizer"):
        StopStrings(None, ("x",))
