"""Loading a VLM the real way, building its prompts, and scoring responses.

Everything here goes through transformers' Auto classes (`AutoModelForImageTextToText`, `AutoProcessor`), so
a hub id and a local directory load the same way, and the embedded tiny model is loaded exactly like a real
checkpoint. What the training scripts need from a model is three things: a batch of prompts
(`build_prompts`), sampled responses (`generate`), and per-token log-probs of responses (`response_logprobs`).
"""

import json
import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without the video processor.

    transformers' Qwen2-VL video processor needs torchvision, which has no CPU wheel matching our torch; the
    image path (resize, patching, `<|image_pad|>` expansion, `mm_token_type_ids`) is the parent's, unchanged.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Saved as a plain Qwen2VLProcessor, so the checkpoint loads anywhere (with video support where
        torchvision is present)."""
        out = super().save_pretrained(save_directory, **kwargs)
        for name in ("processor_config.json", "tokenizer_config.json"):
            path = os.path.join(save_directory, name)
            if os.path.exists(path):
                config = json.load(open(path))
                config["processor_class"] = "Qwen2VLProcessor"
                json.dump(config, open(path, "w"), indent=2)
        return out


def load_processor(path: str):
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError) as e:
        if "video" not in str(e).lower() and "torchvision" not in str(e).lower():
            raise
        from transformers import AutoConfig

        if AutoConfig.from_pretrained(path).model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise SystemExit(f"cannot load the processor of '{path}' without torchvision: pip install torchvision")
        print("note: torchvision is missing, using Qwen2-VL's processor without video support")
        processor = Qwen2VLImageOnlyProcessor.from_pretrained(path)
    if not hasattr(processor, "image_processor"):
        raise SystemExit(f"'{path}' has no image processor: pass a vision-language checkpoint")
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return processor


def load_vlm(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) from a hub id or a local directory."""
    if os.path.sep in model and not os.path.isdir(model):
        raise SystemExit(f"--model '{model}' is not a directory; pass an existing checkpoint dir or a hub id")
    try:
        processor = load_processor(model)
        vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"could not load --model '{model}' ({str(e).splitlines()[0][:160]}); pass a local checkpoint dir, "
            "or a hub id while online"
        )
    return vlm, processor


def suppressed_token_ids(processor) -> list[int]:
    """Special tokens a response must never contain (image/video pads, vision markers, ...), all but EOS.

    Sampling at temperature 1 over the full vocabulary emits them otherwise, and the next forward fails on
    image tokens without an image. The same ids are masked when scoring, so the policy we train is the
    policy we sample from."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return sorted(special - {eos})


def build_prompts(processor, images, questions, max_prompt_tokens: int):
    """Chat-template prompts with one image each, tokenised and left-padded into one batch."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    batch = processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt")
    longest = int(batch["attention_mask"].sum(1).max())
    if longest > max_prompt_tokens:
        raise SystemExit(
            f"a prompt has {longest} tokens (image tokens included) > --max-prompt-tokens {max_prompt_tokens}; "
            "truncating would cut image tokens: raise --max-prompt-tokens or lower --max-pixels"
        )
    return batch


@torch.no_grad()
def generate(model, processor, prompts, num_samples: int, max_new_tokens: int, temperature: float, greedy: bool):
    """Sample `num_samples` responses per prompt. Returns response ids (B*G, T) padded with EOS after EOS.

    Sampling is over the full distribution (top_k=0, top_p=1): the loss assumes the sampling policy is the
    model's softmax(logits / temperature) with `suppressed_token_ids` removed, nothing else."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(
        **prompts,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None,
        num_return_sequences=num_samples,
        max_new_tokens=max_new_tokens,
        suppress_tokens=suppressed_token_ids(processor),
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return out[:, prompts["input_ids"].shape[1] :]


def response_mask(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it. (B, T) float."""
    is_eos = (response_ids == eos_id).int()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).float()


def select(inputs, indices):
    """Rows `indices` of a processor batch, images included. pixel_values is (patches of all images, D), so
    each sample's block of patch rows is gathered by its image_grid_thw."""
    indices = torch.as_tensor(list(indices), dtype=torch.long)
    out = {k: v[indices] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    blocks = inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist())
    rows = [blocks[i] for i in indices.tolist()]
    out["pixel_values"] = torch.cat(rows) if rows else inputs["pixel_values"][:0]
    out["image_grid_thw"] = inputs["image_grid_thw"][indices]
    return out


def response_logprobs(model, prompts, response_ids, mask, suppressed_ids, temperature: float = 1.0):
    """log π(response token | image, prompt, earlier tokens) for every response position, in one forward pass
    over prompt + response. prompts: (B, P) left-padded batch with image inputs; response_ids, mask: (B, T).
    Returns (B, T); positions where mask == 0 hold 0."""
    prompt_len = prompts["input_ids"].shape[1]
    inputs = dict(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], response_ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], mask.to(prompts["attention_mask"].dtype)], 1)
    if "mm_token_type_ids" in prompts:  # response tokens are text (type 0)
        zeros = torch.zeros_like(response_ids, dtype=prompts["mm_token_type_ids"].dtype)
        inputs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], zeros], dim=1)
    # logits at position i predict token i+1: keep the ones that predict response tokens
    T = response_ids.shape[1]
    logits = model(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1].float() / temperature  # (B, T, V)
    logits[..., suppressed_ids] = float("-inf")  # the policy we sampled from never emits these
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))


@torch.no_grad()
def greedy_accuracy(model, processor, examples, reward_fn, max_new_tokens: int, max_prompt_tokens: int, batch_size=100):
    """Fraction of `examples` answered right (reward 1) with greedy decoding."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        prompts = build_prompts(processor, [e.image for e in batch], [e.question for e in batch], max_prompt_tokens)
        response_ids = generate(model, processor, prompts.to(model.device), 1, max_new_tokens, 1.0, greedy=True)
        texts = processor.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        correct += sum(reward_fn(t, e.answer) == 1.0 for t, e in zip(texts, batch))
    model.train(was_training)
    return correct / len(examples)
