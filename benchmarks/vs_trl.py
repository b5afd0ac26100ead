"""Our GRPO beside TRL's GRPOTrainer, back to back on this machine: the same embedded tiny VLM (warm-started), counting
data, rule reward and hyperparameters, each run in its own process. Prints the median seconds per step, the peak RSS,
the held-out accuracy at equal wall time and at the end, and each ratio ours / TRL's.

    pip install -r requirements-bench.txt      # trl, a benchmark-only requirement
    python benchmarks/vs_trl.py                # 400 steps each: ~25 minutes on a 2-core CPU
    python benchmarks/vs_trl.py --steps 50     # a quick look

Matched, set explicitly on TRL's side: prompts × G per step (TRL counts completions: 16 × 8 = 128 per optimizer step,
in micro-batches of 64), lr with linear decay to 0 and no warm-up, AdamW's weight decay, beta (k3 KL to the initial
policy), the clip range, loss_type "grpo" (a mean per response, then over responses), scale_rewards "group",
temperature 1 with no top-k/top-p, the max new tokens, fp32, no gradient checkpointing, grad-norm clipping, one
optimizer pass per rollout, and the special tokens our sampling suppresses (TRL's `suppress_tokens`). The held-out
accuracy of both is the same function (greedy responses to the same 200 examples, common/agent.py greedy_rewards),
and both clocks count it. Not matched (docs/grpo_vlm.md): TRL trains every group, those whose rewards are all equal
too (ours leaves them out), and it scores the full vocabulary where we mask the suppressed tokens, as sampling did.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from learn import pinned_env  # noqa: E402  (benchmarks/learn.py, next to this file)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    """Run algos/grpo_vlm.py and TRL's GRPOTrainer on counting, one after the other; print the comparison."""

    steps: int = 400
    """optimizer steps of each run (counting's default budget)"""
    seed: int = 1
    """the seed of both runs"""
    eval_every: int = 25
    """steps between held-out evaluations, in both runs"""
    eval_size: int = 200
    """held-out examples"""
    model: str = "tiny"
    """the policy both start from: the embedded tiny VLM (warm-started), or a checkpoint directory"""
    out: str = "runs/vs_trl"
    """where both runs write (ours: <out>/ours/<run>/metrics.jsonl; TRL's: <out>/trl/metrics.jsonl) and their logs"""
    only: Literal["both", "ours", "trl"] = "both"
    """run that one only and read the other's metrics and peak RSS from --out (after an interrupted comparison)"""
    trl_worker: bool = False
    """(internal) run TRL's trainer in this process"""


def measured(command: list[str], log: Path) -> tuple[int, float, float]:
    """Run `command` with its output in `log`: (exit status, wall seconds, its peak RSS in MiB)."""
    start = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=pinned_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage, ru_maxrss in KiB on Linux
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.time() - start, usage.ru_maxrss / 1024


def ours_command(args: Args) -> list[str]:
    return [sys.executable, "algos/grpo_vlm.py", "--task", "counting", "--total-steps", str(args.steps), "--seed",
            str(args.seed), "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
            "--model", args.model, "--output-dir", str(Path(args.out) / "ours")]  # fmt: skip


