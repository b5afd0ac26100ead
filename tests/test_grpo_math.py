"""The heart of GRPO, pinned with hand-computed numbers: masked_mean, group_advantages, grpo_loss (which returns the
loss and its losses/* metrics). DAPO's loss and overlong penalty: tests/test_dapo_math.py."""

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
    loss, logs = grpo.grpo_loss(logprobs, logprobs.clone(), logprobs.clone(), advantages, mask, 0.2, 0.04)
    assert loss.item() == pytest.approx(-(1.0 - 0.5 + 2.0) / 3)
    assert logs["losses/kl"].item() == 0.0
    assert logs["losses/clipfrac"].item() == 0.0


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
    loss, logs = grpo.grpo_loss(logprobs, old, logprobs.detach(), advantages, mask, 0.2, 0.0)
    assert loss.item() == pytest.approx(-sum(surrogates) / 5, abs=1e-6)
    assert logs["losses/clipfrac"].item() == pytest.approx(4 / 5)  # |rho - 1| > 0.2 for all but the last
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
        _, logs = grpo.grpo_loss(logprobs[i : i + 1], logprobs[i : i + 1], ref[i : i + 1], zeros[:1], mask[:1], 0.2, 0.1)
        assert logs["losses/kl"].item() == pytest.approx(expected[i], abs=1e-6)
    # with A = 0 and ratio 1 the loss is beta * the per-sequence KL, averaged
    loss, _ = grpo.grpo_loss(logprobs, logprobs, ref, zeros, mask, 0.2, 0.1)
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
        _, logs = grpo.grpo_loss(logprobs[i : i + 1], logprobs[i : i + 1], ref[i : i + 1], zero, one, 0.2, 0.1)
        assert logs["losses/kl"].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-5, abs=1e-6), d
        assert logs["losses/kl"].item() >= 0.0, d


def test_each_sequence_is_weighted_by_one_over_its_own_length(grpo):
    old = torch.zeros(2, 3)
    # sequence 0 has 1 token (ratio 1.1), sequence 1 has 3 tokens (ratios 1.1, 1.1, 0.9); padding holds garbage
    ratios = torch.tensor([[1.1, 50.0, 50.0], [1.1, 1.1, 0.9]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.0, 2.0])
    loss, logs = grpo.grpo_loss(torch.log(ratios), old, torch.log(ratios), advantages, mask, 0.2, 0.0)
    per_sequence = [1.0 * 1.1 / 1, 2.0 * (1.1 + 1.1 + 0.9) / 3]
    assert loss.item() == pytest.approx(-sum(per_sequence) / 2, abs=1e-6)
    assert loss.item() != pytest.approx(-(1.1 + 2.0 * 3.1) / 4, abs=1e-3)  # not a flat token mean (DAPO's)
    assert logs["losses/clipfrac"].item() == 0.0  # the padded ratio 50 is not counted
    assert logs["losses/kl"].item() == 0.0


def test_logged_kl_clip_fraction_and_entropy_are_averaged_per_sequence_then_over_sequences(grpo):
    # as the loss is: a long sequence does not outweigh a short one, so neither depends on how sequences are batched
    old = torch.zeros(2, 4)
    ratios = torch.tensor([[1.5, 1.0, 1.0, 1.0], [1.0, 1.5, 1.0, 1.0]])  # sequence 0: 1 token, clipped; 1: 4, one clipped
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ref = torch.log(ratios) + torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # d = 0.5 on sequence 0's token
    _, logs = grpo.grpo_loss(torch.log(ratios), old, ref, torch.ones(2), mask, 0.2, 0.1)
    assert logs["losses/clipfrac"].item() == pytest.approx((1 / 1 + 1 / 4) / 2)  # not 2 clipped of 5 tokens
    assert logs["losses/kl"].item() == pytest.approx((math.exp(0.5) - 0.5 - 1) / 2, abs=1e-6)  # not that over 5 tokens
    # entropy: -log p of the sampled tokens, log p = log 1.5 on sequence 0's token, (log 1.5 + 3 log 1) / 4 on 1's
    assert logs["losses/entropy"].item() == pytest.approx(-(math.log(1.5) + math.log(1.5) / 4) / 2, abs=1e-6)


def test_gradient_is_minus_advantage_over_length_and_count_and_zero_on_padding(grpo):
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.5, -0.5])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.6, -0.7, -0.8]], requires_grad=True)
    loss, _ = grpo.grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, 0.2, 0.0)
    loss.backward()
    # N = 2 sequences: -A_i / (|y_i| * N) = -1.5 / (2 * 2) and 0.5 / (4 * 2)
    expected = torch.tensor([[-0.375, -0.375, 0.0, 0.0], [0.0625, 0.0625, 0.0625, 0.0625]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-7)


def test_the_logged_loss_is_the_loss_and_every_metric_is_a_scalar(grpo):
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    loss, logs = grpo.grpo_loss(logprobs, logprobs.detach() - 0.1, logprobs.detach() + 0.2, torch.tensor([1.0, -1.0]), torch.ones(2, 2), 0.2, 0.1)
    assert set(logs) == {"losses/loss", "losses/kl", "losses/clipfrac", "losses/entropy"}
    assert logs["losses/loss"].item() == loss.item()
    assert all(v.dim() == 0 for v in logs.values())  # one number each, for the step's weighted sum


def test_random_rewards_against_the_advantage_formula_written_out(grpo):
    generator = torch.Generator().manual_seed(1)
    for group_size in (2, 3, 8):
        rewards = torch.rand(5 * group_size, generator=generator, dtype=torch.float64)
        expected = []
        for start in range(0, len(rewards), group_size):
            group = rewards[start : start + group_size].tolist()
            mean = sum(group) / group_size
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))  # unbiased, as DeepSeekMath's code
            expected += [(r - mean) / (std + 1e-4) for r in group]
        assert torch.allclose(grpo.group_advantages(rewards, group_size), torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def test_k3_kl_is_its_formula_in_d_equal_ref_minus_logp_and_padding_does_not_count(grpo):
    # Schulman (2020): with r = ref / pi and d = log r, k3 = r - 1 - d (GRPO's one estimator; k1 and k2 are gone)
    def k3(d):
        return math.exp(d) - 1 - d

    logprobs = torch.tensor([[-2.0, -1.0], [-0.3, -0.3]])
    ref = torch.tensor([[-1.5, -1.7], [-0.9, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second sequence's last token is padding (d = 9.3 there)
    per_sequence = [(k3(0.5) + k3(-0.7)) / 2, k3(-0.6)]
    loss, logs = grpo.grpo_loss(logprobs, logprobs, ref, torch.zeros(2), mask, 0.2, 0.1)
    assert logs["losses/kl"].item() == pytest.approx(sum(per_sequence) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(per_sequence) / 2, abs=1e-6)  # A = 0: the loss is beta * KL
