"""torchrun: one training step of every script under `torchrun --nproc-per-node 2` (gloo, CPU), with FSDP2 (and
DDP: DDP_RUNS), equals the single-process step on the same global batch (tests/torchrun_step.py fixes the responses and rewards):
the updated weights within 1e-5, and the logged metrics, which are global means. Includes steps where the two ranks
keep different numbers of sequences and where one rank keeps none, and saving under FSDP2 (the full model and a LoRA
adapter) for `from_pretrained`. Also the pieces of common/dist.py that need no process group."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from common import dist

# (run name, script, flags, global prompt indices whose G responses are equal). 4 prompts x 4 responses: rank 0 gets
# prompts 0-1, rank 1 prompts 2-3. "uneven": rank 0 keeps 1 group, rank 1 keeps 2; "none": rank 1 keeps none.
FLAGS = ["--total-steps", "1", "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "3",
         "--eval-size", "3", "--train-size", "16", "--save-every", "0", "--lr", "0.1"]  # fmt: skip
RUNS = [
    *[(f"{algo}-uneven", f"algos/{algo}_vlm.py", [], [1]) for algo in ("grpo", "rloo", "opo", "gspo")],
    # DAPO's token-level loss: its normaliser is the global step's tokens (no dynamic sampling: see TORCHRUN_ONLY)
    ("dapo-uneven", "algos/dapo_vlm.py", ["--max-resample-rounds", "0"], [1]),
    # a rank that keeps none: GRPO's and GSPO's (minibatch) updates; RLOO's and OPO's weigh rows as GRPO's do
    *[(f"{algo}-none", f"algos/{algo}_vlm.py", [], [2, 3]) for algo in ("grpo", "gspo")],
    ("ppo", "algos/ppo_vlm.py", [], []),  # PPO keeps every sequence
    ("grpo-lora", "algos/grpo_vlm.py", ["--lora"], [1]),
    ("grpo-frozen", "algos/grpo_vlm.py", ["--freeze-vision-tower"], [1]),
]
# Under torchrun only (a single process resamples other prompts): DAPO's dynamic sampling, rank 1's groups all equal
# and its resampled ones too (tests/torchrun_step.py keys the responses by place), rank 0 resampling in step with it.
TORCHRUN_ONLY = [("dapo-dynamic", "algos/dapo_vlm.py", ["--max-resample-rounds", "2"], [2, 3]),
                 ("grpo-agentic", "algos/grpo_vlm.py", ["--task", "zoom", "--max-turns", "2"], [])]  # tests/torchrun_step.py
# DDP wraps every script's model alike: GRPO's single update (and a rank with no rows, which must still join the
# gradients' all-reduce), GSPO's minibatch updates, PPO's critic, a LoRA and a frozen tower (parameters without grads)
DDP_RUNS = {"grpo-uneven", "grpo-none", "gspo-none", "ppo", "grpo-lora", "grpo-frozen"}
assert DDP_RUNS <= {name for name, *_ in RUNS}, DDP_RUNS - {name for name, *_ in RUNS}  # a typo would drop a run
ONE_MINIBATCH = {"gspo": ["--num-minibatches", "1"], "ppo": ["--num-minibatches", "1"]}  # a minibatch split is per rank
IGNORED = {"time", "charts/step_time", "charts/tokens_per_second", "charts/reward_time"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run(repo_root, *command, timeout=600):
    """`command` in the repo, one thread per process, offline; it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def steps(tiny_model_dir, repo_root, tmp_path_factory):
    """{engine: {run name: run dir}} for engine single, fsdp, ddp: one process runs every RUNS entry, then one
    torchrun launch runs them all with FSDP2 (and TORCHRUN_ONLY), then DDP_RUNS with DDP."""
    root = tmp_path_factory.mktemp("dist")
    engines = {"single": RUNS, "fsdp": RUNS + TORCHRUN_ONLY, "ddp": [r for r in RUNS if r[0] in DDP_RUNS]}
    launches = {"single": [sys.executable], "torchrun": TORCHRUN}
    for launch, command in launches.items():
        runs = []
        for engine in ["single"] if launch == "single" else ["fsdp", "ddp"]:
            for name, script, flags, equal in engines[engine]:
                run_flags = [*FLAGS, *ONE_MINIBATCH.get(name.split("-")[0], []), "--model", tiny_model_dir, *flags,
                             "--output-dir", str(root / engine / name), "--dist", "ddp" if engine == "ddp" else "fsdp"]  # fmt: skip
                runs.append({"script": script, "flags": run_flags, "equal_groups": equal, "agentic": name.endswith("agentic")})
        (root / f"{launch}.json").write_text(json.dumps(runs))
        run(repo_root, *command, "tests/torchrun_step.py", str(root / f"{launch}.json"))
    return {engine: {name: next((root / engine / name).iterdir()) for name, *_ in runs} for engine, runs in engines.items()}