def trl_worker(args: Args):
    """TRL's GRPOTrainer on what algos/grpo_vlm.py trains by default; writes <out>/trl/metrics.jsonl as ours does."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from algos.grpo_vlm import Args as GRPOArgs  # our defaults, the flags not given above
    from common.agent import greedy_rewards
    from common.policy import load_data
    from common.tasks import get_task
    from common.tiny_vlm import tiny_model_dir, tiny_processor
    from common.vlm import load_processor, suppressed_token_ids

    ours, task = GRPOArgs(), get_task("counting")
    torch.manual_seed(args.seed)
    train, held_out = load_data("counting", None, ours.train_size, args.eval_size, args.model, None, None,
                                ours.max_prompt_tokens, check_rows=ours.prompts_per_step)  # fmt: skip
    tiny = args.model == "tiny"
    model_dir = tiny_model_dir("counting") if tiny else args.model
    processor = tiny_processor("counting") if tiny else load_processor(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": e.question}], "image": e.image,
                                  "answer": e.answer} for e in train])  # fmt: skip

    def reward(prompts, completions, answer, **_):  # the same rule as ours, on the completion's text
        return [task.reward_fn()(c[0]["content"], a, ours.format_reward) for c, a in zip(completions, answer)]

    completions = ours.prompts_per_step * ours.group_size  # 128 a step, in micro-batches of 64
    config = GRPOConfig(
        output_dir=str(Path(args.out) / "trl" / "trainer"), max_steps=args.steps, seed=args.seed, use_cpu=True,
        per_device_train_batch_size=ours.micro_batch_size,
        gradient_accumulation_steps=completions // ours.micro_batch_size, num_generations=ours.group_size,
        learning_rate=ours.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01,
        max_grad_norm=ours.max_grad_norm, beta=ours.beta, epsilon=ours.clip_eps, loss_type="grpo",
        scale_rewards="group", num_iterations=ours.updates_per_step, temperature=ours.temperature, top_k=0, top_p=1.0,
        max_completion_length=task.max_new_tokens, bf16=False, gradient_checkpointing=False,
        generation_kwargs={"suppress_tokens": suppressed_token_ids(processor)},
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    metrics = open(Path(args.out) / "trl" / "metrics.jsonl", "w")

    class Log(TrainerCallback):  # step times, and our held-out evaluation every eval_every steps
        def evaluate(self, state):
            rewards = greedy_rewards(trainer.model, processor, held_out, task.reward_fn(), task.max_new_tokens,
                                     ours.max_prompt_tokens)  # fmt: skip
            return task.summarize(rewards, "eval")

        def on_train_begin(self, args_, state, control, **_):
            self.start = time.time()
            self.write({"step": 0, **self.evaluate(state)})

        def on_step_begin(self, args_, state, control, **_):
            self.step_start = time.time()

        def on_step_end(self, args_, state, control, **_):
            record = {"step": state.global_step, "charts/step_time": round(time.time() - self.step_start, 3)}
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                record.update(self.evaluate(state))
            self.write(record)

        def write(self, record):
            metrics.write(json.dumps({**record, "time": round(time.time() - self.start, 2)}) + "\n")
            metrics.flush()

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=processor, callbacks=[Log()])  # fmt: skip
    trainer.train()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(records: list[dict]) -> dict:
    """median s/step, the evals [(time, accuracy)] and the run's end time."""
    evals = [(r["time"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    return {"step": statistics.median(r["charts/step_time"] for r in records if "charts/step_time" in r),
            "evals": evals, "end": records[-1]["time"]}  # fmt: skip


def accuracy_at(evals: list[tuple[float, float]], seconds: float) -> float:
    """The held-out accuracy of the last evaluation done by `seconds` into the run."""
    return [accuracy for time_, accuracy in evals if time_ <= seconds + 1e-9][-1]


def main(args: Args):
    if args.trl_worker:
        return trl_worker(args)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/vs_trl.py needs trl: pip install -r requirements-bench.txt")
    out = Path(args.out)
    (out / "ours").mkdir(parents=True, exist_ok=True)
    (out / "trl").mkdir(parents=True, exist_ok=True)
    rss_file = out / "peak_rss.json"
    rss = json.loads(rss_file.read_text()) if rss_file.exists() else {}
    runs = {"ours": ours_command(args), "trl": [sys.executable, __file__, "--trl-worker", "--out", str(out),
            "--steps", str(args.steps), "--seed", str(args.seed), "--eval-every", str(args.eval_every),
            "--eval-size", str(args.eval_size), "--model", args.model]}  # fmt: skip
    for name, command in runs.items():
        if args.only not in ("both", name):
            continue
        print(f"{name}: {' '.join(command[1:])}  (log: {out / f'{name}.log'})", flush=True)
        returncode, wall, peak = measured(command, out / f"{name}.log")
        if returncode != 0:
            raise SystemExit(f"{name} failed (exit {returncode}) after {wall:.0f} s: see {out / f'{name}.log'}")
        rss[name] = peak
        rss_file.write_text(json.dumps(rss))
        print(f"{name}: {wall:.0f} s, peak RSS {peak:.0f} MiB", flush=True)
    ours_metrics = max((out / "ours").glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    results = {"ours": summary(read(ours_metrics)), "trl": summary(read(out / "trl" / "metrics.jsonl"))}
    equal = min(results["ours"]["end"], results["trl"]["end"])  # the shorter run's wall time
    rows = [
        ("median s / step", "step", "{:.3f}"),
        ("peak RSS MiB", None, "{:.0f}"),
        (f"held-out accuracy at {equal:.0f} s", "equal", "{:.3f}"),
        ("held-out accuracy at the end", "final", "{:.3f}"),
        ("wall s (evals included)", "end", "{:.0f}"),
    ]
    for name, result in results.items():
        result["equal"] = accuracy_at(result["evals"], equal)
        result["final"] = result["evals"][-1][1]
    print(f"\n{args.steps} steps each, seed {args.seed}, counting, this machine\n")
    print("| | ours (algos/grpo_vlm.py) | TRL GRPOTrainer | ours / TRL |\n|---|---|---|---|")
    for label, key, fmt in rows:
        a, b = (rss.get(n, float("nan")) for n in ("ours", "trl")) if key is None else (
            results["ours"][key], results["trl"][key])
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f} |" if b else f"| {label} | {a} | {b} | |")


if __name__ == "__main__":
    main(tyro.cli(Args))
