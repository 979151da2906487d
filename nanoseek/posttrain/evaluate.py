"""Evaluation: task accuracy on the held-out set with nanoseek's engine, bits per byte on
token shards, and a report card with one row per checkpoint (base -> SFT -> RL).

Task metrics, on `task.held_out(n)` with thinking prompts (`<|assistant|><think>`):
accuracy and format rate of greedy completions, their mean length in tokens and the share
cut at max_tokens; with k > 0, pass@k from `samples` >= k sampled completions per problem
by the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Completion, Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.tasks import Problem, Task
from nanoseek.utils import atomic_write_text


# --- checkpoints ------------------------------------------------------------------------------
def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory of a checkpoint or run directory (`hub.resolve_checkpoint`);
    a run whose last save was cut mid-swap has only .ckpt.old: that one."""
    from nanoseek.hub import resolve_checkpoint
    from nanoseek.train.checkpoint import find_checkpoint

    return resolve_checkpoint(find_checkpoint(Path(path) / "ckpt") or path)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer]:
    """Model (in eval mode) and tokenizer from a checkpoint or run directory."""
    from nanoseek.device import resolve_device
    from nanoseek.hub import from_pretrained

    ckpt = checkpoint_dir(path)
    if not (ckpt / "tokenizer.json").is_file():
        raise PostTrainError(f"{ckpt} has no tokenizer.json; copy the training tokenizer into it")
    model = from_pretrained(ckpt, dtype=dtype, device=resolve_device(device))
    return model.eval(), Tokenizer.load(ckpt)


def chat_prompt(tokenizer: Tokenizer, problem: Problem, thinking: bool | None = True) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt}], add_generation_prompt=True, thinking=thinking
    )


def make_engine(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    max_tokens: int,
    max_batch: int,
) -> Engine:
    """An engine whose context fits the longest prompt plus max_tokens (no larger: the cache
    is preallocated for max_batch sequences)."""
    need = max(len(p) for p in prompts) + max_tokens
    model.eval()  # the caller's job, not the engine's
    return Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_len=min(need, model.config.max_position_embeddings),
    )


def seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per request, so results do not depend on batching."""
    rng = random.Random(seed)
    return [rng.getrandbits(63) for _ in range(n)]


# --- task metrics ------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise PostTrainError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class TaskResult:
    task: str
    n: int
    accuracy: float
    format_rate: float
    mean_length: float  # tokens per greedy completion
    truncated: float  # share of greedy completions cut at max_tokens
    k: int = 0
    pass_at_k: float | None = None
    samples: int = 0  # sampled completions per problem behind pass@k

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("k", "pass_at_k", "samples")}
        if self.k:
            out[f"pass@{self.k}"] = self.pass_at_k
        return out


def evaluate_task(
    model: Transformer,
    tokenizer: Tokenizer,
    task: Task,
    n: int = 100,
    k: int = 0,
    samples: int | None = None,
    max_tokens: int = 128,
    temperature: float = 1.0,
    max_batch: int = 16,
    seed: int = 0,
) -> TaskResult:
    """Greedy metrics on task.held_out(n); pass@k (k > 0) from `samples` (default k) sampled
    completions per problem at `temperature`. Leaves the model in the mode it found it."""
    samples = samples or k
    if k < 0 or (k and samples < k):
        raise PostTrainError(f"pass@k needs k >= 0 and samples >= k; got k={k}, samples={samples}")
    problems = task.held_out(n)
    prompts = [chat_prompt(tokenizer, p) for p in problems]
    was_training = model.training
    try:
        engine = make_engine(model, tokenizer, prompts, max_tokens, max_batch)
        greedy = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
        rewards = [task.reward(p, c.text) for p, c in zip(problems, greedy, strict=True)]
        result = TaskResult(
            task=task.name,
            n=n,
            accuracy=sum(r.correct for r in rewards) / n,
            format_rate=sum(r.formatted for r in rewards) / n,
            mean_length=sum(len(c.token_ids) for c in greedy) / n,
            truncated=sum(c.finish_reason == "length" for c in greedy) / n,
        )
        if k:
            sampled = sample_completions(engine, prompts, samples, max_tokens, temperature, seed)
            scores = []
            for p, outs in zip(problems, sampled, strict=True):
                c = sum(task.reward(p, o.text).correct for o in outs)
                scores.append(pass_at_k(samples, c, k))
            result.k, result.samples, result.pass_at_k = k, samples, sum(scores) / n
    finally:
        model.train(was_training)
    return result


def sample_completions(
    engine: Engine,
    prompts: list[list[int]],
    samples: int,
    max_tokens: int,
    temperature: float,
    seed: int,
) -> list[list[Completion]]:
    """`samples` seeded completions per prompt, as one batched generate."""
    flat = [p for p in prompts for _ in range(samples)]
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s)
        for s in seeds(seed, len(flat))
    ]
    outs = engine.generate(flat, params)
    return [outs[i * samples : (i + 1) * samples] for i in range(len(prompts))]


# --- bits per byte -----------------------------------------------------------------------------
@torch.no_grad()
def bits_per_byte(
    model: Transformer,
    shard_dir: str | Path,
    batch_size: int = 8,
    seq_len: int | None = None,
    n_batches: int = 8,
    tokenizer: Tokenizer | None = None,
) -> float:
    """Main-head loss on the val split's fixed batches, in bits per byte of text (comparable
    across tokenizers). With `tokenizer`, checks the shards were made with it."""
    from nanoseek.data.loader import BatchLoader

    seq_len = seq_len or min(model.config.max_position_embeddings, 512)
    loader = BatchLoader(shard_dir, "val", batch_size, seq_len)
    meta_tok = loader.meta["tokenizer"]
    if tokenizer is not None and tokenizer.hash != meta_tok["hash"]:
        raise PostTrainError(
            f"{shard_dir} was tokenized with {meta_tok['hash']}, the checkpoint's tokenizer is "
            f"{tokenizer.hash}; give shards made with the checkpoint's tokenizer"
        )
    if meta_tok["vocab_size"] > model.config.vocab_size:
        raise PostTrainError(
            f"{shard_dir} has a vocabulary of {meta_tok['vocab_size']}, the model "
            f"{model.config.vocab_size}; give shards made with the checkpoint's tokenizer"
        )
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        losses = [
            model(x.to(device), targets=y.to(device), mtp_weight=0).main_loss.item()
            for x, y in loader.val_batches(n_batches)
        ]
    finally:
        model.train(was_training)
    return loader.bits_per_byte(sum(losses) / len(losses))


# --- report card -------------------------------------------------------------------------------
HEADERS = {
    "name": "checkpoint",
    "task": "task",
    "n": "n",
    "accuracy": "accuracy",
    "format_rate": "format",
    "mean_length": "mean length",
    "truncated": "truncated",
    "bits_per_byte": "bits/byte",
}
PERCENT = ("accuracy", "format_rate", "truncated")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (key in PERCENT or key.startswith("pass@")):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3f}" if key == "bits_per_byte" else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def report_card(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """One row per checkpoint or stage (dicts of metrics, e.g. TaskResult.row() plus "name"
    and "bits_per_byte") -> (a markdown table, a JSON-ready dict). Columns are the union of
    the rows' keys in first-seen order; a missing value shows as '-'."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    lines = [
        "| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" if c in ("name", "task") else "---:" for c in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n", {"columns": columns, "rows": rows}


def write_report_card(path: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """The markdown at `path` and the JSON beside it (same name, .json), each atomically."""
    markdown, data = report_card(rows)
    path = Path(path)
    json_path = path.with_suffix(".json")
    if json_path == path:
        raise PostTrainError(f"{path}: give the report a .md name; the JSON goes beside it")
    atomic_write_text(path, markdown)
    atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
    return path, json_path
