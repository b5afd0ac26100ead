"""The actor and the reference, handled the same way by every algorithm: the task's data, loading the models as the
flags say, sampling rollouts (`Sampler`: HF generate or the vLLM engine, one turn or agentic episodes) into a
`Rollouts` batch, and scoring a batch's responses micro-batch by micro-batch."""

import contextlib
import dataclasses
import os
import random
import re

import torch
import torch.nn.functional as F

from common import dist
from common.agent import episode_batch, greedy_completions, run_episodes
from common.dist import wrap
from common.runs import weights_fingerprint
from common.tasks import load_task
from common.tiny_vlm import tiny_processor
from common.vlm import build_prompts, cat_inputs, generate, load_processor, load_vlm, response_logprobs, response_mask
from common.vlm import stop_token_id, suppressed_token_ids, take_rows, vision_tower


def load_data(task: str, dataset: str | None, train_size: int, eval_size: int, model: str, min_pixels: int | None,
              max_pixels: int | None, max_prompt_tokens: int, check_rows: int) -> tuple[list, list]:  # fmt: skip
    """(train examples, held-out examples) of `task` (`dataset`: a real one, else the offline twin), after checking
    with the processor alone, before any weights load, that the first `check_rows` prompts of each fit
    max_prompt_tokens (if not, one line says what to do). model: 'tiny' or a hub id / checkpoint dir."""
    train = load_task(task, "train", train_size, dataset)
    held_out = load_task(task, "eval", eval_size, dataset)
    source = f"--dataset {dataset}" if dataset else f"--task {task}"
    if len(train) < check_rows:  # a step samples check_rows (--prompts-per-step) distinct prompts
        raise SystemExit(f"{source} has {len(train)} training rows, fewer than --prompts-per-step {check_rows}: "
                         "lower --prompts-per-step or use more data")
    if not held_out:
        raise SystemExit(f"{source} has no held-out rows to evaluate on: add a 'test' split or more rows")
    if len(held_out) < eval_size:
        print(f"note: {source} has {len(held_out)} held-out rows (--eval-size {eval_size}): eval/ metrics move in "
              f"steps of 1/{len(held_out)}")
    if model == "tiny":
        processor = tiny_processor(task, min_pixels, max_pixels)
    else:
        processor = load_processor(model, min_pixels, max_pixels)
    for examples in (train[:check_rows], held_out[:check_rows]):
        build_prompts(processor, [e.image for e in examples], [e.question for e in examples], max_prompt_tokens)
    return train, held_out


def load_policy(model_path: str, dtype: str, device: str, with_reference: bool, min_pixels: int | None = None,
                max_pixels: int | None = None, lora: dict | None = None, freeze_vision_tower: bool = False,
                gradient_checkpointing: bool = False, dist_mode: str = "fsdp", checkpoint: str | None = None,
                reference_fingerprint: str | None = None):  # fmt: skip
    """(model, processor, reference, reference_fingerprint): the actor (the policy we train), made trainable as the
    memory flags say (prepare_policy), and with `with_reference` the reference (the frozen KL anchor, the initial
    policy): a frozen copy of model_path, or with `lora` the policy itself (scored with its adapters disabled: the
    base weights, no second copy); else None. Under torchrun a frozen copy is sharded like the actor (common/dist.py);
    the actor is wrapped by the script. A resumed run's actor comes from its `checkpoint`: its full weights, or the
    base and its adapters; its reference must be the one the run started with (`reference_fingerprint` says)."""
    policy_path = os.path.join(checkpoint, "model") if checkpoint and lora is None else model_path
    model, processor = load_vlm(policy_path, getattr(torch, dtype), device, min_pixels, max_pixels)
    fingerprint = weights_fingerprint(model) if lora is not None else None  # LoRA: the base model is the reference
    adapter_dir = os.path.join(checkpoint, "adapter") if checkpoint and lora is not None else None
    model = prepare_policy(model, freeze_vision_tower, gradient_checkpointing, lora, adapter_dir)
    reference = None
    if with_reference and lora is not None:
        reference = model
    elif with_reference:
        reference = load_vlm(model_path, getattr(torch, dtype), device, min_pixels, max_pixels)[0]
        reference = reference.eval().requires_grad_(False)
        fingerprint = weights_fingerprint(reference)
        reference = wrap(reference, dist_mode, trainable=False)  # torchrun: FSDP2 shards it too (DDP: a replica)
    if checkpoint and fingerprint != reference_fingerprint:
        raise SystemExit(f"--resume: the reference model ({model_path}) is not the one the run started with: "
                         "resume where its --model is the same checkpoint")
    return model, processor, reference, fingerprint


