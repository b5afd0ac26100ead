"""Past one GPU: the same script on N processes, launched by `torchrun`, with `torch.distributed` itself.

    torchrun --nproc-per-node 8 algos/grpo_vlm.py --task counting --model Qwen/Qwen2.5-VL-7B-Instruct ...

Without torchrun (no RANK in the environment) every function here is the single-process identity: world size 1,
rank 0, nothing to reduce. Under torchrun each process (rank) joins one process group (NCCL on GPUs, gloo on CPU)
and the step is split like this:

  prompts      every rank draws the same global batch (Python's `random`, seeded alike) and keeps its contiguous
               share (`for_this_rank`): a group of G responses never spans ranks. Each rank samples its own rollouts.
  update       each rank weights its micro-batches by their share of the *global* step (its sequences or tokens over
               every rank's, `all_sum`), and the engine sums the gradients over ranks (`wrap`): the update is the
               single-process update on the global batch. Every rank runs the same number of forward passes (FSDP's
               are collectives), so a rank that keeps fewer sequences pads with rows whose mask is 0 (`even_rows`).
  engines      --dist fsdp (default): FSDP2's `fully_shard` on every transformer block (the model's
               `_no_split_modules`) and the root, so weights, gradients and optimizer state are split over the ranks.
               --dist ddp: DistributedDataParallel, a full replica per rank, all-reducing gradients.
  metrics      means over every rank's sequences (`gather`, `all_sum`); eval is split over ranks (`map_over_ranks`);
               only rank 0 writes metrics.jsonl, wandb, the progress bar, stdout, checkpoints and the saved model
               (gathered into a full state dict first, so it loads with `from_pretrained` like a single-process one).
"""

import atexit
import contextlib
import math
import os
import sys

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def init(cuda: bool) -> str:
    """Join torchrun's process group if launched by it (once per process); returns this rank's device. Ranks other
    than 0 print nothing to stdout (errors and warnings still reach stderr)."""
    use_cuda = torch.cuda.is_available() and cuda
    if "RANK" not in os.environ:
        return "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        # left to the interpreter's teardown, gloo's threads can abort the process at exit ("terminate called without
        # an active exception", pytorch/pytorch#190489): leave the group while Python is still whole
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu"


def wrap(module: torch.nn.Module, mode: str, trainable: bool = True) -> torch.nn.Module:
    """`module` ready for distributed training; itself when there is one process.

    fsdp: FSDP2's `fully_shard` on each of the model's `_no_split_modules` blocks (decoder layers, vision blocks)
    and on the root, in place: `module` is returned, its parameters now DTensor shards. Its `generate` gathers the
    weights like `forward` does (`register_fsdp_forward_method`). Gradients are summed over ranks, not averaged:
    each rank's loss is already its share of the global step.
    ddp: a DistributedDataParallel wrapper around `module`, which stays the plain model (sample, save and score
    without gradients with it; forward through the wrapper to train). Gradients are summed likewise.
    trainable False (a frozen reference model): fsdp shards it the same way, its root too freed after each forward
    (FSDP2 keeps a root gathered for the backward that follows; a frozen model has none); ddp leaves it as it is."""
    if world_size() == 1:
        return module
    if mode == "ddp":
        if not trainable:
            return module
        on_gpu = next(module.parameters()).is_cuda
        ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=[torch.cuda.current_device()] if on_gpu else None)
        ddp.register_comm_hook(None, _sum_gradients)
        return ddp
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    blocks = set(getattr(_base(module), "_no_split_modules", None) or [])
    for m in module.modules():
        if type(m).__name__ in blocks:
            fully_shard(m)
    fully_shard(module, reshard_after_forward=True if not trainable else None)  # a frozen root: freed after forward
    if hasattr(module, "generate"):
        register_fsdp_forward_method(module, "generate")
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if dist.get_backend() != "nccl":  # gloo has no pre-multiplied sum: a plain one
                m.set_force_sum_reduction_for_comms(True)
    return module


