"""The heart of DAPO (arXiv 2503.14476), pinned with hand-computed numbers: dapo_loss (clip-higher, the token-level
loss, the clip fraction) and overlong_penalty (the soft overlong punishment). Its advantage is GRPO's."""

import math

import pytest
import torch
from conftest import REPO_ROOT, load_script


@pytest.fixture(scope="module")
def dapo():
    return load_script(REPO_ROOT / "algos" / "dapo_vlm.py")


def one_token_each(ratios):
    """(logprobs, old_logprobs, mask) of sequences of one token each whose ratios exp(logp - old_logp) are `ratios`."""
    old = torch.full((len(ratios), 1), -1.0)
    return (old + torch.log(torch.tensor(ratios)).unsqueeze(1)).requires_grad_(True), old, torch.ones(len(ratios), 1)


# Clip-higher: clip(rho, 1 - eps, 1 + eps_high), decoupled bounds
def test_clip_higher_lets_a_positive_advantage_ratio_rise_to_one_plus_eps_high(dapo):
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    logprobs, old, mask = one_token_each([1.25, 1.4, 0.7, 0.7, 1.4])
    # min(rho * A, clip(rho, 0.8, 1.28) * A):
    #   A=+1, rho=1.25 → 1.25 (inside [0.8, 1.28]; the symmetric 1.2 would clip it)
    #   A=+1, rho=1.4  → min(1.4, 1.28) = 1.28 (clipped at the upper bound)
    #   A=+1, rho=0.7  → min(0.7, 0.8) = 0.7 (the unclipped branch is the smaller)
    #   A=-1, rho=0.7  → min(-0.7, -0.8) = -0.8 (clipped at the lower bound, 1 - eps)
    #   A=-1, rho=1.4  → min(-1.4, -1.28) = -1.4 (not clipped: the bound only limits what is gained)
    loss, logs = dapo.dapo_loss(logprobs, old, advantages, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-(1.25 + 1.28 + 0.7 - 0.8 - 1.4) / 5, abs=1e-6)
    assert logs["losses/clipfrac"].item() == pytest.approx(4 / 5)  # every ratio but 1.25 is outside [0.8, 1.28]
    loss.backward()
    # clipped branches carry no gradient; the others d(-rho * A / 5) / dlogp = -rho * A / 5
    expected_grad = torch.tensor([-1.25 / 5, 0.0, -0.7 / 5, 0.0, 1.4 / 5]).unsqueeze(1)
    assert torch.allclose(logprobs.grad, expected_grad, atol=1e-6)


def test_with_eps_high_equal_to_eps_the_clip_is_ppos_symmetric_one(dapo):
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    logprobs, old, mask = one_token_each([1.25, 1.4, 0.7, 0.7, 1.4])
    loss, logs = dapo.dapo_loss(logprobs, old, advantages, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1.2 + 0.7 - 0.8 - 1.4) / 5, abs=1e-6)  # 1.25 is now clipped to 1.2
    assert logs["losses/clipfrac"].item() == 1.0


