"""`make r1`: from nothing to a model that answers held-out arithmetic with reasoning.

(draft: data helpers; the recipe follows)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nanoseek.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanoseek.posttrain.tasks import Arithmetic, Problem
from nanoseek.utils import atomic_write_text


def worked_solution(problem: Problem) -> str:
    """Column arithmetic from the ones digit up, the answer so far after each column:
    `876 + 141` -> `6+1+0=7>7, 7+4+0=11>17, 8+1+1=10>017, 1>1017`;
    `862 - 145` -> `2-5-0=7 b>7, 6-4-1=1>17, 8-1-0=7>717`. Each step reads two digits and
    the carry (or borrow), and copies the previous answer with one digit in front."""
    a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
    if op not in "+-":
        raise ValueError(f"no worked solution for {op!r}")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, so_far, carry = [], "", 0  # carry: the carry (+) or borrow (-) into this column
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            s = x + y + carry
            so_far = str(s % 10) + so_far
            steps.append(f"{x}+{y}+{carry}={s}>{so_far}")
            carry = s // 10
        else:
            d = x - y - carry
            so_far = str(d % 10) + so_far
            steps.append(f"{x}-{y}-{carry}={d % 10}{' b' if d < 0 else ''}>{so_far}")
            carry = int(d < 0)
    if carry:  # only addition ends with one (a >= b, so subtraction never does)
        so_far = "1" + so_far
        steps.append(f"1>{so_far}")
    return ", ".join(steps)


def chat(problem: Problem) -> dict:
    return {
        "messages": [
            {"role": "user", "content": problem.prompt},
            {
                "role": "assistant",
                "content": problem.answer,
                "reasoning_content": worked_solution(problem),
            },
        ]
    }


def write_chats(problems: list[Problem], path: Path) -> Path:
    atomic_write_text(path, "".join(json.dumps(chat(p)) + "\n" for p in problems))
    return path


def digit_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE whose digits are always single tokens (as LLaMA's): a merged "17"
    would hide the column a digit belongs to."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


if __name__ == "__main__":
    rng = random.Random(0)
    t = Arithmetic()
    for p in t.generate(1, 8):
        print(p.prompt, worked_solution(p), p.answer)
