"""The optimizers behind `--optimizer`, and the memory plan the scripts print at start.

    adamw              torch.optim.AdamW: two moments per weight, in the weights' dtype, on the training device.
    adamw8bit          bitsandbytes' AdamW8bit on the weights' device: both moments quantised to 8 bits in blocks of
                       256 values (Dettmers et al., arXiv 2110.02861), 2 bytes per weight instead of 8.
    adamw8bit-offload  AdamW with 8-bit moments run on the CPU (common/adamw8bit.cpp, as fast as torch's fused AdamW
                       there): the moments and an fp32 copy of the weights live in CPU memory; the training
                       device holds only the weights and their gradients.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections import defaultdict

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit-offload")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.01):
    """The optimizer `--optimizer name` asks for, over the parameters that require grad."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        return allocate_state(bitsandbytes().optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay))
    if name == "adamw8bit-offload":
        return CPUOffloadAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise SystemExit(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")


def bitsandbytes():
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # silence a notice about 4-bit matmuls
    import bitsandbytes

    return bitsandbytes


def allocate_state(optimizer):
    """Allocate a bitsandbytes optimizer's state now (its own init_state) instead of at the first step: the memory
    plan then counts real tensors, and running out of memory shows at start. Tensors with fewer than
    min_8bit_size (4096) elements get fp32 moments: bitsandbytes quantises only the big ones."""
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, p in enumerate(group["params"]):
            optimizer.init_state(group, p, group_index, param_index)
    return optimizer


KERNEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adamw8bit.cpp")


def adamw8bit_kernel():
    """common/adamw8bit.cpp as a loaded library, built with g++ on first use (~2 s) into the cache (`$VLRL_CACHE`,
    default ~/.cache/vlrl), one build per source and machine (-march=native: this CPU's vector instructions)."""
    with open(KERNEL, "rb") as f:
        key = hashlib.sha256(f.read() + cpu_model().encode()).hexdigest()
    cache = os.environ.get("VLRL_CACHE", os.path.expanduser("~/.cache/vlrl"))
    library = os.path.join(cache, f"adamw8bit-{key[:16]}.so")
    if not os.path.isfile(library):
        if shutil.which("g++") is None:
            raise SystemExit("--optimizer adamw8bit-offload builds its CPU step with g++: install it (apt install g++), "
                             "or use --optimizer adamw8bit")
        os.makedirs(cache, exist_ok=True)
        building = f"{library}.{os.getpid()}.tmp"  # renamed into place whole: ranks and runs may build at once
        flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
        subprocess.run(["g++", *flags, KERNEL, "-o", building], check=True)
        os.replace(building, library)
    kernel = ctypes.CDLL(library).adamw8bit_step
    pointer, f32, i64 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64
    kernel.argtypes = [pointer] * 6 + [i64, f32, f32, f32, f32, f32, i64, ctypes.c_int]
    return kernel


def cpu_model() -> str:
    """This CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(dict.fromkeys(lines))  # once each: every core repeats them
    except OSError:  # not Linux
        return platform.processor() + platform.machine()


class CPUOffloadAdamW8bit:
    """AdamW with 8-bit moments whose state lives in CPU memory: per weight, the two 8-bit moments and an fp32
    master copy (the bf16 weights on the device are its rounding, so small updates are not lost). One step:
      1. queue every gradient's copy into its CPU buffer at once (non-blocking into pinned memory on CUDA), each
         followed by an event that marks it landed;
      2. tensor by tensor, as soon as its gradient has landed, common/adamw8bit.cpp updates its fp32 master weights
         and moments in one pass on every thread torch uses, and queues the copy of the new master weights into
         the device weights (non-blocking, cast to their dtype): the transfers of the other tensors overlap with
         the CPU's work. CUDA runs the copies before the next forward (same stream), and in the next step a
         gradient's event is recorded after them, so the CPU never writes master weights still being read.
    (For non-blocking copies torch casts bf16 <-> fp32 on the GPU, through a transient fp32 copy of one tensor.)
    CPU memory per weight: 4 (master) + 4 (gradient buffer) + 2 (moments) + 8/256 (block maxima) = 10.03 bytes.
    A weight already on the CPU in fp32 (a CPU run) is its own master copy and its gradient is read where it is:
    no copies and 2.03 bytes per weight."""

    def __init__(self, params, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.kernel = adamw8bit_kernel()
        pin = any(p.is_cuda for p in self.params)  # pinned CPU memory makes host<->device copies asynchronous
        self.in_place = [p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in self.params]
        self.master_weights = [p.data if in_place else torch.empty(p.shape, pin_memory=pin).copy_(p.detach())
                               for p, in_place in zip(self.params, self.in_place)]  # fp32  # fmt: skip
        self.cpu_grads = [None if in_place else torch.empty(p.shape, pin_memory=pin)
                          for p, in_place in zip(self.params, self.in_place)]  # fp32, where gradients land  # fmt: skip
        blocks = [-(-p.numel() // 256) for p in self.params]
        self.state = [{"step": 0, "m_codes": torch.zeros(p.numel(), dtype=torch.uint8), "m_max": torch.zeros(b),
                       "r_codes": torch.zeros(p.numel(), dtype=torch.uint8), "r_max": torch.zeros(b)}
                      for p, b in zip(self.params, blocks)]  # fmt: skip
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}]

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self):
        group, threads = self.param_groups[0], torch.get_num_threads()
        stepped = [i for i, p in enumerate(self.params) if p.grad is not None]  # a weight without a gradient is skipped
        landed = {}  # tensor index: a CUDA event that its gradient's copy has finished
        for i in stepped:
            p, cpu_grad = self.params[i], self.cpu_grads[i]
            if cpu_grad is not None:
                cpu_grad.copy_(p.grad.reshape(p.shape), non_blocking=True)
                if p.is_cuda:
                    landed[i] = torch.cuda.Event()
                    landed[i].record()
        for i in stepped:
            p, master, state = self.params[i], self.master_weights[i], self.state[i]
            if i in landed:
                landed[i].synchronize()  # this tensor's gradient is here; the later ones are still on their way
            grad = p.grad.contiguous() if self.in_place[i] else self.cpu_grads[i]
            state["step"] += 1
            tensors = (master, grad, state["m_codes"], state["m_max"], state["r_codes"], state["r_max"])
            self.kernel(*(t.data_ptr() for t in tensors), master.numel(), group["lr"], *group["betas"], group["eps"],
                        group["weight_decay"], state["step"], threads)  # fmt: skip
            if not self.in_place[i]:
                p.copy_(master, non_blocking=True)  # to the device while the CPU updates the next tensor

    def state_dict(self) -> dict:
        return {"state": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in self.state],
                "param_groups": [dict(g) for g in self.param_groups],
                "master_weights": [m.clone() for m in self.master_weights]}  # fmt: skip

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict):
        """Restores the moments, the step counts, the lr and the fp32 master weights, and writes the latter into the
        device weights."""
        if "state" not in state_dict:  # a checkpoint of bitsandbytes' AdamW8bit, this option's update until 2026-12
            raise SystemExit("this checkpoint's 8-bit optimizer state is bitsandbytes' (an older vlrl): resume it "
                             "with that version, or start the run again")
        for state, saved in zip(self.state, state_dict["state"]):
            state["step"] = saved["step"]
            for key in ("m_codes", "m_max", "r_codes", "r_max"):
                state[key].copy_(saved[key])
        self.param_groups = [dict(g) for g in state_dict["param_groups"]]
        for p, master, saved in zip(self.params, self.master_weights, state_dict["master_weights"]):
            master.copy_(saved)
            p.copy_(master)


MEMORY_ROLES = ("weights", "gradients", "optimizer state", "reference model", "rollout engine", "reward model")


def memory_bytes(model, optimizer, ref_model=None, rollout_engine_bytes: int | None = None, reward_model=None):
    """({device: {role: bytes}}, notes), counted from the tensors themselves (each tensor once). Gradients and
    torch AdamW's moments that do not exist yet are sized from the trainable weights, and a note says so."""
    usage, notes, seen = defaultdict(lambda: dict.fromkeys(MEMORY_ROLES, 0)), [], set()

    def add(role, tensors):  # existing tensors, each counted once, on its device
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                usage[str(t.device)][role] += local_bytes(t)

    def estimate(role, like, copies):  # tensors to come, shaped, typed and placed like `like`
        for p in like:
            usage[str(p.device)][role] += copies * local_bytes(p)

    add("weights", model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    add("gradients", [p.grad for p in trainable])
    if missing := [p for p in trainable if p.grad is None]:
        estimate("gradients", missing, 1)
        notes.append("gradients: not allocated yet, sized as the trainable weights (same dtype and device)")
    offload = isinstance(optimizer, CPUOffloadAdamW8bit)
    state = optimizer.state if offload else list(optimizer.state.values())
    add("optimizer state", [t for param_state in state for t in param_state.values()])
    if not state:  # torch AdamW allocates exp_avg and exp_avg_sq (like the weight) at its first step
        estimate("optimizer state", trainable, 2)
        notes.append("optimizer state: allocated at the first step, sized as 2 moments per trainable weight")
    if offload:
        copies = [t for t, in_place in zip(optimizer.master_weights + optimizer.cpu_grads, optimizer.in_place * 2)
                  if not in_place]  # a CPU fp32 weight is its own master copy and gradient buffer  # fmt: skip
        add("optimizer state", copies)
        if copies:
            notes.append("optimizer state on cpu: 8-bit moments + fp32 master weights + fp32 gradient buffers")
    if ref_model is not None:
        add("reference model", ref_model.parameters())
    if rollout_engine_bytes:
        usage[str(next(model.parameters()).device)]["rollout engine"] += rollout_engine_bytes
    if reward_model is not None:  # a judge or classifier (common/judges.py): its weights, no gradients
        add("reward model", reward_model.model.parameters())
    return usage, notes


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor in this process: an FSDP2-sharded one (a DTensor) holds only its shard here."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def memory_plan(model, optimizer, ref_model=None, rollout_engine_bytes: int | None = None, reward_model=None) -> str:
    """A printable table of memory_bytes in MiB, one column per device."""
    usage, notes = memory_bytes(model, optimizer, ref_model, rollout_engine_bytes, reward_model)
    devices = sorted(usage)
    lines = [f"{'memory plan (MiB)':<20}" + "".join(f"{d:>12}" for d in devices)]
    for role in MEMORY_ROLES:
        lines.append(f"  {role:<18}" + "".join(f"{usage[d][role] / 2**20:>12.1f}" for d in devices))
    lines.append(f"  {'total':<18}" + "".join(f"{sum(usage[d].values()) / 2**20:>12.1f}" for d in devices))
    return "\n".join(lines + [f"  note: {n}" for n in notes])
