"""The heart of GRPO, pinned with hand-computed numbers: masked_mean, group_advantages, grpo_loss."""

import math

import pytest
import torch


def test_masked_mean_ignores_padding(grpo):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert grpo.masked_mean(x, mask).item() == pytest.approx((1 + 2 + 5 + 6 + 7) / 5)
    assert torch.allclose(grpo.masked_mean(x, mask, dim=1), torch.tensor([(1 + 2) / 2, (5 + 6 + 7) / 3]))


def test_masked_mean_of_a_fully_masked_row_is_zero_not_nan(grpo):
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert torch.equal(grpo.masked_mean(x, mask, dim=1), torch.tensor([0.0, 4.0]))


def test_group_advantages_normalise_within_each_contiguous_group(grpo):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    eps = 1e-4
    # group 1: mean 0.25, unbiased var ((0.75)^2 + 3 * (0.25)^2) / 3 = 0.25 → std 0.5
    # group 2: mean 0.5, unbiased var 4 * (0.5)^2 / 3 = 1/3 → std sqrt(1/3)
    s1, s2 = 0.5, math.sqrt(1 / 3)
    expected = [0.75 / (s1 + eps)] + [-0.25 / (s1 + eps)] * 3 + [0.5 / (s2 + eps)] * 2 + [-0.5 / (s2 + eps)] * 2
    assert torch.allclose(grpo.group_advantages(rewards, 4, eps=eps), torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 0.1, 1.0])
def test_group_with_equal_rewards_gets_exactly_zero_advantage(grpo, value):
    rewards = torch.tensor([value] * 4 + [1.0, 0.0, 0.0, 0.0])
    advantages = grpo.group_advantages(rewards, 4)
    assert torch.equal(advantages[:4], torch.zeros(4))
    assert advantages[4] > 0  # the other group is untouched


def test_loss_at_ratio_one_is_minus_mean_advantage_with_zero_kl_and_clipfrac(grpo):
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 4) * 3
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -0.5, 2.0])
    loss, kl, clipfrac = grpo.grpo_loss(logprobs, logprobs.clone(), logprobs.clone(), advantages, mask, 0.2, 0.04)
    assert loss.item() == pytest.approx(-(1.0 - 0.5 + 2.0) / 3)
    assert kl.item() == 0.0
    assert clipfrac.item() == 0.0


