"""benchmarks/learn.py, curve.py and compare.py run as a user runs them, in a subprocess."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

TINY_BUDGET = ["--total-steps", "2", "--eval-every", "1", "--eval-size", "4", "--train-size", "64"]
TINY_BUDGET += ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4"]


def run(repo_root, tmp_path, *command, **env):
    """Run a command from the repo root, offline, on one thread (a tiny model loses on a busy CPU with more), with
    its caches under tmp_path and `env` added to its environment."""
    env = {**os.environ, "VLRL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
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


def write_metrics(path, with_iou: bool, metric: str = "eval/iou"):
    """A run of 4 steps, evaluated at steps 0, 2 and 4; step 3's reward was not finite (logged as null); with_iou:
    also `metric` (a task's mean reward: eval/iou, eval/f1)."""
    records = [{"step": 0, "eval/accuracy": 0.3, "time": 1.0}]
    for step in range(1, 5):
        records.append({"step": step, "charts/reward_mean": None if step == 3 else 0.1 * step})
        if step % 2 == 0:
            records[-1]["eval/accuracy"] = 0.3 + 0.1 * step
    if with_iou:
        for record in records:
            if "eval/accuracy" in record:
                record[metric] = record["eval/accuracy"] / 2
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_learn_summarises_each_eval_key_first_to_last(repo_root, tmp_path):
    spec = importlib.util.spec_from_file_location("learn", repo_root / "benchmarks" / "learn.py")
    learn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learn)
    write_metrics(tmp_path / "metrics.jsonl", with_iou=True)
    assert learn.eval_summary(tmp_path / "metrics.jsonl") == "eval/accuracy 0.300 → 0.700, eval/iou 0.150 → 0.350"


@pytest.mark.parametrize("metric", [None, "eval/iou", "eval/f1"], ids=["counting", "grounding", "mat"])
def test_curve_writes_a_png_of_the_eval_metrics_and_the_reward(repo_root, tmp_path, metric):
    pytest.importorskip("matplotlib", reason="curve.py needs matplotlib, a benchmark-only requirement "
                        "(requirements-bench.txt) that CI, which installs requirements.txt, does not have")  # fmt: skip
    metrics, out = tmp_path / "run" / "metrics.jsonl", tmp_path / "plots" / "curve.png"
    metrics.parent.mkdir()
    write_metrics(metrics, metric is not None, metric)
    result = run(repo_root, tmp_path, "benchmarks/curve.py", str(metrics), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plotted = "eval/accuracy (3 points), " + (f"{metric} (3 points), " if metric else "") + "charts/reward_mean (3 points)"
    assert result.stdout.strip() == f"{out}: {plotted}"


def test_curve_refuses_a_file_without_eval_metrics(repo_root, tmp_path):
    pytest.importorskip("matplotlib", reason="curve.py needs matplotlib, a benchmark-only requirement "
                        "(requirements-bench.txt) that CI, which installs requirements.txt, does not have")  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "charts/reward_mean": 0.5}) + "\n")
    result = run(repo_root, tmp_path, "benchmarks/curve.py", str(metrics), "--out", str(tmp_path / "curve.png"))
    assert result.returncode != 0 and "has no eval/accuracy" in result.stderr
    assert not (tmp_path / "curve.png").exists()


def load_benchmark(repo_root, name, monkeypatch):
    """benchmarks/<name>.py as a module; benchmarks/ on sys.path, as when it runs (it imports learn.py)."""
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, repo_root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPARED = ["algos/grpo_vlm.py", "algos/dapo_vlm.py"]


@pytest.fixture(scope="module")
def benchmark(repo_root, tiny_model_dir, tmp_path_factory):
    """compare.py on GRPO and DAPO, seeds 1 and 2, tiny budget: (its --out, its flags, the finished result)."""
    out = tmp_path_factory.mktemp("benchmark")
    flags = ["--out", str(out), "--seeds", "2", "--scripts", *COMPARED, "--", *TINY_BUDGET, "--model", tiny_model_dir]
    result = run(repo_root, out, "benchmarks/compare.py", *flags)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, flags, result


