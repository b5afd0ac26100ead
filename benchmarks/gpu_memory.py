"""GPU memory and time of one GRPO step of a 3-8B VLM under each memory recipe of docs/memory.md: the bytes the
docs' arithmetic predicts, part by part, next to what torch measures.

    python benchmarks/gpu_memory.py                  # on a GPU: the 4B full/LoRA and 7B LoRA recipes (docs/memory.md)
    python benchmarks/gpu_memory.py --size tiny      # the same code at tiny size, on CPU (tests/test_gpu_memory.py)
    python benchmarks/gpu_memory.py --recipes 3b-full-offload 4b-full-offload-kl

The models are random-init with the architecture and sizes of the published checkpoints (their config.json
values are written below: the hub is out of reach here), our tokenizer carrying Qwen's special tokens, and
the family's real image processor. One step is algos/grpo_vlm.py's: a rollout with HF `generate` (common.policy's
Sampler: B prompts × G samples, one image each, max_new_tokens new tokens; a random model rarely says EOS, so every
response is full length), rewards, group advantages, log-probs under the reference, then micro-batched
forward/backward with `grpo_loss` (gradient_accumulation) and one optimizer step. The rewards are random, so no group has all-equal rewards and the
update sees all B·G sequences: the most a step can take. Each recipe runs a short warm-up step and one
measured step: CUDA's peak allocated bytes per phase (rollout; training = reference scoring + update), the parts held
after the backward pass, and the times.
"""

import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from algos.grpo_vlm import group_advantages, grpo_loss  # noqa: E402  (the script's own heart)
from common.families import QWEN_FAMILIES, TEXT, TINY_QWEN, qwen_vlm  # noqa: E402
from common.optim import make_optimizer, memory_bytes  # noqa: E402
from common.policy import Sampler, batch_logprobs, gradient_accumulation, prepare_policy, reference_logprobs  # noqa: E402
from common.tasks import Example  # noqa: E402
from common.vlm import build_prompts  # noqa: E402

QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")  # fmt: skip
QWEN25_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
MODELS = {  # name: (model_type, text config, vision config, rope), from each checkpoint's published config.json
    "Qwen2.5-VL-3B": ("qwen2_5_vl",
        dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
             vocab_size=151936, tie_word_embeddings=True),
        dict(QWEN25_VISION, out_hidden_size=2048), QWEN25_ROPE),
    "Qwen3-VL-4B": ("qwen3_vl",
        dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
             head_dim=128, vocab_size=151936, tie_word_embeddings=True),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
             hidden_act="gelu_pytorch_tanh"),
        {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
    "Qwen2.5-VL-7B": ("qwen2_5_vl",
        dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
             vocab_size=152064, tie_word_embeddings=False),
        dict(QWEN25_VISION, out_hidden_size=3584), QWEN25_ROPE),
}  # fmt: skip
TINY_MODELS = {"Qwen2.5-VL-3B": "qwen2_5_vl", "Qwen3-VL-4B": "qwen3_vl", "Qwen2.5-VL-7B": "qwen2_5_vl"}
FULL = dict(optimizer="adamw8bit-offload", lora=False, gradient_checkpointing=True)
LORA = dict(optimizer="adamw", lora=True, gradient_checkpointing=True)
RECIPES = {  # docs/memory.md's recipes, all --dtype bfloat16: name -> (model, flags of algos/grpo_vlm.py)
    "4b-full-offload": ("Qwen3-VL-4B", dict(FULL, beta=0.0)),  # the paper's headline: 4B, full-parameter, 24 GB
    "3b-full-offload": ("Qwen2.5-VL-3B", dict(FULL, beta=0.0)),
    "4b-lora-kl": ("Qwen3-VL-4B", dict(LORA, beta=0.04)),
    "7b-lora": ("Qwen2.5-VL-7B", dict(LORA, beta=0.0)),
    "4b-full-offload-kl": ("Qwen3-VL-4B", dict(FULL, beta=0.04)),  # + a full reference copy
}
LORA_ARGS = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
GIB = 2**30