def weights(run_dir, name):
    """The saved policy's tensors: <run>/adapter for a LoRA run, else <run>/model."""
    folder = run_dir / ("adapter" if name.endswith("lora") else "model")
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"nothing saved in {folder}"
    return {k: v for f in files for k, v in load_file(f).items()}


def step_record(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]


@pytest.mark.parametrize("launch, name", [("fsdp", r[0]) for r in RUNS] + [("ddp", r[0]) for r in RUNS if r[0] in DDP_RUNS])
def test_torchrun_step_equals_single_process_step(steps, launch, name, tiny_model_dir):
    single, distributed = weights(steps["single"][name], name), weights(steps[launch][name], name)
    assert single.keys() == distributed.keys()
    if name == "ppo":  # the critic: a value head, sharded (or wrapped) like the actor
        single["value_head"], distributed["value_head"] = (torch.load(steps[x][name] / "value_head.pt")["weight"] for x in ("single", launch))
    worst = max((single[k].float() - distributed[k].float()).abs().max().item() for k in single)
    assert worst < 1e-5, f"{name} under {launch}: weights differ by {worst}"
    if not name.endswith("lora"):  # the step changed the weights: a wrong gradient would show
        initial = {k: v for f in sorted(os.listdir(tiny_model_dir)) if f.endswith(".safetensors") for k, v in load_file(os.path.join(tiny_model_dir, f)).items()}
        moved = max((single[k].float() - initial[k].float()).abs().max().item() for k in single if k in initial)
        assert moved > 1e-4, f"{name}: the step did not change the weights"
    # the logged metrics are global means: equal to the single process's
    a, b = step_record(steps["single"][name]), step_record(steps[launch][name])
    assert a.keys() == b.keys()
    for key in a.keys() - IGNORED:
        if a[key] is None or b[key] is None:
            assert a[key] == b[key], key
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name, zero_groups", [("grpo-uneven", 0.25), ("dapo-uneven", 0.25), ("grpo-none", 0.5), ("gspo-none", 0.5)])
def test_the_scenarios_happen(steps, name, zero_groups):
    """rank 0 keeps 1 group and rank 1 keeps 2 ("uneven"); rank 1 keeps none ("none"): the step still trains."""
    record = step_record(steps["fsdp"][name])
    assert record["charts/zero_advantage_groups"] == zero_groups and record["losses/loss"] is not None


def test_dynamic_sampling_under_torchrun_keeps_the_ranks_in_step(steps):
    """Rank 1 needs 2 new groups per round, rank 0 none: both roll out 2 rounds of 2 prompts (FSDP's forwards are
    collectives), and rank 1's groups stay all-equal, so rank 0's two groups alone train."""
    record = step_record(steps["fsdp"]["dapo-dynamic"])
    assert record["charts/resampled_prompts"] == 4 and record["losses/loss"] is not None


