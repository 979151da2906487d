"""Training checkpoints: one directory a Hugging Face loader, nanoseek's engine and `--resume`
all read.

    ckpt/
      config.json, model.safetensors       weights (fp32) in the HF DeepSeek-V3 layout,
                                           gate biases as e_score_correction_bias
      tokenizer.json, tokenizer_config.json
      train_state/state.json               RunState: step, tokens, times, LR horizon, config
      train_state/optimizer.pt             AdamW moments
      train_state/rng.pt                   torch RNG states

The whole directory is written under a temporary name and renamed into place, so a crash
mid-save leaves the previous checkpoint untouched. Between the two renames of the swap the
old one is briefly `.ckpt.old`; `find_checkpoint` falls back to it, and it is deleted only
once the new one is in place.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.hub import CheckpointError, from_pretrained, write_pretrained
from nanoseek.model import Transformer
from nanoseek.train.budget import Budget
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
) -> Path:
    with atomic_dir(path, is_complete=_complete) as tmp:
        write_pretrained(model, tmp)  # fp32 master weights: resuming from them is exact
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        ts = tmp / "train_state"
        ts.mkdir()
        torch.save(optimizer.state_dict(), ts / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, ts / "rng.pt")
        (ts / "state.json").write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    return Path(path)


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
) -> tuple[Transformer, RunState, dict[str, Any], dict[str, Any]]:
    """-> (model in fp32 on device, run state, optimizer state_dict, rng states)."""
    path = Path(path)
    ts = path / "train_state"
    state = read_train_state(path)
    try:
        opt = torch.load(ts / "optimizer.pt", map_location=device, weights_only=True)
        rng = torch.load(ts / "rng.pt", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{ts}: unreadable training state ({e}); start afresh with --overwrite"
        ) from e
    model = from_pretrained(path, dtype=torch.float32, device=device)
    return model, state, opt, rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
