"""How a model is spread over ranks: FSDP2 for the dense parameters, expert parallelism (EP)
for the routed experts. `Runtime.wrap` calls these; the model code stays single-device.

Expert parallelism (DeepSeek-V3, GShard): with `ep` ranks in an EP group, rank i of the group
holds experts [i E/ep, (i+1) E/ep) of every MoE layer. Each rank routes its own tokens (the
gate is replicated), sends each (token, expert) pair to the rank holding that expert with
one all-to-all, runs its local experts on what it received, and sends the outputs back with
a second all-to-all; the combine (weighted sum over a token's k experts) is local. Expert
weights are DTensors sharded on dim 0 over the EP mesh dimension (and replicated over the
other), so checkpoints (DCP), clipping and consolidation see their global shape.

Gradients: every rank's loss is the mean over its own tokens, and DDP/FSDP average the dense
gradients over ranks. An expert's gradient arrives summed over the ranks of its EP group
(their tokens came to it), so `finish_expert_grads` sums it over the EP groups that hold the
same experts and divides by the world size: the same mean gradient as one process sees.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from nanoseek.model.moe import Experts, _eager_under_compile


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with its transpose as the backward: rows sent to rank j in the
    forward come back from rank j as gradients."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows: send[j] rows to rank j, recv[j] rows from it."""
    return _AllToAll.apply(x, send, recv, group)


class ParallelExperts(Experts):
    """`Experts` whose weights are sharded over the EP group; `forward` has the same contract
    (x [N, d] -> [N, d]) and dispatches tokens with two all-to-alls."""

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        nn.Module.__init__(self)
        self.inter = experts.inter
        self.mesh = mesh  # 2-D: ("replicate", "ep")
        self.group = mesh.get_group("ep")
        self.ep = mesh["ep"].size()
        self.n_experts = experts.w13.shape[0]
        if self.n_experts % self.ep:
            raise ValueError(
                f"--ep {self.ep}: {self.n_experts} routed experts do not split evenly over "
                f"{self.ep} ranks"
            )
        placements = [Replicate(), Shard(0)]
        self.w13 = nn.Parameter(distribute_tensor(experts.w13.detach(), mesh, placements))
        self.w2 = nn.Parameter(distribute_tensor(experts.w2.detach(), mesh, placements))

    @_eager_under_compile  # collectives and per-step split sizes
    def forward(self, x, weights, indices, counts=None, shared=None) -> torch.Tensor:
        """As `Experts.forward`: the routed experts' output, plus `shared(x)` when given."""
        N, k = indices.shape
        ep, local = self.ep, self.n_experts // self.ep
        if counts is None:
            counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        order = indices.flatten().argsort(stable=True)  # (token, choice) pairs by expert
        token = order // k
        # how many rows each rank of the group sends to each of my experts: [ep, local]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(ep, local)
        sizes = torch.cat([counts.view(ep, local).sum(1), recv_counts.sum(1), recv_counts.sum(0)])
        sizes = sizes.tolist()  # the layer's one host sync
        send, recv, per_expert = sizes[:ep], sizes[ep : 2 * ep], sizes[2 * ep :]

        got = all_to_all(x[token], send, recv, self.group)  # by source rank, then expert
        # regroup by local expert (a stable sort keeps each source's rows in order)
        expert_of_row = torch.arange(local, device=x.device).repeat(ep)
        expert_of_row = expert_of_row.repeat_interleave(recv_counts.flatten(), output_size=len(got))
        perm = expert_of_row.argsort(stable=True)
        w13, w2 = self.w13.to_local(), self.w2.to_local()
        ys = []
        # every expert runs, on zero rows too: each rank then has a gradient for every weight,
        # and the collectives over gradients (clipping) line up across ranks
        for e, h in enumerate(got[perm].split(per_expert)):
            gate, up = F.linear(h, w13[e]).chunk(2, dim=-1)
            ys.append(F.linear(F.silu(gate) * up, w2[e]))
        y = torch.empty_like(got).index_copy(0, perm, torch.cat(ys))  # back to arrival order
        back = all_to_all(y, recv, send, self.group)  # my pairs' outputs, sorted by expert
        w = weights.flatten()[order, None].to(back.dtype)
        out = x.new_zeros(N, x.shape[1]).index_add(0, token, back * w)
        return out if shared is None else out + shared(x)


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace every MoE layer's `Experts` by `ParallelExperts` over `mesh` (in place: call
    it before building the optimizer). -> the expert parameters (DTensors)."""
    params = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is Experts:
                sharded = ParallelExperts(child, mesh)
                setattr(module, name, sharded)
                params += [sharded.w13, sharded.w2]
    return params


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ParallelExperts) for p in (m.w13, m.w2)]


@torch.no_grad()
def finish_expert_grads(model: nn.Module, world: int) -> None:
    """Expert gradients -> the mean over all ranks' tokens (see the module docstring)."""
    for p in expert_params(model):
        if p.grad is None:
            continue
        g = p.grad.to_local()
        mesh = p.grad.device_mesh
        if mesh["replicate"].size() > 1:
            dist.all_reduce(g, group=mesh.get_group("replicate"))
        g.div_(world)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, ignored: set[nn.Parameter]) -> None:
    """FSDP2: each block is a unit (its parameters all-gathered just before it runs and freed
    after), then the rest (embedding, final norm, head). Parameters become DTensors sharded on
    dim 0; `ignored` (the EP experts) are left as they are."""
    from torch.distributed.fsdp import fully_shard

    # an MTP module's norms run outside its forward (the loss calls module.norm): only its
    # block is a unit, the rest stays with the root, gathered for the whole forward
    blocks = list(model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def dtensor_full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective); a plain tensor as is."""
    return x.full_tensor() if isinstance(x, DTensor) else x
