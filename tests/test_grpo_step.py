"""One GRPO step seen from the inside: algos/grpo_vlm.py's `main` in-process on the random tiny model with a tiny
budget, its flags parsed as the command line parses them, its rewards replaced. GRPO only: these runs rely on GRPO's
own flags (--group-size, --skip-zero-advantage-groups, --updates-per-step, --clip-eps, --beta); what every script
logs is pinned in tests/test_scripts.py."""

import itertools
import json

import pytest
import torch
import tyro
from safetensors.torch import load_file

import common.policy
from common.vlm import stop_token_id

BUDGET = ["--prompts-per-step", "2", "--group-size", "2", "--train-size", "8", "--eval-size", "4", "--max-new-tokens", "4"]
LOSSES = ["losses/loss", "losses/kl", "losses/clipfrac", "losses/entropy", "losses/grad_norm"]


def alternating(calls):  # 0, 1, 0, 1, ...: every group of 2 has one of each, so every group is kept
    return float(calls % 2)


class Run:
    """What one in-process run leaves for the tests to inspect."""

    def __init__(self):
        self.run_dir = None
        self.records = []  # metrics.jsonl, parsed strictly (NaN or Infinity would raise)
        self.optimizer_steps = 0  # calls of AdamW.step
        self.clipfracs = []  # the clip fraction grpo_loss returned, call by call (one call per micro-batch and pass)
        self.loss_calls = []  # (advantages, keyword arguments) grpo_loss was given, call by call
        self.models_loaded = 0  # load_vlm calls: the policy, then the reference unless --beta 0


def strict_records(run_dir):
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_grpo(grpo, model_dir, out, *flags, reward=alternating, reference_noise=0.0, uneven_lengths=False) -> Run:
    """The script's main with these flags. reward(i): the reward of the i-th completion scored. reference_noise: the
    reference's weights get this much seeded Gaussian noise, so the KL is not 0 on the first step. uneven_lengths:
    sampled response i ends (EOS) after 1 + i % T tokens, so responses of one step have different lengths."""
    run = Run()
    load_vlm, generate, grpo_loss, adamw_step = common.policy.load_vlm, common.policy.generate, grpo.grpo_loss, torch.optim.AdamW.step

    def counting_load_vlm(*args, **kwargs):
        model, processor = load_vlm(*args, **kwargs)
        run.models_loaded += 1
        if run.models_loaded == 2 and reference_noise:  # the reference (load_policy loads the policy first)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * reference_noise)
        return model, processor

    def cut_generate(model, processor, prompts, num_samples, max_new_tokens, temperature, greedy):
        response_ids = generate(model, processor, prompts, num_samples, max_new_tokens, temperature, greedy)
        if not greedy:  # the rollout, not the eval
            for i, row in enumerate(response_ids):
                row[1 + i % response_ids.shape[1] :] = stop_token_id(processor)
        return response_ids

    def recording_grpo_loss(*args, **kwargs):
        loss, kl, clipfrac = grpo_loss(*args, **kwargs)
        run.clipfracs.append(clipfrac.item())
        run.loss_calls.append((args[3].tolist(), kwargs))
        return loss, kl, clipfrac

    def counting_step(optimizer, *args, **kwargs):
        run.optimizer_steps += 1
        return adamw_step(optimizer, *args, **kwargs)

    calls = itertools.count()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo.tasks, "reward_fn", lambda task, box_frame=None: lambda c, a, f=0.0: reward(next(calls)))
        patch.setattr(common.policy, "load_vlm", counting_load_vlm)
        if uneven_lengths:
            patch.setattr(common.policy, "generate", cut_generate)
        patch.setattr(grpo, "grpo_loss", recording_grpo_loss)
        patch.setattr(torch.optim.AdamW, "step", counting_step)
        grpo.main(tyro.cli(grpo.Args, args=[*BUDGET, "--model", model_dir, "--output-dir", str(out), *flags]))
    (run.run_dir,) = out.iterdir()
    run.records = strict_records(run.run_dir)
    return run


# --skip-zero-advantage-groups (on by default): a step whose groups all have equal rewards trains on nothing
@pytest.fixture(scope="module")
def all_equal(grpo, tiny_model_dir, tmp_path_factory, one_thread):
    """Two steps in which every completion earns 0.5: every group is skipped."""
    return run_grpo(grpo, tiny_model_dir, tmp_path_factory.mktemp("all-equal"), "--total-steps", "2", reward=lambda i: 0.5)


def test_steps_that_keep_no_sequence_leave_the_weights_bitwise_unchanged(all_equal, tiny_model_dir):
    # AdamW's weight decay (0.01) moves every weight that has a gradient, even a zero one, at each optimizer step.
    # A step with no gradient at all (no backward ran) moves nothing in torch's AdamW, so the weights alone cannot
    # show that such a step was taken: the step count does.
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    trained = load_file(all_equal.run_dir / "model" / "model.safetensors")
    assert trained.keys() == start.keys()
    assert all(torch.equal(trained[k], start[k]) for k in start), "a weight changed"
    assert all_equal.optimizer_steps == 0


