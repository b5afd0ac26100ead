"""One DAPO step seen from the inside: algos/dapo_vlm.py's `main` in-process on the random tiny model with a tiny
budget, its flags parsed as the command line parses them, its rewards replaced (tests/step_runner.py): dynamic
sampling, the token-level loss over micro-batches, the overlong penalty in the rewards, no reference model, and DAPO's
own flags. Its pure functions: tests/test_dapo_math.py."""

import math

import pytest
import torch
from conftest import REPO_ROOT, load_script
from safetensors.torch import load_file
from step_runner import bad_flag_exit, run_script

ONE_STEP = ["--total-steps", "1", "--micro-batch-size", "8"]
NO_OVERLONG = ["--overlong-buffer", "0"]  # the rewards exactly as given: the random model's responses are all long
# calls 0-3 score the step-0 eval (--eval-size 4); then the rollout's 2 groups of 2 (calls 4-7), then any refills
FIRST_ROLLOUT = {4: 0.0, 5: 0.0, 6: 0.0, 7: 1.0}  # group 0 uninformative (all 0), group 1 informative


@pytest.fixture(scope="module")
def dapo():
    return load_script(REPO_ROOT / "algos" / "dapo_vlm.py")


def rewards(table, default):
    return lambda i: table.get(i, default)


# Dynamic sampling (DAPO's Algorithm 1): groups whose rewards are all equal give their places to informative new ones
def test_dynamic_sampling_refills_an_uninformative_group_with_a_new_prompts_informative_group(dapo, tiny_model_dir, tmp_path, one_thread):
    refill = {8: 1.0, 9: 0.5}  # the one new prompt's group (calls 8, 9) is informative
    run = run_script(dapo, tiny_model_dir, tmp_path, *ONE_STEP, *NO_OVERLONG, reward=rewards({**FIRST_ROLLOUT, **refill}, 0.0))
    (call,) = run.loss_calls
    # both groups trained on, the new one in the old one's place (slot 0): (1, 0.5) → ±0.25 / (0.35355 + 1e-4)
    assert call["advantages"] == pytest.approx([0.70691, -0.70691, -0.70700, 0.70700], abs=1e-5)
    record = run.records[1]
    assert record["charts/resampled_prompts"] == 1
    # the charts describe the refilled batch, the one trained on (as verl does): rewards 1, 0.5, 0, 1
    assert record["charts/reward_mean"] == 0.625 and record["charts/accuracy"] == 0.5
    assert record["charts/zero_advantage_groups"] == 0  # the first rollout's: 0.5, its reward mean 0.25


def test_without_dynamic_sampling_the_uninformative_group_is_left_out(dapo, tiny_model_dir, tmp_path, one_thread):
    # the test above can fail: the same first rollout, --max-resample-rounds 0, trains on one group and draws nothing
    flags = [*ONE_STEP, *NO_OVERLONG, "--max-resample-rounds", "0"]
    run = run_script(dapo, tiny_model_dir, tmp_path, *flags, reward=rewards(FIRST_ROLLOUT, 1.0))
    (call,) = run.loss_calls
    assert call["advantages"] == pytest.approx([-0.70700, 0.70700], abs=1e-5)
    record = run.records[1]
    assert record["charts/resampled_prompts"] == 0
    assert record["charts/reward_mean"] == 0.25 and record["charts/zero_advantage_groups"] == 0.5


def test_dynamic_sampling_stops_after_max_resample_rounds(dapo, tiny_model_dir, tmp_path, one_thread):
    flags = [*ONE_STEP, *NO_OVERLONG, "--max-resample-rounds", "3"]
    run = run_script(dapo, tiny_model_dir, tmp_path, *flags, reward=rewards(FIRST_ROLLOUT, 0.5))  # new groups all 0.5
    record = run.records[1]
    assert record["charts/resampled_prompts"] == 3  # one prompt per round, three rounds, then no more
    (call,) = run.loss_calls
    assert len(call["advantages"]) == 2  # the slot still uninformative is left out of the update
    assert record["charts/zero_advantage_groups"] == 0.5 and record["charts/reward_mean"] == 0.25  # 0, 0, 0, 1


def test_resampled_prompts_counts_the_new_prompts_not_the_rounds(dapo, tiny_model_dir, tmp_path, one_thread):
    # both groups uninformative; round 1 rolls out 2 new prompts, of which one is informative (calls 8, 9) and one not
    # (10, 11); round 2 rolls out 1 more for the slot left (12, 13), informative: 3 prompts in 2 rounds
    table = {4: 0.5, 5: 0.5, 6: 0.0, 7: 0.0, 8: 0.0, 9: 1.0, 10: 0.5, 11: 0.5, 12: 1.0, 13: 0.0}
    run = run_script(dapo, tiny_model_dir, tmp_path, *ONE_STEP, *NO_OVERLONG, reward=rewards(table, 0.0))
    record = run.records[1]
    assert record["charts/resampled_prompts"] == 3
    (call,) = run.loss_calls
    assert call["advantages"] == pytest.approx([-0.70700, 0.70700, 0.70700, -0.70700], abs=1e-5)  # (0, 1), (1, 0)
    assert record["charts/reward_mean"] == 0.5 and record["charts/zero_advantage_groups"] == 0