@dataclass
class Args:
    size: Literal["full", "tiny"] = "full"
    """full: the published sizes (a GPU with 32 GB or more: 4b-full-offload-kl peaks near 28 GiB; the offloaded
    recipes also take ~42 GiB of CPU memory); tiny: the same families at tiny size, a 64x64 image, 8 new tokens, B=2, G=2 (CPU, seconds)"""
    recipes: tuple[str, ...] = ("4b-full-offload", "4b-lora-kl", "7b-lora")
    """which recipes, in this order (all: 4b-full-offload 3b-full-offload 4b-lora-kl 7b-lora 4b-full-offload-kl);
    the default three take ~7 minutes on an H200, a lease's 15 minutes leave room for one more try"""
    prompts_per_step: int | None = None
    """B (default: 8 full, 2 tiny)"""
    group_size: int | None = None
    """G (default: 8 full, 2 tiny)"""
    max_new_tokens: int | None = None
    """response length (default: 512 full, 8 tiny)"""
    image_size: int | None = None
    """side of the square image, px (default: 448 full, 64 tiny)"""
    micro_batch_size: int = 2
    """sequences per forward/backward, as --micro-batch-size"""
    max_pixels: int = 401408
    """as --max-pixels (the full size only): at most 512 image tokens at 28 px per token"""
    memory_limit_gib: float | None = None
    """on a GPU, cap this process's CUDA allocations at this many GiB, as on a smaller card (e.g. 23 for a 24 GiB
    one, less its CUDA context): a recipe that does not fit reports 'out of memory' and the next one runs"""
    out: str | None = None
    """also write the results as JSON here (rewritten after each recipe, so a cut-short run keeps what it measured)"""


def build_model(name: str, size: str, device: str, image_pixels: dict):
    """(model, processor): random-init bf16 weights, made on the device directly."""
    if size == "tiny":
        model_type = TINY_MODELS[name]
        vision, rope, text_extra, pixels = TINY_QWEN[model_type]
        config, processor = qwen_vlm(model_type, {**TEXT, **text_extra}, vision, rope, pixels)
    else:
        model_type, text, vision, rope = MODELS[name]
        config, processor = qwen_vlm(model_type, text, vision, rope, image_pixels)
    processor.tokenizer.padding_side = "left"
    torch.manual_seed(0)
    with torch.device(device):
        model = QWEN_FAMILIES[model_type][1]._from_config(config, dtype=torch.bfloat16)
    return model, processor


def predicted_bytes(model, flags: dict, micro_batch_size: int, sequences: int, prompt_len: int, new_tokens: int) -> dict:
    """docs/memory.md's arithmetic, part by part, in bytes on the GPU (P = parameters, bf16 = 2 bytes)."""
    text = model.config.get_text_config()
    P = sum(p.numel() for p in model.parameters())  # before LoRA: the base model
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    lora_params = 0
    if flags["lora"]:  # r * (d_in + d_out) per adapted linear of the language model, fp32
        lora_params = sum(LORA_ARGS["r"] * (m.in_features + m.out_features) for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LORA_ARGS["target_modules"]
                          and ".visual." not in f".{n}.")  # fmt: skip
    trainable_bytes = 4 * lora_params if flags["lora"] else 2 * P
    optimizer = {"adamw": 2 * trainable_bytes, "adamw8bit": 2 * (lora_params or P), "adamw8bit-offload": 0}[flags["optimizer"]]
    L, mb, V = prompt_len + new_tokens, micro_batch_size, text.vocab_size
    parts = {
        "weights": 2 * P + 4 * lora_params,
        "gradients": trainable_bytes,
        "optimizer state": optimizer,
        "reference model": 2 * P if flags["beta"] > 0 and not flags["lora"] else 0,
        # k and v per layer, per token of every sequence: B*G*(prompt + response) tokens
        "kv cache": 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * sequences * L,
        # per micro-batch: each layer's input (checkpointing), one layer recomputed, and the response logits: bf16 out
        # of lm_head, then fp32 (.float(), / temperature, log_softmax) and their gradients
        "activations": mb * L * 2 * (text.num_hidden_layers * text.hidden_size + 4 * text.hidden_size + 3 * text.intermediate_size)
        + mb * new_tokens * V * (2 + 4 * 4),
    }
    parts["rollout peak"] = parts["weights"] + parts["reference model"] + parts["kv cache"]
    parts["training peak"] = sum(parts[k] for k in ("weights", "gradients", "optimizer state", "reference model", "activations"))
    return parts