def spread(values, fmt):
    return f"{sum(values) / len(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def test_compare_tabulates_each_scripts_eval_accuracy_and_wall_time_over_the_seeds(benchmark):
    out, flags, result = benchmark
    markdown = (out / "benchmark.md").read_text()
    assert "python benchmarks/compare.py " + " ".join(flags) in markdown  # the command that made it
    for script in COMPARED:
        name = os.path.basename(script).removesuffix(".py")
        paths = [path for seed in (1, 2) for path in (out / "runs").glob(f"counting__{name}__{seed}__*/metrics.jsonl")]
        runs = [list(map(json.loads, path.read_text().splitlines())) for path in paths]
        assert len(runs) == 2, f"{name}: one run per seed"
        accuracy = [[r["eval/accuracy"] for r in records if "eval/accuracy" in r] for records in runs]
        assert all(len(a) == 3 for a in accuracy)  # step 0, then every step
        row = f"| {name.removesuffix('_vlm').upper()} | `{script}` | {spread([a[0] for a in accuracy], '.3f')} → "
        row += f"{spread([a[-1] for a in accuracy], '.3f')} | "
        (line,) = [line for line in markdown.splitlines() if line.startswith(row)]
        wall = re.fullmatch(r"(\d+) \[(\d+), (\d+)\] \| 1, 2 \|", line.removeprefix(row))
        assert wall, line
        assert int(wall[2]) + 0.5 >= min(records[-1]["time"] for records in runs)  # a process outlives its logging
        assert line in result.stdout
        for seed in (1, 2):  # a line as each run starts and one as it ends, with its result
            assert f"{script} --seed {seed}: running, output in {out / 'logs' / f'{name}__{seed}.log'}" in result.stdout
            ended = rf"{script} --seed {seed}: eval/accuracy \d\.\d{{3}} → \d\.\d{{3}} in \d+ s"
            assert re.search(ended, result.stdout)


def test_compare_draws_the_eval_curves(benchmark):
    pytest.importorskip("matplotlib", reason="compare.py draws with matplotlib, a benchmark-only requirement "
                        "(requirements-bench.txt) that CI, which installs requirements.txt, does not have")  # fmt: skip
    out, _, _ = benchmark
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](benchmark.png)" in (out / "benchmark.md").read_text()


def copy_of(benchmark, tmp_path):
    """(a copy of the benchmark's --out without the trained models, its flags with --out the copy's); runs.jsonl
    names run directories relative to --out, so the copy's runs are finished runs too."""
    out, flags, _ = benchmark
    shutil.copytree(out, tmp_path / "out", ignore=shutil.ignore_patterns("model"))
    return tmp_path / "out", [str(tmp_path / "out") if flag == str(out) else flag for flag in flags]