# The soft overlong punishment reaches the advantages; the charts and the all-equal test read the task's reward
def test_the_overlong_penalty_shapes_the_advantages_not_the_charts(dapo, tiny_model_dir, tmp_path, one_thread):
    # one prompt, G = 4 responses of lengths 2, 3, 4, 4 (EOS included) of --max-new-tokens 4, task rewards 1, 1, 0, 1
    # (calls 0-3 score the step-0 eval); --overlong-buffer 0.5: L_cache = 2, penalty 0 up to 2 tokens, then
    # -(|y| - 2) / 2: 0, -0.5, -1, -1, so the shaped rewards are 1, 0.5, -1, 0
    def step(buffer, out):
        flags = [*ONE_STEP, "--prompts-per-step", "1", "--group-size", "4", "--overlong-buffer", buffer]
        rewards = {4: 1.0, 5: 1.0, 6: 0.0, 7: 1.0}
        return run_script(dapo, tiny_model_dir, out, *flags, "--max-resample-rounds", "0", reward=lambda i: rewards.get(i, 1.0), uneven_lengths=True)

    def grpo_advantages(r):  # (r - mean) / (std + 1e-4), the unbiased std, by hand
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        return [(x - mean) / (std + 1e-4) for x in r]

    run = step("0.5", tmp_path / "buffer")
    record = run.records[1]
    assert record["charts/response_length"] == 3.25  # the lengths the penalty was worked out for
    assert record["charts/reward_mean"] == 0.75 and record["charts/accuracy"] == 0.75  # the task's reward
    (call,) = run.loss_calls
    assert call["advantages"] == pytest.approx(grpo_advantages([1.0, 0.5, -1.0, 0.0]), abs=1e-5)
    without = step("0", tmp_path / "no-buffer")
    (call,) = without.loss_calls
    assert call["advantages"] == pytest.approx(grpo_advantages([1.0, 1.0, 0.0, 1.0]), abs=1e-5)
    assert without.records[1]["charts/reward_mean"] == 0.75


# The token-level loss: each micro-batch weighted by its share of the step's tokens
@pytest.fixture(scope="module")
def token_mean_runs(dapo, tiny_model_dir, tmp_path_factory, one_thread):
    """The same step (4 prompts x 2 = 8 sequences of different lengths, alternating rewards) in micro-batches of 1,
    3 (3 + 3 + 2: unequal shares) and all 8 sequences."""
    runs = {}
    for size in (1, 3, 8):
        flags = ["--total-steps", "1", "--prompts-per-step", "4", "--micro-batch-size", str(size)]
        runs[size] = run_script(dapo, tiny_model_dir, tmp_path_factory.mktemp(f"token-mean-{size}"), *flags, uneven_lengths=True)
    return runs


def test_token_mean_weights_each_micro_batch_by_its_share_of_the_steps_tokens(token_mean_runs):
    # a micro-batch's loss is a mean over its own tokens: weighted by its share of sequences (GRPO's weight) instead,
    # the step's loss and gradient would change with --micro-batch-size
    whole = token_mean_runs[8]
    assert whole.records[1]["charts/response_length"] < 4.0 and whole.records[1]["charts/zero_advantage_groups"] == 0
    trained = load_file(whole.run_dir / "model" / "model.safetensors")
    for size in (1, 3):
        run = token_mean_runs[size]
        assert len(run.loss_calls) == -(-8 // size)
        for key in ("losses/loss", "losses/clipfrac", "losses/grad_norm"):
            assert run.records[1][key] == pytest.approx(whole.records[1][key], rel=1e-5, abs=1e-9), (size, key)
        # AdamW's first step moves a weight by about lr * sign(gradient) (2e-4): a gradient that differs in sign
        # moves it ~4e-4 the other way; float noise in gradients near 0 moves it ~1e-6
        other = load_file(run.run_dir / "model" / "model.safetensors")
        assert all(torch.allclose(other[k], trained[k], rtol=0, atol=1e-5) for k in trained), size


def test_logged_entropy_does_not_depend_on_the_micro_batch_size(token_mean_runs):
    whole = token_mean_runs[8].records[1]["losses/entropy"]
    for size in (1, 3):
        assert token_mean_runs[size].records[1]["losses/entropy"] == pytest.approx(whole, rel=1e-5), size


# No KL term, so no reference model
def test_dapo_loads_no_reference_model_and_logs_no_kl(dapo, tiny_model_dir, tmp_path, one_thread):
    run = run_script(dapo, tiny_model_dir, tmp_path, *ONE_STEP)
    assert run.models_loaded == 1  # the policy only
    record = run.records[1]
    assert "losses/kl" not in record and record["losses/loss"] is not None
    (call,) = run.loss_calls
    assert (call["clip_eps"], call["clip_eps_high"]) == (0.2, 0.28)  # DAPO's defaults reach the loss


# DAPO's own flags, checked before anything loads (the flags every script shares: tests/test_scripts.py)
DAPO_BAD_FLAGS = {
    "group-size=1": (["--group-size", "1"], "--group-size 1: "),
    "updates-per-step=0": (["--updates-per-step", "0"], "--updates-per-step 0: "),
    "clip-eps=0": (["--clip-eps", "0"], "--clip-eps 0.0: "),
    "clip-eps-high=0": (["--clip-eps-high", "0"], "--clip-eps-high 0.0: "),
    "overlong-buffer=2": (["--overlong-buffer", "2"], "--overlong-buffer 2.0: "),
    "max-resample-rounds=-1": (["--max-resample-rounds", "-1"], "--max-resample-rounds -1: "),
}


@pytest.mark.parametrize("flags, message", DAPO_BAD_FLAGS.values(), ids=DAPO_BAD_FLAGS.keys())
def test_a_bad_dapo_flag_ends_the_run_with_one_line_before_anything_loads(dapo, tmp_path, monkeypatch, flags, message):
    exited = bad_flag_exit(dapo, tmp_path, monkeypatch, *flags)
    assert str(exited).startswith(message) and "\n" not in str(exited), exited