def prepare_policy(model, freeze_vision_tower: bool = False, gradient_checkpointing: bool = False,
                   lora: dict | None = None, adapter_dir: str | None = None):  # fmt: skip
    """The loaded model, made trainable as the memory flags ask (docs/memory.md), in train mode.

    freeze_vision_tower: the image encoder keeps its loaded weights; gradients stop at its output.
    gradient_checkpointing: each layer keeps only its input and is recomputed during backward. Non-reentrant
        checkpointing also passes gradients to LoRA adapters behind frozen layers.
    lora: peft LoraConfig arguments (r, lora_alpha, lora_dropout, target_modules) to train adapters
        W x + (alpha / r) B A x on the language model's linears instead of all weights (every base weight frozen);
        None trains all weights. adapter_dir: load these adapters (a resumed run) instead of new ones."""
    if freeze_vision_tower:
        vision_tower(model)[1].requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model  # imported only when used: importing peft is slow

        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        else:
            # the language model only: some vision towers reuse these names (Qwen2.5-VL's MLP, SigLIP's q_proj)
            exclude = re.escape(vision_tower(model)[0]) + r"\..*"
            model = get_peft_model(model, LoraConfig(**lora, exclude_modules=exclude))
    return model.train()


@dataclasses.dataclass
class Rollouts:
    """One rollout batch: a row per response (or agentic episode), ordered p0 x G, p1 x G, ... `batch[rows]` is the
    batch of those rows (a slice, a list or a tensor of indices), every per-row field indexed alike, the prompts'
    images included. The algorithm fills in what it computes per row (advantages, old/ref log-probs, values)."""

    inputs: dict  # the prompts, a processor batch: row i is response i's, with its images (an episode's tool images)
    response_ids: torch.Tensor  # (N, T), EOS-padded
    mask: torch.Tensor  # (N, T): 1 on the model-written tokens trained on (up to the end-of-turn token), else 0
    completions: list[str]  # what the reward reads: the response's text (an episode's last turn)
    examples: list  # the example (tasks.Example) each row answers
    tool_calls: torch.Tensor  # (N,): tool calls per episode (0 for one-turn tasks)
    group_size: int  # G, responses per prompt
    suppressed_ids: list[int]  # scored as sampled: these tokens masked out ...
    temperature: float  # ... at the sampling temperature
    rewards: torch.Tensor | None = None  # (N,)
    advantages: torch.Tensor | None = None  # (N,), one per response, or (N, T), one per token (PPO)
    old_logprobs: torch.Tensor | None = None  # (N, T) under the sampling policy
    ref_logprobs: torch.Tensor | None = None  # (N, T) under the reference
    rule_rewards: torch.Tensor | None = None  # (N,) the task's rule's (common/reward.py), logged beside a reward model
    model_scores: torch.Tensor | None = None  # (N,) a reward model's, NaN where a judge gave no verdict
    reward_seconds: torch.Tensor | None = None  # (N,) each row's share of the time spent scoring the batch
    old_values: torch.Tensor | None = None  # (N, T) the critic's (PPO)
    returns: torch.Tensor | None = None  # (N, T) the critic's targets (PPO)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def sequences(self) -> int:
        """The rows that are responses, not torchrun's padding (keep): what a per-response mean divides by. A response
        has at least one token trained on (its end-of-turn token, at least); a padding row has none."""
        return int((self.mask.sum(1) > 0).sum())

    def __getitem__(self, rows) -> "Rollouts":
        index = list(range(len(self)))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).tolist()
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                picked[f.name] = value[index]
            elif f.name in ("completions", "examples"):
                picked[f.name] = [value[i] for i in index]
        return dataclasses.replace(self, inputs=take_rows(self.inputs, index), **picked)

    def cat(self, other: "Rollouts", eos_id: int, pad_token_id: int) -> "Rollouts":
        """This batch's rows, then `other`'s, as one batch (the fields both have): the prompts as if processed
        together (common.vlm.cat_inputs), the responses EOS-padded to one width and their masks 0-padded."""
        joined = {"inputs": cat_inputs(self.inputs, other.inputs, pad_token_id)}
        width = max(self.response_ids.shape[1], other.response_ids.shape[1])
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("completions", "examples"):
                joined[f.name] = a + b
            elif torch.is_tensor(a) and a.dim() == 2:  # (N, T): padded on the right
                value = eos_id if f.name == "response_ids" else 0
                joined[f.name] = torch.cat([F.pad(x, (0, width - x.shape[1]), value=value) for x in (a, b)])
            elif torch.is_tensor(a):
                joined[f.name] = torch.cat([a, b])
        return dataclasses.replace(self, **joined)

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """x, a sum over this batch's rows, summed over the whole step's batch: under torchrun every rank holds a part
        of it, and a mean or variance over the batch needs every part's sum (PPO's whitening)."""
        return dist.all_sum(x)

    def keep(self, rows: list[int]) -> "Rollouts":
        """The batch of `rows` for the update. Under torchrun every rank then keeps as many rows, the ones added
        (copies of row 0) with mask and advantage 0, so that every rank runs the same micro-batches, even one that
        keeps none."""
        rows, padding = dist.even_rows(rows)
        kept = self[rows]
        if padding:
            kept.mask[len(rows) - padding :] = 0
            if kept.advantages is not None:
                kept.advantages[len(rows) - padding :] = 0
        return kept


