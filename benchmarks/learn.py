"""Does it learn? Runs an algos/ script as a user runs it, then prints its held-out metrics at the start and at the
end of the run, and the wall time.

    python benchmarks/learn.py algos/grpo_vlm.py --task counting
    python benchmarks/learn.py --output-dir /tmp/runs algos/grpo_vlm.py --task grounding --seed 2

learn.py's own flags come before the script; every argument after the script goes to the script. It prints, e.g.,
`eval/accuracy 0.390 → 0.825 in 223 s` (every `eval/` key of the run's metrics.jsonl, first → last) and exits
non-zero when the run fails. The wall time is the script's, from its start: a first-run model build included.
"""

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.runs import read_metrics  # noqa: E402


@dataclass
class Args:
    """Run SCRIPT [ARGS...] and print its eval/ metrics, first → last, and the wall time."""

    script: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SCRIPT")]
    """the script to run, e.g. algos/grpo_vlm.py; every argument after it is passed to it"""
    output_dir: str = "runs"
    """passed to the script as --output-dir; the run read is the newest <output_dir>/*/metrics.jsonl it wrote"""


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged `key` (null: a skipped step, left out)."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def eval_summary(metrics_path: Path) -> str:
    """'eval/accuracy 0.390 → 0.825, eval/iou ...': each eval/ key's first and last logged value."""
    records = read_metrics(metrics_path.parent)
    keys = dict.fromkeys(k for r in records for k in r if k.startswith("eval/"))  # in the order first logged
    values = {key: series(records, key)[1] for key in keys}
    return ", ".join(f"{key} {v[0]:.3f} → {v[-1]:.3f}" for key, v in values.items() if v)


# The same seed lands elsewhere on another CPU: where torch, MKL and oneDNN pick wider (AVX-512) kernels, sums round
# differently. Pinned to their AVX2 kernels, AVX2 and AVX-512 machines should compute alike (measured only on an AVX2
# machine, an AMD EPYC: 15 GRPO steps bitwise the same as unpinned, and as fast). x86 only.
SAME_KERNELS_ON_EVERY_X86 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pinned_env() -> dict[str, str]:
    """This process's environment with the kernels pinned (on x86; a variable you set yourself wins)."""
    pinned = SAME_KERNELS_ON_EVERY_X86 if platform.machine().lower() in ("x86_64", "amd64") else {}
    return {**pinned, **os.environ}


def run_script(script: str, output_dir: str, script_args: list[str], **output) -> tuple[int, float, Path | None]:
    """Run `script` as a user runs it, `python SCRIPT --output-dir OUTPUT_DIR ARGS...` (`output`: subprocess.run's
    stdout and stderr; the terminal by default): (its exit status, its wall seconds from start to exit, the newest
    metrics.jsonl it wrote under output_dir, or None)."""
    start = time.time()
    command = [sys.executable, script, "--output-dir", output_dir, *script_args]
    result = subprocess.run(command, env=pinned_env(), **output)
    wall = time.time() - start
    written = [p for p in Path(output_dir).glob("*/metrics.jsonl") if p.stat().st_mtime >= start]
    return result.returncode, wall, max(written, key=lambda p: p.stat().st_mtime, default=None)


def main(args: Args, script_args: list[str]) -> int:
    if "--output-dir" in script_args:
        raise SystemExit("give --output-dir before the script (learn.py passes it on and reads the run from there)")
    returncode, wall, metrics_path = run_script(args.script, args.output_dir, script_args)
    if returncode != 0:
        print(f"{args.script} failed (exit {returncode}) after {wall:.0f} s", file=sys.stderr)
        return returncode
    if metrics_path is None:
        print(f"{args.script} wrote no {args.output_dir}/*/metrics.jsonl", file=sys.stderr)
        return 1
    summary = eval_summary(metrics_path)
    if not summary:
        print(f"{metrics_path} has no eval/ metrics", file=sys.stderr)
        return 1
    print(f"metrics: {metrics_path}")
    print(f"{summary} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    # learn.py's own arguments end at the script: the first argument ending in .py
    split = next((i + 1 for i, arg in enumerate(argv) if arg.endswith(".py")), len(argv))
    sys.exit(main(tyro.cli(Args, args=argv[:split]), argv[split:]))
