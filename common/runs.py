"""A run's machinery, what every algorithm does the same way: `Run` (--resume, Ctrl-C / kill, the run directory and
its metrics, the progress bar, the first and last evaluation, checkpoints and the final save), and the functions it
uses.

    <output_dir>/<run_name>/
        metrics.jsonl        one strict-JSON object per line: step 0's eval, then one per step
        checkpoint-<step>/   the latest checkpoint (--save-every): the policy (model/, adapter/), optimizer.pt, state.pt
        model/ or adapter/   the trained policy, saved at the end (or when the run is stopped), atomically too
        <name>.pt            each entry of the script's extra state, saved at the end (PPO: value_head.pt)

A checkpoint is written to checkpoint-<step>.tmp/ and then renamed, which is atomic: a run killed while writing
one leaves the previous checkpoint whole; the trained policy's model/ (adapter/) is written the same way, after a
checkpoint of the last step. `--resume <run dir>` continues from the latest checkpoint, in the same directory, with
the same flags, RNG states and optimizer state, so that the resumed run is the run that was not interrupted; a run
killed while saving its trained policy resumes to save it.
"""

import glob
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time

import torch
from tqdm import tqdm

from common import dist
from common.judges import model_metrics
from common.tasks import get_task


def new_run_dir(output_dir: str, run_name: str) -> str:
    """Create and return <output_dir>/<run_name>; never an existing directory: a run started in the same second
    with the same name (a same-seed sweep) gets <run_name>-2, -3, ... (os.mkdir fails if the name is taken, so two
    runs cannot both get one)."""
    os.makedirs(output_dir, exist_ok=True)
    for n in range(1, 10_000):
        path = os.path.join(output_dir, run_name if n == 1 else f"{run_name}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise SystemExit(f"{output_dir} holds 10,000 runs named {run_name}: pass another --output-dir or --exp-name")


def start_run(args, checkpoint: str | None, state: dict | None, start_time: float):
    """(run dir, the metrics it holds, log, finish): a new <output_dir>/<task>__<exp_name>__<seed>__<time> directory
    with the run's flags, defaults resolved, in args.json, or the resumed run's directory with the records after its
    checkpoint dropped (they are logged again). log(record) appends one
    line to metrics.jsonl and, with --track, logs to Weights & Biases (the run's id is its directory's name, so a
    resumed run continues its wandb run); finish() closes both at the end."""
    if dist.rank() > 0:  # under torchrun rank 0 writes: the others get its run dir and records, and log nothing
        run_dir, records = dist.broadcast(None)
        return run_dir, records, lambda record: None, lambda: None
    if checkpoint:
        run_dir, records = args.resume, truncate_metrics(args.resume, state["step"])
    else:
        run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(start_time)}"
        run_dir, records = new_run_dir(args.output_dir, run_name), []
    with open(os.path.join(run_dir, "args.json"), "w") as f:  # e.g. the --total-steps it reaches (a resume can extend)
        json.dump(vars(args), f, indent=1)
    dist.broadcast((run_dir, records))
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    name = os.path.basename(run_dir)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=name,
                   id=name.replace(".", "-"), resume="allow", save_code=True)  # fmt: skip

    def log(record: dict):
        metrics_file.write(json_line(record))
        metrics_file.flush()
        if args.track:
            wandb.log(record, step=record["step"])

    def finish():
        metrics_file.close()
        if args.track:
            wandb.finish()

    return run_dir, records, log, finish


