"""algos/grpo_vlm.py run as a user runs it, in a subprocess, with a tiny budget (CleanRL style)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

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


def test_readmes_reload_snippet_loads_the_saved_model_and_processor(smoke, repo_root):
    """README promises how to reload a trained policy: its snippet, run as written, on this (CPU) machine."""
    readme = (repo_root / "README.md").read_text()
    snippet = re.search(r"```python\n(# reload a trained policy.*?)```", readme, re.DOTALL).group(1)
    namespace = {}
    exec(snippet.replace("runs/<run_name>/model", str(smoke[1] / "model")), namespace)
    assert namespace["model"].config.model_type == "qwen2_vl" and hasattr(namespace["processor"], "image_processor")


def test_smoke_run_ends_with_the_accuracy_summary_and_an_offline_wandb_run(smoke):
    result, _, tmp = smoke
    last_line = result.stdout.strip().splitlines()[-1]
    assert "eval/accuracy" in last_line and "→" in last_line, last_line
    assert list((tmp / "wandb").glob("offline-run-*")), "no offline wandb run was written"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--group-size", "1"], "--group-size"),
        (["--model", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--eval-every", "0"], "--eval-every"),
        (["--micro-batch-size", "0"], "--micro-batch-size"),
        (["--prompts-per-step", "9"], "--train-size"),  # > --train-size 8
        (["--prompts-per-step", "0"], "--prompts-per-step"),
        (["--updates-per-step", "0"], "--updates-per-step"),
        (["--temperature", "0"], "--temperature"),
        (["--total-steps", "0"], "--total-steps"),
        (["--eval-size", "0"], "--eval-size"),
        (["--lora-merge"], "--lora"),
        (["--max-prompt-tokens", "4"], "--max-prompt-tokens"),
        (["--save-every", "-1"], "--save-every"),
        (["--resume", "/nonexistent/run"], "/nonexistent/run"),
    ],
)
def test_bad_flag_exits_with_one_line_before_anything_loads(repo_root, tmp_path, flags, message):
    """Checked before any model loads or builds: with an empty model cache, --model tiny would build for a minute
    (VLRL_CACHE is empty here), and no run directory is made."""
    start = time.time()
    base = ["--train-size", "8", "--eval-size", "4", "--prompts-per-step", "2", "--output-dir", str(tmp_path / "runs")]
    result = run_grpo(repo_root, tmp_path, *base, *flags)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert time.time() - start < 30 and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag, value", [("--task", "cnt"), ("--optimizer", "foo"), ("--dtype", "float16"), ("--rollout-engine", "x")])
def test_a_flag_outside_its_choices_is_refused_by_the_parser_with_the_choices(repo_root, tmp_path, flag, value):
    result = run_grpo(repo_root, tmp_path, flag, value, "--output-dir", str(tmp_path / "runs"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"invalid choice '{value}'" in result.stderr and "Expected one of" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def start_grpo(repo_root, tmp_path, *flags, **popen):
    env = {**os.environ, "VLRL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "algos/grpo_vlm.py", *flags], cwd=repo_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def wait_for(condition, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.05)


def ignore_sigint():  # what a shell does to a command it starts in the background (`python ... &` in a script)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum, preexec", [(signal.SIGTERM, None), (signal.SIGINT, ignore_sigint)], ids=["sigterm", "sigint-in-background"])
def test_a_signal_stops_the_run_after_its_step_and_saves_a_checkpoint_and_the_model(repo_root, tiny_model_dir, tmp_path, signum, preexec):
    flags = ["--total-steps", "1000", "--eval-every", "1000", "--eval-size", "4", "--train-size", "32", "--save-every", "0"]
    flags += ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--no-skip-zero-advantage-groups"]
    process = start_grpo(repo_root, tmp_path, *flags, "--output-dir", str(tmp_path / "runs"), "--model", tiny_model_dir, preexec_fn=preexec)
    wait_for(lambda: any(p.name == "metrics.jsonl" and p.stat().st_size > 0 for p in (tmp_path / "runs").rglob("*")), "step 0")
    time.sleep(2)  # a few training steps
    process.send_signal(signum)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    assert "interrupted at step" in out and "--resume" in out, out[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "model" / "config.json").exists()
    (checkpoint,) = run_dir.glob("checkpoint-*")
    last_step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert checkpoint.name == f"checkpoint-{last_step}"


def test_a_run_killed_with_sigkill_resumes_from_its_checkpoint_to_the_uninterrupted_runs_end(repo_root, tiny_model_dir, tmp_path):
    flags = ["--total-steps", "40", "--save-every", "5", "--eval-every", "10", "--eval-size", "8", "--train-size", "64"]
    flags += ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--no-skip-zero-advantage-groups"]
    flags += ["--model", tiny_model_dir]
    straight = run_grpo(repo_root, tmp_path, *flags, "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    process = start_grpo(repo_root, tmp_path, *flags, "--output-dir", str(tmp_path / "killed"))
    wait_for(lambda: list((tmp_path / "killed").glob("*/checkpoint-[0-9]*[0-9]")), "the first checkpoint")
    process.kill()  # SIGKILL: nothing runs on the way out
    process.communicate(timeout=60)
    (run_dir,) = (tmp_path / "killed").iterdir()
    assert not (run_dir / "model").exists(), "the run finished before it was killed: give it more steps"
    resumed = run_grpo(repo_root, tmp_path, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (straight_dir,) = (tmp_path / "straight").iterdir()
    a, b = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight_dir, run_dir))
    assert [r["step"] for r in b] == list(range(41))
    same = ("eval/accuracy", "charts/reward_mean", "charts/response_length", "losses/loss", "losses/kl")
    assert [[r.get(k) for k in same] for r in a] == [[r.get(k) for k in same] for r in b]
    final_a = load_file(straight_dir / "model" / "model.safetensors")
    final_b = load_file(run_dir / "model" / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_runs_started_in_the_same_second_get_their_own_directories(repo_root, tiny_model_dir, tmp_path):
    """Every name this run could get from its start time is taken: it must make a new directory, not reuse one."""
    now, out = int(time.time()), tmp_path / "runs"
    taken = [out / f"counting__grpo_vlm__1__{t}" for t in range(now, now + 120)]
    for path in taken:
        path.mkdir(parents=True)
    flags = ["--total-steps", "1", "--eval-size", "4", "--train-size", "8", "--prompts-per-step", "2", "--group-size", "2"]
    result = run_grpo(repo_root, tmp_path, *flags, "--max-new-tokens", "4", "--model", tiny_model_dir, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(not any(path.iterdir()) for path in taken)
    (new,) = [p for p in out.iterdir() if p not in taken]
    assert new.name.endswith("-2") and (new / "metrics.jsonl").exists()
