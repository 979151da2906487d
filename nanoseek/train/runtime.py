"""The training process: which rank it is, its device and dtype, and everything that talks to
the other ranks. Pretraining, SFT and GRPO loops share it, so none of them touches
`torch.distributed` directly.

    with Runtime.start(device="auto", dtype="auto") as rt:   # one process, or under torchrun
        step_model = rt.wrap(model)                          # DDP over the ranks
        with rt.autocast():
            loss = step_model(x, targets=y).loss
        rt.all_reduce_sum(counts)

Under `torchrun` (WORLD_SIZE > 1) it joins the process group: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.device import resolve_device, resolve_dtype

Value = TypeVar("Value", torch.Tensor, float)


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # of the matmuls, under autocast; parameters stay fp32
    owns_process_group: bool = False  # started it, so close() ends it
    threads_before: int | None = None  # the thread count to restore on close()

    @classmethod
    def start(
        cls, device: str = "auto", dtype: str = "auto", threads: int | None = None
    ) -> Runtime:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device)
        if world > 1 and dev.type == "cuda":  # one GPU per process
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        amp_dtype = resolve_dtype(dtype, dev)
        owns = world > 1 and not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        before = None
        if threads:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
        return cls(rank, world, local_rank, dev, amp_dtype, owns, before)

    @property
    def master(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # --- the model -------------------------------------------------------------------------

    def wrap(
        self, model: nn.Module, unused_parameters: bool = False, compile: bool = False
    ) -> nn.Module:
        """The module to run forward and backward through. Call it before building the
        optimizer: the optimizer, clipping and checkpoints then use `model`'s parameters,
        which stay whole under DDP. `unused_parameters`: some parameters get no gradient in a
        step (DDP must then look for them).

        DDP today. FSDP2 goes here too: `fully_shard` each block, then the model, in place;
        the parameters become sharded DTensors, so optimizer and clipping work unchanged and
        `full_state_dict` below gathers them."""
        wrapped = model
        if self.world > 1:
            # buffers are not broadcast: the expert biases are updated identically on every
            # rank from all-reduced counts
            wrapped = nn.parallel.DistributedDataParallel(
                model, broadcast_buffers=False, find_unused_parameters=unused_parameters
            )
        return torch.compile(wrapped) if compile else wrapped

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        model = getattr(model, "_orig_mod", model)  # torch.compile
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def sync_grads(self, model: nn.Module, sync: bool) -> AbstractContextManager:
        """Around a micro-batch's forward and backward: sync=False keeps its gradients local
        (accumulating), sync=True (the last micro-batch) reduces them across ranks."""
        if sync or self.world == 1:
            return nullcontext()
        return model.no_sync()  # FSDP2: model.set_requires_gradient_sync(False)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of the model, whole, on every rank: for checkpoints and for refreshing
        an inference engine's weights. Under DDP each rank holds it already; under FSDP2
        this is a collective (`get_model_state_dict(full_state_dict=True)`): call it on all
        ranks."""
        return self.unwrap(model).state_dict()

    # --- across ranks ----------------------------------------------------------------------

    def all_reduce_sum(self, x: Value) -> Value:
        """A tensor is reduced in place (and returned); a number comes back reduced."""
        return self._reduce(x, mean=False)

    def all_reduce_mean(self, x: Value) -> Value:
        return self._reduce(x, mean=True)

    def _reduce(self, x: Value, mean: bool) -> Value:
        if self.world == 1:
            return x
        t = (
            x
            if isinstance(x, torch.Tensor)
            else torch.tensor([x], dtype=torch.float64, device=self.device)
        )
        if t.numel():
            dist.all_reduce(t)
            if mean:
                t /= self.world
        return t if isinstance(x, torch.Tensor) else t.item()

    def broadcast(self, x: Value, src: int = 0) -> Value:
        """Rank `src`'s value on every rank (so that, say, all agree when the time is up)."""
        if self.world == 1:
            return x
        if isinstance(x, torch.Tensor):
            dist.broadcast(x, src)
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src)
        return t.item()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # --- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
            self.threads_before = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