def json_line(record: dict) -> str:
    """One line of metrics.jsonl. NaN and infinity are not JSON (JSON.parse and strict parsers reject them): a
    non-finite number is logged as null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, last_step: int) -> list[dict]:
    """Drop the records logged after `last_step` (steps a killed run did after its last checkpoint; the resumed run
    logs them again), atomically. Returns the records kept."""
    records = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json_line(r) for r in records)
    os.replace(path + ".tmp", path)
    return records


def save_policy(model, processor, out_dir: str, lora: bool, merge: bool = False):
    """The trained policy as checkpoints on disk. Full fine-tuning: <out_dir>/model (save_pretrained). LoRA: the
    adapter alone in <out_dir>/adapter (megabytes; PeftModel.from_pretrained(base model, <out_dir>/adapter)), and
    with `merge` also <out_dir>/model, base + (alpha / r) B A folded into each weight (a plain checkpoint, no peft).
    Merging changes `model` in place: only at the end of a run. Under torchrun every rank calls it: an FSDP2 model's
    shards are gathered into a full state dict, and rank 0 writes."""
    state_dict = dist.full_state_dict(model)  # every rank takes part; rank 0 gets it
    if dist.rank() > 0:
        return
    if state_dict is not None:  # a tied weight (lm_head = embeddings) is saved once, as save_pretrained does
        state_dict = {k: v for k, v in state_dict.items() if k not in getattr(model, "all_tied_weights_keys", {})}
    if lora:
        save_pretrained(model, processor, os.path.join(out_dir, "adapter"), state_dict)
        if not merge:
            return
        model, state_dict = model.merge_and_unload(), None
    save_pretrained(model, processor, os.path.join(out_dir, "model"), state_dict)


def save_pretrained(model, processor, path: str, state_dict: dict | None):
    """model and processor .save_pretrained(path), atomically: written to <path>.tmp, then renamed. A run killed
    meanwhile leaves no half-written <path> (a 0-byte config.json that no loader reads)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
    model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)  # a resumed run's earlier save
    os.rename(tmp, path)


def saved_policy_dirs(run_dir: str, lora: bool, merge: bool) -> list[str]:
    """The directories save_policy writes at the end of a run: model/, or adapter/ (and model/ with merge)."""
    names = (["adapter"] + (["model"] if merge else [])) if lora else ["model"]
    return [os.path.join(run_dir, name) for name in names]


def rng_states() -> dict:
    """Every random generator a step draws from: Python's (the prompts), torch's (sampling), CUDA's."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: list[dict] | dict):
    """The states rng_states gave, one per rank (saved by save_checkpoint): this rank's. (A checkpoint written before
    torchrun support holds one dict.)"""
    states = states if isinstance(states, dict) else states[dist.rank()]
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def weights_fingerprint(model) -> str:
    """A short hash of a model's weights (each tensor's name, shape and first and last values): tells whether a
    resumed run's reference policy is the one the run started with, in milliseconds even for billions of weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().flatten()
        sample = torch.cat([flat[:8], flat[-8:]]).float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(run_dir: str, step: int, model, processor, optimizer, lora: bool, state: dict) -> str:
    """Write checkpoint-<step> atomically (see the module docstring), then remove older checkpoints. `state` holds
    what the script needs to continue (its flags, the reference's fingerprint, ...); the step and every RNG state
    are added here."""
    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
        os.makedirs(tmp)
    dist.barrier()
    save_policy(model, processor, tmp, lora)
    rng = dist.gather_objects(rng_states())  # under torchrun: one per rank, each rank samples with its own
    sharded = dist.is_sharded(model)
    if sharded:  # FSDP2: each rank's shard of the optimizer state
        torch.save(dist.optimizer_state(optimizer), os.path.join(tmp, f"optimizer-rank{dist.rank()}.pt"))
    dist.barrier()
    if dist.rank() == 0:
        if not sharded:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save({**state, "step": step, "rng": rng, "world_size": dist.world_size()}, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)  # a stop right after a periodic save writes the same step again
        os.rename(tmp, final)
        for old in glob.glob(os.path.join(run_dir, "checkpoint-*")):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_optimizer(optimizer, checkpoint: str):
    """The optimizer state of a checkpoint: optimizer.pt, or under FSDP2 this rank's optimizer-rank<r>.pt."""
    sharded = os.path.join(checkpoint, f"optimizer-rank{dist.rank()}.pt")
    if os.path.exists(sharded):
        dist.load_optimizer_state(optimizer, torch.load(sharded, weights_only=True))
    else:
        optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint-<step> of a run dir, or None (unfinished .tmp writes are not checkpoints)."""
    steps = [int(m.group(1)) for d in os.listdir(run_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return os.path.join(run_dir, f"checkpoint-{max(steps)}") if steps else None


def load_checkpoint_state(checkpoint: str) -> dict:
    """state.pt of a checkpoint: the script's state, the step, the RNG states (plain Python and tensors)."""
    return torch.load(os.path.join(checkpoint, "state.pt"), weights_only=True)


