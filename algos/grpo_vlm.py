"""GRPO for vision-language models: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300).

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
For each prompt we sample a group of G responses, score each, and push up the tokens of responses that beat
their group's mean.

    python algos/grpo_vlm.py --task counting                      # embedded tiny VLM, laptop CPU, offline
    python algos/grpo_vlm.py --task math                          # ... numbers drawn in the image, \\boxed{} sums
    python algos/grpo_vlm.py --task grounding                     # ... boxes, reward = IoU
    python algos/grpo_vlm.py --task zoom                          # ... agentic: a zoom tool, several turns per episode
    python algos/grpo_vlm.py --task counting --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --dataset BUAADreamer/clevr_count_70k --dtype bfloat16 --lora --lr 1e-5 --max-new-tokens 256 --track
    torchrun --nproc-per-node 8 algos/grpo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct ...   # FSDP2

Docs: docs/grpo_vlm.md. Not meant to be imported except for the pure functions the tests pin.
"""

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common import tasks  # noqa: E402
from common.dist import accumulate, all_max, all_mean, all_sum, even_rows, gather, init, rank, shard, split_map, world_size, wrap  # noqa: E402
from common.optim import make_optimizer, memory_plan  # noqa: E402
from common.policy import load_policy, micro_batch_logprobs, micro_batches, reference_logprobs, sample, sequence_logprobs  # noqa: E402
from common.rollout import make_rollout_engine  # noqa: E402
from common.runs import StopSignals, check_flags, latest_checkpoint, load_optimizer, resumed_args, save_checkpoint, save_policy, set_rng_states, start_run  # noqa: E402
from common.tiny_vlm import tiny_model_dir  # noqa: E402
from common.vlm import box_frame, build_prompts, greedy_rewards, response_mask, select, stop_token_id, suppressed_token_ids  # noqa: E402


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

    # Algorithm specific arguments: GRPO
    group_size: int = 8
    """responses per prompt (G); the group mean is the baseline, so at least 2"""
    beta: float = 0.1
    """KL coefficient to the frozen reference policy (0 = no reference model)"""
    clip_eps: float = 0.2
    """PPO clip range for the importance ratio"""
    updates_per_step: int = 1
    """optimizer passes over each rollout batch (mu in the paper; >1 makes the ratio and clipping active)"""
    skip_zero_advantage_groups: bool = True
    """leave groups whose rewards are all equal out of the update (their advantage is 0; only their KL term
    would remain): saves their forward and backward passes, as DAPO's dynamic sampling does (arXiv 2503.14476)"""
    # GRPO's published variants (docs/grpo_vlm.md#variants); the defaults are DeepSeekMath's GRPO
    scale_rewards: Literal["group", "none"] = "group"
    """divide each group's centred rewards by the group's std (group: DeepSeekMath) or not (none: Dr. GRPO, arXiv
    2503.20783, which finds the division weights too-easy and too-hard prompts up)"""
    loss_aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """token losses to one loss: seq-mean-token-mean (mean over each response's tokens, then over responses:
    DeepSeekMath), token-mean (mean over every token of the step: DAPO, arXiv 2503.14476), seq-mean-token-sum-norm
    (each response's token sum divided by --max-new-tokens, then mean over responses: Dr. GRPO, arXiv 2503.20783)"""
    clip_eps_high: float | None = None
    """upper clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's clip-higher: 0.28 with
    --clip-eps 0.2); default: --clip-eps"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token estimator of KL(policy || reference), with d = ref_logp - logp: k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1
    (Schulman, "Approximating KL divergence", 2020)"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (arXiv 2503.14476): replace groups whose rewards are all equal with groups of new
    prompts, rolled out again, until every group is informative or --max-resample-rounds rollouts were added"""
    max_resample_rounds: int = 4
    """with --dynamic-sampling: at most this many extra rollouts per step (each samples as many new prompts as groups
    are still uninformative); groups still uninformative after them are left out of the update"""


