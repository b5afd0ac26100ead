"""The algorithms side by side: every algos/*_vlm.py on one task with its defaults, for seeds 1..S, one run at a time
(each as a user runs it: the wall times are honest), then a markdown table and a picture of the eval curves.

    python benchmarks/compare.py --seeds 2          # the six scripts on counting: ~80 minutes on a 2-core CPU
    python benchmarks/compare.py --seeds 3 --scripts algos/grpo_vlm.py algos/rloo_vlm.py -- --total-steps 100

Flags after `--` (or in --script-args) go to every script. What it writes under --out (default runs/benchmark):
    runs/<run_name>/           each run, as the script writes it (--output-dir <out>/runs --seed <s> --task <task>)
    logs/<script>__<seed>.log  each run's output; `tail -f` one to follow a run
    runs.jsonl                 one line per finished run: script, seed, task, flags, run directory, wall seconds
    benchmark.md               the table: eval/accuracy first → last and wall seconds, mean [min, max] over the seeds
    benchmark.png              eval/accuracy against wall-clock seconds, one line per script (needs matplotlib:
                               `pip install -r requirements-bench.txt`)
Interrupted? Run the same command again: a finished run (exit 0, its metrics.jsonl at the run's last step) is read
from runs.jsonl, not run again. The exit status is non-zero when a run failed; the table holds the runs that finished.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Literal, NamedTuple

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.runs import read_metrics  # noqa: E402
from learn import pinned_env, run_script, series  # noqa: E402  (benchmarks/learn.py, next to this file)

ALGOS = Path(__file__).resolve().parents[1] / "algos"
SET_HERE = ("--output-dir", "--seed", "--task", "--resume")  # each run's own, set by compare.py


@dataclass
class Args:
    """Run each script for seeds 1..S, one run at a time; write benchmark.md and benchmark.png under --out."""

    seeds: int = 2
    """run seeds 1..seeds of each script (2 or more: the table and the picture show the seeds' range)"""
    scripts: tuple[str, ...] = ()
    """the scripts to compare (default: every algos/*_vlm.py)"""
    task: Literal["counting", "math", "grounding"] = "counting"
    """the task every run trains on (passed as --task)"""
    out: str = "runs/benchmark"
    """the folder for the runs, their logs, runs.jsonl, benchmark.md and benchmark.png; rerun with it to continue"""
    script_args: str = ""
    """flags for every script, as one string: --script-args='--total-steps 100' (with =); those after `--` are added"""


class Run(NamedTuple):
    """A finished run of one script and seed: its metrics.jsonl records and the wall seconds of its process."""

    seed: int
    records: list[dict]
    wall: float


def last_step(run_dir: Path) -> int | None:
    """The step the run ends at when it finishes: its --total-steps, defaults resolved (the task's budget for the
    script: task.total_steps, PPO's task.ppo_total_steps), from the args.json every script writes into its run
    directory (common.runs.start_run); None without one."""
    path = run_dir / "args.json"
    return json.loads(path.read_text())["total_steps"] if path.is_file() else None


def finished_records(run_dir: Path) -> list[dict] | None:
    """The run's metrics records if they reach its last step, else None (no metrics.jsonl, or a run stopped early)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    records = read_metrics(run_dir)
    return records if records and records[-1]["step"] == last_step(run_dir) else None


def eval_curve(runs: list[Run]) -> tuple[list[float], list[float], list[float], list[float]]:
    """(seconds, mean, min, max) at each eval step the seeds share: eval/accuracy's mean and range over the seeds,
    placed at the seeds' mean wall-clock time of that step (the `time` its record logged)."""
    curves = []  # per seed: {step: (time, accuracy)}
    for run in runs:
        times = {r["step"]: r["time"] for r in run.records}
        curves.append({step: (times[step], acc) for step, acc in zip(*series(run.records, "eval/accuracy"))})
    steps = [step for step in curves[0] if all(step in curve for curve in curves)]
    seconds = [sum(curve[s][0] for curve in curves) / len(curves) for s in steps]
    accuracies = [[curve[s][1] for curve in curves] for s in steps]
    return seconds, [sum(a) / len(a) for a in accuracies], [min(a) for a in accuracies], [max(a) for a in accuracies]


def spread(values: list[float], fmt: str) -> str:
    """'mean [min, max]' of the values, each formatted with `fmt`."""
    return f"{sum(values) / len(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def algorithm(script: str) -> str:
    """The name a script's row and line get: algos/grpo_vlm.py -> GRPO."""
    return Path(script).stem.removesuffix("_vlm").upper()


def table(results: dict[str, list[Run]]) -> str:
    """A markdown row per script: eval/accuracy first → last and wall seconds, mean [min, max] over the seeds."""
    lines = ["| algorithm | script | eval/accuracy before → after | wall s per run | seeds |"]
    lines.append("|---|---|---|---|---|")
    for script, runs in results.items():
        if not runs:
            lines.append(f"| {algorithm(script)} | `{script}` | failed: no finished run | | |")
            continue
        accuracies = [series(run.records, "eval/accuracy")[1] for run in runs]
        before, after = spread([a[0] for a in accuracies], ".3f"), spread([a[-1] for a in accuracies], ".3f")
        wall, seeds = spread([run.wall for run in runs], ".0f"), ", ".join(str(run.seed) for run in runs)
        lines.append(f"| {algorithm(script)} | `{script}` | {before} → {after} | {wall} | {seeds} |")
    return "\n".join(lines)


def draw(results: dict[str, list[Run]], title: str, png: Path):
    """benchmark.png: eval/accuracy against wall-clock seconds, a line per script (the seeds' mean), its seeds'
    min-max range shaded. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for script, runs in results.items():
        if runs:
            seconds, mean, low, high = eval_curve(runs)
            (line,) = ax.plot(seconds, mean, marker="o", markersize=2.5, label=algorithm(script))
            ax.fill_between(seconds, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="wall-clock seconds into the run (metrics.jsonl's time)", ylabel="held-out eval/accuracy (greedy)",
           ylim=(-0.02, 1.02))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def build_tiny_model(task: str):
    """Build the embedded tiny model (`--model tiny`, the default) unless it is cached, before the first run: its
    one-time build (~40 s on 2 cores) would otherwise count in that run's wall time. In a process of its own, with
    the runs' pinned kernels: its warm start trains, and would round differently on another CPU."""
    build = f"from common.tiny_vlm import tiny_model_dir; tiny_model_dir({task!r})"
    subprocess.run([sys.executable, "-c", build], env=pinned_env(), cwd=ALGOS.parent, check=True)


def run_once(script: str, seed: int, args: Args, flags: list[str], tag: str) -> Run | None:
    """Run one script and seed, its output to <out>/logs/; a finished run is added to <out>/runs.jsonl and returned,
    a failed one printed with the end of its log (None)."""
    out = Path(args.out)
    log = out / "logs" / f"{Path(script).stem}__{seed}.log"
    print(f"{tag}: running, output in {log}", flush=True)
    with open(log, "w") as f:
        code, wall, metrics = run_script(script, str(out / "runs"), [*flags, "--task", args.task, "--seed", str(seed)],
                                         stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    records = finished_records(metrics.parent) if code == 0 and metrics else None
    if records is None:
        why = f"exit {code}" if code != 0 else "no metrics.jsonl" if not metrics else f"it stopped before step {last_step(metrics.parent)}"
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-8:])
        print(f"{tag}: FAILED ({why}) after {wall:.0f} s; the end of {log}:\n{tail}", file=sys.stderr, flush=True)
        return None
    line = {"script": script, "seed": seed, "task": args.task, "flags": flags,
            "run_dir": os.path.relpath(metrics.parent, out), "wall_s": round(wall, 2)}  # fmt: skip
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return Run(seed, records, line["wall_s"])  # as a rerun reads it from runs.jsonl: the same table either way


