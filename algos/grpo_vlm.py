"""GRPO for vision-language models: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300).

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (here: is the count right?). For each prompt we sample a group of G
responses, score each, and push up the tokens of responses that beat their group's mean.

    python algos/grpo_vlm.py --task counting                      # embedded tiny VLM, laptop CPU, offline
    python algos/grpo_vlm.py --task counting --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --dataset BUAADreamer/clevr_count_70k --dtype bfloat16 --lr 1e-6 --max-new-tokens 256 --track

Docs: README.md ("The GRPO script"). Not meant to be imported except for the pure functions the tests pin.
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common import tasks  # noqa: E402
from common.tiny_vlm import tiny_model_dir  # noqa: E402
from common.vlm import (  # noqa: E402
    build_prompts,
    generate,
    greedy_accuracy,
    load_vlm,
    response_logprobs,
    response_mask,
    select,
    suppressed_token_ids,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "vlrl"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    output_dir: str = "runs"
    """metrics.jsonl and the trained model go to <output_dir>/<run_name>/"""

    # Task and model
    task: str = "counting"
    """which task: counting"""
    dataset: str | None = None
    """a real dataset (hub id or local dir) in the task's schema; default: the task's offline synthetic twin"""
    model: str = "tiny"
    """hub id or local checkpoint dir; 'tiny' = the embedded tiny Qwen2-VL (built and cached on first use)"""
    dtype: str = "float32"
    """float32 or bfloat16 for the weights"""
    train_size: int = 20000
    """number of training examples to sample prompts from"""
    eval_size: int = 200
    """number of held-out examples for eval/accuracy (greedy decoding)"""

    # Algorithm specific arguments
    total_steps: int = 450
    """number of rollout + update steps"""
    prompts_per_step: int = 16
    """prompts per step (B); each gets group_size responses"""
    group_size: int = 8
    """responses per prompt (G); the group mean is the baseline, so at least 2"""
    max_new_tokens: int = 8
    """response length limit in tokens"""
    max_prompt_tokens: int = 512
    """longest prompt allowed, image tokens included (never truncated: too long is an error)"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed at the same temperature)"""
    lr: float = 2e-4
    """AdamW learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over total_steps (late updates are the noisiest)"""
    beta: float = 0.1
    """KL coefficient to the frozen reference policy (0 = no reference model)"""
    clip_eps: float = 0.2
    """PPO clip range for the importance ratio"""
    updates_per_step: int = 1
    """optimizer passes over each rollout batch (mu in the paper; >1 makes the ratio and clipping active)"""
    micro_batch_size: int = 64
    """sequences per forward/backward; gradients accumulate over the step's B*G sequences"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    skip_zero_advantage_groups: bool = True
    """leave groups whose rewards are all equal out of the update (their advantage is 0; only their KL term
    would remain): saves their forward and backward passes, as DAPO's dynamic sampling does (arXiv 2503.14476)"""
    format_reward: float = 0.0
    """reward for a well-formed but wrong answer (accuracy is 1.0)"""
    eval_every: int = 25
    """evaluate on the held-out set every this many steps"""