def test_without_skipping_the_same_steps_do_move_the_weights(grpo, tiny_model_dir, tmp_path, one_thread):
    # the test above can fail: the same groups, trained on (advantage 0, KL 0), step the optimizer
    run = run_grpo(grpo, tiny_model_dir, tmp_path, "--total-steps", "2", "--no-skip-zero-advantage-groups", reward=lambda i: 0.5)
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    trained = load_file(run.run_dir / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert run.optimizer_steps == 2


def test_a_step_that_trains_on_nothing_logs_its_losses_as_null_not_zero(all_equal):
    for record in all_equal.records[1:]:
        assert record["charts/zero_advantage_groups"] == 1
        assert [record[key] for key in LOSSES] == [None] * len(LOSSES), record


# Logged losses: each micro-batch weighted by its share of the step, every pass counted
@pytest.fixture(scope="module")
def micro_batch_runs(grpo, tiny_model_dir, tmp_path_factory, one_thread):
    """micro_batch_runs(uneven_lengths) -> {micro-batch size: run}: the same step (4 prompts x 2 = 8 sequences, seed
    1, alternating rewards, a reference that differs from the policy) in micro-batches of 1, of 3 (3 + 3 + 2: unequal
    shares) and of all 8. The random model's responses all run to --max-new-tokens 4 unless uneven_lengths."""
    cache = {}

    def get(uneven_lengths: bool) -> dict[int, Run]:
        if uneven_lengths not in cache:
            cache[uneven_lengths] = {}
            for size in (1, 3, 8):
                out = tmp_path_factory.mktemp(f"micro-batch-{size}")
                flags = ["--total-steps", "1", "--prompts-per-step", "4", "--micro-batch-size", str(size), "--beta", "0.1"]
                cache[uneven_lengths][size] = run_grpo(grpo, tiny_model_dir, out, *flags, reference_noise=0.02, uneven_lengths=uneven_lengths)
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
        for key in LOSSES:
            assert record[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-9), (size, key)


# --updates-per-step 2: the second pass sees a moved policy, so its ratio clips
def test_a_second_pass_over_the_rollout_clips_and_the_logged_clip_fraction_averages_both(grpo, tiny_model_dir, tmp_path, one_thread):
    # also the update's other branches: old log-probs from a forward of their own, --beta 0 (no reference model)
    flags = ["--total-steps", "1", "--updates-per-step", "2", "--lr", "1e-2", "--clip-eps", "0.01", "--beta", "0"]
    run = run_grpo(grpo, tiny_model_dir, tmp_path, *flags, "--micro-batch-size", "4")  # one micro-batch per pass
    first_pass, second_pass = run.clipfracs
    assert first_pass == 0.0  # the policy that sampled: ratio 1 exactly
    assert second_pass > 0
    record = run.records[1]
    assert record["losses/clipfrac"] == pytest.approx((first_pass + second_pass) / 2)
    assert all(record[key] is not None for key in LOSSES) and run.optimizer_steps == 2
    assert run.models_loaded == 1


# GRPO's own flags, checked before anything loads (the flags every script shares: tests/test_scripts.py)
GRPO_BAD_FLAGS = [
    (["--group-size", "1"], "--group-size"),
    (["--updates-per-step", "0"], "--updates-per-step"),
    (["--clip-eps", "0"], "--clip-eps"),
    (["--beta", "-1"], "--beta"),
    (["--clip-eps-high", "0"], "--clip-eps-high"),
    (["--max-resample-rounds", "-1"], "--max-resample-rounds"),
]


@pytest.mark.parametrize("flags, message", GRPO_BAD_FLAGS, ids=["group-size=1", "updates-per-step=0", "clip-eps=0", "beta=-1", "clip-eps-high=0", "max-resample-rounds=-1"])
def test_a_bad_grpo_flag_ends_the_run_with_one_line_before_anything_loads(grpo, tmp_path, monkeypatch, flags, message):
    (tmp_path / "cache").write_text("")  # --model tiny's cache is a file: building the model would fail at once
    monkeypatch.setenv("VLRL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match=f"^{message} ") as exited:
        grpo.main(tyro.cli(grpo.Args, args=[*BUDGET, *flags, "--output-dir", str(tmp_path / "runs")]))
    assert "\n" not in str(exited.value) and not (tmp_path / "runs").exists()


# GRPO's published variants reach the loss and the advantage (their math: tests/test_grpo_math.py)
def test_the_variant_flags_reach_the_advantage_and_the_loss(grpo, tiny_model_dir, tmp_path, one_thread):
    flags = ["--total-steps", "1", "--scale-rewards", "none", "--loss-aggregation", "seq-mean-token-sum-norm"]
    flags += ["--clip-eps-high", "0.28", "--kl-estimator", "k2", "--micro-batch-size", "4"]
    run = run_grpo(grpo, tiny_model_dir, tmp_path, *flags)
    ((advantages, variant),) = run.loss_calls
    assert advantages == [-0.5, 0.5, -0.5, 0.5]  # rewards 0, 1 in each group: r - mean, not divided by the std
    assert variant == {"clip_eps_high": 0.28, "kl_estimator": "k2", "aggregation": "seq-mean-token-sum-norm", "max_tokens": 4}
    default = run_grpo(grpo, tiny_model_dir, tmp_path / "default", "--total-steps", "1", "--micro-batch-size", "4")
    ((advantages, variant),) = default.loss_calls
    assert advantages == pytest.approx([-0.7070, 0.7070, -0.7070, 0.7070], abs=1e-4)  # (r - mean) / (std + 1e-4)
    assert variant == {"clip_eps_high": None, "kl_estimator": "k3", "aggregation": "seq-mean-token-mean", "max_tokens": 4}


@pytest.fixture(scope="module")
def token_mean_runs(grpo, tiny_model_dir, tmp_path_factory, one_thread):
    """The same step with --loss-aggregation token-mean and responses of different lengths, in micro-batches of 1, 3
    and all 8 sequences."""
    runs = {}
    for size in (1, 3, 8):
        flags = ["--total-steps", "1", "--prompts-per-step", "4", "--micro-batch-size", str(size), "--loss-aggregation", "token-mean"]
        runs[size] = run_grpo(grpo, tiny_model_dir, tmp_path_factory.mktemp(f"token-mean-{size}"), *flags, reference_noise=0.02, uneven_lengths=True)
    return runs


def test_token_mean_weights_each_micro_batch_by_its_share_of_the_steps_tokens(token_mean_runs, tiny_model_dir):
    # a micro-batch's loss is a mean over its own tokens: weighted by its share of sequences (the default's weight)
    # instead, the step's loss and gradient would change with --micro-batch-size
    whole = token_mean_runs[8]
    trained = load_file(whole.run_dir / "model" / "model.safetensors")
    for size in (1, 3):
        assert token_mean_runs[size].records[1]["losses/loss"] == pytest.approx(whole.records[1]["losses/loss"], rel=1e-5, abs=1e-9)
        other = load_file(token_mean_runs[size].run_dir / "model" / "model.safetensors")
        assert all(torch.allclose(other[k], trained[k], atol=1e-6) for k in trained), size


# --dynamic-sampling (DAPO): groups whose rewards are all equal give their place to informative groups of new prompts
STEP_REWARDS = {4: 0.5, 5: 0.5, 6: 0.0, 7: 1.0}  # calls 0-3 score the step-0 eval (--eval-size 4); then the rollout


def test_dynamic_sampling_refills_an_uninformative_group_with_a_new_prompts_group(grpo, tiny_model_dir, tmp_path, one_thread):
    refill = {8: 0.0, 9: 1.0}  # the one new prompt's group (calls 8, 9) is informative
    flags = ["--total-steps", "1", "--dynamic-sampling", "--micro-batch-size", "8"]
    run = run_grpo(grpo, tiny_model_dir, tmp_path, *flags, reward=lambda i: {**STEP_REWARDS, **refill}.get(i, 0.0))
    ((advantages, _),) = run.loss_calls
    assert len(advantages) == 4  # both groups trained on: the refilled one is not skipped
    record = run.records[1]
    assert record["charts/resampled_prompts"] == 1
    assert record["charts/zero_advantage_groups"] == 0.5 and record["charts/reward_mean"] == 0.5  # the first rollout's
    without = run_grpo(grpo, tiny_model_dir, tmp_path / "without", "--total-steps", "1", reward=lambda i: STEP_REWARDS.get(i, 0.0))
    assert len(without.loss_calls[0][0]) == 2 and without.records[1]["charts/resampled_prompts"] == 0


def test_dynamic_sampling_stops_after_max_resample_rounds(grpo, tiny_model_dir, tmp_path, one_thread):
    flags = ["--total-steps", "1", "--dynamic-sampling", "--max-resample-rounds", "3", "--micro-batch-size", "8"]
    run = run_grpo(grpo, tiny_model_dir, tmp_path, *flags, reward=lambda i: STEP_REWARDS.get(i, 0.5))  # new groups all 0.5
    assert run.records[1]["charts/resampled_prompts"] == 3  # one prompt per round, three rounds
    ((advantages, _),) = run.loss_calls
    assert len(advantages) == 2  # the group still uninformative is left out
