"""RLOO for vision-language models: REINFORCE Leave-One-Out (arXiv 2402.14740), docs/rloo_vlm.md.

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
For each prompt we sample G responses and push up the tokens of those that beat the mean of the other G - 1.

    python algos/rloo_vlm.py --task counting     # the embedded tiny VLM, laptop CPU, offline (tasks: docs/tasks.md)
    torchrun --nproc-per-node 8 algos/rloo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct \\
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
from common.policy import reference_logprobs, sequence_logprobs  # noqa: E402
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

    # Algorithm specific arguments: RLOO
    group_size: int = 8
    """responses per prompt (G); each one's baseline is the mean of the other G - 1, so at least 2"""
    beta: float = 0.1
    """KL coefficient to the frozen reference policy (0 = no reference model)"""
    clip_eps: float = 0.2
    """PPO clip range for the importance ratio"""
    updates_per_step: int = 1
    """optimizer passes over each rollout batch (mu in the paper; >1 makes the ratio and clipping active)"""
    skip_zero_advantage_groups: bool = True
    """leave groups whose rewards are all equal out of the update (their advantage is 0): saves their compute"""


# ALGO LOGIC: the heart of the algorithm, pure functions (tests/test_<algorithm>_math.py pins them)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count)."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)  # dim None: over all positions


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage (Ahmadian et al. 2024, arXiv 2402.14740, eq. 6; Kool et al. 2019): per group of G responses
    to one prompt, A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean_j r_j). Unlike GRPO, no
    division by the group's std. rewards: (B*G,) ordered group by group. Returns (B*G,)."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).view(-1)


LOG_RATIO_BOUND = 20.0  # log-ratios are clamped to +-20 (verl's bound): exp of a drifted token's would overflow to inf


def rloo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps: float, beta: float):
    """REINFORCE with the leave-one-out advantage, as a clipped surrogate with a k3 KL penalty (GRPO's form): with
    one update per rollout rho = 1 and its gradient is the paper's A_i grad log pi, averaged per token. The KL sits
    here, not in the reward as in the paper and TRL: there KL noise alone would make every group's rewards unequal
    (no group could be skipped) and cost a forward pass of the sampler each step.
        rho   = exp(logp - old_logp)                                per token
        surr  = min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)
        kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1        (k3: >= 0, unbiased; Schulman 2020)
        loss  = -mean_i [ (1/|y_i|) sum_t (surr - beta * kl) ]      a mean per response, then over responses
    the log-probs and mask: (N, T); advantages: (N,), one per sequence.
    Returns (loss, its losses/* metrics)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    adv = advantages.unsqueeze(1)  # (N, 1): the sequence's advantage on each of its tokens
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    loss = -masked_mean(surrogate - beta * kl, mask, dim=1).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    entropy = -masked_mean(logprobs.detach(), mask, dim=1).mean()  # -log p of the sampled tokens
    kl, clipfrac = masked_mean(kl, mask, dim=1).mean(), masked_mean(clipped, mask, dim=1).mean()
    return loss, {"losses/loss": loss, "losses/kl": kl, "losses/clipfrac": clipfrac, "losses/entropy": entropy}


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    args.check()  # the flags every script shares (common/args.py), then the algorithm's own
    checks = [
        (args.group_size < 2, f"--group-size {args.group_size}: the baseline is the group's mean, use 2 or more"),
        (args.clip_eps <= 0, f"--clip-eps {args.clip_eps}: use a clip range > 0"),
        (args.beta < 0, f"--beta {args.beta}: the KL coefficient is >= 0 (0 = no reference model)"),
        (args.updates_per_step < 1, f"--updates-per-step {args.updates_per_step}: use 1 or more"),
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

    # ALGO LOGIC: the KL term's anchor, a frozen reference policy (the initial one)
    with_reference = args.beta > 0

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

        # ALGO LOGIC: advantage, reward minus the mean reward of the group's other responses, one per sequence
        batch.advantages = rloo_advantages(batch.rewards, G).to(device)  # (B*G,)
        informative = batch.rewards.view(-1, G).std(dim=1) > 0  # (B,): groups whose rewards differ
        trained = informative if args.skip_zero_advantage_groups else torch.ones_like(informative)
        train_batch = batch.keep(trained.repeat_interleave(G).nonzero().squeeze(1).tolist())  # rows of those groups

        # ALGO LOGIC: log-probs recomputed by the trainer (not taken from the rollout engine) before any update.
        # With one pass per rollout the sampling policy is the current model: old_logprobs is the pass's own, rho = 1
        mb = args.micro_batch_size
        if args.updates_per_step > 1:
            train_batch.old_logprobs = sequence_logprobs(model, train_batch, mb)
        if reference is not None:  # and under the reference, for the KL term
            train_batch.ref_logprobs = reference_logprobs(reference, train_batch, mb)

        # ALGO LOGIC: update, micro-batches with gradient accumulation, then one clipped optimizer step per pass
        passes = [train_batch] * args.updates_per_step  # one optimizer step each
        losses = defaultdict(float)  # each metric weighted by its micro-batch's share of the step, over every pass
        for minibatch in passes:
            normaliser = all_sum(minibatch.sequences)  # the loss's: the global step's responses
            optimizer.zero_grad(set_to_none=True)
            for micro in gradient_accumulation(minibatch, mb, wrapped_model):
                logprobs = batch_logprobs(wrapped_model, micro)  # (n, T), with gradients
                old = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs
                ref = logprobs.detach() if micro.ref_logprobs is None else micro.ref_logprobs  # beta 0: KL 0
                loss, logs = rloo_loss(logprobs, old, ref, micro.advantages, micro.mask, args.clip_eps, args.beta)
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
