"""SFT data: chats from JSONL, rendered with the chat template, batched for next-token loss
on the assistant's tokens only.

Each line: {"messages": [{"role": "system"|"user"|"assistant", "content": "...",
"reasoning_content": "..." (assistant, optional)}, ...]}, with at least one assistant turn.
A bad line is reported with its number and skipped; a file that is mostly bad is refused.

A batch is a pure function of (seed, step, rank), like the pretraining loader: the examples
are visited in a fresh permutation per epoch, so a run resumed at step k sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.data.tokenizer import CHAT_ROLES, Tokenizer
from nanoseek.posttrain.errors import PostTrainError

IGNORE = -100  # the loss's ignore index
SHOW_PROBLEMS = 5


@dataclass
class SFTExample:
    ids: list[int]
    mask: list[bool]  # True on the assistant tokens that are trained on


@dataclass
class SFTData:
    examples: list[SFTExample]
    lines: int  # non-blank lines read
    problems: list[str] = field(default_factory=list)  # "line N: what is wrong", one per bad line
    truncated: int = 0  # examples cut to seq_len + 1 tokens
    dropped: int = 0  # examples whose assistant tokens were all cut away by truncation

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(e.mask) for e in self.examples)

    def summary(self) -> str:
        return (
            f"{len(self.examples):,} examples ({self.tokens:,} tokens, {self.trained_tokens:,} "
            f"trained) from {self.lines:,} lines; {len(self.problems)} bad, "
            f"{self.truncated} truncated, {self.dropped} dropped"
        )


def check_chat(record: Any) -> str | None:
    """What is wrong with one parsed line, or None if it is a valid chat."""
    if not isinstance(record, dict) or "messages" not in record:
        return 'expected an object with a "messages" list'
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if m.get("role") not in CHAT_ROLES:
            return f"message {i} has role {m.get('role')!r}; use one of {', '.join(CHAT_ROLES)}"
        if not isinstance(m.get("content"), str):
            return f'message {i} "content" must be a string, got {type(m.get("content")).__name__}'
        rc = m.get("reasoning_content")
        if rc is not None and not isinstance(rc, str):
            return f'message {i} "reasoning_content" must be a string, got {type(rc).__name__}'
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to train on"
    return None


def read_chats(path: str | Path) -> tuple[list[list[dict]], int, list[str]]:
    """(valid chats, non-blank lines, problems). Raises PostTrainError when no line is good or
    more than half are bad: that is the wrong file or format, not a few stray lines."""
    path = Path(path)
    if not path.is_file():
        raise PostTrainError(f"no SFT data at {path}; give a .jsonl file of chats")
    chats, problems, lines = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {n}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            problem = check_chat(record)
            if problem:
                problems.append(f"line {n}: {problem}")
            else:
                chats.append(record["messages"])
    if not chats or len(problems) > lines / 2:
        shown = "; ".join(problems[:SHOW_PROBLEMS]) or "the file is empty"
        raise PostTrainError(
            f"{path}: {len(problems)} of {lines} lines are not valid chats ({shown}); "
            'each line must be {"messages": [{"role": ..., "content": ...}, ...]}'
        )
    if problems:
        more = (
            f" (and {len(problems) - SHOW_PROBLEMS} more)" if len(problems) > SHOW_PROBLEMS else ""
        )
        warnings.warn(
            f"{path}: skipped {len(problems)} bad line(s): "
            + "; ".join(problems[:SHOW_PROBLEMS])
            + more,
            stacklevel=2,
        )
    return chats, lines, problems


def load_sft(path: str | Path, tokenizer: Tokenizer, seq_len: int) -> SFTData:
    """Read, validate and render a JSONL of chats; each example keeps at most seq_len + 1
    tokens, so its inputs and targets are at most seq_len long."""
    if seq_len < 1:
        raise PostTrainError(f"seq_len must be >= 1, got {seq_len}")
    chats, lines, problems = read_chats(path)
    data = SFTData([], lines, problems)
    for messages in chats:
        ids, mask = tokenizer.render_chat(messages, add_generation_prompt=False)
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            data.truncated += 1
        if not any(mask[1:]):  # position 0 is never a target
            data.dropped += 1
            continue
        data.examples.append(SFTExample(ids, mask))
    if not data.examples:
        raise PostTrainError(
            f"{path}: every example lost its assistant tokens to truncation at seq_len "
            f"{seq_len}; raise seq_len"
        )
    return data


def example_indices(
    n_examples: int, batch_size: int, seed: int, step: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Which examples make this rank's part of batch `step` (batch_size examples over all
    ranks): position p of the global stream of examples is permutation(seed, epoch = p // n)
    [p % n]; ranks take adjacent slices of the step's batch_size positions."""
    local = batch_size // world_size
    first = step * batch_size + rank * local
    out, perms = [], {}
    for p in range(first, first + local):
        epoch = p // n_examples
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_examples)
        out.append(int(perms[epoch][p % n_examples]))
    return out


def collate(examples: list[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> x, y [B, T] (T = the longest example - 1): x pads with pad_id, y[t] = ids[t+1] where
    that token is trained on, else -100."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        trained = torch.tensor(e.mask[1:], dtype=torch.bool)
        x[b, : len(ids) - 1] = ids[:-1]
        y[b, : len(ids) - 1] = ids[1:].masked_fill(~trained, IGNORE)
    return x, y


def get_batch(
    data: SFTData,
    batch_size: int,
    seed: int,
    step: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = example_indices(len(data.examples), batch_size, seed, step, rank, world_size)
    return collate([data.examples[i] for i in idx], pad_id)
