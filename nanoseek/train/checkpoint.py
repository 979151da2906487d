"""Training checkpoints: one directory a Hugging Face loader, nanoseek's engine and `--resume`
all read.

    ckpt/
      config.json, model.safetensors       weights (fp32) in the HF DeepSeek-V3 layout,
                                           gate biases as e_score_correction_bias
      tokenizer.json, tokenizer_config.json
      train_state/state.json               step, tokens, elapsed time, data seed, config
      train_state/optimizer.pt             AdamW moments
      train_state/rng.pt                   torch RNG states

The whole directory is written under a temporary name and renamed into place, so a crash
mid-save leaves the previous checkpoint untouched. Between the two renames of the swap the
old one is briefly `.ckpt.old`; `find_checkpoint` falls back to it, and it is deleted only
once the new one is in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from nanoseek.hub import CheckpointError, from_pretrained, write_pretrained
from nanoseek.model import Transformer
from nanoseek.utils import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_checkpoint(path: str | Path, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], tokenizer_dir: str | Path | None = None) -> Path:  # fmt: skip
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
        (ts / "state.json").write_text(json.dumps(state, indent=2) + "\n")
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


def read_train_state(path: str | Path) -> dict[str, Any]:
    """train_state/state.json: step, tokens, times, tokenizer hash, the run's train config."""
    f = Path(path) / "train_state" / "state.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{f}: training state unreadable ({e}); start afresh with --overwrite"
        ) from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[Transformer, dict[str, Any], dict[str, Any], dict[str, Any]]:  # fmt: skip
    """-> (model in fp32 on device, train state, optimizer state_dict, rng states)."""
    path = Path(path)
    ts = path / "train_state"
    state = read_train_state(path)
    try:
        opt = torch.load(ts / "optimizer.pt", map_location=device, weights_only=True)
        rng = torch.load(ts / "rng.pt", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{ts}: training state unreadable ({e}); start afresh with --overwrite"
        ) from e
    model = from_pretrained(path, dtype=torch.float32, device=device)
    return model, state, opt, rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