def test_compare_run_again_reads_the_finished_runs_and_needs_no_matplotlib_for_the_table(repo_root, benchmark, tmp_path):
    out, flags = copy_of(benchmark, tmp_path)
    runs_before, ledger_before = sorted((out / "runs").iterdir()), (out / "runs.jsonl").read_text()
    (tmp_path / "no-matplotlib" / "matplotlib").mkdir(parents=True)
    (tmp_path / "no-matplotlib" / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = run(repo_root, tmp_path, "benchmarks/compare.py", *flags, PYTHONPATH=str(tmp_path / "no-matplotlib"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running" not in result.stdout and result.stdout.count(": finished before, eval/accuracy") == 4
    assert sorted((out / "runs").iterdir()) == runs_before and (out / "runs.jsonl").read_text() == ledger_before
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line in benchmark[2].stdout for line in table)  # the first run's table
    assert "needs matplotlib (pip install -r requirements-bench.txt)" in result.stdout
    assert not (out / "benchmark.png").exists()  # the copied picture would not match the table's command
    assert all(line in (out / "benchmark.md").read_text() for line in table)


def fake_script(tmp_path, name, body):
    """A script in tmp_path that fails or logs as told, without a model: its flags come as --name value pairs."""
    path = tmp_path / f"{name}_vlm.py"
    path.write_text("import json, os, sys\nflags = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n" + body)
    return str(path)


def test_compare_reports_failed_runs_and_exits_non_zero(repo_root, benchmark, tmp_path):
    out, flags = copy_of(benchmark, tmp_path)
    # seed 1 crashes; seed 2 exits 0 one step short of --total-steps 2, as a run stopped by a signal (Ctrl-C, kill) does
    flaky = fake_script(tmp_path, "flaky", "if flags['--seed'] == '1':\n    sys.exit('flaky: no such layer')\n"
                        "run_dir = os.path.join(flags['--output-dir'], 'run' + flags['--seed'])\n"
                        "os.makedirs(run_dir)\njson.dump({'total_steps': 2}, open(os.path.join(run_dir, 'args.json'), 'w'))\n"
                        "with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:\n"
                        "    f.writelines(json.dumps({'step': s, 'eval/accuracy': 0.5, 'time': s}) + '\\n' for s in range(2))\n")  # fmt: skip
    flags[flags.index(COMPARED[1])] = flaky
    ledger_before = (out / "runs.jsonl").read_text()
    result = run(repo_root, tmp_path, "benchmarks/compare.py", *flags)
    assert result.returncode != 0
    assert f"{flaky} --seed 1: FAILED (exit 1)" in result.stderr, result.stderr[-3000:]
    assert "flaky: no such layer" in result.stderr  # the end of its log
    assert f"{flaky} --seed 2: FAILED (it stopped before step 2)" in result.stderr
    assert f"2 run(s) failed: {flaky} --seed 1; {flaky} --seed 2" in result.stderr
    assert (out / "runs.jsonl").read_text() == ledger_before  # not finished: the same command runs them again
    markdown = (out / "benchmark.md").read_text()  # the table of what finished
    assert f"| FLAKY | `{flaky}` | failed: no finished run |" in markdown
    assert "| GRPO | `algos/grpo_vlm.py` | 0" in markdown
    assert result.stdout.count(": finished before, eval/accuracy") == 2


def test_compare_table_and_curve_are_the_seeds_mean_and_range(repo_root, monkeypatch):
    compare = load_benchmark(repo_root, "compare", monkeypatch)

    def records(times, accuracy):  # evaluated at steps 0, 2, 4, at these wall-clock times
        return [{"step": s, "time": t, **({"eval/accuracy": a} if a is not None else {})}
                for s, t, a in zip(range(5), times, accuracy)]  # fmt: skip

    runs = [compare.Run(1, records([1, 2, 3, 4, 5], [0.3, None, 0.5, None, 0.7]), 100.4),
            compare.Run(3, records([2, 3, 4, 5, 6], [0.1, None, 0.5, None, 0.9]), 119.6)]  # fmt: skip
    assert compare.eval_curve(runs) == ([1.5, 3.5, 5.5], [0.2, 0.5, 0.8], [0.1, 0.5, 0.7], [0.3, 0.5, 0.9])
    assert compare.table({"algos/grpo_vlm.py": runs, "algos/ppo_vlm.py": []}).splitlines()[2:] == [
        "| GRPO | `algos/grpo_vlm.py` | 0.200 [0.100, 0.300] → 0.800 [0.700, 0.900] | 110 [100, 120] | 1, 3 |",
        "| PPO | `algos/ppo_vlm.py` | failed: no finished run | | |",
    ]


def test_compare_reads_the_last_step_from_the_runs_args_json(repo_root, monkeypatch, tmp_path):
    # every script writes its flags, defaults resolved, to <run>/args.json (common.runs.start_run)
    compare = load_benchmark(repo_root, "compare", monkeypatch)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": s}) + "\n" for s in range(4)))
    assert compare.finished_records(tmp_path) is None  # no args.json: not a run of ours
    (tmp_path / "args.json").write_text(json.dumps({"total_steps": 3}))
    assert [r["step"] for r in compare.finished_records(tmp_path)] == [0, 1, 2, 3]
    (tmp_path / "args.json").write_text(json.dumps({"total_steps": 150}))  # e.g. PPO's own default on counting
    assert compare.finished_records(tmp_path) is None


def test_optimizers_tabulates_every_optimizer_beside_torch_fused_adamw(repo_root, tmp_path):
    result = run(repo_root, tmp_path, "benchmarks/optimizers.py", "--hidden-size", "64", "--num-layers", "1",
                 "--intermediate-size", "128", "--vocab-size", "512", "--steps", "2", "--warmup-steps", "1",
                 "--no-deepspeed")  # fmt: skip (DeepSpeed's op would build for minutes where it is installed)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in result.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}  # fmt: skip
    for name in ("torch AdamW(fused=True)", "--optimizer adamw", "--optimizer adamw8bit", "--optimizer adamw8bit-offload"):
        assert name in rows, result.stdout
    assert rows["--optimizer adamw"][3].strip(" |") == "0.000"  # the reference itself
    state = rows["--optimizer adamw8bit-offload"][2]  # its fp32 CPU weights are their own master copy
    assert re.fullmatch(r"2\.\d\d \(10\.\d\d from a GPU\)", state), state
    assert float(rows["--optimizer adamw8bit-offload"][3].strip(" |")) < 0.10  # tests/test_optim.py's tolerance


def test_vs_trl_reads_accuracy_at_equal_wall_time_from_each_runs_evals(repo_root, monkeypatch):
    vs_trl = load_benchmark(repo_root, "vs_trl", monkeypatch)
    records = [{"step": 0, "time": 1.0, "eval/accuracy": 0.4}, {"step": 1, "time": 3.0, "charts/step_time": 2.0},
               {"step": 2, "time": 4.5, "charts/step_time": 1.0, "eval/accuracy": 0.6},
               {"step": 3, "time": 9.0, "charts/step_time": 4.0, "eval/accuracy": 0.7}]  # fmt: skip
    result = vs_trl.summary(records)
    assert result["step"] == 2.0 and result["end"] == 9.0 and result["evals"][-1] == (9.0, 0.7)
    assert [vs_trl.accuracy_at(result["evals"], t) for t in (1.0, 4.4, 4.5, 8.9, 9.0)] == [0.4, 0.4, 0.6, 0.6, 0.7]


def test_vs_trl_runs_both_trainers_and_prints_each_ratio(repo_root, tiny_model_dir, tmp_path):
    pytest.importorskip("trl", reason="benchmarks/vs_trl.py runs TRL, a benchmark-only requirement "
                        "(pip install -r requirements-bench.txt)")  # fmt: skip
    result = run(repo_root, tmp_path, "benchmarks/vs_trl.py", "--steps", "2", "--eval-every", "1", "--eval-size", "8",
                 "--model", tiny_model_dir, "--out", str(tmp_path / "vs_trl"))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for label in ("median s / step", "peak RSS MiB", "held-out accuracy at", "held-out accuracy at the end"):
        (row,) = [line for line in result.stdout.splitlines() if line.startswith(f"| {label}")][:1]
        ours, trl, ratio = (cell.strip() for cell in row.strip("|").split("|")[1:])
        assert float(ratio) == pytest.approx(float(ours) / float(trl), abs=0.01) if float(trl) else True
    trl_records = [json.loads(line) for line in (tmp_path / "vs_trl" / "trl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trl_records] == [0, 1, 2] and all("eval/accuracy" in r for r in trl_records)
