"""GSPO for vision-language models: Group Sequence Policy Optimization (arXiv 2507.18071), docs/gspo_vlm.md.

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
For each prompt we sample G responses and push up those that beat the group's mean, one clipped ratio per response.

    python algos/gspo_vlm.py --task counting     # the embedded tiny VLM, laptop CPU, offline (tasks: docs/tasks.md)
    torchrun --nproc-per-node 8 algos/gspo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct \\
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
from common.policy import sequence_logprobs  # noqa: E402
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

    # Algorithm specific arguments: GSPO (no KL term, so no reference model)
    group_size: int = 8
    """responses per prompt (G); the group mean is the baseline, so at least 2"""
    clip_eps_low: float = 3e-4
    """the sequence ratio's clip range below 1: a response with s_i < 1 - clip_eps_low is pushed down no further"""
    clip_eps_high: float = 4e-4
    """the sequence ratio's clip range above 1: a response with s_i > 1 + clip_eps_high is pushed up no further"""
    num_minibatches: int = 4
    """optimizer steps per rollout, each on 1/num_minibatches of its sequences, shuffled (the clip acts from the 2nd)"""
    skip_zero_advantage_groups: bool = True
    """leave groups whose rewards are all equal out of the update (their advantage is 0): saves their compute"""


# ALGO LOGIC: the heart of the algorithm, pure functions (tests/test_<algorithm>_math.py pins them)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count)."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)  # dim None: over all positions


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage (DeepSeekMath eq. 3, arXiv 2402.03300): per group of G responses to one prompt,
        A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
    rewards: (B*G,) ordered group by group. Returns (B*G,). A group whose rewards are all equal gets A = 0."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps)).view(-1)


LOG_RATIO_BOUND = 20.0  # log-ratios are clamped to +-20 (verl's bound): exp of a drifted token's would overflow to inf


def gspo_loss(logprobs, old_logprobs, advantages, mask, clip_eps_low: float, clip_eps_high: float):
    """GSPO's clipped sequence-level surrogate (Zheng et al. 2025, arXiv 2507.18071, eq. 5), negated for minimisation:
        s_i  = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp( (1/|y_i|) sum_t (logp - old_logp) )   one ratio per response
        loss = -mean_i min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i)               no KL term
    the log-probs and mask: (N, T); advantages: (N,), one per sequence.
    Returns (loss, its losses/* metrics)."""
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=1).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    seq_ratio = torch.exp(seq_log_ratio)  # (N,): the geometric mean of the token ratios
    clipped_ratio = torch.clamp(seq_ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    loss = -torch.min(seq_ratio * advantages, clipped_ratio * advantages).mean()
    # clipfrac: the responses the clip holds, s_i past the bound that A_i pushes it towards
    clipped = ((advantages > 0) & (seq_ratio > 1 + clip_eps_high)) | ((advantages < 0) & (seq_ratio < 1 - clip_eps_low))
    entropy = -masked_mean(logprobs.detach(), mask, dim=1).mean()  # -log p of the sampled tokens
    return loss, {"losses/loss": loss, "losses/clipfrac": clipped.float().mean(), "losses/entropy": entropy}


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    args.check()  # the flags every script shares (common/args.py), then the algorithm's own
    checks = [
        (args.group_size < 2, f"--group-size {args.group_size}: the baseline is the group's mean, use 2 or more"),
        (min(args.clip_eps_low, args.clip_eps_high) <= 0, f"--clip-eps-low/high {args.clip_eps_low}: use ranges > 0"),
        (args.num_minibatches < 1, f"--num-minibatches {args.num_minibatches}: use 1 or more (1: on-policy, no clip)"),
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

        # ALGO LOGIC: advantage, group-normalised reward, one per sequence
        batch.advantages = group_advantages(batch.rewards, G).to(device)  # (B*G,)
        informative = batch.rewards.view(-1, G).std(dim=1) > 0  # (B,): groups whose rewards differ
        trained = informative if args.skip_zero_advantage_groups else torch.ones_like(informative)
        train_batch = batch.keep(trained.repeat_interleave(G).nonzero().squeeze(1).tolist())  # rows of those groups

        # ALGO LOGIC: log-probs recomputed by the trainer (not taken from the rollout engine) before any update.
        # The rows are shuffled into minibatches first (torch's RNG: a resumed run shuffles alike)
        mb = args.micro_batch_size
        train_batch = train_batch[torch.randperm(len(train_batch)).tolist()]
        train_batch.old_logprobs = sequence_logprobs(model, train_batch, mb)

        # ALGO LOGIC: update, one clipped optimizer step per minibatch (the first at s = 1), micro-batches inside
        N, K = len(train_batch), args.num_minibatches
        bounds = sorted({N * k // K for k in range(K + 1)})  # minibatch sizes differ by <= 1; fewer when N < K
        passes = [train_batch[first:end] for first, end in zip(bounds, bounds[1:])] or [train_batch]  # none: empty
        losses = defaultdict(float)  # each metric weighted by its micro-batch's share of the step, over every pass
        for minibatch in passes:
            normaliser = all_sum(minibatch.sequences)  # the loss's: the global step's responses
            optimizer.zero_grad(set_to_none=True)
            for micro in gradient_accumulation(minibatch, mb, wrapped_model):
                logprobs = batch_logprobs(wrapped_model, micro)  # (n, T), with gradients
                old = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs
                loss, logs = gspo_loss(logprobs, old, micro.advantages, micro.mask,
                                       args.clip_eps_low, args.clip_eps_high)  # fmt: skip
                share = len(micro) / normaliser  # the micro-batch's part of the pass's per-response mean
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
