"""One training step of algos/ scripts on a fixed global batch, for tests/test_dist.py: run as one process and under
torchrun (FSDP2, DDP), so that the test can compare the updated weights and the logged metrics.

    python tests/torchrun_step.py RUNS_JSON
    torchrun --nproc-per-node 2 tests/torchrun_step.py RUNS_JSON

RUNS_JSON: a list of {"script": "algos/grpo_vlm.py", "flags": [...], "equal_groups": [global prompt indices], "agentic":
bool}; each run is one call of the script's main() in this process. An agentic run's turns: scripted_turns. Two things are made independent of how the prompts are split
over ranks, and nothing else is changed:
- the responses: not sampled but a fixed text per (the prompt's place in the step's global batch, sample index):
  "0" or "1" followed by a few tokens; a prompt listed in equal_groups gets G equal responses, so its group's rewards
  are equal and the script leaves it out of the update (a test picks which ranks keep how many sequences);
- the reward: 1 for a response that starts with "1", else 0.
And the optimizer is plain SGD, so that the updated weights show the gradient itself: Adam's first step is lr times
the gradient's sign, where a rounding difference in a near-zero component flips the update.
"""

import importlib.util
import json
import os
import sys

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import agent, dist, policy, tasks  # noqa: E402
from common.vlm import stop_token_id  # noqa: E402


def fixed_responses(equal_groups):
    def generate(model, processor, prompts, num_samples, max_new_tokens, temperature, greedy):
        B = len(prompts["input_ids"])
        first = dist.rank() * B  # this rank's first prompt's place in the global batch (common.dist.shard)
        texts = []
        for g in range(first, first + B):
            for j in range(num_samples):
                texts.append("1" if g in equal_groups else ("1" if j % 2 else "0") + " 2" * ((g + j) % 3))
        eos = stop_token_id(processor)
        ids = [processor.tokenizer(t, add_special_tokens=False).input_ids + [eos] for t in texts]
        width = max(map(len, ids))
        return torch.tensor([row + [eos] * (width - len(row)) for row in ids])

    return generate


def scripted_turns(model_generate):
    """An agentic run's turns (common.agent.generate): the model samples each turn, as a rollout does (an FSDP2 forward
    is a collective: every rank must sample as often), then the sampled tokens are replaced. On rank 1 the first turn
    calls the zoom tool; on rank 0 it answers, so that only rank 1's episodes need a second turn, which it samples
    alone unless the ranks stay in step. Answers alternate "1" (reward 1) and "0" over a turn's rows."""

    def generate(model, processor, context, *args):
        sampled = model_generate(model, processor, context, *args)
        first_turn = len(context["image_grid_thw"]) == len(context["input_ids"])  # one image per episode so far
        texts = ["<tool>zoom(2)</tool>" if first_turn and dist.rank() == 1 else str(row % 2) for row in range(len(sampled))]
        eos = stop_token_id(processor)
        ids = [processor.tokenizer(t, add_special_tokens=False).input_ids + [eos] for t in texts]
        width = max(map(len, ids))
        return torch.tensor([row + [eos] * (width - len(row)) for row in ids])

    return generate


def main(runs_json: str):
    with open(runs_json) as f:
        runs = json.load(f)
    model_generate = agent.generate
    for run in runs:
        path = run["script"]
        name = os.path.basename(path)[: -len(".py")]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # tyro reads the Args docstrings through it
        spec.loader.exec_module(module)
        policy.generate = fixed_responses(set(run["equal_groups"]))  # what common.policy.sample samples with
        agent.generate = scripted_turns(model_generate) if run.get("agentic") else model_generate
        module.make_optimizer = lambda name, params, lr: torch.optim.SGD([p for p in params if p.requires_grad], lr=lr)
        # every task's reward (the scripts call get_task(args.task).reward_fn(box_frame)); Task is frozen: set on the class
        tasks.Task.reward_fn = lambda task, box_frame=None: lambda completion, answer, format_reward=0.0: float(completion.startswith("1"))
        module.main(tyro.cli(module.Args, args=run["flags"]))


if __name__ == "__main__":
    main(sys.argv[1])
