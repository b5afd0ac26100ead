"""Every algorithm script (algos/*_vlm.py, the `script` fixture) run as a user runs it: in a subprocess with a tiny
budget (CleanRL style), and, where a process adds nothing, its `main` in-process, parsing the flags as the command
line does. A new script is run by these tests as soon as it exists; the slow ones (signals, resume, other tasks) run
GRPO and each script that changes one of GRPO's TRY NOT TO MODIFY blocks (`end_to_end_script`, conftest.py). Flags
that only GRPO-like scripts have go through `script.optional`: --group-size 2 keeps a run tiny where the script
samples groups. Last, the template's diet (no fixtures, quick): its length, each copy's diff from it, and ALGO LOGIC
blocks free of torchrun calls."""

import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import pytest
import torch
import tyro
from safetensors.torch import load_file

import common.dist
import common.tasks
from common.vlm import load_vlm
from conftest import ALGO, REPO_ROOT, SCRIPTS, TEMPLATE, marked_blocks, shared_blocks

TRAIN_KEYS = [
    "step",
    "charts/learning_rate",
    "charts/reward_mean",
    "charts/reward_std",
    "charts/response_length",
    "charts/zero_advantage_groups",
    "charts/step_time",
    "charts/reward_time",
    "eval/accuracy",
]
LOSSES = ["losses/loss", "losses/kl", "losses/clipfrac", "losses/entropy", "losses/grad_norm"]  # losses/kl: with a KL term


def run_script(script, repo_root, tmp_path, *flags, **env):
    """Run the script from the repo root, offline, with its caches under tmp_path."""
    full_env = {**os.environ, "VLRL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, script.path, *flags],
        cwd=repo_root, env=full_env, capture_output=True, text=True, encoding="utf-8", timeout=300,
    )  # fmt: skip


def tiny(script, *flags):
    """A tiny budget: 2 prompts per step (groups of 2 where the script samples groups), short answers, few examples."""
    return ["--prompts-per-step", "2", *script.optional("--group-size", "2"), "--max-new-tokens", "4", *flags]


@pytest.fixture(scope="module")
def smoke(script, repo_root, tiny_model_dir, tmp_path_factory):
    """Two steps on the random tiny model, evaluated every step, tracked with wandb offline, rewarded by a judge (the
    random tiny model again: docs/rewards.md)."""
    tmp = tmp_path_factory.mktemp(f"{script.name}-smoke")
    flags = tiny(script, "--total-steps", "2", "--eval-every", "1", "--eval-size", "8", "--train-size", "32")
    flags += ["--output-dir", str(tmp / "runs"), "--model", tiny_model_dir, "--track", "--reward-model", tiny_model_dir]
    result = run_script(script, repo_root, tmp, *flags, WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_SILENT="true")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp / "runs").iterdir()
    return result, run_dir, tmp


def check_metrics(run_dir, steps, script):
    """metrics.jsonl holds a step-0 eval record, then one record per step with every key, finite. A step that trains
    on nothing (every group left out of the update: the random model's rewards are all 0, so its groups' rewards are
    all equal) logs no losses/* but losses/grad_norm, null; any other step logs LOSSES, finite, and losses/kl only in
    a script with a KL term (--beta). (A script's own losses/* may be null: PPO's explained variance of equal returns.)"""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(steps + 1))
    assert math.isfinite(records[0]["eval/accuracy"])
    for record in records[1:]:
        for key in TRAIN_KEYS:
            assert key in record and math.isfinite(record[key]), (key, record)
        losses = {key: value for key, value in record.items() if key.startswith("losses/")}
        if losses == {"losses/grad_norm": None}:
            assert record["charts/zero_advantage_groups"] == 1, record  # every group skipped: nothing was trained on
            continue
        expected = [key for key in LOSSES if key != "losses/kl" or script.optional("--beta")]
        assert set(expected) <= set(losses) and ("losses/kl" in losses) == bool(script.optional("--beta")), record
        assert all(losses[key] is not None and math.isfinite(losses[key]) for key in expected), losses


def test_smoke_run_logs_every_metric_for_every_step(smoke, script):
    check_metrics(smoke[1], steps=2, script=script)
    records = [json.loads(line) for line in (smoke[1] / "metrics.jsonl").read_text().splitlines()]
    judged = ["charts/judge_agreement", "charts/judge_unread", "eval/judge_agreement", "eval/judge_unread"]
    assert all(0 <= r[key] <= 1 for r in records[1:] for key in judged), records[-1]
    assert re.search(r"reward model +[1-9]", smoke[0].stdout), smoke[0].stdout[:3000]  # the memory plan counts it
    flags = json.loads((smoke[1] / "args.json").read_text())  # the run's flags, for benchmarks/compare.py and people
    assert flags["total_steps"] == 2 and flags["task"] == "counting" and flags["exp_name"] == script.name


