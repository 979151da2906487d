"""Training checkpoints: one directory a Hugging Face loader, nanoseek's engine and `--resume`
all read.

    ckpt/
      config.json, model.safetensors       weights (fp32) in the HF DeepSeek-V3 layout,
                                           gate biases as e_score_correction_bias
      tokenizer.json, tokenizer_config.json
      train_state/state.json               RunState: step, tokens, times, LR horizon, config
      train_state/optimizer/               AdamW moments, a torch.distributed.checkpoint
      train_state/rng.pt                   torch RNG states (rank 0's)
      train_state/<name>.safetensors       tensors a loop keeps besides the model's (async
                                           GRPO: the weights its rollouts in flight sample)

Under torchrun every rank calls `save_checkpoint`: the weights are gathered whole and written
by rank 0; the optimizer state is written by DCP, each rank its own shard, with the global
layout in its metadata, so a run saved on N ranks resumes on M (DCP reshards on load) and
every checkpoint opens in `transformers` as it is.

The whole directory is written under a temporary name and renamed into place, so a crash
mid-save leaves the previous checkpoint untouched. Between the two renames of the swap the
old one is briefly `.ckpt.old`; `find_checkpoint` falls back to it, and it is deleted only
once the new one is in place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.hub import CheckpointError, from_pretrained, write_pretrained
from nanoseek.model import Transformer
from nanoseek.train.budget import Budget
from nanoseek.train.runtime import whole_state_dict
from nanoseek.utils import atomic_dir, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class RunState:
    """Where a run stands: with the weights, optimizer and RNG states, all a resumed run needs
    to repeat the uninterrupted one exactly."""

    lr_horizon: Budget  # what the schedules run over: fixed when the run starts
    train_config: dict[str, Any] = field(default_factory=dict)  # the run's settings, as given
    tokenizer: str = ""  # hash of the tokenizer the model is trained with
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens seen, all ranks
    elapsed: float = 0.0  # wall seconds, evaluation and checkpoints included
    train_seconds: float = 0.0  # wall seconds in training steps only
    # what a loop keeps besides (SFT: its data's hash; GRPO: seconds in rollouts and updates)
    extra: dict[str, Any] = field(default_factory=dict)

    def progress(self, budget: Budget) -> float:
        return budget.fraction(self.step, self.tokens, self.elapsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # the horizon too, as a plain dict

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        # checkpoints from before the horizon was saved ran over their config's budget
        values["lr_horizon"] = Budget.from_dict(d.get("lr_horizon") or d.get("train_config", {}))
        return cls(**values)


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    tokenizer_dir: str | Path | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint (a collective under torchrun: call it on every rank). `model` is
    the one whose parameters the optimizer holds (not a DDP wrapper); `extra_tensors` (rank
    0's) are written as train_state/<name>.safetensors, read back by `read_extra_tensors`."""
    import torch.distributed.checkpoint as dcp  # ~1 s to import: only when saving
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    path = Path(path)
    rank0 = not _distributed() or dist.get_rank() == 0
    weights = whole_state_dict(model)
    # DCP writes the optimizer's shards beside the checkpoint; rank 0 moves them in
    staging = path.with_name(f".{path.name}.optimizer")
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    try:
        with _dcp_errors():
            dcp.save(
                {"optimizer": get_optimizer_state_dict(model, optimizer)},
                checkpoint_id=staging,
                no_dist=not _distributed(),
            )
        if rank0:
            with atomic_dir(path, is_complete=_complete) as tmp:
                # fp32 master weights: resuming from them is exact
                write_pretrained(model, tmp, tensors=weights)
                for name in TOKENIZER_FILES:
                    if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                        shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
                ts = tmp / "train_state"
                ts.mkdir()
                staging.rename(ts / "optimizer")
                rng = {"cpu": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state_all()
                torch.save(rng, ts / "rng.pt")
                for name, tensors in (extra_tensors or {}).items():
                    save_file(
                        {k: v.contiguous() for k, v in tensors.items()}, ts / f"{name}.safetensors"
                    )
                (ts / "state.json").write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    finally:
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)  # left only by a failed save
    _barrier()
    return path


@contextlib.contextmanager
def _dcp_errors() -> Iterator[None]:
    """DCP reports a rank's failure as CheckpointException, a BaseException that `except
    Exception` (and the CLI's one-line errors) would miss: re-raise the rank's own error. On
    one process DCP also warns, at every call, that it is on one process: silenced."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable")
            yield
    except CheckpointException as e:
        rank, (exc, _) = next(iter(e.failures.items()))
        raise exc if isinstance(exc, Exception) else RuntimeError(f"rank {rank}: {exc}") from e


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at `path`, or the previous one if a crash hit mid-swap."""
    path = Path(path)
    for p in (path, path.with_name(f".{path.name}.old")):
        if _complete(p):
            return p
    return None


def _complete(path: Path) -> bool:
    return (path / "train_state" / "state.json").is_file()


def read_train_state(path: str | Path) -> RunState:
    f = Path(path) / "train_state" / "state.json"
    fix = "start afresh with --overwrite"
    try:
        return RunState.from_dict(read_json(f, "training state", CheckpointError))
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {fix}") from e
    except (TypeError, AttributeError) as e:  # JSON, but not a RunState
        raise CheckpointError(f"{f}: unreadable training state ({e}); {fix}") from e


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Transformer, RunState, dict[str, Any]]:
    """-> (model in fp32 on device, run state, rng states). The optimizer's state is loaded
    once the model is spread over the ranks and the optimizer built: `restore_optimizer`."""
    path = Path(path)
    state = read_train_state(path)
    try:
        rng = torch.load(path / "train_state" / "rng.pt", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{path / 'train_state'}: unreadable training state ({e}); start afresh with "
            "--overwrite"
        ) from e
    model = from_pretrained(path, dtype=torch.float32, device=device)
    return model, state, rng


def read_extra_tensors(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """What `save_checkpoint(..., extra_tensors={name: ...})` wrote."""
    f = Path(path) / "train_state" / f"{name}.safetensors"
    try:
        return load_file(f)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({e}); start afresh with --overwrite") from e


def restore_optimizer(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer state into `optimizer`, whatever the number of ranks that
    saved it and that load it (a collective under torchrun)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    ts = Path(path) / "train_state"
    try:
        if (ts / "optimizer.pt").is_file():  # written before DCP checkpoints: one process
            optimizer.load_state_dict(torch.load(ts / "optimizer.pt", weights_only=True))
            return
        target = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to fill
        # the parameter groups stay this launch's: how parameters are grouped depends on how
        # they are spread (sharded ones apart); the settings in them are the run's anyway
        groups = copy.deepcopy(target["optimizer"]["param_groups"])  # dcp.load fills in place
        # partial: parameters that never had a gradient (GRPO's MTP modules) have no saved
        # state; they keep the empty one the template starts them with
        planner = DefaultLoadPlanner(allow_partial_load=True)
        with _dcp_errors():
            dcp.load(
                target,
                checkpoint_id=ts / "optimizer",
                planner=planner,
                no_dist=not _distributed(),
            )
        target["optimizer"]["param_groups"] = groups
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{ts}: unreadable optimizer state ({e}); start afresh with --overwrite"
        ) from e
    set_optimizer_state_dict(model, optimizer, target["optimizer"])


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
