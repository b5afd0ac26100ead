"""OPO for vision-language models: On-Policy RL with Optimal reward baseline (arXiv 2505.23585), docs/opo_vlm.md.

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
For each prompt we sample G responses and push up those that beat the group's length-weighted mean, on-policy.

    python algos/opo_vlm.py --task counting      # the embedded tiny VLM, laptop CPU, offline (tasks: docs/tasks.md)
    torchrun --nproc-per-node 8 algos/opo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --dataset BUAADreamer/clevr_count_70k --dtype bfloat16 --lr 1e-6 --max-new-tokens 256 --track  # 8 GPUs, FSDP2

Not meant to be imported except for the pure functions the tests pin.
"""

import math
import os
import random
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import tyro
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.args import SharedArgs  # noqa: E402
from common.dist import all_sum, init, rank, for_this_rank, world_size, wrap  # noqa: E402
from common.optim import make_optimizer, memory_plan  # noqa: E402
from common.policy import Sampler, gradient_accumulation, batch_logprobs, load_data, load_policy  # noqa: E402
from common.rollout import make_rollout_engine  # noqa: E402
from common.runs import Run  # noqa: E402
from common.reward import Reward, load_reward_model  # noqa: E402
from common.tasks import get_task  # noqa: E402
from common.tiny_vlm import tiny_model_dir  # noqa: E402
from common.vlm import box_frame  # noqa: E402


@dataclass
class Args(SharedArgs):  # the flags every script shares (task, model, memory, budget, logging): common/args.py
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""

    # Algorithm specific arguments: OPO (no KL, no clipping: one optimizer step per rollout batch, so the ratio is 1)
    group_size: int = 8
    """responses per prompt (G); the group mean is the baseline, so at least 2"""
    skip_zero_advantage_groups: bool = True
    """leave groups whose rewards are all equal out of the update (their advantage is 0): saves their compute"""


# ALGO LOGIC: the heart of the algorithm, pure functions (tests/test_<algorithm>_math.py pins them)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count)."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)  # dim None: over all positions


