"""The optimizers behind `--optimizer`, and the memory plan the scripts print at start.

    adamw              torch.optim.AdamW: two moments per weight, in the weights' dtype, on the training device.
    adamw8bit          bitsandbytes' AdamW8bit on the weights' device: both moments quantised to 8 bits in blocks of
                       256 values (Dettmers et al., arXiv 2110.02861), 2 bytes per weight instead of 8.
    adamw8bit-offload  the same 8-bit update, run on the CPU: the moments and an fp32 copy of the weights live in CPU
                       memory; the training device holds only the weights and their gradients.
"""

import logging
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


class CPUOffloadAdamW8bit:
    """AdamW8bit whose state lives in CPU memory: per weight, the 8-bit moments and an fp32 master copy (the bf16
    weights on the device are its rounding, so small updates are not lost). One step:
      1. copy every gradient into its CPU buffer: all copies queued at once (non-blocking into pinned memory on
         CUDA), then one wait;
      2. bitsandbytes updates the fp32 master weights on the CPU (the device idles meanwhile: no overlap here);
      3. copy the master weights into the device weights, cast to their dtype: queued non-blocking, they overlap
         with what Python does next; CUDA runs them before the next forward (same stream), and the next step's
         wait in 1. makes sure they are done before the CPU writes the master weights again.
    (For non-blocking copies torch casts bf16 <-> fp32 on the GPU, through a transient fp32 copy of one tensor.)
    On a CPU-only run the fp32 copy doubles the weights' memory and buys nothing: use adamw8bit there."""

    def __init__(self, params, lr: float, weight_decay: float = 0.01):
        self.params = list(params)
        pin = any(p.is_cuda for p in self.params)  # pinned CPU memory makes host<->device copies asynchronous
        self.master_weights = [torch.empty(p.shape, pin_memory=pin).copy_(p.detach()) for p in self.params]  # fp32
        self.cpu_grads = [torch.empty(p.shape, pin_memory=pin) for p in self.params]  # fp32, where gradients land
        cpu_optimizer = bitsandbytes().optim.AdamW8bit(self.master_weights, lr=lr, weight_decay=weight_decay)
        self.cpu_optimizer = allocate_state(cpu_optimizer)

    @property
    def param_groups(self):  # bitsandbytes' own groups: setting ["lr"] here sets the lr of the update
        return self.cpu_optimizer.param_groups  # (a property: load_state_dict replaces the list)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self):
        for p, master, cpu_grad in zip(self.params, self.master_weights, self.cpu_grads):
            master.grad = None if p.grad is None else cpu_grad.copy_(p.grad, non_blocking=True)  # None: skipped
        if any(p.is_cuda for p in self.params):
            torch.cuda.synchronize()  # the gradients must have landed before the CPU reads them
        self.cpu_optimizer.step()
        for p, master in zip(self.params, self.master_weights):
            if master.grad is not None:
                p.copy_(master, non_blocking=True)

    def state_dict(self) -> dict:
        return {"cpu_optimizer": self.cpu_optimizer.state_dict(), "master_weights": [m.clone() for m in self.master_weights]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict):
        """Restores the moments and the fp32 master weights, and writes the latter into the device weights."""
        self.cpu_optimizer.load_state_dict(state_dict["cpu_optimizer"])
        for p, master, saved in zip(self.params, self.master_weights, state_dict["master_weights"]):
            master.copy_(saved)
            p.copy_(master)


MEMORY_ROLES = ("weights", "gradients", "optimizer state", "reference model", "rollout engine")


def memory_bytes(model, optimizer, ref_model=None, rollout_engine_bytes: int | None = None):
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
    state = (optimizer.cpu_optimizer if offload else optimizer).state
    add("optimizer state", [t for param_state in state.values() for t in param_state.values()])
    if not state:  # torch AdamW allocates exp_avg and exp_avg_sq (like the weight) at its first step
        estimate("optimizer state", trainable, 2)
        notes.append("optimizer state: allocated at the first step, sized as 2 moments per trainable weight")
    if offload:
        add("optimizer state", optimizer.master_weights + optimizer.cpu_grads)
        notes.append("optimizer state on cpu: 8-bit moments + fp32 master weights + fp32 gradient buffers")
    if ref_model is not None:
        add("reference model", ref_model.parameters())
    if rollout_engine_bytes:
        usage[str(next(model.parameters()).device)]["rollout engine"] += rollout_engine_bytes
    return usage, notes


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor in this process: an FSDP2-sharded one (a DTensor) holds only its shard here."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def memory_plan(model, optimizer, ref_model=None, rollout_engine_bytes: int | None = None) -> str:
    """A printable table of memory_bytes in MiB, one column per device."""
    usage, notes = memory_bytes(model, optimizer, ref_model, rollout_engine_bytes)
    devices = sorted(usage)
    lines = [f"{'memory plan (MiB)':<20}" + "".join(f"{d:>12}" for d in devices)]
    for role in MEMORY_ROLES:
        lines.append(f"  {role:<18}" + "".join(f"{usage[d][role] / 2**20:>12.1f}" for d in devices))
    lines.append(f"  {'total':<18}" + "".join(f"{sum(usage[d].values()) / 2**20:>12.1f}" for d in devices))
    return "\n".join(lines + [f"  note: {n}" for n in notes])