def test_clipped_surrogate_takes_the_pessimistic_branch_for_each_advantage_sign(grpo):
    # one token per sequence; ratio = exp(logp - old_logp)
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    # min(rho * A, clip(rho, 0.8, 1.2) * A):
    #   A=+1, rho=1.5 → min(1.5, 1.2) = 1.2 (clipped)      A=-1, rho=1.5 → min(-1.5, -1.2) = -1.5 (not clipped)
    #   A=+1, rho=0.5 → min(0.5, 0.8) = 0.5 (not clipped)  A=-1, rho=0.5 → min(-0.5, -0.8) = -0.8 (clipped)
    #   A=+1, rho=1.1 → 1.1 (inside the range)
    surrogates = [1.2, -1.5, 0.5, -0.8, 1.1]
    old = torch.full((5, 1), -1.0)
    logprobs = (old + torch.log(ratios).unsqueeze(1)).requires_grad_(True)
    mask = torch.ones(5, 1)
    loss, _, clipfrac = grpo.grpo_loss(logprobs, old, logprobs.detach(), advantages, mask, 0.2, 0.0)
    assert loss.item() == pytest.approx(-sum(surrogates) / 5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(4 / 5)  # |rho - 1| > 0.2 for all but the last
    loss.backward()
    # clipped branches carry no gradient; the others d(-rho*A/5)/dlogp = -rho*A/5
    expected_grad = torch.tensor([0.0, 1.5 / 5, -0.5 / 5, 0.0, -1.1 / 5]).unsqueeze(1)
    assert torch.allclose(logprobs.grad, expected_grad, atol=1e-6)


def test_k3_kl_equals_exp_d_minus_d_minus_one_and_is_non_negative(grpo):
    logprobs = torch.tensor([[-2.0], [-1.0], [-0.3]])
    ref = torch.tensor([[-1.5], [-1.7], [-0.3]])
    # d = ref - logp = 0.5, -0.7, 0 → e^d - d - 1
    expected = [math.exp(0.5) - 0.5 - 1, math.exp(-0.7) + 0.7 - 1, 0.0]
    zeros, mask = torch.zeros(3), torch.ones(3, 1)
    for i in range(3):
        _, kl, _ = grpo.grpo_loss(logprobs[i : i + 1], logprobs[i : i + 1], ref[i : i + 1], zeros[:1], mask[:1], 0.2, 0.1)
        assert kl.item() == pytest.approx(expected[i], abs=1e-6)
    # with A = 0 and ratio 1 the loss is beta * the per-sequence KL, averaged
    loss, kl, _ = grpo.grpo_loss(logprobs, logprobs, ref, zeros, mask, 0.2, 0.1)
    assert loss.item() == pytest.approx(0.1 * sum(expected) / 3, abs=1e-6)


def test_k3_kl_of_one_token_is_exp_d_minus_d_minus_one_for_many_random_d(grpo):
    # d = ref - logp over a wide range; each single-token sequence's kl from grpo_loss against e^d - d - 1 in float64
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(200, 1, generator=generator) * 10
    ref = -torch.rand(200, 1, generator=generator) * 10
    ds = (ref - logprobs).double().flatten().tolist()
    assert min(ds) < -8 and max(ds) > 8 and min(map(abs, ds)) < 0.1  # far below, far above and near 0
    zero, one = torch.zeros(1), torch.ones(1, 1)
    for i, d in enumerate(ds):
        _, kl, _ = grpo.grpo_loss(logprobs[i : i + 1], logprobs[i : i + 1], ref[i : i + 1], zero, one, 0.2, 0.1)
        assert kl.item() == pytest.approx(math.exp(d) - d - 1, rel=1e-5, abs=1e-6), d
        assert kl.item() >= 0.0, d


def test_each_sequence_is_weighted_by_one_over_its_own_length(grpo):
    old = torch.zeros(2, 3)
    # sequence 0 has 1 token (ratio 1.1), sequence 1 has 3 tokens (ratios 1.1, 1.1, 0.9); padding holds garbage
    ratios = torch.tensor([[1.1, 50.0, 50.0], [1.1, 1.1, 0.9]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.0, 2.0])
    loss, kl, clipfrac = grpo.grpo_loss(torch.log(ratios), old, torch.log(ratios), advantages, mask, 0.2, 0.0)
    per_sequence = [1.0 * 1.1 / 1, 2.0 * (1.1 + 1.1 + 0.9) / 3]
    assert loss.item() == pytest.approx(-sum(per_sequence) / 2, abs=1e-6)
    assert loss.item() != pytest.approx(-(1.1 + 2.0 * 3.1) / 4, abs=1e-3)  # not a flat token mean
    assert clipfrac.item() == 0.0  # the padded ratio 50 is not counted
    assert kl.item() == 0.0


def test_logged_kl_and_clip_fraction_are_averaged_per_sequence_then_over_sequences(grpo):
    # as the loss is: a long sequence does not outweigh a short one, so neither depends on how sequences are batched
    old = torch.zeros(2, 4)
    ratios = torch.tensor([[1.5, 1.0, 1.0, 1.0], [1.0, 1.5, 1.0, 1.0]])  # sequence 0: 1 token, clipped; 1: 4, one clipped
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ref = torch.log(ratios) + torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # d = 0.5 on sequence 0's token
    _, kl, clipfrac = grpo.grpo_loss(torch.log(ratios), old, ref, torch.ones(2), mask, 0.2, 0.1)
    assert clipfrac.item() == pytest.approx((1 / 1 + 1 / 4) / 2)  # not 2 clipped of 5 tokens
    assert kl.item() == pytest.approx((math.exp(0.5) - 0.5 - 1) / 2, abs=1e-6)  # not that over 5 tokens


def test_gradient_is_minus_advantage_over_length_and_count_and_zero_on_padding(grpo):
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.5, -0.5])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.6, -0.7, -0.8]], requires_grad=True)
    loss, _, _ = grpo.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, 0.2, 0.0)
    loss.backward()
    # N = 2 sequences: -A_i / (|y_i| * N) = -1.5 / (2 * 2) and 0.5 / (4 * 2)
    expected = torch.tensor([[-0.375, -0.375, 0.0, 0.0], [0.0625, 0.0625, 0.0625, 0.0625]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-7)


# GRPO's published variants (keyword parameters; the defaults above are DeepSeekMath's GRPO)
def test_dr_grpo_scale_none_centres_each_group_without_dividing_by_its_std(grpo):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3, 1.0, 0.5])
    # group means 0.25, 0.3; the pair (1.0, 0.5): mean 0.75
    expected = [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(grpo.group_advantages(rewards[:8], 4, scale="none"), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(grpo.group_advantages(rewards[8:], 2, scale="none"), torch.tensor([0.25, -0.25]), atol=1e-6)
    assert not torch.allclose(grpo.group_advantages(rewards[:8], 4), torch.tensor(expected), atol=1e-3)  # "group" divides


def test_random_rewards_against_both_advantage_formulas_written_out(grpo):
    generator = torch.Generator().manual_seed(1)
    for group_size in (2, 3, 8):
        rewards = torch.rand(5 * group_size, generator=generator, dtype=torch.float64)
        expected_group, expected_none = [], []
        for start in range(0, len(rewards), group_size):
            group = rewards[start : start + group_size].tolist()
            mean = sum(group) / group_size
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))  # unbiased, as DeepSeekMath's code
            expected_group += [(r - mean) / (std + 1e-4) for r in group]
            expected_none += [r - mean for r in group]
        assert torch.allclose(grpo.group_advantages(rewards, group_size), torch.tensor(expected_group, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(grpo.group_advantages(rewards, group_size, scale="none"), torch.tensor(expected_none, dtype=torch.float64), atol=1e-12)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_to_one_plus_eps_high(grpo):
    # DAPO: clip(rho, 1 - 0.2, 1 + 0.28). One token per sequence, A = +1 except the last (A = -1)
    ratios = torch.tensor([1.25, 1.4, 0.7, 0.7])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0])
    # rho 1.25 (inside [0.8, 1.28]) → 1.25; 1.4 → 1.28 (clipped); 0.7, A=+1 → min(0.7, 0.8) = 0.7; 0.7, A=-1 → -0.8
    old = torch.zeros(4, 1)
    logprobs = torch.log(ratios).unsqueeze(1)
    loss, _, clipfrac = grpo.grpo_loss(logprobs, old, logprobs, advantages, torch.ones(4, 1), 0.2, 0.0, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-(1.25 + 1.28 + 0.7 - 0.8) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(3 / 4)  # 1.4 above 1.28; both 0.7 below 0.8; 1.25 inside
    symmetric, _, symmetric_clipfrac = grpo.grpo_loss(logprobs, old, logprobs, advantages, torch.ones(4, 1), 0.2, 0.0)
    assert symmetric.item() == pytest.approx(-(1.2 + 1.2 + 0.7 - 0.8) / 4, abs=1e-6) and symmetric_clipfrac.item() == 1.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_each_kl_estimator_is_its_formula_in_d_equal_ref_minus_logp(grpo, estimator):
    # Schulman (2020): with r = ref / pi and d = log r, k1 = -d, k2 = d^2 / 2, k3 = r - 1 - d
    formula = {"k1": lambda d: -d, "k2": lambda d: d * d / 2, "k3": lambda d: math.exp(d) - 1 - d}[estimator]
    logprobs = torch.tensor([[-2.0, -1.0], [-0.3, -0.3]])
    ref = torch.tensor([[-1.5, -1.7], [-0.9, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second sequence's last token is padding
    per_sequence = [(formula(0.5) + formula(-0.7)) / 2, formula(-0.6)]
    loss, kl, _ = grpo.grpo_loss(logprobs, logprobs, ref, torch.zeros(2), mask, 0.2, 0.1, kl_estimator=estimator)
    assert kl.item() == pytest.approx(sum(per_sequence) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(per_sequence) / 2, abs=1e-6)  # A = 0: the loss is beta * KL


def test_the_three_loss_aggregations_on_responses_of_different_lengths(grpo):
    # at ratio 1 and beta 0 every token's term is its sequence's advantage: sequence 0 has 1 token (A = 1), 1 has 3 (A = 2)
    logprobs = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    advantages = torch.tensor([1.0, 2.0])

    def loss(**variant):
        return grpo.grpo_loss(logprobs, logprobs, logprobs, advantages, mask, 0.2, 0.0, **variant)[0].item()

    assert loss() == pytest.approx(-(1.0 + 2.0) / 2)  # seq-mean-token-mean: each response's mean, then the mean
    assert loss(aggregation="seq-mean-token-mean") == loss()
    assert loss(aggregation="token-mean") == pytest.approx(-(1.0 + 3 * 2.0) / 4)  # DAPO: 4 tokens, each counts once
    assert loss(aggregation="seq-mean-token-sum-norm", max_tokens=8) == pytest.approx(-(1.0 / 8 + 6.0 / 8) / 2)  # Dr. GRPO
