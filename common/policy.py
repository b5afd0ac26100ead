"""The trainer's side of a policy that every algorithm handles the same way: making the loaded model trainable
as the flags say, and scoring responses under it without gradients (old log-probs, the reference's)."""

import re

import torch

from common.vlm import response_logprobs, select, vision_tower


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


@torch.no_grad()
def sequence_logprobs(model, inputs, response_ids, mask, suppressed_ids, temperature: float, micro_batch_size: int):
    """log-probs of N responses under `model`, `micro_batch_size` sequences per forward, no gradients: (N, T).
    inputs: the N prompts (a processor batch, row i is response i's prompt); response_ids, mask: (N, T)."""
    N, mb = len(response_ids), micro_batch_size
    chunks = [
        response_logprobs(model, select(inputs, range(s, min(s + mb, N))), response_ids[s : s + mb], mask[s : s + mb], suppressed_ids, temperature)
        for s in range(0, N, mb)
    ]  # fmt: skip
    return torch.cat(chunks) if chunks else torch.zeros_like(mask)
