"""benchmarks/learn.py and benchmarks/curve.py run as a user runs them, in a subprocess."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

TINY_BUDGET = ["--total-steps", "2", "--eval-every", "1", "--eval-size", "4", "--train-size", "64"]
TINY_BUDGET += ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4"]


def run(repo_root, tmp_path, *command):
    """Run a command from the repo root, offline, with its caches under tmp_path."""
    env = {**os.environ, "VLRL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *command], cwd=repo_root, env=env, capture_output=True, text=True,
                          encoding="utf-8", timeout=300)  # fmt: skip


def test_learn_prints_the_runs_first_and_last_eval_accuracy_and_wall_time(repo_root, tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    result = run(repo_root, tmp_path, "benchmarks/learn.py", "--output-dir", str(runs), "algos/grpo_vlm.py",
                 *TINY_BUDGET, "--model", tiny_model_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = runs.glob("*/metrics.jsonl")  # the flags after the script reached it: --output-dir included
    evals = [r["eval/accuracy"] for r in map(json.loads, metrics.read_text().splitlines()) if "eval/accuracy" in r]
    assert len(evals) == 3  # step 0, then --eval-every 1 over --total-steps 2
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"eval/accuracy {evals[0]:.3f} → {evals[-1]:.3f} in \d+ s", last_line), last_line
    assert f"metrics: {metrics}" in result.stdout


def test_learn_exits_non_zero_when_the_run_fails(repo_root, tmp_path):
    result = run(repo_root, tmp_path, "benchmarks/learn.py", "--output-dir", str(tmp_path / "runs"),
                 "algos/grpo_vlm.py", "--group-size", "1")  # fmt: skip
    assert result.returncode != 0
    assert "--group-size 1" in result.stderr and "algos/grpo_vlm.py failed" in result.stderr, result.stderr[-2000:]
    assert "→" not in result.stdout


def write_metrics(path, with_iou: bool):
    """A run of 4 steps, evaluated at steps 0, 2 and 4; step 3's reward was not finite (logged as null)."""
    records = [{"step": 0, "eval/accuracy": 0.3, "time": 1.0}]
    for step in range(1, 5):
        records.append({"step": step, "charts/reward_mean": None if step == 3 else 0.1 * step})
        if step % 2 == 0:
            records[-1]["eval/accuracy"] = 0.3 + 0.1 * step
    if with_iou:
        for record in records:
            if "eval/accuracy" in record:
                record["eval/iou"] = record["eval/accuracy"] / 2
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_learn_summarises_each_eval_key_first_to_last(repo_root, tmp_path):
    spec = importlib.util.spec_from_file_location("learn", repo_root / "benchmarks" / "learn.py")
    learn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learn)
    write_metrics(tmp_path / "metrics.jsonl", with_iou=True)
    assert learn.eval_summary(tmp_path / "metrics.jsonl") == "eval/accuracy 0.300 → 0.700, eval/iou 0.150 → 0.350"


@pytest.mark.parametrize("with_iou", [False, True], ids=["counting", "grounding"])
def test_curve_writes_a_png_of_the_eval_metrics_and_the_reward(repo_root, tmp_path, with_iou):
    pytest.importorskip("matplotlib", reason="curve.py needs matplotlib, a benchmark-only requirement "
                        "(requirements-bench.txt) that CI, which installs requirements.txt, does not have")  # fmt: skip
    metrics, out = tmp_path / "run" / "metrics.jsonl", tmp_path / "plots" / "curve.png"
    metrics.parent.mkdir()
    write_metrics(metrics, with_iou)
    result = run(repo_root, tmp_path, "benchmarks/curve.py", str(metrics), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plotted = "eval/accuracy (3 points), " + ("eval/iou (3 points), " if with_iou else "") + "charts/reward_mean (3 points)"
    assert result.stdout.strip() == f"{out}: {plotted}"


def test_curve_refuses_a_file_without_eval_metrics(repo_root, tmp_path):
    pytest.importorskip("matplotlib", reason="curve.py needs matplotlib, a benchmark-only requirement "
                        "(requirements-bench.txt) that CI, which installs requirements.txt, does not have")  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "charts/reward_mean": 0.5}) + "\n")
    result = run(repo_root, tmp_path, "benchmarks/curve.py", str(metrics), "--out", str(tmp_path / "curve.png"))
    assert result.returncode != 0 and "has no eval/accuracy" in result.stderr
    assert not (tmp_path / "curve.png").exists()
