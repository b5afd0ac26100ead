"""One GRPO step seen from the inside: algos/grpo_vlm.py's `main` in-process on the random tiny model with a tiny
budget, its flags parsed as the command line parses them, its rewards replaced (tests/step_runner.py). GRPO only: these
runs rely on GRPO's own flags (--group-size, --skip-zero-advantage-groups, --updates-per-step, --clip-eps, --beta);
what every script logs is pinned in tests/test_scripts.py, DAPO's own step in tests/test_dapo_step.py."""

import pytest
import torch
import tyro
from safetensors.torch import load_file
from step_runner import BUDGET, bad_flag_exit, run_script

LOSSES = ["losses/loss", "losses/kl", "losses/clipfrac", "losses/entropy", "losses/grad_norm"]


# --skip-zero-advantage-groups (on by default): a step whose groups all have equal rewards trains on nothing
@pytest.fixture(scope="module")
def all_equal(grpo, tiny_model_dir, tmp_path_factory, one_thread):
    """Two steps in which every completion earns 0.5: every group is skipped."""
    return run_script(grpo, tiny_model_dir, tmp_path_factory.mktemp("all-equal"), "--total-steps", "2", reward=lambda i: 0.5)


def test_steps_that_keep_no_sequence_leave_the_weights_bitwise_unchanged(all_equal, tiny_model_dir):
    # AdamW's weight decay (0.01) moves every weight that has a gradient, even a zero one, at each optimizer step.
    # A step with no gradient at all (no backward ran) moves nothing in torch's AdamW, so the weights alone cannot
    # show that such a step was taken: the step count does.
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    trained = load_file(all_equal.run_dir / "model" / "model.safetensors")
    assert trained.keys() == start.keys()
    assert all(torch.equal(trained[k], start[k]) for k in start), "a weight changed"
    assert all_equal.optimizer_steps == 0 and all_equal.loss_calls == []


