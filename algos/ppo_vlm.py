"""PPO for vision-language models: Proximal Policy Optimization, a critic and GAE (arXiv 1707.06347), docs/ppo_vlm.md.

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
Each token's reward is a KL penalty to the reference (the last's adds the task's); a critic predicts each token's
return, GAE makes per-token advantages, and epochs of clipped minibatch updates train the policy and the critic.

    python algos/ppo_vlm.py --task counting      # the embedded tiny VLM, laptop CPU, offline (tasks: docs/tasks.md)
    torchrun --nproc-per-node 8 algos/ppo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct \\
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
from common.policy import micro_batches, reference_logprobs  # noqa: E402
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

    # Algorithm specific arguments: PPO
    group_size: int = 8
    """responses per prompt (G); PPO needs no group (the critic is the baseline): G > 1 keeps GRPO's samples per step"""
    beta: float = 0.05
    """KL coefficient to the frozen reference policy (0 = no reference model)"""
    clip_eps: float = 0.2
    """PPO clip range for the importance ratio"""
    gamma: float = 1.0
    """discount over response tokens"""
    gae_lambda: float = 0.95
    """GAE's lambda (1: Monte-Carlo returns minus the value; 0: one-step TD)"""
    update_epochs: int = 2
    """passes over each rollout batch (K epochs in the paper)"""
    num_minibatches: int = 2
    """shuffled minibatches per epoch, one optimizer step each"""
    vf_coef: float = 0.5
    """coefficient of the value loss in the total loss"""
    clip_eps_value: float = 0.2
    """clip range of the value prediction around its rollout-time value"""
    norm_adv: bool = True
    """whiten the advantages over the batch's response tokens (masked mean and std)"""


# ALGO LOGIC: the heart of the algorithm, pure functions (tests/test_<algorithm>_math.py pins them)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total=lambda t: t) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count)."""
    return total((x * mask).sum(dim)) / total(mask.sum(dim)).clamp(min=1)  # dim None: over all positions


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=lambda t: t) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), masked mean and biased variance (TRL's masked_whiten takes the unbiased one: the
    std differs by sqrt(n / (n - 1)) over n tokens); `total`: of the whole batch."""
    mean = masked_mean(x, mask, total=total)
    var = masked_mean((x - mean) ** 2, mask, total=total)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(rewards: torch.Tensor, old_logprobs, ref_logprobs, mask, beta: float) -> torch.Tensor:
    """Per-token rewards (Ouyang et al. 2022, eq. 2): r_t = -beta * (logp_old_t - ref_logp_t), + R on the last token"""
    per_token = -beta * (old_logprobs - ref_logprobs) * mask
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of each response's last trained token
    return per_token.scatter_add(1, last.unsqueeze(1), rewards.unsqueeze(1).to(per_token.dtype))


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """GAE (arXiv 1506.02438, eq. 16), backwards over tokens: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the
    last token), A_t = delta_t + gamma lam A_{t+1}; returns = A + V, the critic's target. Masked positions: 0."""
    advantages = torch.zeros_like(token_rewards)
    next_value = next_advantage = values.new_zeros(len(values))  # after the last token: 0
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        trained = mask[:, t].bool()  # masked positions (padding, tool tokens) pass the next token's on unchanged
        next_value = torch.where(trained, values[:, t], next_value)
        next_advantage = torch.where(trained, advantages[:, t], next_advantage)
    return advantages, (advantages + values) * mask


LOG_RATIO_BOUND = 20.0  # log-ratios are clamped to +-20 (verl's bound): exp of a drifted token's would overflow to inf


def ppo_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float):
    """PPO's clipped surrogate (arXiv 1707.06347, eq. 7): token mean of -min(rho A, clip(rho, 1 +- eps) A), detached
    clip fraction, approx KL(old || new) (k3: (rho - 1) - log rho, as cleanrl logs it)."""
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return -masked_mean(surrogate, mask), masked_mean(clipped, mask).detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip_eps_value: float):
    """The critic's clipped regression (cleanrl's): token mean of 1/2 max((V - R)^2, (V_old + clip(V - V_old) - R)^2)"""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps_value, clip_eps_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, total=lambda t: t) -> float:
    """1 - Var(returns - V) / Var(returns) over the masked tokens (cleanrl's); NaN when the returns do not vary."""
    var_returns = masked_mean((returns - masked_mean(returns, mask, total=total)) ** 2, mask, total=total)
    error = returns - values
    var_error = masked_mean((error - masked_mean(error, mask, total=total)) ** 2, mask, total=total)
    return float("nan") if var_returns == 0 else (1 - var_error / var_returns).item()


