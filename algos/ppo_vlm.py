"""PPO for vision-language models: Proximal Policy Optimization with a learned critic and GAE (Schulman et al.
2017, arXiv 1707.06347; GAE: Schulman et al. 2015, arXiv 1506.02438; for language models: Ouyang et al. 2022,
arXiv 2203.02155).

The MDP: the state is an image plus the text so far, an action is the next text token, and the episode's
reward comes at the end from a rule (is the count right? is the sum right? how well does the box overlap?).
Every response token gets a reward (a KL penalty to the reference policy, plus the task's reward on the last token);
a critic, a value head on the policy's own last hidden state, predicts each token's return, and GAE turns rewards and
values into per-token advantages. Several epochs of clipped updates over minibatches then train policy and critic.

    python algos/ppo_vlm.py --task counting                      # embedded tiny VLM, laptop CPU, offline
    python algos/ppo_vlm.py --task math                          # ... numbers drawn in the image, \\boxed{} sums
    python algos/ppo_vlm.py --task grounding                     # ... boxes, reward = IoU
    python algos/ppo_vlm.py --task zoom                          # ... agentic: a zoom tool, several turns per episode
    python algos/ppo_vlm.py --task counting --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --dataset BUAADreamer/clevr_count_70k --dtype bfloat16 --lora --lr 1e-5 --max-new-tokens 256 --track
    torchrun --nproc-per-node 8 algos/ppo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct ...   # FSDP2

Docs: docs/ppo_vlm.md. Not meant to be imported except for the pure functions the tests pin.
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
from common.dist import accumulate, all_max, all_mean, all_sum, full_state_dict, gather, init, rank, shard, split_map, world_size, wrap  # noqa: E402
from common.optim import make_optimizer, memory_plan  # noqa: E402
from common.policy import load_policy, micro_batch_logprobs, micro_batches, reference_logprobs, sample  # noqa: E402
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
    """number of rollout + update steps (default: PPO_TOTAL_STEPS, 3/8 of the task's GRPO budget: 150 for counting,
    170 for math, 95 for grounding; a PPO step costs ~3 GRPO steps and learns more)"""
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

    # Algorithm specific arguments: PPO
    group_size: int = 8
    """responses per prompt (G); PPO needs no group (the critic is the baseline): G > 1 keeps GRPO's samples per step"""
    beta: float = 0.05
    """KL coefficient: each token's reward includes -beta * (logp_old - ref_logp) (0 = no reference model)"""
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