# ALGO LOGIC: the heart of GRPO, pure functions (tests/test_grpo_math.py pins them)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage (DeepSeekMath eq. 3, arXiv 2402.03300): per group of G responses to one prompt,
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps). rewards: (B*G,) ordered group by group. Returns (B*G,).
    A group whose rewards are all equal gets A = 0: it teaches nothing."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps: float, beta: float):
    """GRPO's clipped surrogate with a k3 KL penalty (DeepSeekMath eq. 3-4), negated for minimisation:
        rho   = exp(logp - old_logp)                               per token
        surr  = min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)
        kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1      (k3: >= 0, unbiased)
        loss  = -mean_i [ (1/|y_i|) sum_t (surr - beta * kl) ]
    logprobs, old_logprobs, ref_logprobs, mask: (N, T); advantages: (N,), one per sequence.
    Returns (loss, kl, clip fraction); kl and clip fraction are token means for logging."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)  # (N, 1): the sequence's advantage on each of its tokens
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logprobs - logprobs
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = surrogate - beta * kl
    loss = -masked_mean(per_token, mask, dim=1).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, masked_mean(kl, mask).detach(), masked_mean(clipped, mask).detach()


def main(args: Args):
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO's baseline is the group mean, use --group-size 2 or more")
    if args.dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype {args.dtype}: choose float32 or bfloat16")
    start_time = time.time()  # the logged "time" counts from here, so it includes a first-run model build
    run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(start_time)}"
    run_dir = os.path.join(args.output_dir, run_name)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() and args.cuda else "cpu"

    # Setup: task data, actor (the policy we train), reference (frozen KL anchor), optimizer
    reward_fn = tasks.reward_fn(args.task)
    train_examples = tasks.load_task(args.task, "train", args.train_size, args.dataset)
    eval_examples = tasks.load_task(args.task, "eval", args.eval_size, args.dataset)
    model_path = tiny_model_dir(args.task) if args.model == "tiny" else args.model
    dtype = getattr(torch, args.dtype)
    model, processor = load_vlm(model_path, dtype, device)
    model.train()
    ref_model = load_vlm(model_path, dtype, device)[0].eval().requires_grad_(False) if args.beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    eos_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    suppressed = suppressed_token_ids(processor)  # masked in sampling and in scoring alike

    os.makedirs(run_dir, exist_ok=True)
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name, save_code=True)

    def log(record):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if args.track:
            wandb.log(record, step=record["step"])

    def evaluate():  # held-out accuracy, greedy decoding
        return greedy_accuracy(model, processor, eval_examples, reward_fn, args.max_new_tokens, args.max_prompt_tokens)

    first_accuracy = last_accuracy = evaluate()
    log({"step": 0, "eval/accuracy": first_accuracy, "time": round(time.time() - start_time, 2)})
    progress = tqdm(range(1, args.total_steps + 1), desc="grpo", dynamic_ncols=True)
    step = 0
    try:
        for step in progress:
            step_start = time.time()
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.lr * (1 - (step - 1) / args.total_steps)
            batch = random.sample(train_examples, args.prompts_per_step)
            prompts = build_prompts(processor, [e.image for e in batch], [e.question for e in batch], args.max_prompt_tokens)
            prompts = prompts.to(device)
            G = args.group_size

            # ALGO LOGIC 1. rollout: G samples per prompt, ordered p0 x G, p1 x G, ...
            model.eval()
            response_ids = generate(model, processor, prompts, G, args.max_new_tokens, args.temperature, greedy=False)
            model.train()
            mask = response_mask(response_ids, eos_id)  # (B*G, T)
            inputs = select(prompts, [i for i in range(len(batch)) for _ in range(G)])  # each prompt G times
            completions = processor.tokenizer.batch_decode(response_ids, skip_special_tokens=True)

            # ALGO LOGIC 2. reward: the task's rule on the decoded text
            answers = [e.answer for e in batch for _ in range(G)]
            rewards = torch.tensor([reward_fn(c, a, args.format_reward) for c, a in zip(completions, answers)])

            # ALGO LOGIC 3. advantage: group-normalised reward, one per sequence
            advantages = group_advantages(rewards, G).to(device)  # (B*G,)
            response_lengths = mask.sum(1)  # for logging, before any filtering
            zero_advantage_groups = (rewards.view(-1, G).std(1) == 0).float().mean().item()
            if args.skip_zero_advantage_groups:  # all-equal groups have A = 0 everywhere: skip their compute
                keep = (rewards.view(-1, G).std(1) > 0).repeat_interleave(G).nonzero().squeeze(1).tolist()
                inputs, response_ids, mask, advantages = select(inputs, keep), response_ids[keep], mask[keep], advantages[keep]

            # log-probs under the sampling policy and under the reference, recomputed by the trainer (not taken
            # from the rollout engine). With one update per rollout the sampling policy is the current model, so
            # old_logprobs is the update's own forward, detached: a forward pass saved (rho = 1 exactly).
            N, mb = len(advantages), args.micro_batch_size

            def score(m):  # log-probs of the N responses under model m, micro-batch by micro-batch: (N, T)
                chunks = [
                    response_logprobs(m, select(inputs, range(s, min(s + mb, N))), response_ids[s : s + mb], mask[s : s + mb], suppressed, args.temperature)
                    for s in range(0, N, mb)
                ]  # fmt: skip
                return torch.cat(chunks) if chunks else torch.zeros_like(mask)

            with torch.no_grad():
                old_logprobs = score(model) if args.updates_per_step > 1 else None
                ref_logprobs = score(ref_model) if ref_model is not None else None

            # ALGO LOGIC 4. update: micro-batches with gradient accumulation, then one clipped optimizer step
            for _ in range(args.updates_per_step):
                optimizer.zero_grad(set_to_none=True)
                kls, clipfracs, losses, entropies = [], [], [], []
                for s in range(0, N, mb):
                    e = min(s + mb, N)
                    logprobs = response_logprobs(model, select(inputs, range(s, e)), response_ids[s:e], mask[s:e], suppressed, args.temperature)
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[s:e]
                    ref = logprobs.detach() if ref_logprobs is None else ref_logprobs[s:e]  # beta = 0: KL term is 0
                    loss, kl, clipfrac = grpo_loss(logprobs, old, ref, advantages[s:e], mask[s:e], args.clip_eps, args.beta)
                    entropies.append(-masked_mean(logprobs.detach(), mask[s:e]).item() * (e - s) / N)
                    (loss * (e - s) / N).backward()  # the step's loss is the mean over all N sequences
                    kls.append(kl.item()), clipfracs.append(clipfrac.item()), losses.append(loss.item() * (e - s) / N)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                if math.isfinite(grad_norm) and all(map(math.isfinite, losses)):
                    optimizer.step()
                else:
                    tqdm.write(f"warning: step {step}: non-finite loss or grad norm ({grad_norm}); update skipped")

            # 5. log / eval / save
            record = {
                "step": step,
                "time": round(time.time() - start_time, 2),
                "charts/reward_mean": rewards.mean().item(),
                "charts/reward_std": rewards.std().item(),
                "charts/accuracy": (rewards == 1.0).float().mean().item(),
                "charts/response_length": response_lengths.mean().item(),
                "charts/zero_advantage_groups": zero_advantage_groups,
                "charts/step_time": round(time.time() - step_start, 3),
                "charts/tokens_per_second": response_lengths.sum().item() / (time.time() - step_start),
                "losses/loss": sum(losses),
                "losses/kl": sum(kls) / max(len(kls), 1),
                "losses/clipfrac": sum(clipfracs) / max(len(clipfracs), 1),
                "losses/entropy": sum(entropies),  # -log p of the sampled tokens: a Monte Carlo entropy estimate
                "losses/grad_norm": grad_norm,
            }
            if step % args.eval_every == 0 or step == args.total_steps:
                last_accuracy = evaluate()
                record["eval/accuracy"] = last_accuracy
            log(record)
            progress.set_postfix(reward=f"{record['charts/reward_mean']:.2f}", eval_acc=f"{last_accuracy:.3f}")
    except KeyboardInterrupt:
        tqdm.write(f"interrupted at step {step}: saving what was trained so far")
    model.save_pretrained(os.path.join(run_dir, "model"))
    processor.save_pretrained(os.path.join(run_dir, "model"))
    metrics_file.close()
    print(f"eval/accuracy {first_accuracy:.3f} → {last_accuracy:.3f} in {time.time() - start_time:.0f}s; model and metrics in {run_dir}")
    if args.track:
        wandb.finish()


if __name__ == "__main__":
    main(tyro.cli(Args))