def make_value_head(model) -> torch.nn.Linear:
    """The critic: V(s_t) = w . h_t + b on the policy's last hidden state h_t (the LM head's input): zeros, float32."""
    head = torch.nn.Linear(model.get_output_embeddings().in_features, 1, device=model.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def logprobs_and_values(model, value_head, batch):
    """(log-probs, values) of the batch's responses, both (n, T), from one forward of the shared trunk."""
    logprobs, hidden = batch_logprobs(model, batch, hidden_states=True)
    return logprobs, value_head(hidden.float()).squeeze(-1)


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    args.check()  # the flags every script shares (common/args.py), then the algorithm's own
    checks = [
        (args.group_size < 1, f"--group-size {args.group_size}: sample 1 or more responses per prompt"),
        (args.clip_eps <= 0, f"--clip-eps {args.clip_eps}: use a clip range > 0"),
        (args.beta < 0, f"--beta {args.beta}: the KL coefficient is >= 0 (0 = no reference model)"),
        (not 0 <= args.gamma <= 1, f"--gamma {args.gamma}: use a discount in [0, 1]"),
        (not 0 <= args.gae_lambda <= 1, f"--gae-lambda {args.gae_lambda}: use a lambda in [0, 1]"),
        (args.update_epochs < 1, f"--update-epochs {args.update_epochs}: use 1 or more"),
        (args.num_minibatches < 1, f"--num-minibatches {args.num_minibatches}: use 1 or more"),
        (args.vf_coef < 0, f"--vf-coef {args.vf_coef}: the value loss's coefficient is >= 0"),
        (args.clip_eps_value <= 0, f"--clip-eps-value {args.clip_eps_value}: use a clip range > 0"),
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
    args.total_steps = task.ppo_total_steps if args.total_steps is None else args.total_steps
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

    # TRY NOT TO MODIFY: actor (the policy we train), reference (frozen KL anchor)
    model_path = tiny_model_dir(args.task) if args.model == "tiny" else args.model
    model, processor, reference, reference_fingerprint = load_policy(
        model_path, args.dtype, device, with_reference, args.min_pixels, args.max_pixels, args.lora_config(),
        args.freeze_vision_tower, args.gradient_checkpointing, args.dist, run.checkpoint,
        run.state and run.state["reference_fingerprint"])  # fmt: skip
    wrapped_model = wrap(model, args.dist)  # torchrun: FSDP2 shards `model` in place (it is `model`), DDP wraps it

    # ALGO LOGIC: the critic, a value head on the actor's trunk (not a second VLM: docs/ppo_vlm.md), the same optimizer
    value_head = make_value_head(model)
    if run.state:
        value_head.load_state_dict(run.state["value_head"])
    wrapped_value_head, params = wrap(value_head, args.dist), [*model.parameters(), *value_head.parameters()]
    optimizer = make_optimizer(args.optimizer, params, lr=args.lr)  # the weights that require grad

    # TRY NOT TO MODIFY: rollout engine
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

    run.start(model, processor, optimizer, evaluate, reference_fingerprint,
              extra_state=lambda: {"value_head": value_head})  # in each checkpoint, and <run>/value_head.pt at the end

    for step in run.steps():
        lr = args.lr * (1 - (step - 1) / args.total_steps) if args.anneal_lr else args.lr  # linear decay to 0
        optimizer.param_groups[0]["lr"] = lr

        # TRY NOT TO MODIFY: rollout and reward, G responses to each of B prompts (under torchrun, this rank's B / N)
        G, batch = args.group_size, rollout(for_this_rank(random.sample(train_examples, args.prompts_per_step)))

        # ALGO LOGIC: log-probs and values under the sampling policy, log-probs under the reference, by the trainer
        mb = args.micro_batch_size
        with torch.no_grad():
            scored = [logprobs_and_values(model, value_head, batch[rows]) for rows in micro_batches(len(batch), mb)]
        batch.old_logprobs, batch.old_values = (torch.cat(x) for x in zip(*scored))  # (N, T) each
        batch.ref_logprobs = batch.old_logprobs if reference is None else reference_logprobs(reference, batch, mb)

        # ALGO LOGIC: advantage, per token: KL-penalised token rewards, GAE with the critic's values, whitened
        rewards = token_rewards(batch.rewards.to(device), batch.old_logprobs, batch.ref_logprobs, batch.mask, args.beta)
        batch.advantages, batch.returns = gae(rewards, batch.old_values, batch.mask, args.gamma, args.gae_lambda)
        if args.norm_adv:  # whitened over the step's whole batch
            batch.advantages = whiten(batch.advantages, batch.mask, total=batch.total)

        # ALGO LOGIC: update, micro-batches with gradient accumulation, then one clipped optimizer step per minibatch
        splits = [torch.randperm(len(batch)).tensor_split(args.num_minibatches) for _ in range(args.update_epochs)]
        passes, grad_norms = [rows for split in splits for rows in split if len(rows)], []  # one optimizer step each
        losses = defaultdict(float)  # each metric weighted by its micro-batch's share of the step, over every pass
        for minibatch in (batch[rows] for rows in passes):  # update_epochs x num_minibatches shuffled minibatches
            normaliser = all_sum(minibatch.mask.sum())  # the loss's: the global minibatch's response tokens
            optimizer.zero_grad(set_to_none=True)
            for micro in gradient_accumulation(minibatch, mb, wrapped_model, wrapped_value_head):
                logprobs, values = logprobs_and_values(wrapped_model, wrapped_value_head, micro)  # (n, T) each
                pg_loss, clip, kl = ppo_loss(logprobs, micro.old_logprobs, micro.advantages, micro.mask, args.clip_eps)
                v_loss, v_clip = value_loss(values, micro.old_values, micro.returns, micro.mask, args.clip_eps_value)
                loss = pg_loss + args.vf_coef * v_loss
                share = (micro.mask.sum() / normaliser).item()  # token means: the micro-batch's part of the tokens
                (loss * share).backward()
                logs = {"losses/loss": loss, "losses/policy_loss": pg_loss, "losses/value_loss": v_loss,
                        "losses/clipfrac": clip, "losses/approx_kl": kl, "losses/value_clipfrac": v_clip}
                for name, value in logs.items():
                    losses[name] += value.item() * share / len(passes)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
            grad_norms.append(grad_norm)
            if normaliser > 0 and math.isfinite(grad_norm) and all(map(math.isfinite, losses.values())):
                optimizer.step()
            elif normaliser > 0:
                tqdm.write(f"warning: step {step}: non-finite loss or grad norm ({grad_norm}); update skipped")
        optimizer.zero_grad(set_to_none=True)  # free the gradients now: the next rollout needs the memory
        # the sampling policy's KL to the reference (k3, as GRPO logs it) and entropy per response: this part's share
        d, mask, responses = batch.ref_logprobs - batch.old_logprobs, batch.mask, args.prompts_per_step * G  # B*G
        losses["losses/kl"] = masked_mean(torch.exp(d) - d - 1, mask, dim=1).sum().item() / responses
        losses["losses/entropy"] = -masked_mean(batch.old_logprobs, mask, dim=1).sum().item() / responses
        critic = {"charts/value_mean": masked_mean(batch.old_values, mask, total=batch.total).item(),
                  "losses/explained_variance": explained_variance(batch.old_values, batch.returns, mask, batch.total)}
        grad_norm = sum(grad_norms) / len(grad_norms)  # mean over the minibatch updates

        # TRY NOT TO MODIFY: log / eval / save (under torchrun: over every rank's rollouts, rank 0 writes)
        run.log({"charts/learning_rate": lr, "losses/grad_norm": grad_norm, **critic}, batch, summed_over_ranks=losses)
    run.finish()  # <run>/model (or <run>/adapter), the summary line


if __name__ == "__main__":
    main(tyro.cli(Args))