class Sampler:
    """Samples rollouts with the current policy: HF generate, or the co-located vLLM engine (wake, push the current
    weights, sample, sleep; common/rollout.py); with tools, multi-turn episodes (common/agent.py)."""

    def __init__(self, model, processor, rollout_engine, tools: dict | None, device: str, max_new_tokens: int,
                 max_prompt_tokens: int, temperature: float, max_turns: int, train_turns: str):  # fmt: skip
        self.model, self.processor, self.engine, self.tools = model, processor, rollout_engine, tools
        self.device, self.max_new_tokens, self.max_prompt_tokens = device, max_new_tokens, max_prompt_tokens
        self.temperature, self.max_turns, self.train_turns = temperature, max_turns, train_turns
        self.suppressed_ids = suppressed_token_ids(processor)  # masked in sampling and in scoring alike

    def sample(self, examples: list, num_samples: int) -> Rollouts:
        """num_samples responses (or episodes) to each example's prompt, ordered p0 x G, p1 x G, ..."""
        images, questions = [e.image for e in examples], [e.question for e in examples]
        prompts = build_prompts(self.processor, images, questions, self.max_prompt_tokens).to(self.device)
        inputs, response_ids, mask, completions, tool_calls = sample(
            self.model, self.engine, self.processor, prompts, examples, num_samples, self.max_new_tokens,
            self.temperature, self.tools, self.max_turns, self.train_turns)  # fmt: skip
        rows = [e for e in examples for _ in range(num_samples)]
        return Rollouts(inputs, response_ids, mask, completions, rows, tool_calls, num_samples, self.suppressed_ids,
                        self.temperature)

    def evaluate(self, examples: list, reward) -> dict:
        """Held-out metrics of greedy responses (episodes) scored by `reward` (common/reward.py: the rule's eval/accuracy,
        a reward model's eval/judge_agreement with it), split over torchrun's ranks."""
        def score(part):  # this rank's part of the examples
            completions = greedy_completions(self.model, self.processor, part, self.max_new_tokens,
                                             self.max_prompt_tokens, tools=self.tools, max_turns=self.max_turns)  # fmt: skip
            return reward.evaluation(part, completions)

        return reward.summarize(dist.map_over_ranks(score, examples), "eval")


    def refill(self, batch: Rollouts, slots: list[int], new: Rollouts, informative: torch.Tensor) -> Rollouts:
        """`batch` with its groups `slots` replaced, in order, by the groups of `new` that are `informative` ((B',)
        bool), as many as both have, their rewards included. One-turn responses and agentic episodes alike."""
        G, groups = batch.group_size, informative.nonzero().squeeze(1).tolist()
        replacement = dict(zip(slots, groups))  # a slot of batch -> a group of new
        if not replacement:
            return batch
        both = batch.cat(new, stop_token_id(self.processor), self.processor.tokenizer.pad_token_id)  # batch's, new's
        first = len(batch) // G  # new's group k is both's group first + k
        kept = [first + replacement[g] if g in replacement else g for g in range(first)]  # both's groups, in order
        return both[[g * G + j for g in kept for j in range(G)]]


