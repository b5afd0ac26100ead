"""The flags every algorithm script shares, defined once. A script's `Args` subclasses `SharedArgs` and adds its
algorithm's block (`group_size`, `beta`, ...); tyro's `--help` lists both, each with the docstring under it. Everything
here is plumbing the lesson does not need to read: the task and model, memory savers, the run's budget and logging."""

from dataclasses import dataclass
from typing import Literal

from common import dist
from common.tasks import TASKS


@dataclass
class SharedArgs:
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
    """continue the run in this run directory from its latest checkpoint, with the flags it was started with (and
    --total-steps N: train on to step N)"""

    # Task and model
    task: Literal[tuple(TASKS)] = "counting"
    """which task (common/tasks.py's TASKS; docs/tasks.md): counting, math, grounding, zoom (agentic: it needs a tool
    call) or mat-search / mat-coding (agentic, --dataset only)"""
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
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")  # fmt: skip
    """names of the linear layers that get adapters (Qwen-style names), never inside the vision tower"""
    lora_merge: bool = False
    """with --lora, also save the merged full model (base + adapters) to <run>/model (the adapter: <run>/adapter)"""
    gradient_checkpointing: bool = False
    """keep only each layer's input in the forward pass and recompute the layer in backward: less activation
    memory for one more forward pass"""
    freeze_vision_tower: bool = False
    """do not train the vision encoder (its weights stay exactly as loaded, and it gets no optimizer state)"""

    # Training
    total_steps: int | None = None
    """number of rollout + update steps (default: the task's budget for this algorithm, common/tasks.py)"""
    prompts_per_step: int = 16
    """prompts per step (B); each gets --group-size responses"""
    max_new_tokens: int | None = None
    """response length limit in tokens, per turn (default: the task's, enough for its answer; common/tasks.py)"""
    max_prompt_tokens: int = 512
    """longest prompt allowed, image tokens included (never truncated: too long is an error)"""
    max_turns: int = 3
    """agentic tasks: model turns per episode at most (each up to --max-new-tokens; a tool's result between two)"""
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

    # Reward (docs/rewards.md)
    reward_model: str | None = None
    """a model as the reward instead of the task's rule: a judge VLM or a classifier (hub id or checkpoint dir), or
    'tiny-judge' (the task's embedded tiny judge, built and cached on first use); the rule is still logged beside it"""
    reward_kind: Literal["judge", "classifier"] = "judge"
    """judge: a generative VLM's P(yes) to the task's judge prompt (image, question, response); classifier: an
    AutoModelForSequenceClassification reward model's score"""
    reward_mix: Literal["model", "format-gate"] = "model"
    """model: the reward model's score alone; format-gate: its score where the task's parser reads an answer, else 0
    (the rule gates the format, the model scores the content)"""
    reward_batch_size: int = 64
    """responses per reward-model forward pass (no gradients)"""
    reward_max_tokens: int = 1024
    """longest reward-model input, image tokens included (never truncated: too long is an error)"""

    def check(self):
        """The shared flags, before anything loads: the first bad one ends the run with one line that names the fix.
        (A script checks its algorithm's own flags itself.)"""
        world = dist.world_size()  # torchrun's WORLD_SIZE: known before the process group exists
        sharded = world > 1 and self.dist == "fsdp"
        checks = [
            (self.total_steps < 1, f"--total-steps {self.total_steps}: train for at least 1 step"),
            (self.prompts_per_step < 1, f"--prompts-per-step {self.prompts_per_step}: use 1 or more"),
            (self.prompts_per_step > self.train_size,
             f"--prompts-per-step {self.prompts_per_step} > --train-size {self.train_size}: raise --train-size"),
            (self.eval_size < 1, f"--eval-size {self.eval_size}: eval/accuracy needs at least 1 held-out example"),
            (self.eval_every < 1, f"--eval-every {self.eval_every}: evaluate every 1 or more steps"),
            (self.micro_batch_size < 1, f"--micro-batch-size {self.micro_batch_size}: use 1 or more sequences"),
            (self.temperature <= 0, f"--temperature {self.temperature}: use a temperature > 0 (1 samples the policy)"),
            (self.max_new_tokens < 1, f"--max-new-tokens {self.max_new_tokens}: allow 1 or more"),
            (self.max_prompt_tokens < 1, f"--max-prompt-tokens {self.max_prompt_tokens}: allow 1 or more"),
            (self.max_turns < 1, f"--max-turns {self.max_turns}: allow 1 or more model turns per episode"),
            (self.lr <= 0, f"--lr {self.lr}: use a learning rate > 0"),
            (self.max_grad_norm <= 0, f"--max-grad-norm {self.max_grad_norm}: use a norm > 0"),
            (not 0 <= self.format_reward < 1,
             f"--format-reward {self.format_reward}: use 0 <= it < 1 (a right answer earns 1)"),
            (self.save_every < 0, f"--save-every {self.save_every}: use 0 (no checkpoints) or more"),
            (self.reward_model is not None and self.format_reward > 0,
             "--format-reward is the rule's bonus: with --reward-model, --reward-mix format-gate rewards the format"),
            (self.reward_model is None and self.reward_mix != "model",
             f"--reward-mix {self.reward_mix} mixes a reward model with the rule: add --reward-model"),
            (self.reward_batch_size < 1, f"--reward-batch-size {self.reward_batch_size}: use 1 or more"),
            (self.reward_max_tokens < 1, f"--reward-max-tokens {self.reward_max_tokens}: allow 1 or more"),
            (self.lora_rank < 1, f"--lora-rank {self.lora_rank}: use 1 or more"),
            (not 0 <= self.lora_dropout < 1, f"--lora-dropout {self.lora_dropout}: use 0 <= it < 1"),
            (self.lora_merge and not self.lora, "--lora-merge merges LoRA adapters into the model: add --lora"),
            (self.min_pixels is not None and self.min_pixels < 1, f"--min-pixels {self.min_pixels}: use 1 or more"),
            (self.max_pixels is not None and self.max_pixels < 1, f"--max-pixels {self.max_pixels}: use 1 or more"),
            # torchrun (common/dist.py)
            (self.prompts_per_step % world != 0,
             f"--prompts-per-step {self.prompts_per_step} does not split over {world} ranks: use a multiple of it"),
            (sharded and self.optimizer != "adamw",
             f"--optimizer {self.optimizer} under FSDP2 (it shards tensors): use --dist ddp or --optimizer adamw"),
            (sharded and self.lora_merge, "--lora-merge under FSDP2: merge the saved <run>/adapter afterwards "
             "(docs/grpo_vlm.md#torchrun), or use --dist ddp"),
        ]  # fmt: skip
        for bad, message in checks:
            if bad:
                raise SystemExit(message)

    def lora_config(self) -> dict | None:
        """peft's LoraConfig arguments with --lora (common.policy.prepare_policy), else None (all weights train)."""
        if not self.lora:
            return None
        return dict(r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                    target_modules=list(self.lora_target_modules))  # fmt: skip