def test_without_skipping_the_same_steps_do_move_the_weights(grpo, tiny_model_dir, tmp_path, one_thread):
    # the test above can fail: the same groups, trained on (advantage 0, KL 0), step the optimizer
    run = run_script(grpo, tiny_model_dir, tmp_path, "--total-steps", "2", "--no-skip-zero-advantage-groups", reward=lambda i: 0.5)
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    trained = load_file(run.run_dir / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert run.optimizer_steps == 2
    assert all(call["advantages"] == [0.0] * 4 for call in run.loss_calls)  # what the step above left out


def test_a_step_that_trains_on_nothing_logs_no_losses_and_a_null_grad_norm_not_zeros(all_equal):
    # a loss of 0 would read as "trained, and the loss was 0": no losses/* key at all, and the grad norm null
    for record in all_equal.records[1:]:
        assert record["charts/zero_advantage_groups"] == 1
        assert [k for k in record if k.startswith("losses/")] == ["losses/grad_norm"], record
        assert record["losses/grad_norm"] is None, record


# Logged losses: each micro-batch weighted by its share of the step, every pass counted
@pytest.fixture(scope="module")
def micro_batch_runs(grpo, tiny_model_dir, tmp_path_factory, one_thread):
    """micro_batch_runs(uneven_lengths) -> {micro-batch size: run}: the same step (4 prompts x 2 = 8 sequences, seed
    1, alternating rewards, a reference that differs from the policy) in micro-batches of 1, of 3 (3 + 3 + 2: unequal
    shares) and of all 8. The random model's responses all run to --max-new-tokens 4 unless uneven_lengths."""
    cache = {}

    def get(uneven_lengths: bool) -> dict:
        if uneven_lengths not in cache:
            cache[uneven_lengths] = {}
            for size in (1, 3, 8):
                out = tmp_path_factory.mktemp(f"micro-batch-{size}")
                flags = ["--total-steps", "1", "--prompts-per-step", "4", "--micro-batch-size", str(size), "--beta", "0.1"]
                cache[uneven_lengths][size] = run_script(grpo, tiny_model_dir, out, *flags, reference_noise=0.02, uneven_lengths=uneven_lengths)
        return cache[uneven_lengths]

    return get


@pytest.mark.parametrize("uneven_lengths", [False, True], ids=["lengths-as-sampled", "uneven-lengths"])
def test_logged_losses_do_not_depend_on_the_micro_batch_size(micro_batch_runs, uneven_lengths):
    runs = micro_batch_runs(uneven_lengths)
    whole = runs[8].records[1]
    assert whole["charts/response_length"] < 4.0 if uneven_lengths else whole["charts/response_length"] == 4.0
    assert whole["charts/zero_advantage_groups"] == 0 and whole["losses/kl"] > 1e-3  # trained on, and KL is not 0
    for size in (1, 3):
        record = runs[size].records[1]
        assert len(runs[size].loss_calls) == -(-8 // size)  # one call per micro-batch
        for key in LOSSES:
            assert record[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-9), (size, key)


# --updates-per-step 2: the second pass sees a moved policy, so its ratio clips
def test_a_second_pass_over_the_rollout_clips_and_the_logged_clip_fraction_averages_both(grpo, tiny_model_dir, tmp_path, one_thread):
    # also the update's other branches: old log-probs from a forward of their own, --beta 0 (no reference model)
    flags = ["--total-steps", "1", "--updates-per-step", "2", "--lr", "1e-2", "--clip-eps", "0.01", "--beta", "0"]
    run = run_script(grpo, tiny_model_dir, tmp_path, *flags, "--micro-batch-size", "4")  # one micro-batch per pass
    first_pass, second_pass = (logs["losses/clipfrac"] for logs in run.loss_logs)
    assert first_pass == 0.0  # the policy that sampled: ratio 1 exactly
    assert second_pass > 0
    record = run.records[1]
    assert record["losses/clipfrac"] == pytest.approx((first_pass + second_pass) / 2)
    assert all(record[key] is not None for key in LOSSES) and run.optimizer_steps == 2
    assert run.models_loaded == 1


# What reaches grpo_loss: the group-normalised advantage, and GRPO's flags
def test_the_group_advantages_and_the_clip_and_kl_flags_reach_the_loss(grpo, tiny_model_dir, tmp_path, one_thread):
    flags = ["--total-steps", "1", "--micro-batch-size", "4", "--clip-eps", "0.3", "--beta", "0.05"]
    run = run_script(grpo, tiny_model_dir, tmp_path, *flags)
    (call,) = run.loss_calls
    # rewards 0, 1 in each group: mean 0.5, unbiased std sqrt(0.5) → ±0.5 / (0.70711 + 1e-4)
    assert call["advantages"] == pytest.approx([-0.70700, 0.70700, -0.70700, 0.70700], abs=1e-5)
    assert (call["clip_eps"], call["beta"]) == (0.3, 0.05)
    assert run.models_loaded == 2  # --beta > 0: the policy and the frozen reference


# GRPO's own flags, checked before anything loads (the flags every script shares: tests/test_scripts.py)
GRPO_BAD_FLAGS = {
    "group-size=1": (["--group-size", "1"], "--group-size 1: "),
    "updates-per-step=0": (["--updates-per-step", "0"], "--updates-per-step 0: "),
    "clip-eps=0": (["--clip-eps", "0"], "--clip-eps 0.0: "),
    "beta=-1": (["--beta", "-1"], "--beta -1.0: "),
}


@pytest.mark.parametrize("flags, message", GRPO_BAD_FLAGS.values(), ids=GRPO_BAD_FLAGS.keys())
def test_a_bad_grpo_flag_ends_the_run_with_one_line_before_anything_loads(grpo, tmp_path, monkeypatch, flags, message):
    exited = bad_flag_exit(grpo, tmp_path, monkeypatch, *flags)
    assert str(exited).startswith(message) and "\n" not in str(exited), exited


# DAPO's variants live in algos/dapo_vlm.py (Dr. GRPO's: a documented change, docs/grpo_vlm.md), not in GRPO's flags
@pytest.mark.parametrize("flag", ["--scale-rewards", "--loss-aggregation", "--clip-eps-high", "--kl-estimator", "--dynamic-sampling", "--max-resample-rounds"])
def test_grpo_takes_none_of_the_variant_flags_it_used_to(grpo, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        tyro.cli(grpo.Args, args=[*BUDGET, flag, "1"])
    assert exited.value.code == 2 and flag in capsys.readouterr().err  # tyro: unrecognized argument