def test_the_lower_bound_is_one_minus_eps_not_one_minus_eps_high(dapo):
    # A = -1, rho = 0.75: clipped to 0.8 with eps 0.2 (-0.8); a lower bound of 1 - 0.28 = 0.72 would leave -0.75
    logprobs, old, mask = one_token_each([0.75])
    loss, logs = dapo.dapo_loss(logprobs, old, torch.tensor([-1.0]), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(0.8, abs=1e-6) and logs["losses/clipfrac"].item() == 1.0


# The token-level loss: every token of the batch counts once, whatever its response's length
def test_token_mean_divides_by_the_batchs_tokens_not_per_response(dapo):
    # sequence 0: 1 token (ratio 1.1, A = 1); sequence 1: 3 tokens (ratios 1.1, 1.1, 0.9, A = 2); padding holds garbage
    ratios = torch.tensor([[1.1, 50.0, 50.0, 50.0], [1.1, 1.1, 0.9, 50.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    logprobs = torch.log(ratios).requires_grad_(True)
    loss, logs = dapo.dapo_loss(logprobs, torch.zeros(2, 4), torch.tensor([1.0, 2.0]), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-(1.1 + 2 * (1.1 + 1.1 + 0.9)) / 4, abs=1e-6)  # 4 tokens
    assert loss.item() != pytest.approx(-(1.1 + 2 * 3.1 / 3) / 2, abs=1e-3)  # not GRPO's mean per response
    assert logs["losses/clipfrac"].item() == 0.0  # the padded ratios 50 are not counted
    loss.backward()
    # d(-rho_t * A_i / 4) / dlogp_t = -rho_t * A_i / 4, the same weight 1/4 on a token of either response
    expected = torch.tensor([[-1.1 / 4, 0.0, 0.0, 0.0], [-2.2 / 4, -2.2 / 4, -1.8 / 4, 0.0]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)


def test_clip_fraction_is_a_token_mean_too(dapo):
    # sequence 0: 1 token, clipped (1.5); sequence 1: 4 tokens, one clipped (0.75 < 0.8), one inside (1.25 < 1.28)
    ratios = torch.tensor([[1.5, 1.0, 1.0, 1.0], [0.75, 1.25, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    _, logs = dapo.dapo_loss(torch.log(ratios), torch.zeros(2, 4), torch.ones(2), mask, 0.2, 0.28)
    assert logs["losses/clipfrac"].item() == pytest.approx(2 / 5)  # not GRPO's (1/1 + 1/4) / 2


def test_the_logged_metrics_are_the_loss_the_clip_fraction_and_the_entropy_and_no_kl(dapo):
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]])  # equal lengths: every mean agrees
    loss, logs = dapo.dapo_loss(logprobs, logprobs, torch.tensor([1.0, -1.0]), torch.ones(2, 3), 0.2, 0.28)
    assert set(logs) == {"losses/loss", "losses/clipfrac", "losses/entropy"}  # DAPO has no KL term
    assert logs["losses/loss"].item() == loss.item() == pytest.approx(0.0, abs=1e-7)  # ratio 1, A = +1 and -1
    assert logs["losses/entropy"].item() == pytest.approx((1 + 2 + 3 + 0.5 + 0.7 + 0.9) / 6)  # -log p, sampled tokens


# The soft overlong punishment (eq. 13): R_length = min(0, ((L_max - L_cache) - |y|) / L_cache), down to -1
def test_overlong_penalty_is_zero_then_linear_in_the_buffer_then_minus_one(dapo):
    # L_max = 20, buffer 0.25: L_cache = 5, so the penalty starts after 15 tokens and falls by 1/5 a token
    lengths = torch.tensor([0.0, 10.0, 15.0, 16.0, 17.5, 19.0, 20.0, 25.0])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.2, -0.5, -0.8, -1.0, -1.0])
    assert torch.allclose(dapo.overlong_penalty(lengths, 20, 0.25), expected, atol=1e-6)


def test_overlong_penalty_at_the_papers_lengths(dapo):
    # DAPO's setting: L_max = 20,480, L_cache = 4,096 (buffer 0.2): 0 at 16,384 tokens, -0.5 at 18,432, -1 at 20,480
    lengths = torch.tensor([1_000, 16_384, 18_432, 20_480])
    assert torch.allclose(dapo.overlong_penalty(lengths, 20_480, 0.2), torch.tensor([0.0, 0.0, -0.5, -1.0]), atol=1e-6)


def test_overlong_buffer_zero_is_no_penalty_not_a_division_by_zero(dapo):
    lengths = torch.tensor([0.0, 3.0, 4.0, 9.0])
    penalty = dapo.overlong_penalty(lengths, 4, 0.0)
    assert torch.equal(penalty, torch.zeros(4))


def test_a_whole_buffer_penalises_every_token_from_the_first(dapo):
    lengths = torch.tensor([0.0, 5.0, 10.0, 20.0])
    assert torch.allclose(dapo.overlong_penalty(lengths, 20, 1.0), torch.tensor([0.0, -0.25, -0.5, -1.0]), atol=1e-6)


# The advantage: GRPO's, unchanged (the script's own copy)
def test_dapos_advantage_and_masked_mean_are_grpos(dapo, grpo):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=generator)
    rewards[:4] = 0.5  # an uninformative group: 0 advantage
    for group_size in (2, 4, 8):
        assert torch.equal(dapo.group_advantages(rewards, group_size), grpo.group_advantages(rewards, group_size))
    assert torch.equal(dapo.group_advantages(rewards, 4)[:4], torch.zeros(4))
    x, mask = torch.rand(3, 5, generator=generator), (torch.rand(3, 5, generator=generator) > 0.5).float()
    assert torch.equal(dapo.masked_mean(x, mask), grpo.masked_mean(x, mask))
    assert torch.equal(dapo.masked_mean(x, mask, dim=1), grpo.masked_mean(x, mask, dim=1))
    assert math.isclose(dapo.masked_mean(x, mask).item(), (x * mask).sum().item() / mask.sum().item(), rel_tol=1e-6)
