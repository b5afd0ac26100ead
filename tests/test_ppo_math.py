"""The heart of PPO, pinned independently of the code: GAE against hand-worked sequences and against the recursion
written out with Python loops (Schulman et al. 2015, eq. 16), the token rewards (Ouyang et al. 2022), the clipped
policy and value losses on both sides of their clips, masking (padding and positions after the last token), and the
value head's inputs: the hidden state whose logits score each response token."""

import math
import random

import pytest
import torch

from conftest import REPO_ROOT, load_script


@pytest.fixture(scope="module")
def ppo():
    return load_script(REPO_ROOT / "algos" / "ppo_vlm.py")


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# GAE
def test_gae_by_hand_with_a_padded_row(ppo):
    # row 0: three tokens, reward 1 on the last; gamma 1, lambda 0.95, V after the last token = 0
    #   delta_2 = 1 - 0.7 = 0.3                  A_2 = 0.3
    #   delta_1 = 0 + 0.7 - 0.6 = 0.1            A_1 = 0.1 + 0.95 * 0.3 = 0.385
    #   delta_0 = 0 + 0.6 - 0.5 = 0.1            A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    # row 1: two tokens then padding holding garbage (5 and 9 must not leak into anything)
    #   delta_1 = 2 - 0.5 = 1.5                  A_1 = 1.5
    #   delta_0 = 0 + 0.5 - 1 = -0.5             A_0 = -0.5 + 0.95 * 1.5 = 0.925
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.allclose(advantages, t([[0.46575, 0.385, 0.3], [0.925, 1.5, 0.0]]), atol=1e-12)
    assert torch.allclose(returns, t([[0.96575, 0.985, 1.0], [1.925, 2.0, 0.0]]), atol=1e-12)


def test_gae_with_gamma_and_lambda_one_is_the_return_to_go_minus_the_value(ppo):
    rng = random.Random(1)
    for n, T in [(1, 1), (2, 5), (3, 8)]:
        lengths = [rng.randint(1, T) for _ in range(n)]
        rewards = t([[rng.uniform(-1, 1) for _ in range(T)] for _ in range(n)])
        values = t([[rng.uniform(-1, 1) for _ in range(T)] for _ in range(n)])
        mask = t([[1.0 if k < length else 0.0 for k in range(T)] for length in lengths])
        advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
        for i, length in enumerate(lengths):
            for k in range(length):
                to_go = sum(rewards[i, j].item() for j in range(k, length))
                assert returns[i, k].item() == pytest.approx(to_go, abs=1e-12)
                assert advantages[i, k].item() == pytest.approx(to_go - values[i, k].item(), abs=1e-12)
            assert all(advantages[i, k] == 0 and returns[i, k] == 0 for k in range(length, T))


def test_gae_with_lambda_zero_is_the_one_step_td_error(ppo):
    rewards, values, mask = t([[0.1, 0.2, 0.3, 0.4]]), t([[1.0, 2.0, 3.0, 4.0]]), t([[1, 1, 1, 0]])
    advantages, _ = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    # A_t = r_t + 0.9 V_{t+1} - V_t; the last token (t = 2) has no next value: 0.3 - 3
    assert torch.allclose(advantages, t([[0.1 + 1.8 - 1.0, 0.2 + 2.7 - 2.0, 0.3 - 3.0, 0.0]]), atol=1e-12)


def direct_gae(rewards, values, length, gamma, lam):
    """The recursion written out for one response of `length` tokens, in Python floats, backwards over t."""
    advantages, next_advantage = [0.0] * length, 0.0
    for k in reversed(range(length)):
        next_value = values[k + 1] if k + 1 < length else 0.0
        delta = rewards[k] + gamma * next_value - values[k]
        next_advantage = advantages[k] = delta + gamma * lam * next_advantage
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_on_random_inputs_against_the_recursion_written_out(ppo):
    rng = random.Random(0)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7)]:
        n, T = 6, 7
        lengths = [rng.randint(1, T) for _ in range(n)]
        rewards = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(n)]
        values = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(n)]
        mask = t([[1.0 if k < length else 0.0 for k in range(T)] for length in lengths])
        advantages, returns = ppo.gae(t(rewards), t(values), mask, gamma, lam)
        for i, length in enumerate(lengths):
            expected_a, expected_r = direct_gae(rewards[i], values[i], length, gamma, lam)
            padding = [0.0] * (T - length)
            assert advantages[i].tolist() == pytest.approx(expected_a + padding, abs=1e-12)
            assert returns[i].tolist() == pytest.approx(expected_r + padding, abs=1e-12)