def opo_advantages(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int) -> torch.Tensor:
    """OPO's advantage (Hao et al. 2025, arXiv 2505.23585): per group, the variance-optimal baseline with
    ||grad log pi(y)||^2 ~ |y|, lengths (B*G,) the response tokens, EOS included (no std; exactly 0 for equal r):
        b = sum_j |y_j| r_j / sum_j |y_j|,    A_i = r_i - b = sum_j |y_j| (r_i - r_j) / sum_j |y_j|
    rewards: (B*G,) ordered group by group. Returns (B*G,). A group whose rewards are all equal gets A = 0."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    weights = lengths.to(rewards.dtype).view(-1, group_size)
    differences = grouped.unsqueeze(2) - grouped.unsqueeze(1)  # (B, G, G): r_i - r_j
    return ((differences * weights.unsqueeze(1)).sum(2) / weights.sum(1, keepdim=True).clamp(min=1)).view(-1)


LOG_RATIO_BOUND = 20.0  # log-ratios are clamped to +-20 (verl's bound): exp of a drifted token's would overflow to inf


def opo_loss(logprobs, old_logprobs, advantages, mask):
    """OPO's policy gradient, negated, every response token weighted alike (verl's token-mean, the paper's recipe):
        loss = -sum_i sum_t A_i rho_it / sum_i |y_i|,  rho = exp(clamp(logp - old_logp, +-20)) = 1 (on-policy)
    Its gradient, -sum_i A_i grad log pi(y_i) / sum_i |y_i|, is the paper's estimator: a response's gradient norm
    grows with |y_i|, as the baseline assumes. No KL, nothing clipped.
    the log-probs and mask: (N, T); advantages: (N,), one per sequence.
    Returns (loss, its losses/* metrics)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    adv = advantages.unsqueeze(1)  # (N, 1): the sequence's advantage on each of its tokens
    loss = -masked_mean(ratio * adv, mask)  # dim None: over all tokens of all responses
    entropy = -masked_mean(logprobs.detach(), mask)  # -log p of the sampled tokens, a token mean as the loss
    return loss, {"losses/loss": loss, "losses/entropy": entropy}


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    args.check()  # the flags every script shares (common/args.py), then the algorithm's own
    checks = [
        (args.group_size < 2, f"--group-size {args.group_size}: the baseline is the group's mean, use 2 or more"),
    ]
    for bad, message in checks:
        if bad:
            raise SystemExit(message)


def main(args: Args):
    with Run(args) as run:  # --resume, Ctrl-C / kill, the run directory, metrics and checkpoints: common/runs.py
        train(run)


def train(run: Run):
    # to be filled in runtime: the task's defaults (a resumed run has its own flags)
    args, task = run.args, get_task(run.args.task)
    args.max_new_tokens = task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    args.total_steps = task.total_steps if args.total_steps is None else args.total_steps
    check_args(args)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = init(args.cuda)  # under torchrun: join the process group, this rank's GPU

    # TRY NOT TO MODIFY: task data, whose prompts must fit --max-prompt-tokens (checked before any weights load)
    train_examples, eval_examples = load_data(args.task, args.dataset, args.train_size, args.eval_size, args.model,
                                              args.min_pixels, args.max_pixels, args.max_prompt_tokens,
                                              check_rows=args.prompts_per_step)  # fmt: skip

    # ALGO LOGIC: no KL term, so no reference policy
    with_reference = False

    # TRY NOT TO MODIFY: actor (the policy we train), reference (frozen KL anchor), optimizer, rollout engine
    model_path = tiny_model_dir(args.task) if args.model == "tiny" else args.model
    model, processor, reference, reference_fingerprint = load_policy(
        model_path, args.dtype, device, with_reference, args.min_pixels, args.max_pixels, args.lora_config(),
        args.freeze_vision_tower, args.gradient_checkpointing, args.dist, run.checkpoint,
        run.state and run.state["reference_fingerprint"])  # fmt: skip
    wrapped_model = wrap(model, args.dist)  # torchrun: FSDP2 shards `model` in place (it is `model`), DDP wraps it
    optimizer = make_optimizer(args.optimizer, model.parameters(), lr=args.lr)  # the weights that require grad
    if world_size() > 1:
        torch.manual_seed(args.seed + rank())  # the same initial weights everywhere, each rank's own sampling noise
    max_model_len = args.max_turns * (args.max_prompt_tokens + args.max_new_tokens)  # an episode's longest context
    rollout_engine = make_rollout_engine(args.rollout_engine, model_path, processor, getattr(torch, args.dtype),
                                         args.seed, max_model_len, args.max_turns)  # fmt: skip
    engine_bytes = rollout_engine.memory_bytes(model) if rollout_engine is not None else None
    reward_model = load_reward_model(args.reward_model, args.reward_kind, task, getattr(torch, args.dtype), device,
                                     args.reward_batch_size, args.reward_max_tokens)  # None: the rule  # fmt: skip
    print(memory_plan(model, optimizer, reference, engine_bytes, reward_model))  # each tensor counted once
    sampler = Sampler(model, processor, rollout_engine, task.tools, device, args.max_new_tokens,
                      args.max_prompt_tokens, args.temperature, args.max_turns, args.train_turns)  # fmt: skip
    # the task's rule (grounding's reads boxes in the family's frame) or --reward-model's score: common/reward.py
    reward = Reward(task, box_frame(model, processor), args.format_reward, reward_model, args.reward_mix)

    def evaluate():  # held-out metrics (eval/accuracy, ...) of greedy responses
        return sampler.evaluate(eval_examples, reward)

    def rollout(examples):  # G responses (or episodes) to each prompt, rows p0 x G, p1 x G, ..., and their rewards
        batch = sampler.sample(examples, args.group_size)
        batch.rewards = reward(batch)  # (B*G,)
        return batch

    run.start(model, processor, optimizer, evaluate, reference_fingerprint)

    for step in run.steps():
        lr = args.lr * (1 - (step - 1) / args.total_steps) if args.anneal_lr else args.lr  # linear decay to 0
        optimizer.param_groups[0]["lr"] = lr

        # TRY NOT TO MODIFY: rollout and reward, G responses to each of B prompts (under torchrun, this rank's B / N)
        G, batch = args.group_size, rollout(for_this_rank(random.sample(train_examples, args.prompts_per_step)))

        # ALGO LOGIC: advantage, reward minus the group's length-weighted mean reward (|y_i|: EOS included)
        batch.advantages = opo_advantages(batch.rewards, batch.mask.sum(1).cpu(), G).to(device)  # (B*G,)
        informative = batch.rewards.view(-1, G).std(dim=1) > 0  # (B,): groups whose rewards differ
        trained = informative if args.skip_zero_advantage_groups else torch.ones_like(informative)
        train_batch = batch.keep(trained.repeat_interleave(G).nonzero().squeeze(1).tolist())  # rows of those groups

        # ALGO LOGIC: strictly on-policy: the sampling policy is the current model, old_logprobs its own forward
        mb = args.micro_batch_size

        # ALGO LOGIC: update, micro-batches with gradient accumulation, then exactly one optimizer step
        passes = [train_batch]  # one optimizer step per rollout
        losses = defaultdict(float)  # each metric weighted by its micro-batch's share of the step, over every pass
        for minibatch in passes:
            normaliser = all_sum(minibatch.mask.sum().item())  # the loss's: the global step's tokens
            optimizer.zero_grad(set_to_none=True)
            for micro in gradient_accumulation(minibatch, mb, wrapped_model):
                logprobs = batch_logprobs(wrapped_model, micro)  # (n, T), with gradients
                old = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs
                loss, logs = opo_loss(logprobs, old, micro.advantages, micro.mask)
                share = micro.mask.sum().item() / normaliser  # the micro-batch's part of the step's token mean
                (loss * share).backward()
                for name, value in logs.items():
                    losses[name] += value.item() * share / len(passes)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
            if normaliser > 0 and math.isfinite(grad_norm) and all(map(math.isfinite, losses.values())):
                optimizer.step()
            elif normaliser > 0:
                tqdm.write(f"warning: step {step}: non-finite loss or grad norm ({grad_norm}); update skipped")
        optimizer.zero_grad(set_to_none=True)  # free the gradients now: the next rollout needs the memory
        if normaliser == 0:  # every group skipped: nothing was trained on (no losses/* but a null grad norm)
            grad_norm = math.nan

        # TRY NOT TO MODIFY: log / eval / save (under torchrun: over every rank's rollouts, rank 0 writes)
        run.log({"charts/learning_rate": lr, "losses/grad_norm": grad_norm}, batch, summed_over_ranks=losses)
    run.finish()  # <run>/model (or <run>/adapter), the summary line


if __name__ == "__main__":
    main(tyro.cli(Args))
