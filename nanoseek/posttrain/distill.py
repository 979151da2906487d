"""Distillation by rejection sampling (DeepSeek-R1, section 2.3.3): sample several reasoning
completions per training problem from a teacher, keep those the task's verifier accepts,
and write them as SFT chats:

    {"messages": [{"role": "user", "content": PROMPT},
                  {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}]}

Kept: well-formatted completions (`tasks.parse_completion`) with non-empty reasoning (an
empty one would render without its <think> block and teach a different format) whose
answer verifies; identical completions of one prompt are kept once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.infer import Engine
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.evaluate import chat_prompt, load_model, make_engine, sample_completions
from nanoseek.posttrain.tasks import Task, get_task, parse_completion
from nanoseek.utils import atomic_write_text


@dataclass
class DistillStats:
    prompts: int
    samples: int
    accepted: int  # completions the verifier accepted
    written: int  # accepted minus duplicates: lines in the output

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.samples, 1)

    def summary(self) -> str:
        return (
            f"{self.prompts} prompts x {self.samples // max(self.prompts, 1)} samples: "
            f"{self.accepted} accepted ({self.acceptance_rate:.1%}), {self.written} written"
        )


def distill(
    teacher: Engine | str | Path,
    task: Task | str,
    n: int,
    out_path: str | Path,
    samples_per_prompt: int = 4,
    temperature: float = 0.7,
    seed: int = 1,
    max_tokens: int = 256,
    max_batch: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DistillStats:
    """Sample from `teacher` (an Engine with a tokenizer, or a checkpoint / run directory) on
    task.generate(seed, n), training problems disjoint from the held-out set."""
    task = get_task(task) if isinstance(task, str) else task
    if n < 1 or samples_per_prompt < 1:
        raise PostTrainError(
            f"need n >= 1 and samples_per_prompt >= 1; got {n} and {samples_per_prompt}"
        )
    problems = task.generate(seed, n)
    if isinstance(teacher, (str, Path)):
        model, tokenizer = load_model(teacher, device, dtype)
        prompts = [chat_prompt(tokenizer, p) for p in problems]
        engine = make_engine(model, tokenizer, prompts, max_tokens, max_batch)
    else:  # an Engine, or anything with its tokenizer and generate()
        engine, tokenizer = teacher, teacher.tokenizer
        if tokenizer is None:
            raise PostTrainError("the teacher engine has no tokenizer; give it one")
        prompts = [chat_prompt(tokenizer, p) for p in problems]
    outs = sample_completions(engine, prompts, samples_per_prompt, max_tokens, temperature, seed)

    lines, accepted = [], 0
    for problem, completions in zip(problems, outs, strict=True):
        kept = set()
        for c in completions:
            parts = parse_completion(c.text)
            if parts is None or not parts[0].strip() or not task.reward(problem, c.text).correct:
                continue
            accepted += 1
            if c.text in kept:
                continue
            kept.add(c.text)
            reasoning, answer = parts
            messages = [
                {"role": "user", "content": problem.prompt},
                {"role": "assistant", "content": answer, "reasoning_content": reasoning},
            ]
            lines.append(json.dumps({"messages": messages}))
    atomic_write_text(out_path, "".join(line + "\n" for line in lines))
    return DistillStats(len(problems), len(problems) * samples_per_prompt, accepted, len(lines))