# ALGO LOGIC: the heart of GRPO, pure functions (tests/test_grpo_math.py pins them)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count)."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)  # dim None: over all positions


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """GRPO's outcome advantage (DeepSeekMath eq. 3, arXiv 2402.03300): per group of G responses to one prompt,
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps); scale "none" (Dr. GRPO, arXiv 2503.20783): A_i = r_i - mean_j r_j.
    rewards: (B*G,) ordered group by group. Returns (B*G,). A group whose rewards are all equal gets A = 0."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps) if scale == "group" else centred).view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: the groups whose rewards are not all equal (the others have A = 0 and teach nothing)."""
    return rewards.view(-1, group_size).std(dim=1) > 0


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps: float, beta: float, *,
              clip_eps_high: float | None = None, kl_estimator: str = "k3", aggregation: str = "seq-mean-token-mean",
              max_tokens: int | None = None):  # fmt: skip
    """GRPO's clipped surrogate with a KL penalty (DeepSeekMath eq. 3-4), negated for minimisation:
        rho   = exp(logp - old_logp)                               per token
        surr  = min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)       (eps_high = eps unless DAPO's clip-higher)
        kl    = k3: e^d - d - 1 (>= 0, unbiased; default), k2: d^2 / 2, k1: -d,   d = ref_logp - logp
        loss  = -mean_i [ (1/|y_i|) sum_t (surr - beta * kl) ]     aggregation seq-mean-token-mean (DeepSeekMath)
              = -(1/sum_i |y_i|) sum_i sum_t (surr - beta * kl)   token-mean (DAPO, arXiv 2503.14476)
              = -mean_i [ (1/max_tokens) sum_t (surr - beta * kl) ]  seq-mean-token-sum-norm (Dr. GRPO, 2503.20783)
    logprobs, old_logprobs, ref_logprobs, mask: (N, T); advantages: (N,), one per sequence.
    Returns (loss, kl, clip fraction); the last two, logged, are averaged per response, then over responses."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)  # (N, 1): the sequence's advantage on each of its tokens
    high = clip_eps if clip_eps_high is None else clip_eps_high
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv)
    d = ref_logprobs - logprobs
    kl = {"k1": -d, "k2": d**2 / 2, "k3": torch.exp(d) - d - 1}[kl_estimator]
    per_token = surrogate - beta * kl
    if aggregation == "seq-mean-token-mean":
        loss = -masked_mean(per_token, mask, dim=1).mean()
    elif aggregation == "token-mean":
        loss = -masked_mean(per_token, mask)
    else:  # seq-mean-token-sum-norm
        loss = -((per_token * mask).sum(dim=1) / max_tokens).mean()
    clipped = ((ratio < 1 - clip_eps) | (ratio > 1 + high)).float()
    return loss, masked_mean(kl, mask, dim=1).mean().detach(), masked_mean(clipped, mask, dim=1).mean().detach()


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    check_flags(args)  # the flags every script shares (common/runs.py), then GRPO's own
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO's baseline is the group mean, use --group-size 2 or more")
    if args.clip_eps <= 0:
        raise SystemExit(f"--clip-eps {args.clip_eps}: use a clip range > 0")
    if args.beta < 0:
        raise SystemExit(f"--beta {args.beta}: the KL coefficient is >= 0 (0 = no reference model)")
    if args.clip_eps_high is not None and args.clip_eps_high <= 0:
        raise SystemExit(f"--clip-eps-high {args.clip_eps_high}: use an upper clip range > 0 (DAPO: 0.28)")
    if args.dynamic_sampling and tasks.tools(args.task):
        raise SystemExit(f"--dynamic-sampling with --task {args.task}: not supported for agentic tasks yet (their episodes carry their own images); drop it")
    if args.max_resample_rounds < 0:
        raise SystemExit(f"--max-resample-rounds {args.max_resample_rounds}: use 0 or more")
    if args.updates_per_step < 1:
        raise SystemExit(f"--updates-per-step {args.updates_per_step}: use 1 or more")


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

            # ALGO LOGIC: DAPO's dynamic sampling (arXiv 2503.14476, Algorithm 1): each group whose rewards are all equal
            # gives its place to the group of a new prompt, if that one is informative. The charts describe the first
            # rollout (the policy on random prompts); the update uses the refilled batch and its rewards.
            response_lengths = mask.sum(1)  # for logging, before any filtering
            zero_advantage_groups = all_mean((~informative_groups(rewards, G)).float().mean().item())
            train_batch, train_rewards, resampled_prompts = list(batch), rewards.clone(), 0
            for _ in range(args.max_resample_rounds if args.dynamic_sampling else 0):
                empty = (~informative_groups(train_rewards, G)).nonzero().squeeze(1).tolist()
                if all_max(len(empty)) == 0:  # torchrun: every rank rolls out as often, as many prompts as the most needs
                    break
                new_batch = shard(random.sample(train_examples, all_max(len(empty)) * world_size()))
                _, new_ids, _, new_rewards, _ = rollout(new_batch)
                resampled_prompts += all_sum(len(empty))
                width = max(response_ids.shape[1], new_ids.shape[1])  # both EOS-padded to one length
                response_ids, new_ids = (F.pad(ids, (0, width - ids.shape[1]), value=stop_token_id(processor)) for ids in (response_ids, new_ids))
                for slot, k in zip(empty, informative_groups(new_rewards, G).nonzero().squeeze(1).tolist()):  # in order
                    old_rows, new_rows = slice(slot * G, slot * G + G), slice(k * G, k * G + G)
                    train_batch[slot], train_rewards[old_rows], response_ids[old_rows] = new_batch[k], new_rewards[new_rows], new_ids[new_rows]
            if resampled_prompts:  # the refilled batch's prompts and masks
                prompts = build_prompts(processor, [e.image for e in train_batch], [e.question for e in train_batch], args.max_prompt_tokens)
                inputs = select(prompts.to(device), [i for i in range(len(train_batch)) for _ in range(G)])
                mask = response_mask(response_ids, stop_token_id(processor))
            extra_metrics = {"charts/resampled_prompts": resampled_prompts}

            # ALGO LOGIC: advantage, group-normalised reward, one per sequence
            advantages = group_advantages(train_rewards, G, scale=args.scale_rewards).to(device)  # (B*G,)
            padding = 0
            if args.skip_zero_advantage_groups:  # all-equal groups have A = 0 everywhere: skip their compute
                keep = informative_groups(train_rewards, G).repeat_interleave(G).nonzero().squeeze(1).tolist()
                rows, padding = even_rows(keep)  # torchrun: as many rows on every rank, the padding masked out
                inputs, response_ids, mask, advantages = select(inputs, rows), response_ids[rows], mask[rows], advantages[rows]
                mask[len(keep) :], advantages[len(keep) :] = 0, 0

            # ALGO LOGIC: log-probs under the sampling policy and the reference, recomputed by the trainer (not taken
            # from the rollout engine). With one update per rollout the sampling policy is the current model, so
            # old_logprobs is the update's own forward, detached: a forward pass saved (rho = 1 exactly).
            N, mb = len(advantages), args.micro_batch_size  # this rank's rows
            sequences, tokens = all_sum(N - padding), all_sum(mask.sum())  # the global step's: every rank's
            scoring = (inputs, response_ids, mask, suppressed, args.temperature)
            old_logprobs = sequence_logprobs(model, *scoring, mb) if args.updates_per_step > 1 else None
            ref_logprobs = reference_logprobs(reference, *scoring, mb) if reference is not None else None

            # ALGO LOGIC: update, micro-batches with gradient accumulation, then one clipped optimizer step per pass
            variant = dict(clip_eps_high=args.clip_eps_high, kl_estimator=args.kl_estimator, aggregation=args.loss_aggregation, max_tokens=args.max_new_tokens)
            stats = torch.zeros(4)  # loss, kl, clipfrac, entropy: each micro-batch weighted by its share of the step, all passes
            for _ in range(args.updates_per_step):
                optimizer.zero_grad(set_to_none=True)
                for rows in accumulate(micro_batches(N, mb), trainer):  # torchrun: gradients reduced in the last
                    logprobs = micro_batch_logprobs(trainer, rows, *scoring)  # (n, T), with gradients
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[rows]
                    ref = logprobs.detach() if ref_logprobs is None else ref_logprobs[rows]  # beta = 0: KL term is 0
                    loss, kl, clipfrac = grpo_loss(logprobs, old, ref, advantages[rows], mask[rows], args.clip_eps, args.beta, **variant)
                    share = len(logprobs) / sequences  # the micro-batch's part of the step's loss: of its sequences, or its tokens
                    loss_share = (mask[rows].sum() / tokens).item() if args.loss_aggregation == "token-mean" else share
                    (loss * loss_share).backward()
                    entropy = -masked_mean(logprobs.detach(), mask[rows], dim=1).mean()  # -log p of the sampled tokens
                    stats += torch.stack([loss.detach() * loss_share, kl * share, clipfrac * share, entropy * share]).cpu() / args.updates_per_step
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                if sequences == 0:  # every group skipped: nothing to update (on zero-filled gradients weight decay would still act)
                    stats[:], grad_norm = float("nan"), float("nan")  # logged as null
                elif math.isfinite(grad_norm) and stats.isfinite().all():
                    optimizer.step()
                else:
                    tqdm.write(f"warning: step {step}: non-finite loss or grad norm ({grad_norm}); update skipped")
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
