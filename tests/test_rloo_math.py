"""The heart of RLOO, pinned independently of the code: rloo_advantages against hand-worked groups and against the
paper's formula written out sum by sum (Ahmadian et al. 2024, eq. 6), and rloo_loss at the sampling policy."""

import random

import pytest
import torch

from conftest import REPO_ROOT, load_script


@pytest.fixture(scope="module")
def rloo():
    return load_script(REPO_ROOT / "algos" / "rloo_vlm.py")


def test_each_response_is_measured_against_the_mean_of_the_others(rloo):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    # group 1: 1 - 0 = 1; each 0 - (1 + 0 + 0) / 3 = -1/3. Group 2: 1 - (1 + 0 + 0.5) / 3 = 0.5 (twice),
    # 0 - (1 + 1 + 0.5) / 3, 0.5 - (1 + 1 + 0) / 3
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 0.5, 0.5, -2.5 / 3, 0.5 - 2 / 3]
    assert torch.allclose(rloo.rloo_advantages(rewards, 4), torch.tensor(expected), atol=1e-6)


def test_groups_of_two_and_all_equal_rewards(rloo):
    # G = 2: each response against the other one; an all-equal group teaches nothing (A = 0 exactly)
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.3, 0.0, 0.0])
    assert torch.equal(rloo.rloo_advantages(rewards, 2), torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0]))


def test_random_rewards_against_the_formula_written_out(rloo):
    rng = random.Random(0)
    for group_size in (2, 3, 8):
        rewards = [rng.random() for _ in range(5 * group_size)]
        expected = []
        for start in range(0, len(rewards), group_size):
            group = rewards[start : start + group_size]
            for i, r in enumerate(group):
                others = [group[j] for j in range(group_size) if j != i]
                expected.append(r - sum(others) / len(others))
        got = rloo.rloo_advantages(torch.tensor(rewards, dtype=torch.float64), group_size)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_the_loss_at_the_sampling_policy_is_minus_the_mean_advantage_and_ignores_padding(rloo):
    # ratio 1 and beta 0: every token's surrogate is its sequence's advantage, so the loss is -mean_i A_i
    logprobs = torch.tensor([[-1.0, -2.0, 99.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([0.6, -0.2])
    loss, logs = rloo.rloo_loss(logprobs, logprobs, logprobs, advantages, mask, 0.2, 0.0)
    assert loss.item() == pytest.approx(-(0.6 - 0.2) / 2) and logs["losses/loss"].item() == loss.item()
    assert logs["losses/kl"].item() == 0.0 and logs["losses/clipfrac"].item() == 0.0
    # its gradient is REINFORCE's: d loss / d logp_t = -A_i / (|y_i| * N) on each unmasked token
    logprobs = logprobs.clone().requires_grad_(True)
    rloo.rloo_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, 0.2, 0.0)[0].backward()
    expected = torch.tensor([[-0.6 / 4, -0.6 / 4, 0.0], [0.2 / 6, 0.2 / 6, 0.2 / 6]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-7)
