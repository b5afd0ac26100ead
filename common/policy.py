"""The actor and the reference, handled the same way by every algorithm: loading them as the flags say, sampling
responses (HF generate or the vLLM engine), and scoring responses micro-batch by micro-batch."""

import os
import re

import torch

from common.agent import episode_batch, run_episodes
from common.dist import wrap
from common.runs import weights_fingerprint
from common.vlm import generate, load_vlm, response_logprobs, response_mask, select, stop_token_id, vision_tower


def load_policy(args, model_path: str, checkpoint: str | None, state: dict | None, device: str):
    """(model, processor, reference, reference_fingerprint): the actor (the policy we train), made trainable as the
    memory flags say, and the reference (the frozen KL anchor, the initial policy): None with --beta 0 or in a script
    without a KL term (no args.beta), a frozen copy of model_path, or with --lora the policy itself (scored with its
    adapters disabled: the base weights, no second copy). Under torchrun a frozen copy is sharded like the actor
    (common/dist.py); the actor is wrapped by the script. A resumed run's actor comes from its checkpoint (`state`
    its state.pt): its full weights, or the base and its adapters; its reference must be the one the run started
    with (the fingerprint says)."""
    dtype = getattr(torch, args.dtype)
    policy_path = os.path.join(checkpoint, "model") if checkpoint and not args.lora else model_path
    model, processor = load_vlm(policy_path, dtype, device, args.min_pixels, args.max_pixels)
    fingerprint = weights_fingerprint(model) if args.lora else None  # LoRA: the base model is the reference
    lora = dict(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=list(args.lora_target_modules)) if args.lora else None  # fmt: skip
    adapter_dir = os.path.join(checkpoint, "adapter") if checkpoint and args.lora else None
    model = prepare_policy(model, args.freeze_vision_tower, args.gradient_checkpointing, lora, adapter_dir)
    reference, beta = None, getattr(args, "beta", 0.0)
    if beta > 0 and args.lora:
        reference = model
    elif beta > 0:
        reference = load_vlm(model_path, dtype, device, args.min_pixels, args.max_pixels)[0].eval().requires_grad_(False)
        fingerprint = weights_fingerprint(reference)
        reference = wrap(reference, args.dist, trainable=False)  # torchrun: FSDP2 shards it too (DDP: a replica)
    if checkpoint and fingerprint != state["reference_fingerprint"]:
        raise SystemExit(f"--resume: the reference model ({model_path}) is not the one the run started with: resume where its --model is the same checkpoint")
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


def sample(model, rollout_engine, processor, prompts, examples, num_samples: int, max_new_tokens: int, temperature: float,
           tools: dict | None = None, max_turns: int = 1, train_turns: str = "all"):  # fmt: skip
    """num_samples responses per prompt, ordered p0 x G, p1 x G, ..., sampled with HF generate (rollout_engine None)
    or the co-located vLLM engine (wake, push the current weights, sample, sleep; common/rollout.py). With tools, each
    is a multi-turn episode (common/agent.py). Returns (inputs, response_ids, mask, completions, tool_calls): inputs,
    the prompts (B*G rows, each with its episode's images); response_ids, mask (B*G, T): mask 1 on the model-written
    tokens trained on (up to the end-of-turn token; an episode's tool turns 0); completions, the texts the reward
    reads (an episode's last turn); tool_calls (B*G,), how many tool calls each made."""
    model.eval()
    if tools:
        episodes = run_episodes(model, rollout_engine, processor, prompts, examples, num_samples, max_new_tokens, temperature, False, tools, max_turns)
        inputs, response_ids, mask = episode_batch(prompts, episodes, stop_token_id(processor), train_turns)
        completions, tool_calls = [e.answer for e in episodes], torch.tensor([float(e.tool_calls) for e in episodes])
    else:
        if rollout_engine is None:
            response_ids = generate(model, processor, prompts, num_samples, max_new_tokens, temperature, greedy=False)
        else:
            response_ids = rollout_engine.generate(model, prompts, [e.image for e in examples], num_samples, max_new_tokens, temperature, greedy=False)
        inputs = select(prompts, [i for i in range(len(examples)) for _ in range(num_samples)])  # each prompt G times
        mask = response_mask(response_ids, stop_token_id(processor))  # 1 up to the end-of-turn token
        completions, tool_calls = processor.tokenizer.batch_decode(response_ids, skip_special_tokens=True), torch.zeros(len(response_ids))
    model.train()
    return inputs, response_ids, mask, completions, tool_calls


def micro_batches(n: int, size: int) -> list[slice]:
    """Rows 0..n-1 in slices of `size` (the last one shorter): one forward/backward each."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def micro_batch_logprobs(model, rows: slice, inputs, response_ids, mask, suppressed_ids, temperature: float, hidden_states: bool = False):
    """log π of the responses in `rows` (a micro-batch), with gradients when they are enabled: (rows, T).
    inputs: the N prompts (a processor batch, row i is response i's prompt); response_ids, mask: (N, T).
    With hidden_states, (log-probs, last hidden states (rows, T, H)): see response_logprobs."""
    prompts = select(inputs, range(rows.start, rows.stop))
    return response_logprobs(model, prompts, response_ids[rows], mask[rows], suppressed_ids, temperature, hidden_states)


@torch.no_grad()
def sequence_logprobs(model, inputs, response_ids, mask, suppressed_ids, temperature: float, micro_batch_size: int):
    """log-probs of all N responses under `model`, micro-batch by micro-batch, no gradients: (N, T)."""
    scoring = (inputs, response_ids, mask, suppressed_ids, temperature)
    chunks = [micro_batch_logprobs(model, rows, *scoring) for rows in micro_batches(len(response_ids), micro_batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros_like(mask)


def reference_logprobs(reference, inputs, response_ids, mask, suppressed_ids, temperature: float, micro_batch_size: int):
    """sequence_logprobs under the reference (load_policy): a frozen copy, or the LoRA policy with its adapters
    disabled, which is exactly the initial policy."""
    scoring = (inputs, response_ids, mask, suppressed_ids, temperature, micro_batch_size)
    if hasattr(reference, "disable_adapter"):  # a peft model (transformers' own models have disable_adapters)
        with reference.disable_adapter():
            return sequence_logprobs(reference, *scoring)
    return sequence_logprobs(reference, *scoring)