def test_agentic_episodes_under_torchrun_keep_the_ranks_in_step(steps):
    """Rank 1's episodes call the zoom tool and need a second turn, rank 0's answer at once (tests/torchrun_step.py,
    scripted_turns): rank 0 samples the second turn too, unused, or FSDP2's forwards would wait for it forever."""
    record = step_record(steps["fsdp"]["grpo-agentic"])
    assert record["charts/tool_calls"] == 0.5 and record["losses/loss"] is not None


def test_fsdp_saved_model_and_adapter_reload_with_from_pretrained(steps, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(steps["fsdp"]["grpo-uneven"] / "model")
    saved = weights(steps["fsdp"]["grpo-uneven"], "grpo-uneven")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items() if k in model.state_dict())
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    lora = PeftModel.from_pretrained(base, steps["fsdp"]["grpo-lora"] / "adapter")
    adapters = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained, loaded


def test_for_this_rank_and_map_over_ranks_without_torchrun():
    assert dist.world_size() == 1 and dist.for_this_rank([1, 2, 3]) == [1, 2, 3]
    assert dist.map_over_ranks(lambda part: [x * 2 for x in part], [1, 2, 3]) == [2, 4, 6]
    assert dist.even_rows([4, 5]) == ([4, 5], 0) and dist.all_sum(3) == 3


def test_check_args_refuses_what_cannot_split(script, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = script.module.Args(prompts_per_step=3, total_steps=1, max_new_tokens=8)
    with pytest.raises(SystemExit, match="does not split over 2 ranks"):
        script.module.check_args(args)
    args = script.module.Args(optimizer="adamw8bit", total_steps=1, max_new_tokens=8)
    with pytest.raises(SystemExit, match="use --dist ddp or --optimizer adamw"):
        script.module.check_args(args)



def test_fsdp_resume_continues_the_run_exactly(repo_root, tiny_model_dir, tmp_path):
    """A 3-step run under FSDP2 SIGKILLed after its step-2 checkpoint (each rank's optimizer shard, every rank's RNG
    state), resumed from there: its step 3 gives the uninterrupted run's weights, bitwise."""
    flags = ["algos/grpo_vlm.py", "--model", tiny_model_dir, "--total-steps", "3", "--save-every", "2", "--eval-size", "2",
             "--train-size", "16", "--prompts-per-step", "4", "--group-size", "4", "--output-dir"]  # fmt: skip
    run(repo_root, *TORCHRUN, *flags, str(tmp_path / "straight"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*TORCHRUN, *flags, str(tmp_path / "killed")], cwd=repo_root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not list(tmp_path.glob("killed/*/checkpoint-2")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for proc in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        proc.kill()  # SIGKILL, during step 3: both ranks (in sessions of their own) and torchrun
    process.wait()
    (run_dir,) = (tmp_path / "killed").iterdir()
    assert not (run_dir / "model").exists() and (run_dir / "checkpoint-2").is_dir(), "killed too late"
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt"} <= set(os.listdir(run_dir / "checkpoint-2"))
    run(repo_root, *TORCHRUN, "algos/grpo_vlm.py", "--resume", str(run_dir))
    finished, resumed = weights(next((tmp_path / "straight").iterdir()), "model"), weights(run_dir, "model")
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)


def test_vllm_engines_under_torchrun(repo_root, tiny_model_dir, tmp_path):
    """One vLLM engine per rank (external_launcher, data parallel), the FSDP2-sharded LoRA policy's weights gathered
    and merged for the push: a step runs, each rank sampling its own prompts."""
    pytest.importorskip("vllm")
    result = run(repo_root, *TORCHRUN, "algos/grpo_vlm.py", "--model", tiny_model_dir, "--rollout-engine", "vllm", "--lora",
                      "--total-steps", "1", "--eval-size", "2", "--train-size", "8", "--prompts-per-step", "4", "--group-size", "4",
                      "--output-dir", str(tmp_path))  # fmt: skip
    assert "rollout engine: vLLM" in result.stdout
    records = [json.loads(line) for line in (next(tmp_path.iterdir()) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and records[-1]["charts/response_length"] > 0