def main(args: Args, flags: list[str], command: str) -> int:
    if args.seeds < 2:
        raise SystemExit(f"--seeds {args.seeds}: use 2 or more (the table and the picture show the seeds' range)")
    scripts = list(args.scripts) or [os.path.relpath(path) for path in sorted(ALGOS.glob("*_vlm.py"))]
    for script in scripts:
        if not os.path.isfile(script):
            raise SystemExit(f"--scripts {script}: no such file")
    for flag in flags:
        if flag.split("=")[0] in SET_HERE:
            raise SystemExit(f"{flag}: compare.py sets {', '.join(SET_HERE[:3])} itself (use --out, --seeds, --task)")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ledger = out / "runs.jsonl"
    lines = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()] if ledger.exists() else []
    finished = {(r["script"], r["seed"], r["task"], tuple(r["flags"])): r for r in lines}  # the latest line wins

    results, failed, built = {script: [] for script in scripts}, [], False
    pairs = list(product(scripts, range(1, args.seeds + 1)))
    for n, (script, seed) in enumerate(pairs, 1):
        tag = f"[{n}/{len(pairs)}] {script} --seed {seed}"
        record = finished.get((script, seed, args.task, tuple(flags)))
        records = record and finished_records(out / record["run_dir"])
        if not records and not any(flag.split("=")[0] == "--model" for flag in flags) and not built:
            build_tiny_model(args.task)
            built = True
        run = Run(seed, records, record["wall_s"]) if records else run_once(script, seed, args, flags, tag)
        if run is None:
            failed.append(f"{script} --seed {seed}")
            continue
        results[script].append(run)
        accuracy = series(run.records, "eval/accuracy")[1]
        note = "finished before, " if records else ""
        print(f"{tag}: {note}eval/accuracy {accuracy[0]:.3f} → {accuracy[-1]:.3f} in {run.wall:.0f} s", flush=True)

    title = f"{args.task}: eval/accuracy, mean over seeds 1..{args.seeds} (shaded: min to max)"
    png = out / "benchmark.png"
    try:
        draw(results, title, png)
        picture = f"\n![{title}](benchmark.png)\n"
    except ImportError:
        picture = ""
        png.unlink(missing_ok=True)  # an earlier run's picture would not show these runs
        print(f"no {png}: it needs matplotlib (pip install -r requirements-bench.txt), then run the same command again")
    markdown = table(results)
    defaults = "its defaults" + (f" and {shlex.join(flags)}" if flags else "")
    (out / "benchmark.md").write_text(
        f"{args.task}, seeds 1..{args.seeds}, each script with {defaults}, one run at a time "
        f"({time.strftime('%Y-%m-%d')}):\n`{command}`\n\n{markdown}\n\n"
        "eval/accuracy: held-out, greedy, at step 0 and at the last step; wall: the script's process from start to "
        "exit; mean [min, max] over the seeds.\n" + picture
    )
    print(f"\n{markdown}\n\n{out / 'benchmark.md'}" + (f", {png}" if picture else ""))
    if failed:
        print(f"{len(failed)} run(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # compare.py's own flags, then -- and the scripts' flags
    args = tyro.cli(Args, args=argv[:split])
    command = shlex.join(["python", "benchmarks/compare.py", *argv])
    try:
        sys.exit(main(args, shlex.split(args.script_args) + argv[split + 1 :], command))
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the finished runs are kept (in {args.out}/runs.jsonl); the same command continues")
