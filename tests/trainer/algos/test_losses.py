"""Tests of agentrl/trainer/algos/losses.py: hand-computed losses, clipping, aggregation, KL, entropy."""

import math

import pytest
import torch

from agentrl.errors import ConfigError, RegistryError
from agentrl.trainer.algos.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    entropy_from_logits,
    get_policy_loss,
    kl_penalty,
)

NAN = float("nan")


def row(*values):
    return torch.tensor([list(values)])


def log_ratios(*ratios):
    """logprobs whose ratio to old_logprobs = 0 is `ratios`, as a leaf with grad."""
    return torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)


# ---------------------------------------------------------------- aggregation

# Rows of length 3, 1 and 0 (all masked); masked positions hold NaN to prove they never leak.
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, NAN, NAN, NAN], [NAN, NAN, NAN, NAN]])
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode,kwargs,expected",
    [
        ("token_mean", {}, 2.5),  # (1 + 2 + 3 + 4) / 4 tokens
        ("token_mean", {"loss_scale_tokens": 8.0}, 1.25),  # 10 / 8 global tokens
        ("seq_mean_token_sum", {}, 5.0),  # sums 6 and 4; the empty row is not a sequence: 10 / 2
        ("seq_mean_token_mean", {}, 3.0),  # means 2 and 4 -> 3
        ("seq_sum_norm", {"norm_constant": 10.0}, 1.0),  # 10 / 10
    ],
)
def test_aggregate_loss_hand_computed(mode, kwargs, expected):
    out = aggregate_loss(LOSS_MAT, AGG_MASK, mode, **kwargs)
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_of_an_all_masked_batch_is_zero_with_finite_grads(mode):
    loss_mat = torch.randn(2, 3, requires_grad=True)
    out = aggregate_loss(loss_mat, torch.zeros(2, 3), mode, norm_constant=6.0)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(loss_mat.grad, torch.zeros(2, 3))


def test_loss_scale_tokens_makes_micro_batches_sum_to_the_global_token_mean():
    # Micro-batches of 4 and 1 tokens: local means would give (2.5 + 10) / 2 = 6.25, not the
    # global mean (1 + 2 + 3 + 4 + 10) / 5 = 4. Dividing each by 5 global tokens gives 4 exactly.
    full = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0]])
    total = mask.sum().item()
    parts = [
        aggregate_loss(full[s], mask[s], "token_mean", loss_scale_tokens=total) for s in (slice(0, 2), slice(2, 3))
    ]
    assert sum(parts).item() == pytest.approx(aggregate_loss(full, mask, "token_mean").item()) == pytest.approx(4.0)


def test_aggregate_loss_rejects_bad_modes_and_options():
    with pytest.raises(ConfigError, match="Did you mean 'token_mean'"):
        aggregate_loss(LOSS_MAT, AGG_MASK, "token-mean")
    with pytest.raises(ConfigError, match="norm_constant"):
        aggregate_loss(LOSS_MAT, AGG_MASK, "seq_sum_norm")
    with pytest.raises(ConfigError, match="loss_scale_tokens"):
        aggregate_loss(LOSS_MAT, AGG_MASK, "seq_mean_token_mean", loss_scale_tokens=4.0)


# ---------------------------------------------------------------- ppo_clip


def test_ppo_clip_hand_computed():
    # Per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.1 A=+1: max(-1.1, -1.1) = -1.1  (inside)
    #   r=1.5 A=+1: max(-1.5, -1.2) = -1.2  (clipped)
    #   r=0.5 A=+1: max(-0.5, -0.8) = -0.5  (pessimistic side, not clipped)
    #   r=0.5 A=-1: max( 0.5,  0.8) =  0.8  (clipped)
    #   r=1.5 A=-1: max( 1.5,  1.2) =  1.5  (pessimistic side, not clipped)
    # token mean (-1.1 - 1.2 - 0.5 + 0.8 + 1.5) / 5 = -0.1; clip_frac 2/5;
    # ratio_mean (1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5 = 1.02;
    # approx_kl = mean(old - new) = -(ln 1.1 + 2 ln 1.5 + 2 ln 0.5) / 5
    #           = -(0.0953102 + 0.8109302 - 1.3862944) / 5 = 0.480054 / 5 = 0.0960108.
    logp = log_ratios(1.1, 1.5, 0.5, 0.5, 1.5)
    adv = row(1.0, 1.0, 1.0, -1.0, -1.0)
    loss, metrics = get_policy_loss("ppo_clip")(logp, torch.zeros(1, 5), adv, torch.ones(1, 5))
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.4)
    assert metrics["ratio_mean"] == pytest.approx(1.02, abs=1e-6)
    assert metrics["approx_kl"] == pytest.approx(0.0960108, abs=1e-6)
    # d loss / d logp = -A r / 5 on unclipped tokens, 0 on clipped ones.
    loss.backward()
    expected_grad = row(-1.1, 0.0, -0.5, 0.0, 1.5) / 5
    torch.testing.assert_close(logp.grad, expected_grad)


