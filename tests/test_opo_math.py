"""The heart of OPO, pinned independently of the code: opo_advantages against hand-worked groups and against the
paper's baseline written out sum by sum (Hao et al. 2025, arXiv 2505.23585: b = sum_i |y_i| r_i / sum_i |y_i|,
A_i = r_i - b), and opo_loss at the sampling policy (its value and its gradient, padding left out)."""

import random

import pytest
import torch

from conftest import REPO_ROOT, load_script


@pytest.fixture(scope="module")
def opo():
    return load_script(REPO_ROOT / "algos" / "opo_vlm.py")


def test_each_response_is_measured_against_the_length_weighted_mean_of_its_group(opo):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    lengths = torch.tensor([2, 4, 1, 1, 3, 1, 4, 2])
    # group 1: b = (2*1) / (2 + 4 + 1 + 1) = 1/4. Group 2: b = (3*1 + 1*1 + 4*0 + 2*0.5) / (3 + 1 + 4 + 2) = 5/10
    expected = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, 0.0]
    assert torch.allclose(opo.opo_advantages(rewards, lengths, 4), torch.tensor(expected), atol=1e-6)


def test_a_longer_response_pulls_the_baseline_towards_its_reward(opo):
    # G = 2, rewards 1 and 0: b = 3/4 when the rewarded response is 3 tokens and the other 1; 1/4 the other way round
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    lengths = torch.tensor([3, 1, 1, 3])
    assert torch.allclose(opo.opo_advantages(rewards, lengths, 2), torch.tensor([0.25, -0.75, 0.75, -0.25]))


def test_groups_of_two_and_all_equal_rewards_give_exactly_zero(opo):
    # an all-equal group teaches nothing: A = 0 exactly, whatever the lengths. In float32 the baseline written as
    # (5 * 0.3 + 2 * 0.3) / 7 is 0.3 + 3e-8, and (1 * 0.7 + 9 * 0.7) / 10 is 0.7 - 6e-8: not exactly the reward
    rewards = torch.tensor([0.3, 0.3, 0.7, 0.7, 1.0, 0.0])
    lengths = torch.tensor([5, 2, 1, 9, 2, 6])
    advantages = opo.opo_advantages(rewards, lengths, 2)
    assert torch.equal(advantages[:4], torch.zeros(4))
    assert torch.allclose(advantages[4:], torch.tensor([0.75, -0.25]))  # b = (2 * 1 + 6 * 0) / 8


def test_equal_lengths_give_the_plain_group_mean(opo):
    rng = random.Random(1)
    rewards = torch.tensor([rng.random() for _ in range(12)], dtype=torch.float64)
    for length in (1, 6):
        got = opo.opo_advantages(rewards, torch.full((12,), length), 4)
        expected = [r - sum(rewards[g : g + 4].tolist()) / 4 for g in range(0, 12, 4) for r in rewards[g : g + 4].tolist()]
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_random_rewards_and_lengths_against_the_formula_written_out(opo):
    rng = random.Random(0)
    for group_size in (2, 3, 8):
        rewards = [rng.random() for _ in range(5 * group_size)]
        lengths = [rng.randint(1, 30) for _ in rewards]
        expected = []
        for start in range(0, len(rewards), group_size):
            group, weights = rewards[start : start + group_size], lengths[start : start + group_size]
            baseline = sum(w * r for w, r in zip(weights, group)) / sum(weights)
            expected += [r - baseline for r in group]
        got = opo.opo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(lengths), group_size)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_the_length_weighted_advantages_of_a_group_sum_to_zero(opo):
    # sum_i |y_i| (r_i - b) = sum_i |y_i| r_i - b sum_i |y_i| = 0: the baseline is the token-weighted mean reward
    rng = random.Random(2)
    rewards = torch.tensor([rng.random() for _ in range(24)], dtype=torch.float64)
    lengths = torch.tensor([rng.randint(1, 20) for _ in range(24)])
    weighted = (opo.opo_advantages(rewards, lengths, 6) * lengths).view(4, 6).sum(1)
    assert torch.allclose(weighted, torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_the_loss_at_the_sampling_policy_weights_every_token_alike_and_ignores_padding(opo):
    # ratio 1: every token's surrogate is its sequence's advantage, averaged over the 2 + 3 response tokens
    logprobs = torch.tensor([[-1.0, -2.0, 99.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([0.6, -0.2])
    loss, logs = opo.opo_loss(logprobs, logprobs, advantages, mask)
    assert loss.item() == pytest.approx(-(2 * 0.6 + 3 * -0.2) / 5) and logs["losses/loss"].item() == loss.item()
    assert set(logs) == {"losses/loss", "losses/entropy"}  # no KL term, nothing clipped (the ratio is 1)
    assert logs["losses/entropy"].item() == pytest.approx((1.0 + 2.0 + 3 * 0.5) / 5)  # a token mean, as the loss
    # its gradient is the paper's estimator over the batch's tokens: d loss / d logp_t = -A_i / sum_j |y_j|
    logprobs = logprobs.clone().requires_grad_(True)
    opo.opo_loss(logprobs, logprobs.detach(), advantages, mask)[0].backward()
    expected = torch.tensor([[-0.6 / 5, -0.6 / 5, 0.0], [0.2 / 5, 0.2 / 5, 0.2 / 5]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-7)


def test_the_loss_over_whole_groups_is_zero_with_the_opo_baseline(opo):
    # the responses' lengths are their masks' sums, as in the script: the baseline and the loss count the same tokens
    rng = random.Random(3)
    lengths = [rng.randint(1, 7) for _ in range(8)]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths], dtype=torch.float64)
    rewards = torch.tensor([rng.random() for _ in range(8)], dtype=torch.float64)
    advantages = opo.opo_advantages(rewards, mask.sum(1), 4)
    logprobs = -torch.rand(8, 7, dtype=torch.float64)
    loss, _ = opo.opo_loss(logprobs, logprobs, advantages, mask)
    assert abs(loss.item()) < 1e-12


def test_strictly_on_policy_no_flag_adds_a_kl_a_clip_or_a_second_update(opo):
    # no beta: load_policy loads no reference model; no updates_per_step or clip_eps: one step per rollout, ratio 1
    fields = {field.name for field in opo.Args.__dataclass_fields__.values()}
    assert not fields & {"beta", "clip_eps", "updates_per_step"}
    with pytest.raises(SystemExit, match="--group-size 1: the baseline is the group's mean"):
        opo.check_args(opo.Args(group_size=1, total_steps=1, max_new_tokens=8))
