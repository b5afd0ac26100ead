"""Step time and peak memory of the three `--optimizer` choices (common/optim.py) on a ~100M-parameter Qwen2-VL,
randomly initialised, trained on random text (an optimizer does not care what the tokens mean).

    python benchmarks/optimizers.py                      # all three, each in a fresh process; a markdown table
    python benchmarks/optimizers.py --optimizer adamw8bit-offload --steps 20 --dtype bfloat16

Each optimizer runs in its own subprocess so that peak RSS (and CUDA's max_memory_allocated) is its own.
On a CPU-only machine the "device" is the CPU too: offloading then only adds a copy of the weights, and
bitsandbytes' 8-bit update on CPU is slow (docs/memory.md); benchmarks/gpu_memory.py measures on a GPU.
"""

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.optim import OPTIMIZERS, make_optimizer, memory_bytes  # noqa: E402
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402  (after common: common/__init__.py)


@dataclass
class Args:
    optimizer: str = "all"
    """one of adamw, adamw8bit, adamw8bit-offload, or 'all' (each in a fresh subprocess, then a table)"""
    steps: int = 5
    """timed training steps (forward, backward, optimizer step) after the warm-up"""
    warmup_steps: int = 1
    """untimed steps first (lazy allocations, first-call overheads)"""
    batch_size: int = 4
    """sequences per step"""
    seq_len: int = 64
    """tokens per sequence"""
    dtype: str = "float32"
    """weights' dtype: float32 or bfloat16"""
    hidden_size: int = 768
    """the language model's width; with the defaults below the model has ~100M parameters"""
    num_layers: int = 12
    """decoder layers"""
    intermediate_size: int = 2048
    """MLP width"""
    vocab_size: int = 32000
    """vocabulary (tied input/output embedding)"""
    cuda: bool = True
    """use CUDA when it is available"""
    seed: int = 1
    """seed for the random weights and tokens"""


def build_model(args: Args) -> Qwen2VLForConditionalGeneration:
    """A Qwen2-VL whose language model has the given size, with a 2-layer vision tower that text never touches."""
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
    return Qwen2VLForConditionalGeneration(config)


def measure(args: Args) -> dict:
    """Train `args.optimizer` for warm-up + timed steps in this process; returns the row of the table."""
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() and args.cuda else "cpu"
    model = build_model(args).to(device, getattr(torch, args.dtype)).train()
    optimizer = make_optimizer(args.optimizer, model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size - 4, (args.batch_size, args.seq_len), device=device)  # no image tokens
    step_times, optimizer_times = [], []
    for step in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        optimizer_start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup_steps:
            step_times.append(time.perf_counter() - start)
            optimizer_times.append(time.perf_counter() - optimizer_start)
    usage, _ = memory_bytes(model, optimizer)
    return {
        "optimizer": args.optimizer,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": sum(step_times) / len(step_times),
        "optimizer_step_s": sum(optimizer_times) / len(optimizer_times),
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,  # ru_maxrss: KiB on Linux
        "cuda_peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "state_MiB": {d: round(u["optimizer state"] / 2**20, 1) for d, u in usage.items() if u["optimizer state"]},
        "device": device,
    }


def main(args: Args):
    if args.optimizer != "all":
        print(json.dumps(measure(args)))
        return
    rows = []
    for name in OPTIMIZERS:  # a fresh process each, so that peak memory is this optimizer's alone
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("optimizer", "cuda")]
        flags += ["--optimizer", name, "--cuda" if args.cuda else "--no-cuda"]
        result = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"\n{rows[0]['params_M']:.1f}M parameters, {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"device {rows[0]['device']}, mean of {args.steps} steps after {args.warmup_steps} warm-up\n")  # fmt: skip
    print("| optimizer | step (s) | of which optimizer.step (s) | peak RSS (GiB) | CUDA peak (GiB) | optimizer state (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cuda_peak = "-" if r["cuda_peak_GiB"] is None else f"{r['cuda_peak_GiB']:.2f}"
        state = ", ".join(f"{d}: {mib}" for d, mib in r["state_MiB"].items())
        print(f"| {r['optimizer']} | {r['step_s']:.2f} | {r['optimizer_step_s']:.2f} | {r['peak_rss_GiB']:.2f} | {cuda_peak} | {state} |")
    print("\noptimizer state: its tensors, per device (common/optim.py memory_bytes); for adamw8bit-offload this includes"
          " the fp32 master weights and fp32 gradient buffers on the CPU")


if __name__ == "__main__":
    main(tyro.cli(Args))
