"""GSPO for vision-language models: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071).

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
For each prompt we sample a group of G responses, score each, and push up the responses that beat their group's
mean (GRPO's advantage), with one importance ratio per response instead of per token: the geometric mean of its
token ratios, clipped to a narrow band, over several minibatch updates per rollout.

    python algos/gspo_vlm.py --task counting                      # embedded tiny VLM, laptop CPU, offline
    python algos/gspo_vlm.py --task math                          # ... numbers drawn in the image, \\boxed{} sums
    python algos/gspo_vlm.py --task grounding                     # ... boxes, reward = IoU
    python algos/gspo_vlm.py --task zoom                          # ... agentic: a zoom tool, several turns per episode
    python algos/gspo_vlm.py --task counting --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --dataset BUAADreamer/clevr_count_70k --dtype bfloat16 --lora --lr 1e-5 --max-new-tokens 256 --track
    torchrun --nproc-per-node 8 algos/gspo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct ...   # FSDP2

Docs: docs/gspo_vlm.md. Not meant to be imported except for the pure functions the tests pin.
"""

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common import tasks  # noqa: E402
from common.dist import accumulate, all_max, all_mean, all_sum, even_rows, gather, init, rank, shard, split_map, world_size, wrap  # noqa: E402
from common.optim import make_optimizer, memory_plan  # noqa: E402
from common.policy import load_policy, micro_batch_logprobs, sample, sequence_logprobs  # noqa: E402
from common.rollout import make_rollout_engine  # noqa: E402
from common.runs import StopSignals, check_flags, latest_checkpoint, load_optimizer, resumed_args, save_checkpoint, save_policy, set_rng_states, start_run  # noqa: E402
from common.tiny_vlm import tiny_model_dir  # noqa: E402
from common.vlm import box_frame, build_prompts, greedy_rewards, select, suppressed_token_ids  # noqa: E402


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
    """metrics.jsonl, checkpoints and the trained model go to <output_dir>/<run_name>/"""
    save_every: int = 50
    """save a checkpoint (policy, optimizer state, step, RNG states) every this many steps; 0 = none"""
    resume: str | None = None
    """continue the run in this run directory from its latest checkpoint, with the flags it was started with"""

    # Task and model
    task: Literal["counting", "math", "grounding", "zoom", "mat-search", "mat-coding"] = "counting"
    """which task: counting, math (sum of drawn numbers; Geometry3K with --dataset), grounding (box of a described
    object; RefCOCO with --dataset), zoom (agentic: the answer needs a tool call) or mat-search / mat-coding (agentic,
    --dataset only: a search tool, a sandboxed Python tool; docs/tasks.md#agentic-tasks)"""
    dataset: str | None = None
    """a real dataset (hub id or local dir) in the task's schema; default: the task's offline synthetic twin"""
    model: str = "tiny"
    """hub id or local checkpoint dir; 'tiny' = the embedded tiny Qwen2-VL (built and cached on first use)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """float32 or bfloat16 for the weights"""
    train_size: int = 20000
    """number of training examples to sample prompts from"""
    eval_size: int = 200
    """number of held-out examples for eval/accuracy (greedy decoding)"""
    min_pixels: int | None = None
    """Qwen-VL: smallest image area in pixels after the processor's resize (default: the checkpoint's own)"""
    max_pixels: int | None = None
    """Qwen-VL: largest image area in pixels after the processor's resize; fewer pixels = fewer image tokens
    (default: the checkpoint's own)"""

    # Memory and parameter-efficiency
    lora: bool = False
    """train LoRA adapters (peft) on the language model's linear layers instead of all weights; the reference
    policy is then the same model with its adapters disabled (no second copy in memory)"""
    lora_rank: int = 16
    """LoRA rank r"""
    lora_alpha: int = 32
    """LoRA alpha: the adapter's update B·A is scaled by alpha / r"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input while training (0 keeps the trained policy equal to the sampled one)"""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """names of the linear layers that get adapters (Qwen-style names), never inside the vision tower"""
    lora_merge: bool = False
    """with --lora, also save the merged full model (base + adapters) to <run>/model; the adapter goes to <run>/adapter"""
    gradient_checkpointing: bool = False
    """keep only each layer's input in the forward pass and recompute the layer in backward: less activation
    memory for one more forward pass"""
    freeze_vision_tower: bool = False
    """do not train the vision encoder (its weights stay exactly as loaded, and it gets no optimizer state)"""

    # Training
    total_steps: int | None = None
    """number of rollout + update steps (default: the task's: 400 for counting, 450 for math, 250 for grounding,
    whose steps are longer)"""
    prompts_per_step: int = 16
    """prompts per step (B); each gets group_size responses"""
    max_new_tokens: int | None = None
    """response length limit in tokens (default: enough for the synthetic task's answer: 8, or 24 for grounding)"""
    max_prompt_tokens: int = 512
    """longest prompt allowed, image tokens included (never truncated: too long is an error)"""
    max_turns: int = 3
    """agentic tasks: model turns per episode at most (each up to --max-new-tokens; a tool's result comes between two)"""
    train_turns: Literal["all", "last"] = "all"
    """agentic tasks: train every model-written token of every turn (all), or only the last turn's (last: RLLaVA's way,
    an ablation); tool-written tokens are never trained on"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed at the same temperature)"""
    lr: float = 2e-4
    """AdamW learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over total_steps (late updates are the noisiest)"""
    micro_batch_size: int = 64
    """sequences per forward/backward; gradients accumulate over the step's B*G sequences"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    format_reward: float = 0.0
    """reward for a well-formed but wrong answer (a right one earns 1.0; grounding earns its IoU)"""
    eval_every: int = 25
    """evaluate on the held-out set every this many steps"""
    optimizer: Literal["adamw", "adamw8bit", "adamw8bit-offload"] = "adamw"
    """adamw (torch), adamw8bit (bitsandbytes' 8-bit moments, on the weights' device) or adamw8bit-offload (8-bit
    moments and an fp32 copy of the weights on the CPU; the device keeps only weights and gradients)"""
    dist: Literal["fsdp", "ddp"] = "fsdp"
    """under torchrun: fsdp (FSDP2 shards weights, gradients and optimizer state over the ranks) or ddp (a full replica
    per rank, gradients all-reduced); a single process ignores it (docs/grpo_vlm.md#torchrun)"""
    rollout_engine: Literal["auto", "hf", "vllm"] = "auto"
    """who samples the rollouts: hf (HF generate), vllm (a vLLM engine co-located with the trainer, asleep while it
    trains) or auto (vLLM when it is installed and there is a GPU, else HF generate); one printed line says which"""

    # Algorithm specific arguments: GSPO (no KL term, so no reference model)
    group_size: int = 8
    """responses per prompt (G); the group mean is the baseline, so at least 2"""
    clip_eps_low: float = 3e-4
    """the sequence ratio's clip range below 1: a response with s_i < 1 - clip_eps_low is pushed down no further"""
    clip_eps_high: float = 4e-4
    """the sequence ratio's clip range above 1: a response with s_i > 1 + clip_eps_high is pushed up no further"""
    num_minibatches: int = 4
    """optimizer steps per rollout, each on 1/num_minibatches of its sequences, shuffled (the clip acts from the second)"""
    skip_zero_advantage_groups: bool = True
    """leave groups whose rewards are all equal out of the update (their advantage is 0, so is their loss): saves
    their forward and backward passes, as DAPO's dynamic sampling does (arXiv 2503.14476)"""


# ALGO LOGIC: the heart of GSPO, pure functions (tests/test_gspo_math.py pins them)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count)."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)  # dim None: over all positions


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage (DeepSeekMath eq. 3, arXiv 2402.03300): per group of G responses to one prompt,
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps). rewards: (B*G,) ordered group by group. Returns (B*G,).
    A group whose rewards are all equal gets A = 0: it teaches nothing."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def gspo_loss(logprobs, old_logprobs, advantages, mask, clip_eps_low: float, clip_eps_high: float):
    """GSPO's clipped sequence-level surrogate (Zheng et al. 2025, arXiv 2507.18071, eq. 5), negated for minimisation:
        s_i  = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp( (1/|y_i|) sum_t (logp - old_logp) )   one ratio per response
        loss = -mean_i min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i)               no KL term
    logprobs, old_logprobs, mask: (N, T); advantages: (N,), one per sequence. Returns (loss, clip fraction): the
    fraction of responses the clip takes out of the gradient (s_i past the bound on the side A_i pushes towards)."""
    seq_ratio = torch.exp(masked_mean(logprobs - old_logprobs, mask, dim=1))  # (N,): geometric mean of token ratios
    surrogate = torch.min(seq_ratio * advantages, torch.clamp(seq_ratio, 1 - clip_eps_low, 1 + clip_eps_high) * advantages)
    clipped = ((advantages > 0) & (seq_ratio > 1 + clip_eps_high)) | ((advantages < 0) & (seq_ratio < 1 - clip_eps_low))
    return -surrogate.mean(), clipped.float().mean()


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    check_flags(args)  # the flags every script shares (common/runs.py), then GSPO's own
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GSPO's baseline is the group mean, use --group-size 2 or more")
    if args.clip_eps_low <= 0 or args.clip_eps_high <= 0:
        raise SystemExit(f"--clip-eps-low {args.clip_eps_low} --clip-eps-high {args.clip_eps_high}: use clip ranges > 0 (the paper: 3e-4, 4e-4)")
    if args.num_minibatches < 1:
        raise SystemExit(f"--num-minibatches {args.num_minibatches}: use 1 or more (1 = on-policy: s = 1, the clip never acts)")


def main(args: Args):
    checkpoint = state = None
    if args.resume is not None:  # the run's own flags, from its latest checkpoint
        args, checkpoint, state = resumed_args(args, Args())
    if args.max_new_tokens is None:  # the task's defaults, filled in at runtime
        args.max_new_tokens = tasks.MAX_NEW_TOKENS[args.task]
    if args.total_steps is None:
        args.total_steps = tasks.TOTAL_STEPS[args.task]
    check_args(args)
    stop = StopSignals(log=tqdm.write)  # Ctrl-C / kill: finish the step, save, exit
    try:
        train(args, checkpoint, state, stop)
    except KeyboardInterrupt:  # during setup: nothing trained yet
        raise SystemExit("interrupted before the first step: nothing was trained") from None
    finally:
        stop.restore()


def train(args: Args, checkpoint: str | None, state: dict | None, stop: StopSignals):
    start_time = time.time() - (state["time"] if checkpoint else 0)  # the logged "time" continues over a resume

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = init(args.cuda)  # under torchrun: join the process group, this rank's GPU

    # TRY NOT TO MODIFY: task data, whose prompts must fit --max-prompt-tokens (checked before any weights load)
    train_examples, eval_examples = tasks.load_data(args)

    # TRY NOT TO MODIFY: actor (the policy we train), reference (frozen KL anchor), optimizer, rollout engine
    model_path = tiny_model_dir(args.task) if args.model == "tiny" else args.model
    model, processor, reference, reference_fingerprint = load_policy(args, model_path, checkpoint, state, device)
    trainer = wrap(model, args.dist)  # torchrun: FSDP2 shards `model` in place (trainer is model), DDP wraps it
    optimizer = make_optimizer(args.optimizer, model.parameters(), lr=args.lr)  # the weights that require grad
    if checkpoint:
        load_optimizer(optimizer, checkpoint)
    if world_size() > 1:
        torch.manual_seed(args.seed + rank())  # the same initial weights everywhere, each rank's own sampling noise
    rollout_engine = make_rollout_engine(args.rollout_engine, model_path, processor, getattr(torch, args.dtype), args.seed, args.max_turns * (args.max_prompt_tokens + args.max_new_tokens), args.max_turns)
    engine_bytes = rollout_engine.memory_bytes(model) if rollout_engine is not None else None
    print(memory_plan(model, optimizer, reference, engine_bytes))  # each tensor once: a LoRA reference is the policy
    reward_fn = tasks.reward_fn(args.task, box_frame(model, processor))  # grounding: boxes in the family's frame
    tools = tasks.tools(args.task)  # agentic tasks: the tools an episode may call (None: one-turn responses)
    suppressed = suppressed_token_ids(processor)  # masked in sampling and in scoring alike

    # TRY NOT TO MODIFY: the run directory (a new one, or the resumed one) and logging
    run_dir, records, log, finish = start_run(args, checkpoint, state, start_time)

    # TRY NOT TO MODIFY: rollout (HF generate or vLLM) and reward (the task's rule on the decoded text), evaluation
    def rollout(batch):  # G responses (or episodes) per prompt, ordered p0 x G, p1 x G, ...: see common/policy.sample
        prompts = build_prompts(processor, [e.image for e in batch], [e.question for e in batch], args.max_prompt_tokens).to(device)
        inputs, response_ids, mask, completions, tool_calls = sample(model, rollout_engine, processor, prompts, batch, args.group_size, args.max_new_tokens, args.temperature, tools, args.max_turns, args.train_turns)
        answers = [e.answer for e in batch for _ in range(args.group_size)]
        rewards = torch.tensor([reward_fn(c, a, args.format_reward) for c, a in zip(completions, answers)])  # (B*G,)
        return inputs, response_ids, mask, rewards, tool_calls  # mask (B*G, T): 1 on the model-written tokens trained on

    def evaluate():  # held-out metrics with greedy decoding: eval/accuracy (and eval/iou for grounding), split over ranks
        rewards = split_map(lambda part: greedy_rewards(model, processor, part, reward_fn, args.max_new_tokens, args.max_prompt_tokens, tools=tools, max_turns=args.max_turns), eval_examples)
        return tasks.summarize(args.task, rewards, "eval")

    def checkpoint_now(step):
        state = {"args": vars(args), "reference_fingerprint": reference_fingerprint, "time": time.time() - start_time}
        return save_checkpoint(run_dir, step, model, processor, optimizer, args.lora, state)

    if checkpoint:
        set_rng_states(state["rng"])  # the RNG states the run had after its checkpoint's step
        print(f"resuming {run_dir} after step {state['step']}")
    else:
        records = [{"step": 0, **evaluate(), "time": round(time.time() - start_time, 2)}]
        log(records[0])
    first_eval = {k: v for k, v in records[0].items() if k.startswith("eval/")}
    last_eval = {k: v for r in records for k, v in r.items() if k.startswith("eval/")}
    start_step = state["step"] if checkpoint else 0
    progress = tqdm(range(start_step + 1, args.total_steps + 1), desc=args.exp_name, dynamic_ncols=True, initial=start_step, total=args.total_steps, disable=rank() > 0)
    step = start_step
    stop.loop_started()
    try:
        for step in progress:
            step_start = time.time()
            lr = args.lr * (1 - (step - 1) / args.total_steps) if args.anneal_lr else args.lr  # linear decay to 0
            optimizer.param_groups[0]["lr"] = lr

            # TRY NOT TO MODIFY: rollout and reward, G responses to each of B prompts (under torchrun, this rank's B / N)
            batch, G = shard(random.sample(train_examples, args.prompts_per_step)), args.group_size
            inputs, response_ids, mask, rewards, tool_calls = rollout(batch)  # rewards: (B*G,)

            # ALGO LOGIC: advantage, group-normalised reward, one per sequence
            advantages = group_advantages(rewards, G).to(device)  # (B*G,)
            response_lengths = mask.sum(1)  # for logging, before any filtering
            zero_advantage_groups = all_mean((rewards.view(-1, G).std(1) == 0).float().mean().item())
            extra_metrics = {}  # GSPO logs nothing beyond the shared metrics
            padding = 0
            if args.skip_zero_advantage_groups:  # all-equal groups have A = 0 everywhere: skip their compute
                keep = (rewards.view(-1, G).std(1) > 0).repeat_interleave(G).nonzero().squeeze(1).tolist()
                rows, padding = even_rows(keep)  # torchrun: as many rows on every rank, the padding masked out
                inputs, response_ids, mask, advantages = select(inputs, rows), response_ids[rows], mask[rows], advantages[rows]
                mask[len(keep) :], advantages[len(keep) :] = 0, 0

            # ALGO LOGIC: log-probs under the sampling policy, recomputed by the trainer (not taken from the rollout engine)
            # before any update, of the sequences shuffled into minibatches (torch's RNG: a resumed run shuffles alike)
            order = torch.randperm(len(advantages)).tolist()
            inputs, response_ids, mask, advantages = select(inputs, order), response_ids[order], mask[order], advantages[order]
            N, mb = len(advantages), args.micro_batch_size  # this rank's rows
            real = mask.amax(1)  # (N,): 1, or 0 for a padding row (under torchrun)
            scoring = (inputs, response_ids, mask, suppressed, args.temperature)
            old_logprobs = sequence_logprobs(model, *scoring, mb)  # (N, T), no gradients

            # ALGO LOGIC: update, one clipped optimizer step per minibatch (the first at s = 1, later ones off-policy), each
            # in micro-batches with gradient accumulation. N = 0 (every group skipped): no step, the losses logged as null
            sequences = all_sum(N - padding)  # the global step's: every rank's
            stats, grad_norm = torch.zeros(4) if sequences else torch.full((4,), float("nan")), float("nan")  # loss, kl, clipfrac, entropy
            bounds = sorted({N * k // args.num_minibatches for k in range(args.num_minibatches + 1)})  # sizes differ by <= 1
            for first, end in zip(bounds, bounds[1:]):  # rows first..end-1; fewer minibatches when N < num_minibatches
                optimizer.zero_grad(set_to_none=True)
                minibatch_sequences = all_sum(real[first:end].sum()).item()  # every rank's
                for rows in accumulate([slice(i, min(i + mb, end)) for i in range(first, end, mb)], trainer):  # its micro-batches
                    logprobs = micro_batch_logprobs(trainer, rows, *scoring)  # (n, T), with gradients
                    loss, clipfrac = gspo_loss(logprobs, old_logprobs[rows], advantages[rows], mask[rows], args.clip_eps_low, args.clip_eps_high)
                    (loss * len(logprobs) / minibatch_sequences).backward()  # the minibatch's loss is the mean over its sequences
                    entropy = -masked_mean(logprobs.detach(), mask[rows], dim=1).mean()  # -log p of the sampled tokens
                    stats += torch.stack([loss.detach(), torch.tensor(0.0), clipfrac, entropy]).cpu() * len(logprobs) / sequences
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                if math.isfinite(grad_norm) and stats.isfinite().all():
                    optimizer.step()
                else:
                    tqdm.write(f"warning: step {step}: non-finite loss or grad norm ({grad_norm}); update skipped")
            stats[1] = float("nan")  # no KL term: losses/kl is logged as null
            optimizer.zero_grad(set_to_none=True)  # free the gradients now: the next rollout needs the memory
            stats = all_sum(stats)  # each rank's share of the global step's

            # TRY NOT TO MODIFY: log / eval / save (under torchrun: over every rank's rollouts, rank 0 writes)
            rewards, response_lengths, tool_calls = gather(rewards), gather(response_lengths), gather(tool_calls)
            loss, kl, clipfrac, entropy = stats.tolist()
            record = {
                "step": step,
                "time": round(time.time() - start_time, 2),
                "charts/learning_rate": lr,
                "charts/reward_mean": rewards.mean().item(),
                "charts/reward_std": rewards.std().item(),
                **tasks.summarize(args.task, rewards.tolist(), "charts"),  # charts/accuracy (+ charts/iou)
                "charts/response_length": response_lengths.mean().item(),
                "charts/tool_calls": tool_calls.mean().item(),  # per episode (agentic tasks)
                "charts/zero_advantage_groups": zero_advantage_groups,
                "charts/step_time": round(time.time() - step_start, 3),
                "charts/tokens_per_second": response_lengths.sum().item() / (time.time() - step_start),
                "losses/loss": loss,
                "losses/kl": kl,
                "losses/clipfrac": clipfrac,
                "losses/entropy": entropy,
                "losses/grad_norm": grad_norm,
                **extra_metrics,  # the algorithm's own (ALGO LOGIC above)
            }
            if step % args.eval_every == 0 or step == args.total_steps:
                last_eval = evaluate()
                record.update(last_eval)
            log(record)
            progress.set_postfix(reward=f"{record['charts/reward_mean']:.2f}", eval_acc=f"{last_eval['eval/accuracy']:.3f}")
            stopping = all_max(int(stop.requested)) == 1 and step < args.total_steps  # Ctrl-C / kill: save, then leave the loop
            if (args.save_every and step % args.save_every == 0) or stopping:
                checkpoint_now(step)
            if stopping:
                tqdm.write(f"interrupted at step {step}: checkpoint saved; continue with --resume {run_dir}")
                break
    except KeyboardInterrupt:  # a second Ctrl-C / kill: stop now, without saving a half-finished step
        last = latest_checkpoint(run_dir)
        raise SystemExit(f"stopped during step {step}: " + (f"continue from {last} with --resume {run_dir}" if last else "no checkpoint was saved"))
    save_policy(model, processor, run_dir, args.lora, args.lora_merge)  # <run>/model or <run>/adapter
    finish()
    change = ", ".join(f"{k} {first_eval[k]:.3f} → {last_eval[k]:.3f}" for k in first_eval)
    print(f"{change} in {time.time() - start_time:.0f}s; model and metrics in {run_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
