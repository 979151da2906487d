"""metrics.jsonl (one JSON object per logged step or evaluation), loss.png, the summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nanoseek.utils import atomic_path


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop what was logged after the checkpoint we resume from
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]  # fmt: skip
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | Path, png: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        s, v = np.array(train).T
        ax.plot(s, v, lw=0.8, alpha=0.4, color="C0", label="train (per step)")
        if len(v) >= 20:  # a running mean reads better than raw noise
            w = max(5, len(v) // 25)
            ax.plot(s[w - 1 :], np.convolve(v, np.ones(w) / w, mode="valid"), color="C0",
                    label=f"train (mean of {w})")  # fmt: skip
    if val:
        s, v = np.array(val).T
        ax.plot(s, v, "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def unigram_loss(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token distribution: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    w = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)