@pytest.mark.parametrize("task, extra_keys", [("math", []), ("grounding", ["charts/iou", "eval/iou"])], ids=["math", "grounding"])
def test_other_tasks_run_one_step_and_log_their_metrics(end_to_end_script, tiny_model_dir, tmp_path, one_thread, task, extra_keys):
    """The script's main in-process, with the task's own data and reward."""
    script = end_to_end_script  # slow: GRPO and the scripts that change its shared blocks (conftest.py)
    flags = ["--task", task, "--total-steps", "1", "--eval-size", "4", "--train-size", "8", "--prompts-per-step", "2"]
    flags += [*script.optional("--group-size", "2"), "--output-dir", str(tmp_path / "runs"), "--model", tiny_model_dir]
    script.module.main(tyro.cli(script.module.Args, args=flags))
    (run_dir,) = (tmp_path / "runs").iterdir()
    check_metrics(run_dir, steps=1, script=script)
    first, last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in extra_keys:
        assert 0.0 <= (first | last)[key] <= 1.0, key
    if task == "grounding":  # the task's default budget fits a box: 24 tokens (a random model rarely stops early)
        assert 8 < last["charts/response_length"] <= 24


def test_auto_rollout_engine_picks_hf_generate_on_a_cpu_machine(smoke):
    """On CPU, HF generate is the faster engine (docs/vllm.md, "Speed on a CPU"); vLLM only when asked for."""
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


# The command line: --help, and bad flags refused before anything loads
def field_docstrings(cls) -> dict[str, str]:
    """{field: docstring} of a dataclass's fields, read from the source of the class and of each dataclass it derives
    from (a script's Args: its own block, and SharedArgs' in common/args.py), the string under each field; a field a
    subclass defines again has the subclass's."""
    docstrings = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(Path(inspect.getsourcefile(klass)).read_text())
        (node,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == klass.__name__]
        for field, below in zip(node.body, node.body[1:]):
            if isinstance(field, ast.AnnAssign) and isinstance(below, ast.Expr) and isinstance(below.value, ast.Constant):
                docstrings[field.target.id] = below.value.value
    return docstrings


