"""Run directories, strict metrics, checkpoints and --resume (common/runs.py and the script's use of them).

The resume tests run algos/grpo_vlm.py's `main` in-process on the random tiny model, with rewards replaced by
0, 1, 0, 1, ... so that every step really updates the weights: a resumed run can only match the run that was not
interrupted if the weights, the optimizer's moments, the LR schedule and every RNG state were restored. GRPO only
(the `grpo` fixture): the runs use its --group-size, and what they pin is common/runs.py's, the same in every script.
The tests at the end drive common.runs.Run directly, as a script's loop does: its log, extra_state and Ctrl-C paths.
"""

import itertools
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import tyro
from conftest import REPO_ROOT, load_script
from safetensors.torch import load_file

import common.tasks
from common import runs
from common.vlm import load_vlm

BUDGET = ["--prompts-per-step", "2", "--group-size", "2", "--train-size", "32", "--eval-size", "4"]
BUDGET += ["--max-new-tokens", "4", "--lr", "1e-2", "--eval-every", "3", "--no-anneal-lr"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the script catches it, nothing is saved on the way out."""


def strict_records(run_dir):
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_main(grpo, model_dir, out, *flags, kill_at_step=None, grad_norm=None):
    """The script's main with these flags; rewards alternate 0, 1, ...; `kill_at_step`: die as that step's metrics
    are about to be written; `grad_norm`: what clip_grad_norm_ reports (NaN: every update is skipped)."""
    rewards = itertools.count()
    json_line = runs.json_line

    def dying_json_line(record):
        if record["step"] == kill_at_step:
            raise Killed
        return json_line(record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common.tasks.Task, "reward_fn", lambda self, box_frame=None: lambda c, a, f=0.0: float(next(rewards) % 2))
        patch.setattr(runs, "json_line", dying_json_line)
        if grad_norm is not None:
            patch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(grad_norm))
        grpo.main(tyro.cli(grpo.Args, args=[*BUDGET, "--model", model_dir, "--output-dir", str(out), *flags]))


POLICY = {  # flags: the file of the trained weights
    (): "model/model.safetensors",
    ("--lora",): "adapter/adapter_model.safetensors",
    ("--optimizer", "adamw8bit-offload"): "model/model.safetensors",  # its state: 8-bit moments, fp32 master weights
}


@pytest.fixture(scope="module", params=list(POLICY), ids=["full", "lora", "adamw8bit-offload"])
def flags(request):
    return request.param


@pytest.fixture(scope="module")
def straight(grpo, tiny_model_dir, tmp_path_factory, one_thread, flags):
    """6 steps, checkpoints every 2, never interrupted: (run dir, final trained weights)."""
    out = tmp_path_factory.mktemp("straight")
    run_main(grpo, tiny_model_dir, out, "--total-steps", "6", "--save-every", "2", *flags)
    (run_dir,) = out.iterdir()
    return run_dir, load_file(run_dir / POLICY[flags])


@pytest.fixture(scope="module")
def resumed(grpo, tiny_model_dir, tmp_path_factory, straight, flags):
    """The same run killed during step 5 (its last checkpoint: step 4), then resumed: (run dir, final weights)."""
    out = tmp_path_factory.mktemp("resumed")
    with pytest.raises(Killed):
        run_main(grpo, tiny_model_dir, out, "--total-steps", "6", "--save-every", "2", *flags, kill_at_step=5)
    (run_dir,) = out.iterdir()
    assert not (run_dir / POLICY[flags]).exists() and runs.latest_checkpoint(str(run_dir)).endswith("checkpoint-4")
    run_main(grpo, tiny_model_dir, out, "--resume", str(run_dir))
    assert [p.name for p in out.iterdir()] == [run_dir.name], "a resumed run continues in its own directory"
    return run_dir, load_file(run_dir / POLICY[flags])


def test_a_resumed_run_ends_with_the_weights_of_the_run_that_was_not_interrupted(straight, resumed):
    assert straight[1].keys() == resumed[1].keys()
    for name, tensor in straight[1].items():
        torch.testing.assert_close(resumed[1][name], tensor, atol=1e-6, rtol=0, msg=name)


def test_the_weights_moved_so_the_comparison_means_something(straight, tiny_model_dir, flags):
    if flags == ("--lora",):  # B starts at 0
        assert max(t.abs().max().item() for k, t in straight[1].items() if "lora_B" in k) > 1e-3
    else:
        start = load_file(f"{tiny_model_dir}/model.safetensors")
        assert max((straight[1][k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_a_resumed_run_logs_each_step_once_with_the_same_metrics(straight, resumed):
    a, b = strict_records(straight[0]), strict_records(resumed[0])
    assert [r["step"] for r in b] == list(range(7))  # step 5, logged again after the resume, only once
    for x, y in zip(a, b):
        for key in x:
            if key not in ("time", "charts/step_time", "charts/tokens_per_second", "charts/reward_time"):
                assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


def test_resume_refuses_a_changed_flag_and_a_finished_run(grpo, tiny_model_dir, straight, resumed):
    with pytest.raises(SystemExit, match="finished all its 6 steps"):
        run_main(grpo, tiny_model_dir, straight[0].parent, "--resume", str(straight[0]))
    with pytest.raises(SystemExit, match=r"drop --lr 0\.5 \(the run's: 0\.01\)"):
        run_main(grpo, tiny_model_dir, resumed[0].parent, "--resume", str(resumed[0]), "--lr", "0.5")


def test_resume_refuses_a_flag_given_at_its_default_that_the_run_changed(grpo, straight, monkeypatch):
    # once ignored without a word: the run's --lr 0.01 went on, though the command line said --lr 0.0002 (the default).
    # Run from the command line, the script parses it again over the run's flags, so a given default counts too
    monkeypatch.setattr("sys.argv", [grpo.__file__, "--resume", str(straight[0]), "--lr", "0.0002"])
    assert grpo.Args().lr == 0.0002
    with pytest.raises(SystemExit, match=r"drop --lr 0\.0002 \(the run's: 0\.01\)"):
        grpo.main(tyro.cli(grpo.Args))


def test_resume_with_more_total_steps_extends_a_finished_run(grpo, tiny_model_dir, straight, tmp_path, flags):
    run_dir, out = tmp_path / straight[0].name, straight[0].parent  # a copy: --output-dir stays the run's
    shutil.copytree(straight[0], run_dir)
    with pytest.raises(SystemExit, match="its checkpoint is at step 6; give more steps"):
        run_main(grpo, tiny_model_dir, out, "--resume", str(run_dir), "--total-steps", "5")
    run_main(grpo, tiny_model_dir, out, "--resume", str(run_dir), "--total-steps", "8")
    assert [r["step"] for r in strict_records(run_dir)] == list(range(9))
    assert json.loads((run_dir / "args.json").read_text())["total_steps"] == 8
    assert runs.latest_checkpoint(str(run_dir)).endswith("checkpoint-8")
    weights = load_file(run_dir / POLICY[flags])  # the policy saved again, two steps further
    assert max((weights[k] - t).abs().max().item() for k, t in straight[1].items()) > 1e-4
    with pytest.raises(SystemExit, match="finished all its 8 steps; train it further with --total-steps"):
        run_main(grpo, tiny_model_dir, out, "--resume", str(run_dir))


def test_a_run_killed_while_saving_its_policy_resumes_to_save_it(grpo, tiny_model_dir, straight, tmp_path, flags):
    # a SIGKILL in the final save once left model/config.json at 0 bytes: README's reload failed and --resume refused
    # the "finished" run. Now the last step is checkpointed (though --save-every 4 is not due) and model/ is renamed
    # into place whole, so the kill leaves only model.tmp/, and the resumed run saves the policy without a step more
    save_pretrained = runs.save_pretrained

    def dying(model, processor, path, state_dict):
        if "checkpoint-" not in path:  # the final save
            os.makedirs(path + ".tmp")
            open(os.path.join(path + ".tmp", "config.json"), "w").close()
            raise Killed
        save_pretrained(model, processor, path, state_dict)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        patch.setattr(runs, "save_pretrained", dying)
        run_main(grpo, tiny_model_dir, tmp_path, "--total-steps", "6", "--save-every", "4", *flags)
    (run_dir,) = tmp_path.iterdir()
    policy = run_dir / POLICY[flags]
    assert not policy.parent.exists() and runs.latest_checkpoint(str(run_dir)).endswith("checkpoint-6")
    run_main(grpo, tiny_model_dir, tmp_path, "--resume", str(run_dir))
    assert [r["step"] for r in strict_records(run_dir)] == list(range(7))
    weights = load_file(policy)
    for name, tensor in straight[1].items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(SystemExit, match="finished all its 6 steps"):
        run_main(grpo, tiny_model_dir, tmp_path, "--resume", str(run_dir))


def test_resume_refuses_another_scripts_run(straight):
    # once a TypeError about an unexpected keyword argument (rloo_vlm.py --resume <a GRPO run>)
    rloo = load_script(REPO_ROOT / "algos" / "rloo_vlm.py")
    with pytest.raises(SystemExit, match=r"a run of algos/grpo_vlm\.py, not of rloo_vlm\.py: resume it with the script"):
        rloo.main(tyro.cli(rloo.Args, args=["--resume", str(straight[0])]))


def test_resume_refuses_a_reference_model_other_than_the_runs(grpo, tiny_model_dir, tmp_path, one_thread):
    with pytest.raises(Killed):
        run_main(grpo, tiny_model_dir, tmp_path, "--total-steps", "4", "--save-every", "2", kill_at_step=3)
    (run_dir,) = tmp_path.iterdir()
    state_file = run_dir / "checkpoint-2" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["reference_fingerprint"] == runs.weights_fingerprint(load_vlm(tiny_model_dir)[0])
    torch.save({**state, "reference_fingerprint": "another model"}, state_file)  # as if --model's weights changed
    with pytest.raises(SystemExit, match="not the one the run started with"):
        run_main(grpo, tiny_model_dir, tmp_path, "--resume", str(run_dir))


def test_only_the_latest_checkpoint_is_kept_and_holds_what_resume_needs(straight, flags):
    (checkpoint,) = straight[0].glob("checkpoint-*")
    assert checkpoint.name == "checkpoint-6"
    assert {p.name for p in checkpoint.iterdir()} == {POLICY[flags].split("/")[0], "optimizer.pt", "state.pt"}
    state = runs.load_checkpoint_state(str(checkpoint))
    assert state["step"] == 6 and state["args"]["total_steps"] == 6 and {"python", "torch"} <= state["rng"][0].keys()


def test_a_skipped_update_logs_null_not_nan(grpo, tiny_model_dir, tmp_path, one_thread):
    run_main(grpo, tiny_model_dir, tmp_path, "--total-steps", "1", grad_norm=float("nan"))
    (run_dir,) = tmp_path.iterdir()
    records = strict_records(run_dir)  # raises on NaN
    assert records[1]["losses/grad_norm"] is None


def test_json_line_writes_non_finite_numbers_as_null():
    line = runs.json_line({"step": 1, "a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 0.5})
    assert json.loads(line) == {"step": 1, "a": None, "b": None, "c": None, "d": 0.5}
    assert "NaN" not in line and "Infinity" not in line and line.endswith("\n")


def test_a_checkpoint_interrupted_while_written_leaves_the_previous_one_whole(tmp_path, tiny_vlm):
    model, processor = tiny_vlm
    optimizer = torch.optim.AdamW(model.parameters())
    first = runs.save_checkpoint(str(tmp_path), 2, model, processor, optimizer, False, {"args": {}})
    (tmp_path / "checkpoint-4.tmp").mkdir()  # a kill during the next write leaves this behind
    (tmp_path / "checkpoint-4.tmp" / "optimizer.pt").write_bytes(b"half")
    assert runs.latest_checkpoint(str(tmp_path)) == first
    assert runs.load_checkpoint_state(first)["step"] == 2


def test_new_run_dirs_are_never_reused(tmp_path):
    made = [runs.new_run_dir(str(tmp_path), "counting__grpo_vlm__1__1700000000") for _ in range(3)]
    assert [p.rsplit("/", 1)[1] for p in made] == [
        "counting__grpo_vlm__1__1700000000",
        "counting__grpo_vlm__1__1700000000-2",
        "counting__grpo_vlm__1__1700000000-3",
    ]


# Run (common/runs.py) driven directly, as a script's loop drives it: no training, a stand-in rollout batch
def stand_in_batch():
    """What Run.log reads of a rollout batch (common.policy.Rollouts): 2 groups of 2."""
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5])
    return SimpleNamespace(rewards=rewards, mask=torch.ones(4, 3), tool_calls=torch.zeros(4), group_size=2,
                           rule_rewards=rewards, model_scores=None, reward_seconds=torch.full((4,), 0.25))  # fmt: skip


def drive(grpo, tiny_vlm, out, *flags, stop_at=None, before_loop=False, extra_state=dict):
    """`with Run(args) as run:` over the script's Args with these flags; raises KeyboardInterrupt (a second Ctrl-C)
    before the loop, or in step `stop_at` after its log. Returns the run."""
    model, processor = tiny_vlm
    args = tyro.cli(grpo.Args, args=["--output-dir", str(out), "--eval-every", "100", *flags])
    with runs.Run(args) as run:
        run.start(model, processor, torch.optim.AdamW(model.parameters()), lambda: {"eval/accuracy": 0.5}, None, extra_state)
        if before_loop:
            raise KeyboardInterrupt
        for step in run.steps():
            run.log({"losses/grad_norm": 1.0}, stand_in_batch(), summed_over_ranks={"losses/loss": step / 10})
            if step == stop_at:
                raise KeyboardInterrupt
        run.finish()
    return run


def test_run_logs_the_shared_charts_the_record_and_the_values_summed_over_ranks(grpo, tiny_vlm, tmp_path):
    run = drive(grpo, tiny_vlm, tmp_path, "--total-steps", "2", "--save-every", "0")
    first, step1, step2 = strict_records(Path(run.dir))
    assert first["step"] == 0 and first["eval/accuracy"] == 0.5
    assert step1["losses/loss"] == 0.1 and step2["losses/loss"] == 0.2 and step1["losses/grad_norm"] == 1.0
    assert step1["charts/reward_mean"] == 0.5 and step1["charts/accuracy"] == 0.25  # rewards 0, 1, 0.5, 0.5
    assert step1["charts/zero_advantage_groups"] == 0.5 and step1["charts/response_length"] == 3.0
    assert "eval/accuracy" not in step1 and step2["eval/accuracy"] == 0.5  # the last step is evaluated


def test_extra_state_goes_into_the_checkpoint_and_comes_back_in_run_state_on_resume(grpo, tiny_vlm, tmp_path):
    # what a script keeps beside the policy and optimizer (PPO's value head)
    head = {"weight": torch.arange(6.0).view(2, 3)}
    with pytest.raises(SystemExit, match="stopped during step 3"):
        drive(grpo, tiny_vlm, tmp_path, "--total-steps", "4", "--save-every", "2", stop_at=3, extra_state=lambda: {"value_head": head})
    (run_dir,) = tmp_path.iterdir()
    resumed = runs.Run(tyro.cli(grpo.Args, args=["--resume", str(run_dir)]))
    assert resumed.checkpoint.endswith("checkpoint-2") and resumed.state["step"] == 2
    assert torch.equal(resumed.state["value_head"]["weight"], head["weight"])


def test_a_second_ctrl_c_in_the_loop_stops_at_once_and_says_where_to_resume_from(grpo, tiny_vlm, tmp_path):
    with pytest.raises(SystemExit) as exited:
        drive(grpo, tiny_vlm, tmp_path / "a", "--total-steps", "4", "--save-every", "2", stop_at=3)
    (run_dir,) = (tmp_path / "a").iterdir()
    assert str(exited.value) == f"stopped during step 3: continue from {run_dir}/checkpoint-2 with --resume {run_dir}"
    assert not (run_dir / "model").exists()  # a half-finished step is never saved as the policy
    with pytest.raises(SystemExit, match="^stopped during step 1: no checkpoint was saved$"):
        drive(grpo, tiny_vlm, tmp_path / "b", "--total-steps", "4", "--save-every", "2", stop_at=1)


def test_a_second_ctrl_c_while_the_policy_is_saved_says_that_resume_saves_it(grpo, tiny_vlm, tmp_path, monkeypatch):
    save_policy = runs.save_policy

    def interrupted(model, processor, out_dir, *args):
        if "checkpoint-" not in out_dir:  # the final save
            raise KeyboardInterrupt
        save_policy(model, processor, out_dir, *args)

    monkeypatch.setattr(runs, "save_policy", interrupted)
    with pytest.raises(SystemExit) as exited:
        drive(grpo, tiny_vlm, tmp_path, "--total-steps", "3", "--save-every", "2")
    (run_dir,) = tmp_path.iterdir()
    assert str(exited.value) == f"stopped while saving the trained policy: --resume {run_dir} saves it"
    monkeypatch.setattr(runs, "save_policy", save_policy)
    drive(grpo, tiny_vlm, tmp_path, "--resume", str(run_dir))
    assert load_vlm(str(run_dir / "model"))[0].config.model_type == "qwen2_vl"


def test_a_ctrl_c_before_the_first_step_says_nothing_was_trained(grpo, tiny_vlm, tmp_path):
    with pytest.raises(SystemExit, match="^interrupted before the first step: nothing was trained$"):
        drive(grpo, tiny_vlm, tmp_path, "--total-steps", "2", before_loop=True)