def grpo_step(model, ref_model, optimizer, processor, examples, flags, G, max_new_tokens, mb, device, optimizer_step=True) -> dict:
    """One step of algos/grpo_vlm.py on the B `examples`, with the peak memory and time of each phase."""
    cuda = device == "cuda"

    def now():  # CUDA runs asynchronously: wait for it before reading the clock
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def phase_start():
        now()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def peak():
        return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (None, None)

    out = {}
    start = phase_start()  # 1. rollout: G samples per prompt
    sampler = Sampler(model, processor, None, None, device, max_new_tokens, 100_000, 1.0, 1, "all")  # HF generate
    batch = sampler.sample(examples, G)  # (B*G, T) responses
    out["rollout peak"], out["rollout peak reserved"] = peak()
    out["rollout s"] = time.perf_counter() - start
    out["response tokens"] = int(batch.mask.sum())

    start = phase_start()  # 2.-4. reward (random: every group kept), advantage, reference, update
    batch.rewards = torch.rand(len(batch))
    batch.advantages = group_advantages(batch.rewards, G).to(device)
    reference = model if flags["lora"] else ref_model  # as load_policy: LoRA's reference is the adapter-less policy
    if flags["beta"] > 0:
        batch.ref_logprobs = reference_logprobs(reference, batch, mb)
    optimizer.zero_grad(set_to_none=True)
    for micro in gradient_accumulation(batch, mb, model):
        logprobs = batch_logprobs(model, micro)
        ref = logprobs.detach() if micro.ref_logprobs is None else micro.ref_logprobs
        loss = grpo_loss(logprobs, logprobs.detach(), ref, micro.advantages, micro.mask, 0.2, flags["beta"])[0]
        (loss * len(micro) / len(batch)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    out["parts"] = dict(memory_bytes(model, optimizer, ref_model)[0][str(next(model.parameters()).device)])
    optimizer_start = now()
    if optimizer_step:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out["optimizer step s"] = now() - optimizer_start
    out["training peak"], out["training peak reserved"] = peak()
    out["training s"] = now() - start
    return out


def run_recipe(name: str, args: Args, device: str) -> dict:
    model_name, flags = RECIPES[name]
    B, G, T = args.prompts_per_step, args.group_size, args.max_new_tokens
    built = time.perf_counter()
    pixels = dict(min_pixels=3136, max_pixels=args.max_pixels)
    model, processor = build_model(model_name, args.size, device, pixels)
    ref_model = None
    if flags["beta"] > 0 and not flags["lora"]:
        ref_model = build_model(model_name, args.size, device, pixels)[0].eval().requires_grad_(False)
    image = Image.new("RGB", (args.image_size, args.image_size), (128, 96, 64))
    examples = [Example(image, "How many objects are in the image? Think, then answer.", "3")] * B
    prompts = build_prompts(processor, [e.image for e in examples], [e.question for e in examples], 100_000)
    prompt_len = int(prompts["attention_mask"].sum(1).max())
    predicted = predicted_bytes(model, flags, args.micro_batch_size, B * G, prompt_len, T)
    lora = LORA_ARGS if flags["lora"] else None
    model = prepare_policy(model, gradient_checkpointing=flags["gradient_checkpointing"], lora=lora)
    optimizer = make_optimizer(flags["optimizer"], model.parameters(), lr=1e-6)
    setup_s = time.perf_counter() - built
    # a short warm-up step (first calls: CUDA's libraries, kernel choices), without the optimizer step (the offloaded
    # one takes seconds whatever the length), then the measured step
    warmup = grpo_step(model, ref_model, optimizer, processor, examples, flags, G, min(T, 8), args.micro_batch_size, device, False)
    measured = grpo_step(model, ref_model, optimizer, processor, examples, flags, G, T, args.micro_batch_size, device)
    result = {
        "recipe": name, "model": model_name, "flags": flags, "device": device, "prompt tokens": prompt_len,
        "B": B, "G": G, "max_new_tokens": T, "micro_batch_size": args.micro_batch_size, "setup s": setup_s,
        "warm-up step s": warmup["rollout s"] + warmup["training s"], "predicted": predicted, "measured": measured,
        "cpu optimizer bytes": memory_bytes(model, optimizer)[0].get("cpu", {}).get("optimizer state", 0) if device == "cuda" else None,
    }  # fmt: skip
    return result


def report(results: list[dict], unit: str = "GiB") -> str:
    """Markdown: one table of the recipes' peaks and times, one of the parts, predicted vs measured."""

    def gib(x) -> str:
        return "n/a" if x is None else f"{x / (GIB if unit == 'GiB' else 2**20):.2f}"

    lines = [f"| recipe | model | prompt + new tokens, B×G | rollout peak {unit} (pred / meas / reserved) | training peak {unit} (pred / meas / reserved) | rollout s (tokens/s) | training s (optimizer step s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if "out of memory" in r:
            lines.append(f"| {r['recipe']} | {r['model']} | out of memory: {r['out of memory']} |||||")
            continue
        p, m = r["predicted"], r["measured"]
        lines.append(
            f"| {r['recipe']} | {r['model']} | {r['prompt tokens']} + {r['max_new_tokens']}, {r['B']}×{r['G']} "
            f"| {gib(p['rollout peak'])} / {gib(m['rollout peak'])} / {gib(m['rollout peak reserved'])} "
            f"| {gib(p['training peak'])} / {gib(m['training peak'])} / {gib(m['training peak reserved'])} "
            f"| {m['rollout s']:.1f} ({m['response tokens'] / m['rollout s']:.0f}) | {m['training s']:.1f} ({m['optimizer step s']:.1f}) |"
        )
    parts = ["weights", "gradients", "optimizer state", "reference model"]
    lines += ["", "| recipe | " + " | ".join(f"{k} {unit} (pred / meas)" for k in parts) + f" | optimizer state on CPU {unit} |",
              "|---|" + "---|" * (len(parts) + 1)]  # fmt: skip
    for r in filter(lambda r: "out of memory" not in r, results):
        cells = [f"{gib(r['predicted'][k])} / {gib(r['measured']['parts'][k])}" for k in parts]
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + f" | {gib(r['cpu optimizer bytes'])} |")
    return "\n".join(lines)


def main(args: Args):
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes {' '.join(unknown)}: choose from {', '.join(RECIPES)}")
    tiny = args.size == "tiny"
    for field, full, small in [("prompts_per_step", 8, 2), ("group_size", 8, 2), ("max_new_tokens", 512, 8), ("image_size", 448, 64)]:
        if getattr(args, field) is None:
            setattr(args, field, small if tiny else full)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        print("note: no GPU: measuring the full sizes on the CPU (peaks are CUDA's, so they read n/a)")
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        if args.memory_limit_gib:
            torch.cuda.set_per_process_memory_fraction(args.memory_limit_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    results = []
    for name in args.recipes:
        start = time.perf_counter()
        try:
            results.append(run_recipe(name, args, device))
        except torch.OutOfMemoryError as e:
            results.append({"recipe": name, "model": RECIPES[name][0], "out of memory": str(e).split(".")[0]})
        gc.collect()  # after an out-of-memory error too: its traceback held the recipe's tensors
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(report(results, "MiB" if tiny else "GiB"))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