def test_ppo_clip_higher_boundaries_are_asymmetric():
    # clip_low 0.2, clip_high 0.28 (DAPO). Just inside and just outside each bound:
    #   A=+1: r=1.27 inside (grad -1.27/4), r=1.29 clipped (grad 0);
    #   A=-1: r=0.81 inside (grad 0.81/4),  r=0.79 clipped at 0.8 (grad 0).
    # r=1.25 with A=+1 would have been clipped by a symmetric 0.2; here it is not (checked separately).
    logp = log_ratios(1.27, 1.29, 0.81, 0.79)
    adv = row(1.0, 1.0, -1.0, -1.0)
    loss, metrics = get_policy_loss("ppo_clip")(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), clip_high=0.28)
    loss.backward()
    torch.testing.assert_close(logp.grad, row(-1.27, 0.0, 0.81, 0.0) / 4)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    one_token = (log_ratios(1.25), torch.zeros(1, 1), row(1.0), torch.ones(1, 1))
    _, symmetric = get_policy_loss("ppo_clip")(*one_token)
    _, higher = get_policy_loss("ppo_clip")(*one_token, clip_high=0.28)
    assert (symmetric["clip_frac"], higher["clip_frac"]) == (1.0, 0.0)


def test_ppo_dual_clip_caps_negative_advantage_loss():
    # c = 3.
    #   r=5 A=-1: clipped PPO gives max(5, 1.2) = 5; dual clip caps at -c A = 3 (grad 0).
    #   r=2 A=-1: max(2, 1.2) = 2 < 3, unchanged (grad -A r / 3 = 2/3).
    #   r=5 A=+1: positive advantage untouched: max(-5, -1.2) = -1.2 (grad 0).
    # token mean (3 + 2 - 1.2) / 3 = 1.266667; dual_clip_frac 1/3.
    logp = log_ratios(5.0, 2.0, 5.0)
    adv = row(-1.0, -1.0, 1.0)
    loss, metrics = get_policy_loss("ppo_clip")(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(3.8 / 3, abs=1e-6)
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 3)
    torch.testing.assert_close(logp.grad, row(0.0, 2 / 3, 0.0))
    with pytest.raises(ConfigError, match="dual_clip must be > 1"):
        get_policy_loss("ppo_clip")(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=0.5)


# ---------------------------------------------------------------- gspo


def test_gspo_hand_computed_sequence_ratio_and_gradient():
    # old = 0. Row 0 log ratios [1e-4, 3e-4] -> s0 = exp(2e-4) = 1.00020002, inside
    # [1 - 3e-4, 1 + 4e-4]; A0 = +1 -> each token -1.00020002.
    # Row 1 log ratios [1e-3, 1e-3, 1e-3] -> s1 = exp(1e-3) = 1.00100050 > 1.0004; A1 = +2 ->
    # max(-2 s1, -2 * 1.0004) = -2.0008 on each token (clipped, no gradient).
    # seq_mean_token_mean: (-1.00020002 - 2.0008) / 2 = -1.50050001.
    # token_mean: (2 * -1.00020002 + 3 * -2.0008) / 5 = -1.60056001.
    # Gradient (seq_mean_token_mean): row-0 token t gets -A0 s0 / (|y0| * 2 seqs) = -0.25005.
    logp = torch.tensor([[1e-4, 3e-4, 0.0], [1e-3, 1e-3, 1e-3]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    loss_fn = get_policy_loss("gspo")
    loss, metrics = loss_fn(logp, torch.zeros(2, 3), adv, mask, agg_mode="seq_mean_token_mean")
    assert loss.item() == pytest.approx(-1.50050001, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(3 / 5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25005, -0.25005, 0.0], [0.0, 0.0, 0.0]]))
    token_loss, _ = loss_fn(logp, torch.zeros(2, 3), adv, mask)
    assert token_loss.item() == pytest.approx(-1.60056001, abs=1e-6)


# ---------------------------------------------------------------- cispo


