"""DAPO for vision-language models: Decoupled Clip and Dynamic sAmpling (arXiv 2503.14476), docs/dapo_vlm.md.

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
GRPO without its KL term, plus clip-higher, dynamic sampling, a token-level loss and a soft overlong penalty.

    python algos/dapo_vlm.py --task counting     # the embedded tiny VLM, laptop CPU, offline (tasks: docs/tasks.md)
    torchrun --nproc-per-node 8 algos/dapo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct \\
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
from common.policy import draw_examples, sequence_logprobs  # noqa: E402
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

    # Algorithm specific arguments: DAPO (no KL term, so no reference model)
    group_size: int = 8
    """responses per prompt (G); the group mean is the baseline, so at least 2"""
    clip_eps: float = 0.2
    """PPO clip range for the importance ratio"""
    clip_eps_high: float = 0.28
    """upper clip range (clip-higher): the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]"""
    updates_per_step: int = 1
    """optimizer passes over each rollout batch (mu in the paper; >1 makes the ratio and clipping active)"""
    skip_zero_advantage_groups: bool = True
    """leave groups whose rewards are all equal out of the update (their advantage is 0): saves their compute"""
    max_resample_rounds: int = 4
    """dynamic sampling: groups whose rewards are all equal refilled from up to this many more rollouts (0 = off)"""
    overlong_buffer: float = 0.2
    """soft overlong punishment: the reward falls by up to 1 over this last share of --max-new-tokens (0 = off)"""


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


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13): min(0, (L_max - L_cache - |y|) / L_cache) >= -1, L_max = max_tokens."""
    cache = buffer * max_tokens
    return ((max_tokens - cache - lengths) / cache).clamp(-1, 0) if cache else torch.zeros_like(lengths)


LOG_RATIO_BOUND = 20.0  # log-ratios are clamped to +-20 (verl's bound): exp of a drifted token's would overflow to inf


def dapo_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float, clip_eps_high: float):
    """DAPO's clipped surrogate (eq. 8), no KL term, negated for minimisation:
        rho   = exp(clamp(logp - old_logp, +-20))                   per token
        surr  = min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)      clip-higher: eps_high > eps
        loss  = -(1 / sum_i |y_i|) sum_i sum_t surr                 token-level: every token counts once
    the log-probs and mask: (N, T); advantages: (N,), one per sequence.
    Returns (loss, its losses/* metrics)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    adv = advantages.unsqueeze(1)  # (N, 1): the sequence's advantage on each of its tokens
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps_high) * adv)
    loss = -masked_mean(surrogate, mask)
    clipped = ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps_high)).float()
    entropy = -masked_mean(logprobs.detach(), mask)  # -log p of the sampled tokens, a token mean as the loss
    return loss, {"losses/loss": loss, "losses/clipfrac": masked_mean(clipped, mask), "losses/entropy": entropy}


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    args.check()  # the flags every script shares (common/args.py), then the algorithm's own
    checks = [
        (args.group_size < 2, f"--group-size {args.group_size}: the baseline is the group's mean, use 2 or more"),
        (args.clip_eps <= 0, f"--clip-eps {args.clip_eps}: use a clip range > 0"),
        (args.clip_eps_high <= 0, f"--clip-eps-high {args.clip_eps_high}: use an upper clip range > 0 (DAPO: 0.28)"),
        (not 0 <= args.overlong_buffer <= 1, f"--overlong-buffer {args.overlong_buffer}: use a share in [0, 1]"),
        (args.max_resample_rounds < 0, f"--max-resample-rounds {args.max_resample_rounds}: use 0 (off) or more"),
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

        # ALGO LOGIC: dynamic sampling (Algorithm 1): groups whose rewards are all equal give their places to new ones
        resampled = 0  # prompts rolled out again; the charts, as the update, describe the refilled batch
        for _ in range(args.max_resample_rounds):
            empty = (batch.rewards.view(-1, G).std(dim=1) == 0).nonzero().squeeze(1).tolist()
            if not (more := draw_examples(train_examples, len(empty))):  # torchrun: as many on every rank
                break
            new, resampled = rollout(more), resampled + len(empty)
            batch = sampler.refill(batch, empty, new, new.rewards.view(-1, G).std(dim=1) > 0)  # slot by slot

        # ALGO LOGIC: advantage, group-normalised reward, one per sequence
        longest = args.max_new_tokens * (args.max_turns if task.tools else 1)  # model-written tokens at most
        shaped = batch.rewards + overlong_penalty(batch.mask.sum(1).cpu(), longest, args.overlong_buffer)
        batch.advantages = group_advantages(shaped, G).to(device)  # (B*G,): the overlong penalty in the reward
        informative = batch.rewards.view(-1, G).std(dim=1) > 0  # (B,): groups whose rewards differ
        trained = informative if args.skip_zero_advantage_groups else torch.ones_like(informative)
        train_batch = batch.keep(trained.repeat_interleave(G).nonzero().squeeze(1).tolist())  # rows of those groups

        # ALGO LOGIC: log-probs recomputed by the trainer (not taken from the rollout engine) before any update.
        # With one pass per rollout the sampling policy is the current model: old_logprobs is the pass's own, rho = 1
        mb = args.micro_batch_size
        if args.updates_per_step > 1:
            train_batch.old_logprobs = sequence_logprobs(model, train_batch, mb)

        # ALGO LOGIC: update, micro-batches with gradient accumulation, then one clipped optimizer step per pass
        passes = [train_batch] * args.updates_per_step  # one optimizer step each
        losses = defaultdict(float)  # each metric weighted by its micro-batch's share of the step, over every pass
        for minibatch in passes:
            normaliser = all_sum(minibatch.mask.sum().item())  # the loss's: the global step's tokens
            optimizer.zero_grad(set_to_none=True)
            for micro in gradient_accumulation(minibatch, mb, wrapped_model):
                logprobs = batch_logprobs(wrapped_model, micro)  # (n, T), with gradients
                old = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs
                loss, logs = dapo_loss(logprobs, old, micro.advantages, micro.mask, args.clip_eps, args.clip_eps_high)
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
        losses["charts/resampled_prompts"] = resampled  # summed over ranks, as the losses' shares are

        # TRY NOT TO MODIFY: log / eval / save (under torchrun: over every rank's rollouts, rank 0 writes)
        run.log({"charts/learning_rate": lr, "losses/grad_norm": grad_norm}, batch, summed_over_ranks=losses)
    run.finish()  # <run>/model (or <run>/adapter), the summary line


if __name__ == "__main__":
    main(tyro.cli(Args))
