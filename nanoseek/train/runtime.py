"""The training process: which rank it is, its device and dtype, and everything that talks to
the other ranks. Pretraining, SFT and GRPO loops share it, so none of them touches
`torch.distributed` directly.

    with Runtime.start(device="auto", dtype="auto", parallel="fsdp", ep=2) as rt:
        step_model = rt.wrap(model)               # FSDP2 (or DDP), experts over the EP group
        with rt.autocast():
            loss = step_model(x, targets=y).loss
        norm = rt.clip_grads(model, 1.0)          # the global gradient norm
        rt.all_reduce_sum(counts)

Under `torchrun` (WORLD_SIZE > 1) it joins the process group: NCCL on GPUs, gloo on CPUs, with
a timeout on every collective (NANOSEEK_DIST_TIMEOUT seconds, default 600), so a rank that
dies cannot leave the others waiting forever. The ranks form a 2-D mesh ("replicate", "ep"):
ranks r // ep share their experts' tokens, ranks with the same r % ep hold the same experts.
See docs/distributed.md.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.device import keep_freed_memory, resolve_device, resolve_dtype

PARALLEL = ("fsdp", "ddp")

Value = TypeVar("Value", torch.Tensor, float)


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # of the matmuls, under autocast; parameters stay fp32
    parallel: str = "fsdp"  # the dense parameters: fsdp (sharded) or ddp (replicated)
    ep: int = 1  # ranks the routed experts are split over
    mesh: Any = None  # DeviceMesh ("replicate", "ep") when world > 1: the experts
    dp_mesh: Any = None  # DeviceMesh over all ranks: FSDP2's
    owns_process_group: bool = False  # started it, so close() ends it
    threads_before: int | None = None  # the thread count to restore on close()

    @classmethod
    def start(
        cls,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        parallel: str = "fsdp",
        ep: int = 1,
    ) -> Runtime:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if parallel not in PARALLEL:
            raise ValueError(f"--parallel must be fsdp or ddp, got {parallel!r}")
        if ep < 1 or world % ep:
            raise ValueError(
                f"--ep {ep} must divide the number of processes ({world}); run under "
                f"`torchrun --nproc-per-node {max(ep, 2)}` for expert parallelism"
            )
        dev = resolve_device(device)
        keep_freed_memory()  # no fresh pages for every step's gradients (see its docstring)
        if world > 1 and dev.type == "cuda":  # one GPU per process
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        amp_dtype = resolve_dtype(dtype, dev)
        owns = world > 1 and not dist.is_initialized()
        if owns:
            timeout = timedelta(seconds=float(os.environ.get("NANOSEEK_DIST_TIMEOUT", "600")))
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        mesh = dp_mesh = None
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(dev.type, (world // ep, ep), mesh_dim_names=("replicate", "ep"))
            dp_mesh = init_device_mesh(dev.type, (world,))
        before = None
        if threads:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
        return cls(
            rank, world, local_rank, dev, amp_dtype, parallel, ep, mesh, dp_mesh, owns, before
        )

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
        optimizer (it may replace parameters). On one process: `model` itself. Under torchrun:
        with ep > 1 the routed experts are split over the EP group first (in place); then the
        dense parameters are sharded in place with FSDP2 (`model` is returned, its parameters
        now DTensors) or replicated with DDP (a wrapper is returned; `model`'s parameters stay
        whole). Either way the optimizer, clipping (`clip_grads`) and checkpoints use
        `model.parameters()`. `unused_parameters`: some parameters get no gradient in a step
        (DDP must then look for them)."""
        wrapped = model
        if self.world > 1:
            from nanoseek.train import parallel as par  # DTensor: 2 s to import, so only here

            experts = par.shard_experts(model, self.mesh) if self.ep > 1 else []
            if self.parallel == "fsdp":
                par.apply_fsdp(model, self.dp_mesh, set(experts))
            else:
                # buffers are not broadcast: the expert biases are updated identically on
                # every rank from all-reduced counts; the experts are synced by EP, not DDP
                ignore = [n for n, p in model.named_parameters() if any(p is e for e in experts)]
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, ignore
                )
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
        if self.world == 1:
            return nullcontext()
        inner = getattr(model, "_orig_mod", model)
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            return nullcontext() if sync else inner.no_sync()
        inner.set_requires_gradient_sync(sync)  # FSDP2
        return nullcontext()

    @torch.no_grad()
    def clip_grads(
        self, model: nn.Module, max_norm: float, optimizer: torch.optim.Optimizer | None = None
    ) -> float:
        """Finish the step's gradients (expert-parallel ones averaged like the rest), clip
        them to `max_norm` (inf: no clipping) by their global norm over all ranks, and return
        that norm. Parameters are grouped by how they are spread, since sharded (DTensor) and
        whole tensors, or two meshes, cannot meet in one norm.
        On one process with torch's fused AdamW (or BF16AdamW) as `optimizer`, the gradients
        are not scaled here: its next step divides them by the factor (its `grad_scale`, set
        or cleared on every call), in the pass it makes over them anyway. That saves a read
        and a write of every gradient (~2% of a `small` bf16 step on CPU); the update differs
        from scaling first by rounding only (a division where clip_grad_norm_ multiplies)."""
        model = self.unwrap(model)
        if self.world == 1:
            if _takes_grad_scale(optimizer):
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                total = torch.nn.utils.get_total_norm(grads)
                norm = total.item()
                # clip_grad_norm_'s factor, max_norm / (norm + 1e-6), as a divisor
                clip = norm + 1e-6 > max_norm
                optimizer.grad_scale = (total + 1e-6) / max_norm if clip else None
                return norm
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        from nanoseek.train import parallel as par

        if self.ep > 1:
            par.finish_expert_grads(model, self.world)
        groups: dict[Any, list[torch.Tensor]] = defaultdict(list)
        for p in model.parameters():
            if p.grad is not None:
                groups[id(getattr(p, "device_mesh", None))].append(p)
        norms = [
            par.dtensor_full(torch.nn.utils.get_total_norm([p.grad for p in params]))
            for params in groups.values()
        ]
        total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
        if max_norm < math.inf:
            for params in groups.values():
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total.item()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of the model, whole, on every rank: for checkpoints and for refreshing
        an inference engine's weights. Sharded tensors (FSDP2, EP) are gathered: a
        collective, so call it on every rank."""
        return whole_state_dict(self.unwrap(model))

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


def whole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with sharded tensors (FSDP2, EP) gathered whole: a collective under
    torchrun (call it on every rank); as is on one process."""
    state = model.state_dict()
    if not (dist.is_available() and dist.is_initialized()):
        return state
    from nanoseek.train.parallel import dtensor_full  # DTensor: imported only when sharded

    return {k: dtensor_full(v) for k, v in state.items()}


def _takes_grad_scale(optimizer: torch.optim.Optimizer | None) -> bool:
    """torch's AdamW with fused=True, or BF16AdamW: its step takes a grad_scale to divide the
    gradients by."""
    from nanoseek.train.adamw import BF16AdamW

    if isinstance(optimizer, BF16AdamW):
        return True
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