def given_flags(args, saved: dict, defaults) -> dict:
    """The flags given to this --resume, {name: value}. A script run from the command line parses its command line
    again over the run's own flags, so a flag given at its default value counts too; Args built in Python (tests) count
    the fields that differ from the defaults."""
    if os.path.abspath(sys.argv[0]) == os.path.abspath(inspect.getfile(type(args))):
        import tyro  # the scripts' parser

        over_saved = tyro.cli(type(args), args=sys.argv[1:], default=type(args)(**{**saved, "resume": args.resume}))
        return {k: v for k, v in vars(over_saved).items() if k != "resume" and v != saved[k]}
    return {k: v for k, v in vars(args).items() if k != "resume" and v != getattr(defaults, k)}


def resumed_args(args, defaults):
    """--resume <run dir>: (the run's own flags, its latest checkpoint, the checkpoint's state). The run continues
    with the flags it was started with; a flag given now that differs from the run's value is refused (it would make
    the resumed run another run), but for --total-steps: more steps than the checkpoint's extend the run (with
    --anneal-lr the learning rate then decays to 0 over the new total, so it steps up at the resume)."""
    run_dir = args.resume
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise SystemExit(f"--resume {run_dir}: not a run directory (no metrics.jsonl); pass <output_dir>/<run_name>")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise SystemExit(f"--resume {run_dir}: no checkpoint-<step> in it yet (one is saved every --save-every steps)")
    state = load_checkpoint_state(checkpoint)
    saved, script, this = state["args"], state.get("script"), script_name(args)
    if (script or this) != this or set(saved) != set(vars(args)):  # another script's flags would not fit
        started = f"algos/{script}" if script else "another script"
        raise SystemExit(f"--resume {run_dir}: a run of {started}, not of {this}: resume it with the script that "
                         "started it")
    given = given_flags(args, saved, defaults)
    total_steps = given.pop("total_steps", saved["total_steps"])
    changed = [k for k, v in given.items() if v != saved[k]]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run's: {saved[k]})" for k in changed)
        raise SystemExit(f"--resume continues {run_dir} with the flags it was started with: drop {flags}")
    if total_steps != saved["total_steps"] and total_steps <= state["step"]:
        raise SystemExit(f"--resume {run_dir} --total-steps {total_steps}: its checkpoint is at step {state['step']}; "
                         f"give more steps, or none (the run's {saved['total_steps']})")
    if state.get("world_size", 1) != dist.world_size():
        world = state.get("world_size", 1)
        raise SystemExit(f"--resume {run_dir}: the run had {world} processes; resume it with as many "
                         f"(torchrun --nproc-per-node {world})")
    saved_policy = all(map(os.path.isdir, saved_policy_dirs(run_dir, saved["lora"], saved["lora_merge"])))
    if read_metrics(run_dir)[-1]["step"] >= total_steps and saved_policy:
        raise SystemExit(f"--resume {run_dir}: the run finished all its {total_steps} steps; train it further with "
                         f"--total-steps <more than {total_steps}>")
    if total_steps != saved["total_steps"] and dist.rank() == 0:
        print(f"--resume {run_dir}: training to step {total_steps}, not {saved['total_steps']}"
              + (" (the learning rate now decays to 0 at that step)" if saved["anneal_lr"] else ""), flush=True)
    resumed = {**saved, "resume": run_dir, "total_steps": total_steps}
    return type(args)(**resumed), checkpoint, state  # a checkpoint of the last step: the save


def script_name(args) -> str:
    """The file name of the script whose Args `args` are (grpo_vlm.py), run as __main__ or imported."""
    return os.path.basename(inspect.getfile(type(args)))


