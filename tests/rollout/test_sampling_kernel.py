"""The one-kernel CUDA sampler against the torch sampler (`sample_reference`) and against known distributions.

GPU-only (`gpu` marker). Seeded rows make both paths invert the CDF at the same uniform number,
so they must pick the same token except where that number lies within float32 rounding of a
CDF boundary (their sums run in different orders).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from agentrl.rollout.backends.embedded.sampling import SamplingBatch, sample, sample_reference, seeded_uniform  # noqa: E402
from agentrl.rollout.engine import SamplingParams  # noqa: E402

DEV = torch.device("cuda")


@pytest.mark.parametrize("V", [1000, 4096, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_torch_sampler(V, dtype):
    torch.manual_seed(V)
    S = 64
    logits = (torch.randn(S, V, device=DEV) * 3).to(dtype)
    logits[3, : V // 2] = float("-inf")  # a row with half its vocabulary impossible
    temps = [0.0 if i % 7 == 0 else 0.3 + (i % 5) * 0.3 for i in range(S)]
    params = [SamplingParams(temperature=t, seed=1000 + i) for i, t in enumerate(temps)]
    batch = SamplingBatch.build(params, [i % 9 for i in range(S)], DEV)
    tok, lp = sample(logits, batch)
    ref_tok, ref_lp = sample_reference(logits, batch)
    same = tok == ref_tok
    if not same.all():  # only where u sits on a CDF boundary (float32 rounding of the two sums)
        u = torch.zeros(S, dtype=torch.float64, device=DEV)  # greedy rows have none
        u[batch.seeded_rows] = seeded_uniform(batch.seeds, batch.positions)
        t = batch.temperature if batch.temperature is not None else 1.0
        cdf = torch.softmax(logits.double() / t, -1).cumsum(-1)
        for r in (~same).nonzero().flatten().tolist():
            j = int(ref_tok[r])
            edges = [cdf[r, j].item()] + ([cdf[r, j - 1].item()] if j else [])
            assert min(abs(e - u[r].item()) for e in edges) < 1e-5, f"row {r}: {int(tok[r])} vs {j}"
    assert same.float().mean() >= 0.95
    assert (lp[same] - ref_lp[same]).abs().max() < 1e-4
    greedy = torch.tensor([t == 0 for t in temps], device=DEV)
    assert (tok[greedy] == logits.float().argmax(-1)[greedy]).all()
    assert (tok[3] >= V // 2).all()


def test_kernel_samples_the_right_distribution():
    S, probs = 200_000, torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05], device=DEV)
    V = 5000  # the five tokens, then impossible ones: spans two chunks of the kernel's loop
    logits = torch.full((S, V), float("-inf"), device=DEV)
    logits[:, :5] = probs.log()
    batch = SamplingBatch.build([SamplingParams(temperature=1.0)] * S, [0] * S, DEV)
    tok, lp = sample(logits, batch)
    freq = torch.bincount(tok, minlength=V)[:5].double() / S
    assert int(torch.bincount(tok, minlength=V)[5:].sum()) == 0 and int(freq[1] * S) == 0
    assert (freq - probs.double()).abs().max() < 0.005  # ~5 standard errors at 200k draws
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)
    hot = SamplingBatch.build([SamplingParams(temperature=2.0)] * S, [0] * S, DEV)  # flatter: p ** (1/2)
    freq2 = torch.bincount(sample(logits, hot)[0], minlength=V)[:5].double() / S
    expect = probs.double().sqrt() / probs.double().sqrt().sum()
    assert (freq2 - expect).abs().max() < 0.005
