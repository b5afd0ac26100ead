"""algos/grpo_vlm.py run as a user runs it, in a subprocess, with a tiny budget (CleanRL style)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.vlm import load_vlm

TRAIN_KEYS = [
    "step",
    "charts/reward_mean",
    "charts/reward_std",
    "losses/kl",
    "losses/clipfrac",
    "charts/response_length",
    "losses/grad_norm",
    "charts/step_time",
    "eval/accuracy",
]


def run_grpo(repo_root, tmp_path, *flags, **env):
    """Run the script from the repo root, offline, with its caches under tmp_path."""
    full_env = {**os.environ, "VLRL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "algos/grpo_vlm.py", *flags],
        cwd=repo_root, env=full_env, capture_output=True, text=True, encoding="utf-8", timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def smoke(repo_root, tiny_model_dir, tmp_path_factory):
    """Two GRPO steps on the random tiny model, evaluated every step, tracked with wandb offline."""
    tmp = tmp_path_factory.mktemp("grpo-smoke")
    flags = ["--total-steps", "2", "--eval-every", "1", "--eval-size", "8", "--train-size", "32"]
    flags += ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4"]
    flags += ["--output-dir", str(tmp / "runs"), "--model", tiny_model_dir, "--track"]
    result = run_grpo(repo_root, tmp, *flags, WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_SILENT="true")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp / "runs").iterdir()
    return result, run_dir, tmp


def check_metrics(run_dir, steps):
    """metrics.jsonl holds a step-0 eval record, then one record per step with every key, all finite."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(steps + 1))
    assert math.isfinite(records[0]["eval/accuracy"])
    for record in records[1:]:
        for key in TRAIN_KEYS:
            assert key in record and math.isfinite(record[key]), (key, record)


def test_smoke_run_logs_finite_metrics_for_every_step(smoke):
    check_metrics(smoke[1], steps=2)


def test_several_updates_per_rollout_in_micro_batches_without_reference_model(repo_root, tiny_model_dir, tmp_path):
    # the other branches of the update: old log-probs from a separate forward, beta = 0, gradient accumulation
    flags = ["--total-steps", "1", "--eval-size", "4", "--train-size", "8", "--prompts-per-step", "2"]
    flags += ["--group-size", "2", "--max-new-tokens", "4", "--updates-per-step", "2", "--beta", "0"]
    flags += ["--micro-batch-size", "3", "--output-dir", str(tmp_path / "runs"), "--model", tiny_model_dir]
    result = run_grpo(repo_root, tmp_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    check_metrics(run_dir, steps=1)


@pytest.mark.parametrize("task, extra_keys", [("math", []), ("grounding", ["charts/iou", "eval/iou"])])
def test_other_tasks_run_one_step_and_log_their_metrics(repo_root, tiny_model_dir, tmp_path, task, extra_keys):
    flags = ["--task", task, "--total-steps", "1", "--eval-size", "4", "--train-size", "8", "--prompts-per-step", "2"]
    flags += ["--group-size", "2", "--output-dir", str(tmp_path / "runs"), "--model", tiny_model_dir]
    result = run_grpo(repo_root, tmp_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    check_metrics(run_dir, steps=1)
    first, last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in extra_keys:
        assert 0.0 <= (first | last)[key] <= 1.0, key
    if task == "grounding":  # the task's default budget fits a box: 24 tokens (a random model rarely stops early)
        assert 8 < last["charts/response_length"] <= 24


def test_auto_rollout_engine_picks_hf_generate_on_a_cpu_machine(smoke):
    """On CPU, HF generate is the faster engine (README: benchmarks/rollout.py); vLLM only when asked for."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: auto picks vLLM there when it is installed")
    assert "rollout engine: HF generate (no GPU" in smoke[0].stdout, smoke[0].stdout[:2000]


def test_smoke_run_saves_a_model_that_reloads(smoke):
    _, run_dir, _ = smoke
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "model" / "model.safetensors").exists()
    model, processor = load_vlm(str(run_dir / "model"))
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") == model.generation_config.eos_token_id


def test_smoke_run_ends_with_the_accuracy_summary_and_an_offline_wandb_run(smoke):
    result, _, tmp = smoke
    last_line = result.stdout.strip().splitlines()[-1]
    assert "eval/accuracy" in last_line and "→" in last_line, last_line
    assert list((tmp / "wandb").glob("offline-run-*")), "no offline wandb run was written"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--group-size", "1"], "--group-size"),
        (["--task", "cnt"], "counting"),
        (["--model", "/nonexistent/dir"], "/nonexistent/dir"),
    ],
)
def test_bad_flag_exits_with_one_line_and_no_traceback(repo_root, tmp_path, flags, message):
    result = run_grpo(repo_root, tmp_path, "--train-size", "8", "--eval-size", "4", "--output-dir", str(tmp_path), *flags)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_sigterm_stops_the_run_and_saves_the_model(repo_root, tiny_model_dir, tmp_path):
    flags = ["--total-steps", "1000", "--eval-every", "1000", "--eval-size", "4", "--train-size", "32"]
    flags += ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--no-skip-zero-advantage-groups"]
    flags += ["--output-dir", str(tmp_path / "runs"), "--model", tiny_model_dir]
    env = {**os.environ, "VLRL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "algos/grpo_vlm.py", *flags], cwd=repo_root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name == "metrics.jsonl" and p.stat().st_size > 0 for p in (tmp_path / "runs").rglob("*")):
        time.sleep(0.5)
    time.sleep(2)  # a few training steps
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    assert "interrupted at step" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "model" / "config.json").exists()
