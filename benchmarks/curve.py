"""A learning curve from a run's metrics.jsonl: held-out eval/accuracy (and eval/iou or eval/f1 when the task logs
it) on the left, the sampled responses' charts/reward_mean on the right, both against the step.

    python benchmarks/curve.py runs/<run_name>/metrics.jsonl --out docs/counting_curve.png

Needs matplotlib: `pip install -r requirements-bench.txt`.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import matplotlib
import tyro

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.runs import read_metrics  # noqa: E402
from learn import series  # noqa: E402  (benchmarks/learn.py, next to this file)


@dataclass
class Args:
    metrics: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="METRICS")]
    """a run's metrics.jsonl (runs/<run_name>/metrics.jsonl)"""
    out: str = "curve.png"
    """the PNG to write"""


def running_mean(values: list[float], window: int) -> list[float]:
    """Each value replaced by the mean of it and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def main(args: Args):
    path = Path(args.metrics)
    records = read_metrics(path.parent)
    logged = {k for r in records for k in r if k.startswith("eval/")}  # accuracy, and a task's metric (iou, f1)
    eval_keys = [k for k in ("eval/accuracy", *sorted(logged - {"eval/accuracy"})) if k in logged]
    if not eval_keys:
        raise SystemExit(f"{path} has no eval/accuracy: is it a metrics.jsonl of an algos/ script?")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    plotted = []
    for key in eval_keys:
        steps, values = series(records, key)
        left.plot(steps, values, marker="o", markersize=3, label=key)
        plotted.append(f"{key} ({len(steps)} points)")
    left.set(xlabel="step", ylabel="held-out (greedy)", ylim=(0, 1.02), title="eval")
    left.legend(loc="lower right")
    steps, values = series(records, "charts/reward_mean")
    right.plot(steps, values, linewidth=0.6, color="tab:gray", alpha=0.6, label="per step")
    window = len(values) // 20  # a running mean over 1/20 of the run shows the trend through the noise
    if window > 1:
        right.plot(steps, running_mean(values, window), color="tab:orange", label=f"mean of the last {window} steps")
    right.set(xlabel="step", ylabel="charts/reward_mean", ylim=(0, 1.02), title="reward of the sampled responses")
    right.legend(loc="lower right")
    plotted.append(f"charts/reward_mean ({len(steps)} points)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(path.parent.name, fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"{args.out}: " + ", ".join(plotted))


if __name__ == "__main__":
    main(tyro.cli(Args))