def test_an_agentic_episodes_tool_turn_is_skipped_by_gae_and_the_reward_lands_on_its_last_model_token(ppo):
    """Mask holes are a tool's turns (common/agent.py): the environment's move, not the policy's. GAE over a row with
    holes equals GAE over the same row with the holes removed, and the holes get A = returns = 0."""
    rng = random.Random(2)
    mask = t([[1, 1, 0, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1, 0, 0]])
    values, old, ref = (t([[rng.uniform(-1, 1) for _ in range(8)] for _ in range(2)]) for _ in range(3))
    token_rewards = ppo.token_rewards(t([1.0, -0.5]), old, ref, mask, beta=0.1)
    assert token_rewards[0, 6] == pytest.approx(1.0 - 0.1 * (old[0, 6] - ref[0, 6]).item(), abs=1e-12)  # last model token
    assert token_rewards[1, 5] == pytest.approx(-0.5 - 0.1 * (old[1, 5] - ref[1, 5]).item(), abs=1e-12)
    advantages, returns = ppo.gae(token_rewards, values, mask, gamma=0.99, lam=0.9)
    for row in range(2):
        kept = mask[row].bool()
        compact_a, compact_r = ppo.gae(token_rewards[row, kept][None], values[row, kept][None], torch.ones(1, int(kept.sum())), gamma=0.99, lam=0.9)
        assert torch.allclose(advantages[row, kept], compact_a[0], atol=1e-12) and torch.allclose(returns[row, kept], compact_r[0], atol=1e-12)
        assert advantages[row, ~kept].eq(0).all() and returns[row, ~kept].eq(0).all()


