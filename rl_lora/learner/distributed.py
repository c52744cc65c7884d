"""The data-parallel learner: `torchrun --nproc_per_node=L -m rl_lora.cli train CONFIG`.

Each rank holds the frozen base (replicated: an 8B model in bf16 fits one GPU) and the same fp32 adapters and
AdamW state. Rank 0 runs the loop (fleet, rewards, pushes, checkpoints) and hands every rank its shard of the
step's samples; each rank runs forward/backward on its shard, and ONE all-reduce of the flattened adapter
gradients (a rank-1 adapter of an 8B model: ~2.7M floats) makes every rank's gradient that of the whole batch.
The loss normaliser (completion tokens per adapter) is all-reduced first, so the summed gradient is exactly
the single-process one. Every rank then takes the same optimizer step and stays identical without a broadcast.
Backend: nccl on GPU, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from rl_lora.learner.batching import shard


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> tuple[int, int]:
    """Join torchrun's process group (if launched by it)."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def barrier() -> None:
    dist.barrier()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum every parameter's .grad over ranks in one collective (missing grads count as zeros)."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
        offset += n


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Rank 0's values everywhere (they are equal by seeding; this makes it a guarantee)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def send(obj) -> object:
    """Rank 0 sends `obj` to every rank; the others pass None and receive it."""
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


class Leader:
    """Rank 0's handle on the data-parallel learner: `train_step` shares the samples out and learns its shard."""

    def __init__(self, learner):
        self.learner = learner
        _, self.size = world()

    def train_step(self, samples) -> dict:
        send(("train", samples))
        return self.learner.train_step(shard(samples, 0, self.size))

    def stop(self) -> None:
        send(("stop",))


def follow(learner) -> int:
    """Ranks > 0: learn each shard rank 0 sends until told to stop, with the loss this rank's learner was built
    with (the same config as rank 0's). Returns the number of steps taken."""
    rank, size = world()
    steps = 0
    while True:
        msg = send(None)
        if msg[0] == "stop":
            return steps
        _, samples = msg
        learner.train_step(shard(samples, rank, size))
        steps += 1