def test_cispo_hand_computed_weight_is_clipped_and_detached():
    # old = 0, ratios [0.5, 2, 8], A [1, -1, 1], bound 1 + 5 = 6 -> weights [0.5, 2, 6].
    # Per token -w A logp: -0.5*ln 0.5 = 0.346574; 2*ln 2 = 1.386294; -6*ln 8 = -12.476649.
    # token mean (0.346574 + 1.386294 - 12.476649) / 3 = -3.581260; clip_frac 1/3.
    # Weight detached -> d loss / d logp = -w A / 3 = [-0.5, 2, -6] / 3.
    logp = log_ratios(0.5, 2.0, 8.0)
    loss, metrics = get_policy_loss("cispo")(logp, torch.zeros(1, 3), row(1.0, -1.0, 1.0), torch.ones(1, 3))
    assert loss.item() == pytest.approx(-3.581260, abs=1e-5)
    assert metrics["clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, row(-0.5, 2.0, -6.0) / 3)


# ---------------------------------------------------------------- every loss


@pytest.mark.parametrize("name", POLICY_LOSSES.ids())
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_sgd_step_moves_logprob_with_the_advantage_sign(name, sign):
    # A tiny softmax policy over 5 tokens at 3 positions; sampled tokens [1, 3, 0].
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    tokens = torch.tensor([1, 3, 0])

    def logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).T  # [1, 3]

    before = logp().detach()
    loss, _ = get_policy_loss(name)(logp(), before, torch.full((1, 3), sign), torch.ones(1, 3))
    loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    change = logp().detach() - before
    assert (sign * change > 0).all(), change


@pytest.mark.parametrize("name", POLICY_LOSSES.ids())
@pytest.mark.parametrize("mode", AGG_MODES)
def test_every_loss_is_finite_with_garbage_in_padding(name, mode):
    # Row 1 is all padding; padded logprobs are -inf/NaN and padded advantages NaN.
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    logp = torch.tensor([[-0.5, -1.0, -math.inf], [NAN, NAN, NAN]], requires_grad=True)
    old = torch.tensor([[-0.6, -0.9, NAN], [-math.inf, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, NAN], [NAN, NAN, NAN]])
    loss, metrics = get_policy_loss(name)(logp, old, adv, mask, agg_mode=mode, norm_constant=6.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_unknown_loss_suggests_the_closest_name():
    with pytest.raises(RegistryError, match="Did you mean 'ppo_clip'"):
        get_policy_loss("ppo_clp")


# ---------------------------------------------------------------- KL and entropy


def test_kl_penalty_hand_computed():
    # logp [-1, -2], ref [-1.5, -1] -> x = ref - logp = [-0.5, 1].
    # k1 = -x = [0.5, -1]; k2 = x^2/2 = [0.125, 0.5];
    # k3 = e^x - x - 1 = [e^-0.5 - 0.5, e - 2] = [0.106531, 0.718282].
    logp, ref = row(-1.0, -2.0), row(-1.5, -1.0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), row(0.5, -1.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), row(0.125, 0.5))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), row(0.106531, 0.718282))
    with pytest.raises(ConfigError, match="Did you mean 'k3'"):
        kl_penalty(logp, ref, "k_3")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    # pi = [0.7, 0.2, 0.1], ref = [0.4, 0.4, 0.2]:
    # KL(pi || ref) = 0.7 ln(7/4) + 0.2 ln(1/2) + 0.1 ln(1/2) = 0.391731 - 0.207944 = 0.183786.
    pi, ref = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref_logp = pi.log()[samples][None], ref.log()[samples][None]
    for kind in ("k1", "k3"):
        assert kl_penalty(logp, ref_logp, kind).mean().item() == pytest.approx(0.183786, abs=5e-3)
    assert (kl_penalty(logp, ref_logp, "k3") >= 0).all()


def test_entropy_from_logits_hand_computed_and_stable():
    # Uniform over 4: ln 4 = 1.386294. Two finite equal logits among -inf: ln 2 = 0.693147.
    # Logits [1000, 0]: p ~ [1, e^-1000], entropy ~ 0 (a naive exp would overflow).
    logits = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [3.0, -math.inf, 3.0, -math.inf], [1000.0, 0.0, -math.inf, -math.inf]],
        requires_grad=True,
    )
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([1.386294, 0.693147, 0.0]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_from_logits_matches_the_definition():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits.double(), -1)
    reference = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits.bfloat16()), reference.float(), atol=0.03, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits), reference.float())