def test_help_shows_every_flag_with_its_docstring(script, capsys):
    docstrings = field_docstrings(script.module.Args)  # SharedArgs' (common/args.py) and the script's own
    assert set(docstrings) == {f.name for f in dataclasses.fields(script.module.Args)}, "a field without a docstring"
    with pytest.raises(SystemExit) as exited:
        tyro.cli(script.module.Args, args=["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # the help's line breaks and padding undone
    for field, docstring in docstrings.items():
        assert re.search(f"--{field.replace('_', '-')}(?![\\w-])", text), field  # --lora, not only --lora-rank
        assert " ".join(docstring.split()) in text, field


SHARED_BAD_FLAGS = [  # flags every script has (common/args.py: SharedArgs.check); GRPO's own: tests/test_grpo_step.py
    (["--model", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--eval-every", "0"], "--eval-every"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--prompts-per-step", "9"], "--train-size"),  # > --train-size 8
    (["--prompts-per-step", "0"], "--prompts-per-step"),
    (["--temperature", "0"], "--temperature"),
    (["--total-steps", "0"], "--total-steps"),
    (["--eval-size", "0"], "--eval-size"),
    (["--lora-merge"], "--lora"),
    (["--max-prompt-tokens", "4"], "--max-prompt-tokens"),
    (["--save-every", "-1"], "--save-every"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run"),
    (["--max-turns", "0"], "--max-turns"),
    (["--task", "mat-search"], "--dataset"),  # no offline twin
]


def flag_id(flags) -> str:
    return "=".join(flag.removeprefix("--") for flag in flags)


@pytest.mark.parametrize("flags, message", SHARED_BAD_FLAGS, ids=[flag_id(flags) for flags, _ in SHARED_BAD_FLAGS])
def test_bad_flag_ends_the_run_with_one_line_before_anything_loads(script, tmp_path, monkeypatch, flags, message):
    """In-process, parsed as the command line parses them. Checked before any model loads or builds (--model tiny's
    cache is a file here: building the model there would fail at once, with another error) and before the run
    directory is made."""
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("VLRL_CACHE", str(tmp_path / "cache"))
    base = ["--train-size", "8", "--eval-size", "4", "--prompts-per-step", "2", "--output-dir", str(tmp_path / "runs")]
    base += script.optional("--max-resample-rounds", "0")  # DAPO: its dynamic sampling refuses an agentic task first
    with pytest.raises(SystemExit, match=re.escape(message)) as exited:
        script.module.main(tyro.cli(script.module.Args, args=[*base, *flags]))
    assert "\n" not in str(exited.value)
    assert not (tmp_path / "runs").exists()


def test_a_bad_flag_ends_the_process_with_one_line_and_a_failure_status(end_to_end_script, repo_root, tmp_path):
    """As a user sees it: one line on stderr (no traceback), a non-zero exit status, in seconds."""
    script = end_to_end_script  # slow: GRPO and the scripts that change its shared blocks (conftest.py)
    start = time.time()
    result = run_script(script, repo_root, tmp_path, "--eval-every", "0", "--output-dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--eval-every" in result.stderr, result.stderr
    assert time.time() - start < 30 and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


CHOICES = [["--task", "cnt"], ["--optimizer", "foo"], ["--dtype", "float16"], ["--rollout-engine", "x"]]


@pytest.mark.parametrize("flag, value", CHOICES, ids=[flag_id(flags) for flags in CHOICES])
def test_a_flag_outside_its_choices_is_refused_by_the_parser_with_the_choices(script, capsys, flag, value):
    with pytest.raises(SystemExit) as exited:
        tyro.cli(script.module.Args, args=[flag, value])
    error = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2
    assert f"invalid choice '{value}' for argument '{flag}'" in error and "Expected one of" in error, error


# Stopping and resuming, as the operating system does it
def start_script(script, repo_root, tmp_path, *flags, **popen):
    env = {**os.environ, "VLRL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, script.path, *flags], cwd=repo_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def wait_for(condition, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.05)


def ignore_sigint():  # what a shell does to a command it starts in the background (`python ... &` in a script)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum, preexec", [(signal.SIGTERM, None), (signal.SIGINT, ignore_sigint)], ids=["sigterm", "sigint-in-background"])
def test_a_signal_stops_the_run_after_its_step_and_saves_a_checkpoint_and_the_model(end_to_end_script, repo_root, tiny_model_dir, tmp_path, signum, preexec):
    script = end_to_end_script  # slow: GRPO and the scripts that change its shared blocks (conftest.py)
    flags = ["--total-steps", "1000", "--eval-every", "1000", "--eval-size", "4", "--train-size", "32", "--save-every", "0"]
    flags += tiny(script, *script.optional("--no-skip-zero-advantage-groups"))  # every step updates
    process = start_script(script, repo_root, tmp_path, *flags, "--output-dir", str(tmp_path / "runs"), "--model", tiny_model_dir, preexec_fn=preexec)
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


def test_a_run_killed_with_sigkill_resumes_from_its_checkpoint_to_the_uninterrupted_runs_end(end_to_end_script, repo_root, tiny_model_dir, tmp_path):
    script = end_to_end_script  # slow: GRPO and the scripts that change its shared blocks (conftest.py)
    flags = ["--total-steps", "6", "--save-every", "2", "--eval-every", "3", "--eval-size", "8", "--train-size", "32"]
    flags += tiny(script, *script.optional("--no-skip-zero-advantage-groups"), "--model", tiny_model_dir)
    straight = run_script(script, repo_root, tmp_path, *flags, "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    process = start_script(script, repo_root, tmp_path, *flags, "--output-dir", str(tmp_path / "killed"))
    wait_for(lambda: list((tmp_path / "killed").glob("*/checkpoint-*[0-9]")), "the first checkpoint")
    process.kill()  # SIGKILL: nothing runs on the way out
    process.communicate(timeout=60)
    (run_dir,) = (tmp_path / "killed").iterdir()
    assert not (run_dir / "model").exists(), "the run finished before it was killed: give it more steps"
    resumed = run_script(script, repo_root, tmp_path, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (straight_dir,) = (tmp_path / "straight").iterdir()
    a, b = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight_dir, run_dir))
    assert [r["step"] for r in b] == list(range(7))
    same = ("eval/accuracy", "charts/reward_mean", "charts/response_length", "losses/loss", "losses/kl")
    assert [[r.get(k) for k in same] for r in a] == [[r.get(k) for k in same] for r in b]
    final_a = load_file(straight_dir / "model" / "model.safetensors")
    final_b = load_file(run_dir / "model" / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_runs_started_in_the_same_second_get_their_own_directories(end_to_end_script, tiny_model_dir, tmp_path, one_thread):
    """Every name this run could get from its start time is taken: it must make a new directory, not reuse one. (The
    script's main in-process: the name is chosen there.)"""
    script = end_to_end_script  # slow: GRPO and the scripts that change its shared blocks (conftest.py)
    now, out = int(time.time()), tmp_path / "runs"
    taken = [out / f"counting__{script.name}__1__{t}" for t in range(now, now + 120)]
    for path in taken:
        path.mkdir(parents=True)
    flags = tiny(script, "--total-steps", "1", "--eval-size", "4", "--train-size", "8")
    script.module.main(tyro.cli(script.module.Args, args=[*flags, "--model", tiny_model_dir, "--output-dir", str(out)]))
    assert all(not any(path.iterdir()) for path in taken)
    (new,) = [p for p in out.iterdir() if p not in taken]
    assert new.name.endswith("-2") and (new / "metrics.jsonl").exists()


# What every step logs, in-process
def run_in_process(script, model_dir, out, *flags):
    """The script's main with these flags on the random tiny model, rewards 0, 1, 0, 1, ... (every group varies, so
    every step updates): (its records, the learning rate of each optimizer step)."""
    rewards, step_lrs = itertools.count(), []
    adamw_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        step_lrs.append(optimizer.param_groups[0]["lr"])
        return adamw_step(optimizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # every task's reward: scripts call get_task(...).reward_fn(box_frame)
        patch.setattr(common.tasks.Task, "reward_fn", lambda task, box_frame=None: lambda c, a, f=0.0: float(next(rewards) % 2))
        patch.setattr(torch.optim.AdamW, "step", recording_step)
        flags = tiny(script, "--train-size", "8", "--eval-size", "4", "--model", model_dir, "--output-dir", str(out), *flags)
        script.module.main(tyro.cli(script.module.Args, args=flags))
    (run_dir,) = out.iterdir()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], step_lrs


@pytest.mark.parametrize("anneal, expected", [("--anneal-lr", [1e-3, 7.5e-4, 5e-4, 2.5e-4]), ("--no-anneal-lr", [1e-3] * 4)], ids=["annealed", "constant"])
def test_the_learning_rate_of_every_step_is_logged(script, tiny_model_dir, tmp_path, one_thread, anneal, expected):
    # linear decay to 0 over 4 steps: step s trains with lr * (1 - (s - 1) / 4)
    records, step_lrs = run_in_process(script, tiny_model_dir, tmp_path, "--total-steps", "4", "--lr", "1e-3", anneal)
    logged = [r["charts/learning_rate"] for r in records[1:]]
    assert logged == pytest.approx(expected, rel=1e-12)
    per_step = len(step_lrs) // len(logged)  # optimizer steps per step: 1, or one per minibatch (GSPO, PPO)
    assert per_step >= 1 and step_lrs == [lr for lr in logged for _ in range(per_step)]  # the rate each one used


def test_the_shared_blocks_are_found_and_a_changed_line_in_one_is_seen(tmp_path):
    """conftest.shared_blocks decides which scripts skip the slow tests: it must see every TRY NOT TO MODIFY block of
    the template, whole, and a one-line change in one of them, but not a change in an ALGO LOGIC block."""
    blocks, source = shared_blocks(TEMPLATE), TEMPLATE.read_text()
    assert len(blocks) == source.count("# TRY NOT TO MODIFY") and all("# TRY NOT TO MODIFY" in b.splitlines()[0] for b in blocks)
    assert any("def rollout(examples)" in b and "run.start(" in b for b in blocks)  # a block runs to the next marker
    assert any("run.log(" in b and "run.finish()" not in b for b in blocks)  # ... or to the end of its code block
    copy = tmp_path / "copy_vlm.py"
    copy.write_text(source.replace("torch.manual_seed(args.seed)", "torch.manual_seed(0)"))
    assert shared_blocks(copy) != blocks
    advantage_line = "advantages = group_advantages("
    assert advantage_line in source
    copy.write_text(source.replace(advantage_line, "advantages = 2 * group_advantages("))
    assert shared_blocks(copy) == blocks


# The template diet (issue 21): GRPO's script is short enough to read once, and a copy of it differs in its heart only
DIFF_LINES = {"ppo_vlm": 220}  # `diff algos/grpo_vlm.py algos/<x>.py | grep -c '^[<>]'` at most; any other script: 80
TORCHRUN_HELPERS = {"all_sum", "all_max", "gather", "gather_objects", "for_this_rank", "even_rows", "map_over_ranks",
                    "world_size", "rank", "sync_gradients_on_last", "broadcast", "barrier", "rank0_first"}  # common/dist.py's  # fmt: skip


def test_the_template_is_at_most_300_lines():
    assert len(TEMPLATE.read_text().splitlines()) <= 300


ALGOS_FILES = sorted((REPO_ROOT / "algos").glob("*.py"))


@pytest.mark.parametrize("path", ALGOS_FILES, ids=[path.stem for path in ALGOS_FILES])
def test_no_line_is_over_120_characters(path):
    long = [f"{path.name}:{n} ({len(line)})" for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, long


def diff_lines(a: Path, b: Path) -> int:
    """The lines `diff a b` marks < or >: the ones only one of the files has."""
    if shutil.which("diff"):
        out = subprocess.run(["diff", str(a), str(b)], capture_output=True, text=True).stdout
        return sum(line.startswith(("<", ">")) for line in out.splitlines())
    diff = difflib.unified_diff(a.read_text().splitlines(), b.read_text().splitlines(), n=0, lineterm="")
    return sum(line.startswith(("-", "+")) and not line.startswith(("---", "+++")) for line in diff)


COPIES = [path for path in SCRIPTS if path != TEMPLATE]


@pytest.mark.parametrize("path", COPIES, ids=[path.stem for path in COPIES])
def test_a_script_differs_from_the_template_in_few_lines(path):
    budget = DIFF_LINES.get(path.stem, 80)
    assert diff_lines(TEMPLATE, path) <= budget, f"diff algos/grpo_vlm.py algos/{path.name}: over {budget} lines"


def torchrun_helpers_named(path: Path) -> list[tuple[int, str]]:
    """(line number, name) of each torchrun helper (TORCHRUN_HELPERS) that the code of the script's ALGO LOGIC blocks
    names (conftest.marked_blocks; comments and strings do not count)."""
    lines = {number for block in marked_blocks(path, ALGO) for number, _ in block}
    with open(path) as f:
        tokens = list(tokenize.generate_tokens(f.readline))
    return [(t.start[0], t.string) for t in tokens if t.type == tokenize.NAME and t.string in TORCHRUN_HELPERS and t.start[0] in lines]


@pytest.mark.parametrize("path", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_no_algo_logic_block_calls_a_torchrun_helper_but_the_loss_normalisers_global_sum(path):
    """The lesson's code reads as one process's: Run.log sums the logged shares over ranks, gradient_accumulation
    syncs the gradients, Rollouts.keep pads the ranks' rows; only the loss's normaliser is summed in the script."""
    assert TORCHRUN_HELPERS <= set(vars(common.dist)), TORCHRUN_HELPERS - set(vars(common.dist))  # the list is current
    source = path.read_text().splitlines()
    named = torchrun_helpers_named(path)
    normaliser = [(n, name) for n, name in named if name == "all_sum" and re.match(r"[\w\s,]*\bnormaliser\b[\w\s,]*=(?!=)", source[n - 1])]
    assert len(normaliser) <= 1 and not [x for x in named if x not in normaliser], [(n, source[n - 1].strip()) for n, _ in named]


def test_the_algo_logic_blocks_are_found_and_a_torchrun_call_in_one_is_seen(tmp_path):
    """The test above sees a torchrun helper in an ALGO LOGIC block, and not one in a TRY NOT TO MODIFY block."""
    source = TEMPLATE.read_text()
    assert [name for _, name in torchrun_helpers_named(TEMPLATE)] == ["all_sum"]  # normaliser = all_sum(...)
    copy = tmp_path / "copy_vlm.py"
    line = "informative = batch.rewards.view(-1, G).std(dim=1) > 0"
    assert line in source
    copy.write_text(source.replace(line, "informative = gather(batch.rewards).view(-1, G).std(dim=1) > 0"))
    assert [name for _, name in torchrun_helpers_named(copy)] == ["gather", "all_sum"]
    copy.write_text(source.replace("torch.manual_seed(args.seed)\n", "torch.manual_seed(args.seed + rank())\n"))
    assert [name for _, name in torchrun_helpers_named(copy)] == ["all_sum"]  # in the seeding block: not algorithm
