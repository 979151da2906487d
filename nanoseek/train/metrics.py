"""What a run shows: the progress bar, metrics.jsonl (one JSON object per logged step or
evaluation), loss.png and the summary table.

A record's `loss` is the main next-token loss (comparable with `val_loss`), `mtp_loss` the
mean over the MTP modules; non-finite values are written as null (strict JSON).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nanoseek.utils import atomic_path, atomic_write_text, format_table, human


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop what was logged after the checkpoint we resume from
            copy_metrics(self.path, self.path, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(_dumps(record) + "\n")


class Progress:
    """The progress bar and metrics.jsonl of a run, shown by rank 0 only (`enabled`): on the
    other ranks every call does nothing. `resume_step`: continue the log of a resumed run from
    there (None: a new log). Without a step budget the bar's total is estimated from the
    budget fraction done. `show`: the record's keys the bar shows, with their formats
    (default: pretraining's loss, tokens/s, MFU, expert load and validation loss)."""

    def __init__(
        self,
        metrics_path: str | Path,
        enabled: bool,
        bar: bool = True,
        total_steps: int | None = None,
        resume_step: int | None = None,
        log_every: int = 1,
        show: dict[str, str] | None = None,
    ):
        self.log = MetricsLog(metrics_path, resume_step) if enabled else None
        self.log_every = log_every
        self.show = show
        self.last_val: float | None = None
        self.steps_known = total_steps is not None
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=resume_step or 0,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,
            )

    def update(self, record: dict[str, Any], fraction: float, last: bool = False) -> None:
        """One step's record (`step`, `loss`, ...); `fraction` of the budget done; `last`:
        the final step, always logged."""
        if self.log is None:
            return
        step = record["step"]
        if step % self.log_every == 0 or "val_loss" in record or last:
            self.log.write(record)
        self.last_val = record.get("val_loss", self.last_val)
        if self.bar is None:
            return
        if not self.steps_known and fraction > 0:  # a budget in tokens or minutes
            self.bar.total = max(step, round(step / fraction))
        if self.show is not None:
            post = {k: format(record[k], f) for k, f in self.show.items() if _finite(record.get(k))}
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
            return
        post = {"loss": f"{record['loss']:.3f}"}
        if "tok_per_s" in record:
            post["tok/s"] = f"{record['tok_per_s']:,.0f}"
        if "mfu" in record:
            post["mfu"] = f"{record['mfu']:.1%}"
        if "load_max_mean" in record:
            post["load"] = f"{max(record['load_max_mean']):.2f}"
        if self.last_val is not None:
            post["val"] = f"{self.last_val:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _dumps(record: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None  # bare NaN / Infinity is not JSON
        return [clean(x) for x in v] if isinstance(v, list) else v

    return json.dumps({k: clean(v) for k, v in record.items()}, allow_nan=False)


def copy_metrics(src: str | Path, dst: str | Path, last_step: int) -> None:
    """Write `src`'s records up to `last_step` as `dst` (atomically; `src` may be `dst`)."""
    keep = [r for r in read_metrics(src) if r.get("step", 0) <= last_step]
    atomic_write_text(dst, "".join(_dumps(r) + "\n" for r in keep))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records; lines that do not parse (a write torn by a crash) are skipped, with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s)", stacklevel=2)
    return records


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_loss(metrics_path: str | Path, png: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    # main next-token loss on both sides: the MTP and balance terms are not in val_loss
    train = [(r["step"], r["loss"]) for r in recs if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in recs if _finite(r.get("val_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        s, v = np.array(train).T
        ax.plot(s, v, lw=0.8, alpha=0.4, color="C0", label="train (per step)")
        if len(v) >= 20:  # a running mean reads better than raw noise
            w = max(5, len(v) // 25)
            ax.plot(
                s[w - 1 :],
                np.convolve(v, np.ones(w) / w, mode="valid"),
                color="C0",
                label=f"train (mean of {w})",
            )
    if val:
        s, v = np.array(val).T
        ax.plot(s, v, "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def unigram_loss(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> float:
    """Entropy (nats) of the token distribution: the loss of a model that ignores context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):  # bincount upcasts to int64: 8 bytes per token
        counts += np.bincount(np.asarray(tokens[i : i + chunk]), minlength=vocab_size)
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def summary_table(s: dict[str, Any]) -> str:
    """The end-of-run table, from a pretraining run's summary.json."""
    rows = [
        ("tokens seen", f"{human(s['tokens_seen'])} in {s['steps']} steps"),
        (
            "training time",
            f"{s['wall_seconds']:.0f} s ({s['tokens_per_second']:,.0f} tokens/s); "
            f"{s['elapsed_seconds']:.0f} s with evaluation and checkpoints",
        ),
        (
            "validation loss",
            f"{s['final_val_loss']:.4f} nats/token, {s['final_val_bpb']:.3f} bits/byte",
        ),
        ("unigram baseline", f"{s['unigram_loss']:.4f} nats/token (a model that ignores context)"),
        ("training FLOPs", f"{s['total_flops']:.3g} ({human(s['flops_per_token'])} per token)"),
        (
            "MFU",
            f"{s['mfu']:.1%} of {s['peak_flops'] / 1e12:.2f} TFLOP/s ({s['dtype']} matmul peak "
            f"measured on {s['device']})",
        ),
        ("checkpoint", s["checkpoint"]),
    ]
    return format_table(rows, "\nrun summary")