def test_all_equal_rewards_predicted_exactly_leave_no_advantage(ppo):
    # every response earns 1 at its end and the critic knows it (V = 1 on every token, gamma = 1): A = 0, returns = 1
    mask = t([[1, 1, 0], [1, 1, 1]])
    rewards = t([[0, 1, 0], [0, 0, 1]])
    advantages, returns = ppo.gae(rewards, torch.ones(2, 3, dtype=torch.float64), mask, 1.0, 0.95)
    assert torch.equal(advantages, torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(returns, mask)


# Token rewards and whitening
def test_token_rewards_are_the_kl_penalty_plus_the_task_reward_on_the_last_token(ppo):
    old = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = t([[-1.5, -2.0, -7.0], [-0.25, -1.0, -0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    got = ppo.token_rewards(t([1.0, 0.5]), old, ref, mask, beta=0.1)
    # -0.1 * (old - ref): row 0: -0.05, 0 (+ reward 1 on token 1, its last), padding 0; row 1: 0.025, -0.05, 0 + 0.5
    assert torch.allclose(got, t([[-0.05, 1.0, 0.0], [0.025, -0.05, 0.5]]), atol=1e-12)
    assert torch.allclose(ppo.token_rewards(t([1.0, 0.5]), old, ref, mask, beta=0.0), t([[0, 1, 0], [0, 0, 0.5]]))


def test_token_rewards_of_one_token_responses(ppo):
    got = ppo.token_rewards(t([0.7]), t([[-1.0, 3.0]]), t([[-1.0, 8.0]]), t([[1, 0]]), beta=0.5)
    assert torch.equal(got, t([[0.7, 0.0]]))


def test_whiten_uses_only_the_masked_tokens(ppo):
    x, mask = t([[1.0, 3.0, 100.0], [5.0, -100.0, -100.0]]), t([[1, 1, 0], [1, 0, 0]])
    # the tokens 1, 3, 5: mean 3, (biased) std sqrt(8/3)
    std = (8 / 3) ** 0.5
    assert torch.allclose(ppo.whiten(x, mask), t([[-2 / std, 0.0, 0.0], [2 / std, 0.0, 0.0]]), atol=1e-6)


def test_whiten_of_equal_values_or_one_token_is_zero_not_nan(ppo):
    equal = ppo.whiten(t([[0.4, 0.4], [0.4, 7.0]]), t([[1, 1], [1, 0]]))  # 0.4 three times: mean 0.4 up to rounding
    assert equal.abs().max() < 1e-6 and equal[1, 1] == 0
    assert ppo.whiten(t([[2.5]]), t([[1]])).abs().item() < 1e-6


# The losses
def test_policy_loss_clips_the_ratio_on_the_side_that_would_gain(ppo):
    old = torch.zeros(1, 5)
    logprobs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]])
    mask = torch.ones(1, 5)
    loss, clipfrac, approx_kl = ppo.ppo_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # min(rho A, clip(rho) A): 1.5 * 1 -> 1.2; 1.5 * -1 -> -1.5 (pessimistic: unclipped); 0.5 * 1 -> 0.5 (unclipped);
    # 0.5 * -1 -> -0.8 (clipped); 1.1 * 2 -> 2.2 (inside the clip)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8 + 2.2) / 5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(4 / 5)
    rho = [1.5, 1.5, 0.5, 0.5, 1.1]
    assert approx_kl.item() == pytest.approx(sum(r - 1 - torch.log(torch.tensor(r)).item() for r in rho) / 5, abs=1e-6)


def test_policy_loss_is_a_token_mean_that_ignores_padding(ppo):
    logprobs = torch.tensor([[-1.0, -2.0, 99.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    advantages = torch.tensor([[0.3, 0.6, 50.0], [-0.3, 0.0, 0.9]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, clipfrac, approx_kl = ppo.ppo_loss(logprobs, logprobs.detach(), advantages, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(0.3 + 0.6 - 0.3 + 0.0 + 0.9) / 5)  # rho = 1: minus the mean advantage
    assert clipfrac.item() == 0 and approx_kl.item() == 0
    loss.backward()  # at rho = 1 the gradient is the policy gradient, -A_t / (number of tokens)
    assert torch.allclose(logprobs.grad, -advantages * mask / 5, atol=1e-7)


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors(ppo):
    old = torch.zeros(1, 4)
    values = torch.tensor([[0.5, 0.5, 0.1, 3.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.value_loss(values, old, returns, mask, clip_eps_value=0.2)
    # token 0: (0.5 - 1)^2 = 0.25 vs clipped V 0.2: (0.2 - 1)^2 = 0.64 -> 0.64 (the clipped branch)
    # token 1: (0.5 - 0)^2 = 0.25 vs (0.2 - 0)^2 = 0.04 -> 0.25 (the unclipped branch)
    # token 2: inside the clip, both (0.1 - 1)^2 = 0.81; token 3 is padding
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    # the clipped branch is flat in V (no gradient); the others: (V - R) / 3 tokens
    assert torch.allclose(values.grad, torch.tensor([[0.0, 0.5 / 3, -0.9 / 3, 0.0]]), atol=1e-7)


def test_value_loss_clip_around_a_nonzero_old_value_and_batches_of_one_and_two(ppo):
    # V_old = 1, V = 2 (clipped to 1.2), R = 2: unclipped error 0, clipped 0.64 -> 0.32
    loss, clipfrac = ppo.value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.32) and clipfrac.item() == 1.0
    # two rows, V = V_old: the clip is inactive and the loss is half the mean squared error over the 3 tokens
    v, r = torch.tensor([[0.2, 0.4], [0.6, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    loss, clipfrac = ppo.value_loss(v, v, r, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.16 + 0.36) / 3) and clipfrac.item() == 0


def test_explained_variance(ppo):
    returns, mask = t([[1.0, 2.0, 50.0], [3.0, 4.0, 50.0]]), t([[1, 1, 0], [1, 1, 0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)
    # V off by a constant -> still 1 (the variance ignores a shift)
    assert ppo.explained_variance(returns + 7, returns, mask) == pytest.approx(1.0)
    # half the deviations predicted: Var(R - V) = Var(R) / 4 -> 0.75
    half = t([[1.75, 2.25, 0.0], [2.75, 3.25, 0.0]])
    assert ppo.explained_variance(half, returns, mask) == pytest.approx(1 - 0.25, abs=1e-9)
    assert math.isnan(ppo.explained_variance(returns, t([[1.0, 1.0, 9.0], [1.0, 1.0, 9.0]]), mask))  # returns that do not vary


# The critic's input
def test_the_value_head_starts_at_zero_and_reads_the_hidden_state_that_scores_each_token(ppo, tiny_vlm, make_prompts):
    from common.vlm import response_logprobs, suppressed_token_ids

    model, processor = tiny_vlm
    prompts = make_prompts(["How many?", "How many shapes are in the image?"])
    suppressed = suppressed_token_ids(processor)
    allowed = sorted(set(range(len(processor.tokenizer))) - set(suppressed))
    responses = torch.tensor([allowed[100:103], allowed[200:203]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    with torch.no_grad():
        plain = response_logprobs(model, prompts, responses, mask, suppressed)
        logprobs, hidden = response_logprobs(model, prompts, responses, mask, suppressed, hidden_states=True)
        # the LM head applied to the hidden state at position t gives the log-prob of response token t
        logits = model.get_output_embeddings()(hidden).float()
        logits[..., suppressed] = float("-inf")
        again = torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1) * mask
        # ... and it is the model's last hidden state (after the final norm) there: the one before response token t
        full = dict(prompts, input_ids=torch.cat([prompts["input_ids"], responses], 1),
                    attention_mask=torch.cat([prompts["attention_mask"], mask.long()], 1),
                    mm_token_type_ids=torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(responses)], 1))  # fmt: skip
        last = model(**full, output_hidden_states=True, use_cache=False).hidden_states[-1][:, -4:-1]
    assert torch.equal(logprobs, plain)
    assert torch.allclose(again, logprobs, atol=1e-5)
    assert hidden.shape == (2, 3, model.get_output_embeddings().in_features)
    assert torch.allclose(hidden[mask.bool()], last[mask.bool()], atol=1e-5)
    head = ppo.make_value_head(model)
    assert head.weight.dtype == torch.float32 and torch.equal(head(hidden.float()), torch.zeros(2, 3, 1))