def _base(module):
    """The transformers model inside a peft wrapper (or the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _sum_gradients(state, bucket):
    """DDP communication hook: all-reduce SUM (DDP's default averages over ranks)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def sync_gradients_on_last(micro_batches: list, *wrapped_models):
    """Iterate over a step's micro-batches for gradient accumulation, the gradients reduced over ranks once, in the
    last one's backward: DDP would otherwise add the gradients it already all-reduced again (`no_sync` before the
    last), and FSDP2 saves a reduce-scatter per micro-batch (`set_requires_gradient_sync`)."""
    for i, rows in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.ExitStack() as stack:
            for wrapped in wrapped_models if world_size() > 1 else ():
                if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not last:
                    stack.enter_context(wrapped.no_sync())
                elif is_sharded(wrapped):
                    wrapped.set_requires_gradient_sync(last)
            yield rows


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def is_sharded(module: torch.nn.Module) -> bool:
    """Is it FSDP2-sharded (its forward then a collective: every rank must run it as often)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def for_this_rank(items: list) -> list:
    """This rank's contiguous share of `items`, whose length the world size divides (SharedArgs.check makes sure)."""
    n = len(items) // world_size()
    return items[rank() * n : (rank() + 1) * n]


def map_over_ranks(fn, items: list) -> list:
    """fn(items), computed in equal parts on every rank and gathered in order. The last part is padded with copies of
    the last item (their results dropped), so that every rank makes the same calls (FSDP's forwards are collectives)."""
    if world_size() == 1:
        return fn(items)
    n = math.ceil(len(items) / world_size())
    mine = items[rank() * n : (rank() + 1) * n]
    results = [None] * world_size()
    dist.all_gather_object(results, fn(mine + [items[-1]] * (n - len(mine))))
    return [r for part in results for r in part][: len(items)]


def _on_comm_device(t: torch.Tensor) -> torch.Tensor:
    """A copy of t where the process group's backend can reduce it (NCCL: this rank's GPU; gloo: the CPU)."""
    return t.to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)


def all_sum(x):
    """Sum of a tensor or number over ranks (the same value on every rank)."""
    if world_size() == 1:
        return x
    t = _on_comm_device(torch.as_tensor(x, dtype=None if torch.is_tensor(x) else torch.float64))
    dist.all_reduce(t)
    return t.to(x.device) if torch.is_tensor(x) else t.item()


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape on every rank), concatenated along dim 0 in rank order."""
    if world_size() == 1:
        return t
    local = _on_comm_device(t.contiguous())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def even_rows(keep: list[int]) -> tuple[list[int], int]:
    """(rows, padding): the rows a rank keeps for its update, padded to the most rows any rank keeps by repeating
    row 0, and how many were added. The padded rows must get mask 0 (they then add 0 to every loss and statistic):
    every rank then runs the same micro-batches, even a rank that keeps none."""
    most = all_max(len(keep))
    return keep + [0] * (most - len(keep)), most - len(keep)


def all_max(n: int) -> int:
    """The largest of every rank's n."""
    if world_size() == 1:
        return n
    t = _on_comm_device(torch.tensor(n))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (picklable objects: RNG states, say)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank (a run directory's name, say)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_first(fn, *args):
    """fn(*args) on rank 0 first, then on the other ranks: for a cache that rank 0 fills (the tiny VLM is built
    once, not by every rank at the same time)."""
    if rank() > 0:
        barrier()
    out = fn(*args)
    if rank() == 0:
        barrier()
    return out


def barrier():
    if world_size() > 1:
        dist.barrier()


def full_state_dict(module: torch.nn.Module) -> dict | None:
    """An FSDP2 module's full (unsharded) state dict on rank 0's CPU, None on the other ranks (every rank must call
    it); None for a module that is not sharded (save_pretrained reads it itself)."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if rank() == 0 else None


def optimizer_state(optimizer) -> dict:
    """This rank's optimizer state, saveable with torch.save: a sharded (DTensor) state as its local shard."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    local = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()} for i, s in state["state"].items()}
    return {**state, "state": local}


def load_optimizer_state(optimizer, state: dict):
    """The inverse of optimizer_state: each local shard becomes a DTensor placed like its parameter again."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        if isinstance(p, DTensor):
            for k, v in s.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0:
                    s[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