# ALGO LOGIC: the heart of PPO, pure functions (tests/test_ppo_math.py pins them). Tensors are (N, T): N responses,
# T response positions; mask is 1 on each response's model-written tokens (up to and including its end-of-turn token;
# in an agentic episode, every model turn's, the tool's turns between them 0).
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total=lambda t: t) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (padding and tokens after EOS do not count). `total` sums over
    every rank's batch (common/dist.all_sum, under torchrun: the batch's mean, not this rank's part's)."""
    return total((x * mask).sum(dim)) / total(mask.sum(dim)).clamp(min=1)  # dim None: over all positions


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=lambda t: t) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), mean and (biased) variance over the positions where mask == 1 (as TRL whitens);
    masked positions hold 0. Equal values (or a single one) whiten to ~0: eps bounds the division. `total`: as in
    masked_mean, the batch's statistics under torchrun."""
    mean = masked_mean(x, mask, total=total)
    var = masked_mean((x - mean) ** 2, mask, total=total)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(rewards: torch.Tensor, old_logprobs, ref_logprobs, mask, beta: float) -> torch.Tensor:
    """Per-token rewards (Ouyang et al. 2022, arXiv 2203.02155, eq. 2, spread over tokens as in Ziegler et al. 2019):
        r_t = -beta * (logp_old_t - ref_logp_t)        every response token t (a k1 KL estimate, per token)
        r_T = r_T + R                                   the task reward R on the last response token
    rewards: (N,), one per response. Returns (N, T), 0 where mask == 0."""
    per_token = -beta * (old_logprobs - ref_logprobs) * mask
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of each response's last trained token
    return per_token.scatter_add(1, last.unsqueeze(1), rewards.unsqueeze(1).to(per_token.dtype))


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16), backwards over tokens:
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)         V after the last response token = 0
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V(s_t)                            the value head's regression target
    Positions where mask == 0 get A = returns = 0 and are skipped: after a response's last token V = 0, and an agentic
    episode's tool turn (common/agent.py) is the environment's move, so s_{t+1} of a turn's last token is the next
    turn's first. Not whitened (whiten is a separate step).
    Returns (advantages, returns), both (N, T)."""
    N, T = token_rewards.shape
    advantages = torch.zeros_like(token_rewards)
    next_value, next_advantage = torch.zeros(N, dtype=values.dtype), torch.zeros(N, dtype=values.dtype)
    next_value, next_advantage = next_value.to(values.device), next_advantage.to(values.device)
    for t in reversed(range(T)):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        trained = mask[:, t].bool()  # masked positions (padding, tool tokens) pass the next token's on unchanged
        next_value = torch.where(trained, values[:, t], next_value)
        next_advantage = torch.where(trained, advantages[:, t], next_advantage)
    return advantages, (advantages + values) * mask


def ppo_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float):
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), per token, negated for minimisation:
        rho  = exp(logp - old_logp)
        loss = masked token mean of -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)
    advantages: (N, T), one per token. Returns (loss, clip fraction, approx KL(old || new)); the KL is the k3
    estimate (rho - 1) - log rho, as cleanrl logs it; the last two are detached."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -masked_mean(surrogate, mask)
    clipfrac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip_eps_value: float):
    """The critic's clipped regression (PPO's value clipping: cleanrl, OpenAI baselines ppo2):
        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        loss   = masked token mean of 1/2 * max((V - returns)^2, (V_clip - returns)^2)
    Returns (loss, fraction of tokens whose clipped error is the larger, i.e. the value clip acts; detached)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps_value, clip_eps_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, total=lambda t: t) -> float:
    """1 - Var(returns - V) / Var(returns) over the masked tokens: 1 = the critic predicts the returns, 0 = no better
    than their mean, < 0 worse; NaN when the returns do not vary (cleanrl's losses/explained_variance). `total`: as
    in masked_mean."""
    var_returns = masked_mean((returns - masked_mean(returns, mask, total=total)) ** 2, mask, total=total)
    error = returns - values
    var_error = masked_mean((error - masked_mean(error, mask, total=total)) ** 2, mask, total=total)
    return float("nan") if var_returns == 0 else (1 - var_error / var_returns).item()