class StopSignals:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM, what job schedulers send before they kill a job) stop a run cleanly.

    Before `loop_started()` a signal raises KeyboardInterrupt at once, as Ctrl-C does. In the loop, the first one
    only sets `requested`: the loop ends after the current step, so the weights are never saved halfway through an
    update, and the script saves a checkpoint and the policy; a second signal raises KeyboardInterrupt at once.
    The handlers are installed explicitly: a run started in the background by a shell script inherits an ignored
    SIGINT, and Python would keep ignoring it. `restore()` puts back the previous handlers."""

    def __init__(self, log=print):
        self.requested, self.in_loop, self.log = False, False, log
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def loop_started(self):
        self.in_loop = True

    def handle(self, signum, frame):
        if not self.in_loop or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        self.log(f"{name}: stopping after this step (checkpoint and policy saved); again to stop now")

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Run:
    """One training run, as the loop sees it:

        with Run(args) as run:               # --resume: run.args are the run's own flags, run.checkpoint its latest
            ...                              # setup (a resumed run loads its policy from run.checkpoint)
            run.start(model, processor, optimizer, evaluate, reference_fingerprint)  # step 0's eval, or the resume
            for step in run.steps():         # a progress bar; ends early after a Ctrl-C / kill (checkpoint saved)
                ...
                run.log(record, batch)       # the shared charts, eval when due, metrics.jsonl / wandb, checkpoints
            run.finish()                     # <run>/model (or adapter), the summary line

    A first Ctrl-C or SIGTERM in the loop finishes the step, saves a checkpoint and the policy; a second one stops at
    once (the block's end turns it into one line saying where to resume from)."""

    def __init__(self, args):
        self.checkpoint = self.state = None
        if args.resume is not None:  # the run's own flags, from its latest checkpoint
            args, self.checkpoint, self.state = resumed_args(args, type(args)())
        self.args, self.dir, self.step, self.in_loop, self.stopping, self.saving = args, None, 0, False, False, False
        self.start_time = time.time() - (self.state["time"] if self.checkpoint else 0)  # "time" continues over a resume

    def __enter__(self):
        self.signals = StopSignals(log=tqdm.write)
        return self

    def __exit__(self, kind, error, traceback):
        self.signals.restore()
        if kind is KeyboardInterrupt and not self.in_loop:
            raise SystemExit("interrupted before the first step: nothing was trained") from None
        if kind is KeyboardInterrupt and self.saving and (latest_checkpoint(self.dir) or "").endswith(f"checkpoint-{self.step}"):
            raise SystemExit(f"stopped while saving the trained policy: --resume {self.dir} saves it") from None
        if kind is KeyboardInterrupt:  # a second Ctrl-C / kill: stopped now, without saving a half-finished step
            last = latest_checkpoint(self.dir)
            where = f"continue from {last} with --resume {self.dir}" if last else "no checkpoint was saved"
            raise SystemExit(f"stopped during step {self.step}: {where}") from None

    def start(self, model, processor, optimizer, evaluate, reference_fingerprint: str | None, extra_state=dict):
        """The run directory (new or resumed), the optimizer state of a resumed run, and step 0's evaluation.
        evaluate() -> the held-out metrics {"eval/accuracy": ...}; extra_state() -> what a checkpoint keeps beside the
        policy and optimizer ({"value_head": PPO's value head}: a module is kept as its full weights), a resumed run's
        is in run.state; each entry is saved at the end too, as <run>/<name>.pt."""
        self.model, self.processor, self.optimizer, self.evaluate = model, processor, optimizer, evaluate
        self.reference_fingerprint, self.extra_state = reference_fingerprint, extra_state
        self.task = get_task(self.args.task)
        if self.checkpoint:
            load_optimizer(optimizer, self.checkpoint)
        self.dir, records, self.write, self.close = start_run(self.args, self.checkpoint, self.state, self.start_time)
        if self.checkpoint:
            set_rng_states(self.state["rng"])  # the RNG states the run had after its checkpoint's step
            print(f"resuming {self.dir} after step {self.state['step']}")
        else:
            records = [{"step": 0, **evaluate(), "time": round(time.time() - self.start_time, 2)}]
            self.write(records[0])
        self.first_eval = {k: v for k, v in records[0].items() if k.startswith("eval/")}
        self.last_eval = {k: v for r in records for k, v in r.items() if k.startswith("eval/")}

    def steps(self):
        """The steps left to train, 1..total_steps (a resumed run: after its checkpoint's), with a progress bar."""
        first = self.state["step"] if self.checkpoint else 0
        total = self.args.total_steps
        self.progress = tqdm(range(first + 1, total + 1), desc=self.args.exp_name, dynamic_ncols=True, initial=first,
                             total=total, disable=dist.rank() > 0)  # fmt: skip
        self.step, self.in_loop = first, True
        self.signals.loop_started()
        for self.step in self.progress:
            self.step_start = time.time()
            yield self.step
            if self.stopping:
                break

    def log(self, record: dict, batch, summed_over_ranks: dict | None = None):
        """Log one step: `record` (the same on every rank), `summed_over_ranks` (this rank's part of each value, such as
        its share of a global mean loss or its count of something: summed over the ranks here) and the charts of the
        rollout batch `batch` (common.policy.Rollouts: rewards, accuracy, lengths, tool calls, equal-reward groups, over
        every rank's rows). Evaluates when due, then saves a checkpoint when due or when a stop was asked for."""
        args, step_time = self.args, time.time() - self.step_start
        rewards, lengths = dist.gather(batch.rewards), dist.gather(batch.mask.sum(1))
        rule = dist.gather(batch.rule_rewards) if batch.rule_rewards is not None else rewards  # the task's rule's
        tool_calls = dist.gather(batch.tool_calls)
        grouped = rewards.view(-1, batch.group_size)
        summed = {k: dist.all_sum(v) for k, v in (summed_over_ranks or {}).items()}
        record = {
            "step": self.step,
            "time": round(time.time() - self.start_time, 2),
            "charts/reward_mean": rewards.mean().item(),
            "charts/reward_std": rewards.std().item(),
            **self.task.summarize(rule.tolist(), "charts"),  # charts/accuracy (+ charts/iou, charts/f1), by the rule
            "charts/response_length": lengths.mean().item(),
            "charts/tool_calls": tool_calls.mean().item(),  # per episode (agentic tasks)
            "charts/zero_advantage_groups": (grouped.amax(1) == grouped.amin(1)).float().mean().item(),
            "charts/step_time": round(step_time, 3),
            "charts/tokens_per_second": lengths.sum().item() / step_time,
            **summed,
            **record,
        }
        if batch.reward_seconds is not None:  # per rank: every rank scores its own rows
            record["charts/reward_time"] = dist.gather(batch.reward_seconds).sum().item() / dist.world_size()
        if batch.model_scores is not None:  # a reward model: how often it agrees with the rule
            record.update(model_metrics(rule, dist.gather(batch.model_scores), self.task.success, "charts"))
        if self.step % args.eval_every == 0 or self.step == args.total_steps:
            self.last_eval = self.evaluate()
            record.update(self.last_eval)
        self.write(record)
        reward, accuracy = record["charts/reward_mean"], self.last_eval["eval/accuracy"]
        self.progress.set_postfix(reward=f"{reward:.2f}", eval_acc=f"{accuracy:.3f}")
        self.stopping = dist.all_max(int(self.signals.requested)) == 1 and self.step < args.total_steps
        last = self.step == args.total_steps  # a checkpoint: a kill while the policy is saved loses no step
        if (args.save_every and (self.step % args.save_every == 0 or last)) or self.stopping:
            state = {"args": vars(args), "script": script_name(args), "time": time.time() - self.start_time,
                     "reference_fingerprint": self.reference_fingerprint, **self.saved_extra_state()}  # fmt: skip
            save_checkpoint(self.dir, self.step, self.model, self.processor, self.optimizer, args.lora, state)
        if self.stopping:
            tqdm.write(f"interrupted at step {self.step}: checkpoint saved; continue with --resume {self.dir}")

    def saved_extra_state(self) -> dict:
        """extra_state(), a module in it as its full weights (every rank calls it: FSDP2 gathers them on rank 0)."""
        return {k: (dist.full_state_dict(v) or v.state_dict()) if isinstance(v, torch.nn.Module) else v
                for k, v in self.extra_state().items()}  # fmt: skip

    def finish(self):
        """Save the trained policy (<run>/model, or <run>/adapter with --lora) and each entry of run.start's
        extra_state (<run>/<name>.pt: PPO's value_head.pt), close the logs, print the summary."""
        self.saving = True  # after the last step's checkpoint (--save-every > 0): a resumed run saves the policy
        extra = self.saved_extra_state()
        if dist.rank() == 0:  # before the policy, whose directories say that the run finished (resumed_args)
            for name, value in extra.items():
                torch.save(value, os.path.join(self.dir, f"{name}.pt.tmp"))
                os.replace(os.path.join(self.dir, f"{name}.pt.tmp"), os.path.join(self.dir, f"{name}.pt"))
        save_policy(self.model, self.processor, self.dir, self.args.lora, self.args.lora_merge)
        self.close()
        change = ", ".join(f"{k} {self.first_eval[k]:.3f} → {self.last_eval[k]:.3f}" for k in self.first_eval)
        print(f"{change} in {time.time() - self.start_time:.0f}s; model and metrics in {self.dir}")
