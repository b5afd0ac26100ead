"""One step of an algorithm script seen from the inside, for tests/test_grpo_step.py and tests/test_dapo_step.py: the
script's `main` in-process on the random tiny model with a tiny budget, its flags parsed as the command line parses
them, its rewards replaced, and what happened inside recorded (the loss function's calls, the optimizer's steps, the
models loaded)."""

import inspect
import itertools
import json

import pytest
import torch
import tyro

import common.policy
import common.tasks
from common.vlm import stop_token_id

BUDGET = ["--prompts-per-step", "2", "--group-size", "2", "--train-size", "8", "--eval-size", "4", "--max-new-tokens", "4"]


def alternating(calls):  # 0, 1, 0, 1, ...: every group of 2 has one of each, so every group is kept
    return float(calls % 2)


class Run:
    """What one in-process run leaves for the tests to inspect."""

    def __init__(self):
        self.run_dir = None
        self.records = []  # metrics.jsonl, parsed strictly (NaN or Infinity would raise)
        self.optimizer_steps = 0  # calls of AdamW.step
        self.loss_calls = []  # the loss function's calls (one per micro-batch and pass): its advantages and settings
        self.loss_logs = []  # the losses/* metrics each call returned, as floats
        self.models_loaded = 0  # load_vlm calls: the policy, then the reference if the script has one


def strict_records(run_dir):
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_script(module, model_dir, out, *flags, reward=alternating, reference_noise=0.0, uneven_lengths=False) -> Run:
    """algos/<name>_vlm.py's main (`module`, whose loss function is <name>_loss) with these flags. reward(i): the reward
    of the i-th completion scored (eval and rollouts alike, in order). reference_noise: the reference's weights get
    this much seeded Gaussian noise, so the KL is not 0 on the first step. uneven_lengths: sampled response i ends
    (EOS) after 1 + i % T tokens, so responses of one step have different lengths."""
    run = Run()
    loss_name = module.__name__.removesuffix("_vlm") + "_loss"
    loss_fn, load_vlm, generate, adamw_step = getattr(module, loss_name), common.policy.load_vlm, common.policy.generate, torch.optim.AdamW.step

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

    def recording_loss(*args, **kwargs):
        loss, logs = loss_fn(*args, **kwargs)
        arguments = inspect.signature(loss_fn).bind(*args, **kwargs).arguments
        settings = {k: v for k, v in arguments.items() if not torch.is_tensor(v)}
        run.loss_calls.append({"advantages": arguments["advantages"].tolist(), **settings})
        run.loss_logs.append({k: v.item() for k, v in logs.items()})
        return loss, logs

    def counting_step(optimizer, *args, **kwargs):
        run.optimizer_steps += 1
        return adamw_step(optimizer, *args, **kwargs)

    calls = itertools.count()
    with pytest.MonkeyPatch.context() as patch:  # scripts call get_task(args.task).reward_fn(box_frame)
        patch.setattr(common.tasks.Task, "reward_fn", lambda self, box_frame=None: lambda c, a, f=0.0: reward(next(calls)))
        patch.setattr(common.policy, "load_vlm", counting_load_vlm)
        if uneven_lengths:
            patch.setattr(common.policy, "generate", cut_generate)
        patch.setattr(module, loss_name, recording_loss)
        patch.setattr(torch.optim.AdamW, "step", counting_step)
        module.main(tyro.cli(module.Args, args=[*BUDGET, "--model", model_dir, "--output-dir", str(out), *flags]))
    (run.run_dir,) = out.iterdir()
    run.records = strict_records(run.run_dir)
    return run


def bad_flag_exit(module, tmp_path, monkeypatch, *flags) -> SystemExit:
    """The SystemExit that main raises for these flags, which must come before anything loads: --model tiny's cache is
    made a file, so that building the model would fail at once, and nothing may be written to --output-dir."""
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("VLRL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exited:
        module.main(tyro.cli(module.Args, args=[*BUDGET, *flags, "--output-dir", str(tmp_path / "runs")]))
    assert not (tmp_path / "runs").exists()
    return exited.value