def make_value_head(model) -> torch.nn.Linear:
    """The critic: V(s_t) = w . h_t + b on the policy's last hidden state h_t (the LM head's input), the trunk shared
    with the actor. Zero-initialised, so every value starts at 0. Float32 whatever the model's dtype."""
    head = torch.nn.Linear(model.get_output_embeddings().in_features, 1, device=model.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def logprobs_and_values(model, value_head, rows, *scoring):
    """(log-probs, values) of the responses in `rows`, both (n, T), from one forward of the shared trunk."""
    logprobs, hidden = micro_batch_logprobs(model, rows, *scoring, hidden_states=True)
    return logprobs, value_head(hidden.float()).squeeze(-1)


# ALGO LOGIC: PPO's own step budgets (counting measured, docs/ppo_vlm.md; math and grounding scaled like it, untuned)
PPO_TOTAL_STEPS = {"counting": 150, "math": 170, "grounding": 95, "zoom": 110, "mat-search": 75, "mat-coding": 150}


def check_args(args: Args):
    """Every flag, before anything loads: the first bad one ends the run with one line that names the fix."""
    check_flags(args)  # the flags every script shares (common/runs.py), then PPO's own
    if args.group_size < 1:
        raise SystemExit(f"--group-size {args.group_size}: sample 1 or more responses per prompt")
    if args.clip_eps <= 0:
        raise SystemExit(f"--clip-eps {args.clip_eps}: use a clip range > 0")
    if args.beta < 0:
        raise SystemExit(f"--beta {args.beta}: the KL coefficient is >= 0 (0 = no reference model)")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        raise SystemExit(f"--gamma {args.gamma} --gae-lambda {args.gae_lambda}: use values in [0, 1]")
    if args.update_epochs < 1 or args.num_minibatches < 1:
        raise SystemExit(f"--update-epochs {args.update_epochs} --num-minibatches {args.num_minibatches}: use 1 or more")
    if args.vf_coef < 0 or args.clip_eps_value <= 0:
        raise SystemExit(f"--vf-coef {args.vf_coef} --clip-eps-value {args.clip_eps_value}: use vf-coef >= 0, clip-eps-value > 0")


def main(args: Args):
    checkpoint = state = None
    if args.resume is not None:  # the run's own flags, from its latest checkpoint
        args, checkpoint, state = resumed_args(args, Args())
    if args.max_new_tokens is None:  # the task's defaults, filled in at runtime
        args.max_new_tokens = tasks.MAX_NEW_TOKENS[args.task]
    if args.total_steps is None:
        args.total_steps = PPO_TOTAL_STEPS[args.task]
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

    # TRY NOT TO MODIFY: actor (the policy we train), reference (frozen KL anchor)
    model_path = tiny_model_dir(args.task) if args.model == "tiny" else args.model
    model, processor, reference, reference_fingerprint = load_policy(args, model_path, checkpoint, state, device)

    # ALGO LOGIC: the critic, a value head on the actor's last hidden state (a shared trunk: hidden + 1 weights, not a
    # second VLM with its own gradients and optimizer state; docs/ppo_vlm.md), trained by the same optimizer. It
    # trains with --lora too. A checkpoint keeps it in state.pt, written atomically with the rest.
    value_head = make_value_head(model)
    if checkpoint:
        value_head.load_state_dict(state["value_head"])
    trainer, value_trainer = wrap(model, args.dist), wrap(value_head, args.dist)  # torchrun: sharded alike (DDP: wrapped)
    params = [p for p in [*model.parameters(), *value_head.parameters()] if p.requires_grad]
    optimizer = make_optimizer(args.optimizer, params, lr=args.lr)

    # TRY NOT TO MODIFY: optimizer state, rollout engine
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

    # ALGO LOGIC: a checkpoint holds the value head too (in state.pt; the optimizer state already covers it)
    def checkpoint_now(step):
        state = {"args": vars(args), "reference_fingerprint": reference_fingerprint, "time": time.time() - start_time,
                 "value_head": full_state_dict(value_head) or value_head.state_dict()}  # fmt: skip
        return save_checkpoint(run_dir, step, model, processor, optimizer, args.lora, state)

    # TRY NOT TO MODIFY: resume, or evaluate the initial policy
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

            # ALGO LOGIC: log-probs and values under the sampling policy (one forward of the shared trunk, no gradients),
            # log-probs under the reference; recomputed by the trainer, not taken from the rollout engine
            response_lengths = mask.sum(1)
            grouped = rewards.view(-1, G)  # what GRPO would leave out: groups whose rewards are all equal
            zero_advantage_groups = all_mean((grouped.amax(1) == grouped.amin(1)).float().mean().item())
            N, mb = len(response_ids), args.micro_batch_size
            scoring = (inputs, response_ids, mask, suppressed, args.temperature)
            with torch.no_grad():
                scored = [logprobs_and_values(model, value_head, rows, *scoring) for rows in micro_batches(N, mb)]
            old_logprobs, old_values = (torch.cat(x) for x in zip(*scored))  # (N, T) each
            ref_logprobs = reference_logprobs(reference, *scoring, mb) if reference is not None else old_logprobs

            # ALGO LOGIC: advantage, per token: KL-penalised token rewards, GAE with the critic's values, whitened
            rewards_t = token_rewards(rewards.to(device), old_logprobs, ref_logprobs, mask, args.beta)
            advantages, returns = gae(rewards_t, old_values, mask, args.gamma, args.gae_lambda)
            if args.norm_adv:
                advantages = whiten(advantages, mask, total=all_sum)  # torchrun: over every rank's tokens

            # ALGO LOGIC: update: update_epochs passes over the batch, each in num_minibatches shuffled minibatches, one
            # clipped optimizer step per minibatch (micro-batches with gradient accumulation inside it)
            totals = torch.zeros(7)  # loss, policy loss, value loss, clipfrac, approx kl, value clipfrac, grad norm: means over minibatches
            minibatches = [rows for _ in range(args.update_epochs) for rows in torch.randperm(N).tensor_split(args.num_minibatches) if len(rows)]
            for rows in minibatches:
                optimizer.zero_grad(set_to_none=True)
                part = rows.tolist()
                batch_scoring = (select(inputs, part), response_ids[part], mask[part], suppressed, args.temperature)
                tokens = all_sum(mask[part].sum())  # every rank's
                for micro in accumulate(micro_batches(len(part), mb), trainer, value_trainer):  # torchrun: reduced in the last
                    idx = part[micro]
                    logprobs, values = logprobs_and_values(trainer, value_trainer, micro, *batch_scoring)  # with gradients
                    m = mask[idx]
                    pg_loss, clipfrac, approx_kl = ppo_loss(logprobs, old_logprobs[idx], advantages[idx], m, args.clip_eps)
                    v_loss, v_clipfrac = value_loss(values, old_values[idx], returns[idx], m, args.clip_eps_value)
                    loss = pg_loss + args.vf_coef * v_loss
                    share = (m.sum() / tokens).item()  # token means: the micro-batch's part of the minibatch's tokens
                    (loss * share).backward()
                    totals[:6] += torch.stack([loss.detach(), pg_loss.detach(), v_loss.detach(), clipfrac, approx_kl, v_clipfrac]).cpu() * share / len(minibatches)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
                totals[6] += grad_norm / len(minibatches)
                if math.isfinite(grad_norm) and totals.isfinite().all():
                    optimizer.step()
                else:
                    tqdm.write(f"warning: step {step}: non-finite loss or grad norm ({grad_norm}); update skipped")
            optimizer.zero_grad(set_to_none=True)  # free the gradients now: the next rollout needs the memory
            totals[:6] = all_sum(totals[:6])  # each rank's share of every rank's tokens (the grad norm is already global)
            loss, policy_loss, v_loss, clipfrac, approx_kl, value_clipfrac, grad_norm = totals.tolist()
            d = ref_logprobs - old_logprobs  # KL(sampling policy || reference), k3 per token, as GRPO logs it
            kl = all_mean(masked_mean(torch.exp(d) - d - 1, mask, dim=1).mean().item())
            entropy = all_mean(-masked_mean(old_logprobs, mask, dim=1).mean().item())  # -log p of the sampled tokens
            stats = torch.tensor([loss, kl, clipfrac, entropy])  # the shared metrics, in the template's order
            extra_metrics = {
                "losses/policy_loss": policy_loss,
                "losses/value_loss": v_loss,
                "losses/approx_kl": approx_kl,  # to the sampling policy, over the update's minibatches
                "losses/value_clipfrac": value_clipfrac,
                "losses/explained_variance": explained_variance(old_values, returns, mask, total=all_sum),
                "charts/value_mean": masked_mean(old_values, mask, total=all_sum).item(),
            }

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
    value_state = full_state_dict(value_head) or value_head.state_dict()  # ALGO LOGIC: the trained critic
    if rank() == 0:
        torch.save(value_state, os.path.join(run_dir, "value_head.pt"))
    finish()
    change = ", ".join(f"{k} {first_eval[k]:.3f} → {last_eval[k]:.3f}" for k in first_eval)
    print(f"{change} in {time.time() - start_time:.0f}s; model and metrics in {run_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