def draw_examples(examples: list, n: int) -> list:
    """n random examples more for this rank's rollouts (random.sample). Under torchrun every rank draws as many as the
    rank that needs the most, since a rollout's forwards are collectives: [] when no rank needs any."""
    most = dist.all_max(n)
    return dist.for_this_rank(random.sample(examples, most * dist.world_size())) if most else []


def sample(model, rollout_engine, processor, prompts, examples, num_samples: int, max_new_tokens: int,
           temperature: float, tools: dict | None = None, max_turns: int = 1, train_turns: str = "all"):  # fmt: skip
    """num_samples responses per prompt, ordered p0 x G, p1 x G, ..., sampled with HF generate (rollout_engine None)
    or the co-located vLLM engine. With tools, each is a multi-turn episode (common/agent.py). Returns (inputs,
    response_ids, mask, completions, tool_calls), the fields of a Rollouts batch."""
    model.eval()
    if tools:
        episodes = run_episodes(model, rollout_engine, processor, prompts, examples, num_samples, max_new_tokens,
                                temperature, False, tools, max_turns)  # fmt: skip
        inputs, response_ids, mask = episode_batch(prompts, episodes, stop_token_id(processor), train_turns)
        completions, tool_calls = [e.answer for e in episodes], torch.tensor([float(e.tool_calls) for e in episodes])
    else:
        if rollout_engine is None:
            response_ids = generate(model, processor, prompts, num_samples, max_new_tokens, temperature, greedy=False)
        else:
            images = [e.image for e in examples]
            response_ids = rollout_engine.generate(model, prompts, images, num_samples, max_new_tokens, temperature,
                                                   greedy=False)  # fmt: skip
        inputs = take_rows(prompts, [i for i in range(len(examples)) for _ in range(num_samples)])  # each prompt G x
        mask = response_mask(response_ids, stop_token_id(processor))  # 1 up to the end-of-turn token
        completions = processor.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        tool_calls = torch.zeros(len(response_ids))
    model.train()
    return inputs, response_ids, mask, completions, tool_calls


def micro_batches(n: int, size: int) -> list[slice]:
    """Rows 0..n-1 in slices of `size` (the last one shorter): one forward/backward each."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def gradient_accumulation(batch: Rollouts, micro_batch_size: int, *wrapped_models):
    """The batch in micro-batches of micro_batch_size rows, for one forward/backward each, gradients accumulating.
    Under torchrun the gradients are reduced over ranks once, in the last one's backward
    (common.dist.sync_gradients_on_last)."""
    for rows in dist.sync_gradients_on_last(micro_batches(len(batch), micro_batch_size), *wrapped_models):
        yield batch[rows]


def batch_logprobs(model, batch: Rollouts, hidden_states: bool = False):
    """log π of the batch's responses, with gradients when they are enabled: (N, T), 0 where mask == 0. With
    hidden_states, (log-probs, last hidden states (N, T, H)): see common.vlm.response_logprobs."""
    return response_logprobs(model, batch.inputs, batch.response_ids, batch.mask, batch.suppressed_ids,
                             batch.temperature, hidden_states)


@torch.no_grad()
def sequence_logprobs(model, batch: Rollouts, micro_batch_size: int) -> torch.Tensor:
    """log-probs of every response of the batch under `model`, micro-batch by micro-batch, no gradients: (N, T)."""
    chunks = [batch_logprobs(model, batch[rows]) for rows in micro_batches(len(batch), micro_batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros_like(batch.mask)


def reference_logprobs(reference, batch: Rollouts, micro_batch_size: int) -> torch.Tensor:
    """sequence_logprobs under the reference (load_policy): a frozen copy, or the LoRA policy with its adapters
    disabled, which is exactly the initial policy."""
    with reference.disable_adapter() if hasattr(reference, "disable_adapter") else contextlib.nullcontext():
        return sequence_logprobs(reference, batch, micro_batch_size)
