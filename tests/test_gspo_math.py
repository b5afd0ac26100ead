"""The heart of GSPO, pinned independently of the code: gspo_loss against hand-worked sequences and against the
paper's objective written out sequence by sequence (Zheng et al. 2025, arXiv 2507.18071, eq. 5): the sequence
ratio s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), clipped to [1 - eps_low, 1 + eps_high], times GRPO's advantage."""

import math
import random

import pytest
import torch

from conftest import REPO_ROOT, load_script

NO_CLIP = (10.0, 10.0)  # clip ranges no ratio here reaches: the loss is -mean_i s_i A_i


@pytest.fixture(scope="module")
def gspo():
    return load_script(REPO_ROOT / "algos" / "gspo_vlm.py")


def loss_and_clipfrac(gspo, *args):
    """gspo_loss's loss and the clip fraction it logs (losses/clipfrac)."""
    loss, logs = gspo.gspo_loss(*args)
    assert logs["losses/loss"] is loss and "losses/kl" not in logs  # no KL term
    return loss, logs["losses/clipfrac"]


def test_the_sequence_ratio_is_the_geometric_mean_of_the_token_ratios_over_unmasked_tokens(gspo):
    # response 1: token ratios 2 and 8 (its third position is padding) -> s = (2 * 8)^(1/2) = 4, A = 1;
    # response 2: ratios 0.5, 0.5, 0.5 -> s = 0.5, A = -1. Unclipped: loss = -(4 * 1 + 0.5 * -1) / 2 = -1.75
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.3, -0.6, -0.9]])
    logprobs = old + torch.log(torch.tensor([[2.0, 8.0, 1e6], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, clipfrac = loss_and_clipfrac(gspo, logprobs, old, torch.tensor([1.0, -1.0]), mask, *NO_CLIP)
    assert loss.item() == pytest.approx(-1.75, rel=1e-6)
    assert clipfrac.item() == 0.0


def test_the_clip_holds_a_response_only_on_the_side_its_advantage_pushes_towards(gspo):
    # one token each, so s is the token ratio; clip range [1 - 0.2, 1 + 0.3] = [0.8, 1.3]
    s = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    advantages = torch.tensor([2.0, 2.0, -1.0, -1.0, 3.0])
    # A > 0, s = 1.5 > 1.3: clipped, 1.3 * 2     A > 0, s = 0.5: min(0.5 * 2, 0.8 * 2) = 1.0, still pushed up
    # A < 0, s = 0.5 < 0.8: clipped, 0.8 * -1    A < 0, s = 1.5: min(-1.5, -1.3) = -1.5, still pushed down
    # inside the range: 1.1 * 3
    expected_terms = [1.3 * 2, 0.5 * 2, 0.8 * -1, 1.5 * -1, 1.1 * 3]
    old = torch.full((5, 1), -1.0)
    logprobs = (old + torch.log(s).unsqueeze(1)).requires_grad_(True)
    loss, clipfrac = loss_and_clipfrac(gspo, logprobs, old, advantages, torch.ones(5, 1), 0.2, 0.3)
    assert loss.item() == pytest.approx(-sum(expected_terms) / 5, rel=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 5)  # the first and the third
    # the gradient is zero for a clipped response; otherwise d loss / d logp = -A s / N (one token)
    loss.backward()
    expected_grad = [0.0, -2.0 * 0.5 / 5, 0.0, 1.0 * 1.5 / 5, -3.0 * 1.1 / 5]
    assert torch.allclose(logprobs.grad.squeeze(1), torch.tensor(expected_grad), atol=1e-6)


def test_the_papers_clip_ranges_are_asymmetric(gspo):
    # defaults 3e-4 below and 4e-4 above: s = 1 + 3.5e-4 is inside for A > 0, s = 1 - 3.5e-4 is outside for A < 0
    defaults = gspo.Args()
    assert (defaults.clip_eps_low, defaults.clip_eps_high) == (3e-4, 4e-4)
    assert not hasattr(defaults, "beta")  # no KL term, so no reference model is loaded
    s = torch.tensor([1 + 3.5e-4, 1 - 3.5e-4, 1 + 4.5e-4, 1 - 2.5e-4], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    logprobs = torch.log(s).unsqueeze(1).requires_grad_(True)
    loss, clipfrac = loss_and_clipfrac(gspo, logprobs, torch.zeros(4, 1, dtype=torch.float64), advantages, torch.ones(4, 1), 3e-4, 4e-4)
    assert clipfrac.item() == pytest.approx(2 / 4)  # the second (below 1 - 3e-4) and the third (above 1 + 4e-4)
    loss.backward()
    assert [g != 0 for g in logprobs.grad.squeeze(1).tolist()] == [True, False, False, True]


def test_at_the_sampling_policy_the_loss_is_minus_the_mean_advantage_and_the_gradient_grpos(gspo):
    # the first minibatch of a step: pi = pi_old, so s = 1, nothing is clipped, and d loss / d logp_t = -A_i / (|y_i| N),
    # GRPO's gradient at ratio 1 (mean over the response's tokens, then over responses)
    logprobs = torch.tensor([[-1.0, -2.0, 99.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([0.6, -0.2])
    loss, clipfrac = loss_and_clipfrac(gspo, logprobs, logprobs.detach(), advantages, mask, 3e-4, 4e-4)
    assert loss.item() == pytest.approx(-(0.6 - 0.2) / 2)
    assert clipfrac.item() == 0.0
    loss.backward()
    expected = torch.tensor([[-0.6 / 4, -0.6 / 4, 0.0], [0.2 / 6, 0.2 / 6, 0.2 / 6]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-7)


def paper_objective(logprobs, old_logprobs, advantages, lengths, eps_low, eps_high):
    """-(1/N) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) with s_i = prod_t rho_t^(1/|y_i|), written
    out with Python floats, one response at a time; and the number of responses the clip holds."""
    total, clipped = 0.0, 0
    for lp, old, a, n in zip(logprobs, old_logprobs, advantages, lengths):
        s = math.prod(math.exp(lp[t] - old[t]) for t in range(n)) ** (1 / n)
        held = min(max(s, 1 - eps_low), 1 + eps_high)
        total += min(s * a, held * a)
        clipped += (a > 0 and s > 1 + eps_high) or (a < 0 and s < 1 - eps_low)
    return -total / len(advantages), clipped


def test_random_inputs_against_the_objective_written_out(gspo):
    rng = random.Random(0)
    for eps_low, eps_high, spread in [(3e-4, 4e-4, 1e-3), (0.2, 0.28, 0.3), (0.1, 0.1, 0.2)]:
        N, T = 12, 7
        lengths = [rng.randint(1, T) for _ in range(N)]
        old = [[-rng.random() * 3 for _ in range(T)] for _ in range(N)]
        new = [[o + rng.gauss(0, spread) for o in row] for row in old]
        advantages = [rng.gauss(0, 1) for _ in range(N)]
        mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
        padded = [[v if t < n else 50.0 for t, v in enumerate(row)] for row, n in zip(new, lengths)]  # junk in padding
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
        loss, clipfrac = loss_and_clipfrac(gspo, as_tensor(padded), as_tensor(old), as_tensor(advantages), mask, eps_low, eps_high)
        expected_loss, expected_clipped = paper_objective(new, old, advantages, lengths, eps_low, eps_high)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
        assert clipfrac.item() == pytest.approx(expected_clipped / N)
        assert 0 < expected_clipped < N  # the clip acted on some responses, not all


def test_padding_does_not_change_the_ratio_or_the_gradient(gspo):
    torch.manual_seed(0)
    old = -torch.rand(3, 4)
    logprobs = old + 0.05 * torch.randn(3, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -0.5, 2.0])
    grads = []
    for junk in (0.0, 7.0):  # whatever the padding positions hold, in logprobs and old_logprobs
        lp = torch.where(mask.bool(), logprobs, torch.full_like(logprobs, junk)).requires_grad_(True)
        ol = torch.where(mask.bool(), old, torch.full_like(old, -junk))
        loss, clipfrac = loss_and_clipfrac(gspo, lp, ol, advantages, mask, 0.02, 0.02)
        loss.backward()
        grads.append((loss.item(), clipfrac.item(), lp.grad))
    assert grads[0][:2] == pytest.approx(grads[1][:2])
    assert torch.allclose(grads[0][2], grads[1][2])
    assert (grads[0][2][mask == 0] == 0).all()
    # a response padded with extra columns scores as the unpadded one
    short = loss_and_clipfrac(gspo, logprobs[1:2, :2], old[1:2, :2], advantages[1:2], mask[1:2, :2], 0.02, 0.02)
    long = loss_and_clipfrac(gspo, logprobs[1:2], old[1:2], advantages[1:2], mask[1:2], 0.02, 0.02)
    assert short[0].item() == pytest.approx(long[0].item()) and short[1].item() == long[1].item()


def test_groups_of_two_and_all_equal_rewards(gspo):
    # GRPO's advantage: in a group of 2 with rewards 1 and 0, A = +-0.5 / (std + 1e-4) with std = sqrt(0.5)
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.3, 0.0, 0.0])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    advantages = gspo.group_advantages(rewards, 2)
    assert torch.allclose(advantages, torch.tensor([a, -a, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)
    # all-equal groups have A = 0: their responses add nothing to the loss or the gradient, whatever their ratio
    logprobs = torch.log(torch.tensor([[1.2], [0.9], [3.0], [0.1], [1.0], [2.0]])).requires_grad_(True)
    loss, clipfrac = loss_and_clipfrac(gspo, logprobs, torch.zeros(6, 1), advantages, torch.ones(6, 1), 0.2, 0.2)
    # s = 1.2 with A > 0 (clipped: 1.2 * a), s = 0.9 with A < 0 (inside: 0.9 * -a); mean over all 6 responses
    assert loss.item() == pytest.approx(-(1.2 * a - 0.9 * a) / 6, rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.0)  # s = 1.2 is not past 1 + 0.2
    loss.backward()
    assert (logprobs.grad[2:] == 0).all() and (logprobs.grad[:2] != 0).all()
