"""The CPU optimizers side by side: ns per parameter per step, cores busy and state bytes per parameter of each
`--optimizer` choice (common/optim.py) beside torch's fused AdamW and DeepSpeed's CPU Adam (ZeRO-Offload's), on the
weights of a ~100M-parameter Qwen2-VL (its real tensor shapes), with the same random gradients for every optimizer.

    python benchmarks/optimizers.py                       # a markdown table; ~2 minutes on 2 cores
    python benchmarks/optimizers.py --hidden-size 2048    # ~0.5B parameters

Only optimizer.step() is timed, on fp32 CPU tensors, where DeepSpeedCPUAdam runs in ZeRO-Offload: there the
weights are adamw8bit-offload's own master copy and nothing is copied (from a GPU, its gradient and weight copies
overlap its CPU work tensor by tensor; benchmarks/gpu_memory.py times that step on a GPU). "vs AdamW": per tensor, |w - w_adamw| / |w_adamw - w_0| after all the steps, the largest, where
w_adamw is torch.optim.AdamW's result from the same start and gradients (tests/test_optim.py asks < 0.10 of the
offload). DeepSpeedCPUAdam needs `pip install deepspeed` (requirements-bench.txt; its C++ op builds with g++ and
ninja on first use, a few minutes); without it its row says so.
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.optim import OPTIMIZERS, make_optimizer, memory_bytes  # noqa: E402
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402  (after common: common/__init__.py)

LR, WEIGHT_DECAY = 1e-4, 0.01


@dataclass
class Args:
    steps: int = 5
    """timed optimizer steps, after the warm-up"""
    warmup_steps: int = 2
    """untimed steps first (lazy state allocation, a kernel's first build or load)"""
    hidden_size: int = 768
    """the language model's width; with the defaults below the model has ~100M parameters"""
    num_layers: int = 12
    """decoder layers"""
    intermediate_size: int = 2048
    """MLP width"""
    vocab_size: int = 32000
    """vocabulary (tied input/output embedding)"""
    seed: int = 1
    """seed for the random weights and gradients"""
    deepspeed: bool = True
    """compare DeepSpeedCPUAdam too (when installed; its op builds on first use, a few minutes)"""


def model_weights(args: Args) -> list[torch.Tensor]:
    """The weights of a random Qwen2-VL of this size (its language model, and a 2-layer vision tower), fp32."""
    heads = args.hidden_size // 64  # head_dim 64
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=heads, num_key_value_heads=2,
                         vocab_size=args.vocab_size, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=2, embed_dim=64, num_heads=2, hidden_size=args.hidden_size),
        image_token_id=args.vocab_size - 1, video_token_id=args.vocab_size - 2,
        vision_start_token_id=args.vocab_size - 3, vision_end_token_id=args.vocab_size - 4, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return [p.detach().clone() for p in Qwen2VLForConditionalGeneration(config).parameters()]


def deepspeed_cpu_adam(params):
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return None
    return DeepSpeedCPUAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, adamw_mode=True)


CHOICES = {  # name: how to build it over the parameters (None: not installed)
    "torch AdamW(fused=True)": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True),
    **{f"--optimizer {name}": lambda params, name=name: make_optimizer(name, params, lr=LR, weight_decay=WEIGHT_DECAY)
       for name in OPTIMIZERS},  # fmt: skip
    "DeepSpeedCPUAdam": deepspeed_cpu_adam,
}


def measure(build, start: list[torch.Tensor], args: Args):
    """(ns per parameter per step, cores busy, state bytes per parameter, final weights), or None if not installed."""
    params = [torch.nn.Parameter(w.clone()) for w in start]
    optimizer = build(params)
    if optimizer is None:
        return None
    generator = torch.Generator().manual_seed(args.seed)
    wall = cpu = 0.0
    for step in range(args.warmup_steps + args.steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.step()
        if step >= args.warmup_steps:
            wall += time.perf_counter() - wall_start
            cpu += time.process_time() - cpu_start
    numel = sum(p.numel() for p in params)
    model = torch.nn.ParameterList(params)
    state = memory_bytes(model, optimizer)[0]["cpu"]["optimizer state"]
    return wall / args.steps / numel * 1e9, cpu / wall, state / numel, [p.detach() for p in params]


def distance(weights, reference, start) -> float:
    return max(((w - r).norm() / (r - s).norm()).item() for w, r, s in zip(weights, reference, start))


def main(args: Args):
    start = model_weights(args)
    numel = sum(w.numel() for w in start)
    print(f"{numel / 1e6:.1f}M fp32 parameters in {len(start)} tensors, {torch.get_num_threads()} threads, "
          f"mean of {args.steps} steps after {args.warmup_steps} warm-up\n")  # fmt: skip
    rows = {}
    for name, build in CHOICES.items():
        if name == "DeepSpeedCPUAdam" and not args.deepspeed:
            continue
        rows[name] = measure(build, start, args)
        print(f"{name}: {'not installed' if rows[name] is None else f'{rows[name][0]:.2f} ns/parameter'}", flush=True)
    reference = rows["--optimizer adamw"][3]  # torch.optim.AdamW, as the scripts make it
    print("\n| optimizer on the CPU | ns / parameter / step | cores busy | state bytes / parameter | vs AdamW |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        if row is None:
            print(f"| {name} | not installed (`pip install -r requirements-bench.txt`) | | | |")
            continue
        ns, cores, state, weights = row
        if name == "--optimizer adamw8bit-offload":  # from a GPU it adds an fp32 master copy and gradient buffer
            state = f"{state:.2f} ({state + 8:.2f} from a GPU)"
        else:
            state = f"{state:.2f}"
        print(f"| {name} | {ns:.2f} | {cores:.2f} | {state} | {distance(weights, reference, start):.3f} |")
    offload, deepspeed = rows["--optimizer adamw8bit-offload"], rows.get("DeepSpeedCPUAdam")
    if deepspeed is not None:
        print(f"\nadamw8bit-offload / DeepSpeedCPUAdam: {offload[0] / deepspeed[0]:.2f}x the time per parameter")
    print("\nstate: the optimizer's tensors in CPU memory (common/optim.py memory_bytes)")


if __name__ == "__main__":
    main(tyro.cli(Args))
