"""Tasks with exact verifiers, and the rule-based rewards of R1-style RL.

A task draws problems from a seed and checks answers exactly. Training sets come from seeds
>= 1; the held-out set from seed 0, and a training set never contains a held-out prompt, so
held-out accuracy measures generalisation, not recall. `held_out(n)` is the first n of one
fixed sequence: `held_out(100)` is a prefix of `held_out(500)`.

Adding a task: subclass `Task`, name it, write `sample(rng)` (one problem) and, unless an
exact match with `problem.answer` is the right check, `verify`; then register it:

    import random
    from dataclasses import dataclass

    from nanoseek.posttrain.tasks import TASKS, Problem, Task

    @dataclass
    class Reverse(Task):
        name = "reverse"
        length: int = 5  # settings are dataclass fields: get_task("reverse", length=8)

        def sample(self, rng: random.Random) -> Problem:
            word = "".join(rng.choice("abcdefgh") for _ in range(self.length))
            return Problem(f"Reverse the letters of {word}.", word[::-1])

    TASKS["reverse"] = Reverse

The completion format (DeepSeek-R1): the prompt ends with `<|assistant|><think>`, so the
model writes `REASONING</think>ANSWER`. See `parse_completion` for the exact rule.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

from nanoseek.data.tokenizer import THINK_CLOSE, THINK_OPEN
from nanoseek.posttrain.errors import PostTrainError

HELD_OUT_SEED = 0
# Correctness dominates: a well-formatted wrong answer (0.1) never outscores a correct one
# (>= 1.0). The small format term still separates completions in a group where none is
# correct yet, which is what teaches a fresh model the <think>...</think> shape.
CORRECT_WEIGHT = 1.0
FORMAT_WEIGHT = 0.1


@dataclass
class Problem:
    prompt: str  # the user message
    answer: str  # a reference answer (for countdown: one of many correct expressions)
    meta: dict[str, Any] = field(default_factory=dict)  # what the verifier needs


@dataclass(frozen=True)
class Reward:
    correct: bool
    formatted: bool
    total: float


def parse_completion(completion: object) -> tuple[str, str] | None:
    """(reasoning, answer) when the completion is well formatted, else None.

    Well formatted: an optional leading `<think>` (the prompt usually opened it already),
    then the reasoning (may be empty), exactly one `</think>`, then a non-empty answer;
    no other `<think>` or `</think>` anywhere. Text is returned as written (not stripped)."""
    if not isinstance(completion, str):
        return None
    body = completion
    if body.lstrip().startswith(THINK_OPEN):
        body = body.lstrip()[len(THINK_OPEN) :]
    reasoning, sep, answer = body.partition(THINK_CLOSE)
    if not sep or THINK_OPEN in reasoning or THINK_OPEN in answer or THINK_CLOSE in answer:
        return None
    return (reasoning, answer) if answer.strip() else None


def answer_part(completion: object) -> str | None:
    """The text after the last `</think>`: what correctness is judged on. None without one,
    so an answer the model never separated from its reasoning scores nothing."""
    if not isinstance(completion, str) or THINK_CLOSE not in completion:
        return None
    return completion.rpartition(THINK_CLOSE)[2]


class Task:
    """A family of problems with an exact check; subclasses are dataclasses of settings."""

    name: ClassVar[str] = ""
    # Training sets exclude the first `held_out_max` held-out problems, the most any
    # `held_out(n)` can return; a task with few distinct problems should lower it.
    held_out_max: ClassVar[int] = 1000

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError(f"{type(self).__name__} must define sample(rng)")

    def verify(self, problem: Problem, answer_text: str) -> bool:
        return isinstance(answer_text, str) and answer_text.strip() == problem.answer

    def generate(self, seed: int, n: int) -> list[Problem]:
        """n distinct training problems, none of them in the held-out set."""
        if seed < 1:
            raise PostTrainError(
                f"training seeds start at 1 (seed {HELD_OUT_SEED} makes the held-out set); "
                f"got {seed}"
            )
        return self._draw(seed, n, self._held_out_prompts())

    def held_out(self, n: int = 200) -> list[Problem]:
        if not 1 <= n <= self.held_out_max:
            raise PostTrainError(
                f"{self.name}: the held-out set has {self.held_out_max} problems; "
                f"ask for 1..{self.held_out_max}, got {n}"
            )
        return self._draw(HELD_OUT_SEED, n)

    def reward(
        self,
        problem: Problem,
        completion: object,
        correct_weight: float = CORRECT_WEIGHT,
        format_weight: float = FORMAT_WEIGHT,
    ) -> Reward:
        """Never raises on a completion, whatever it holds (None included)."""
        formatted = parse_completion(completion) is not None
        answer = answer_part(completion)
        correct = answer is not None and bool(self.verify(problem, answer))
        return Reward(correct, formatted, correct_weight * correct + format_weight * formatted)

    def _held_out_prompts(self) -> frozenset[str]:
        key = (repr(self), self.held_out_max)  # settings change the problems: key the cache
        cached = self.__dict__.get("_held_out_cache")
        if cached is None or cached[0] != key:
            held = self._draw(HELD_OUT_SEED, self.held_out_max, allow_fewer=True)
            cached = self.__dict__["_held_out_cache"] = (key, frozenset(p.prompt for p in held))
        return cached[1]

    def _draw(
        self, seed: int, n: int, exclude: frozenset[str] = frozenset(), allow_fewer: bool = False
    ) -> list[Problem]:
        """The first n distinct problems of seed's sequence that are not in `exclude`."""
        if n < 0:
            raise PostTrainError(f"the number of problems must be >= 0, got {n}")
        rng, seen, out = random.Random(seed), set(exclude), []
        for _ in range(20 * n + 100):  # a task with few distinct problems must not spin forever
            if len(out) == n:
                break
            p = self.sample(rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        if len(out) < n and not allow_fewer:
            raise PostTrainError(
                f"{self.name}: found only {len(out)} distinct problems (of {n} asked) for seed "
                f"{seed} outside the held-out set; ask for fewer, widen the task's settings, "
                "or lower its held_out_max"
            )
        return out


# --- arithmetic -----------------------------------------------------------------------------
_INTEGER = re.compile(r"-?[0-9]{1,40}")  # ASCII digits: int() would also take '١٢' and '1_2'


@dataclass
class Arithmetic(Task):
    """`What is 123 + 45?` -> `168`. Subtraction keeps results >= 0."""

    name: ClassVar[str] = "arithmetic"
    min_digits: int = 2
    max_digits: int = 3
    ops: str = "+-"

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= 18:
            raise PostTrainError(
                f"arithmetic: need 1 <= min_digits <= max_digits <= 18, "
                f"got {self.min_digits}, {self.max_digits}"
            )
        if not self.ops or set(self.ops) - set("+-*"):
            raise PostTrainError(f"arithmetic: ops must be made of + - *, got {self.ops!r}")

    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

    def sample(self, rng: random.Random) -> Problem:
        a, b, op = self._number(rng), self._number(rng), rng.choice(self.ops)
        if op == "-" and a < b:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(f"What is {a} {op} {b}?", str(value), {"a": a, "b": b, "op": op})

    def verify(self, problem: Problem, answer_text: str) -> bool:
        if not isinstance(answer_text, str) or len(answer_text) > 200:
            return False
        s = answer_text.strip()
        return _INTEGER.fullmatch(s) is not None and int(s) == int(problem.answer)


# --- countdown ------------------------------------------------------------------------------
_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_EXPRESSION = re.compile(r"[0-9+\-*/() ]{1,200}")  # ASCII only; the length bounds every value


class _Rejected(Exception):
    pass


def evaluate_expression(text: object, numbers: Sequence[int]) -> Fraction | None:
    """The exact value of an arithmetic expression over + - * / and parentheses that uses
    each of `numbers` at most once, or None if it is anything else (no eval: the parse tree
    is walked with a whitelist; division by zero, `**`, unary minus, names are rejected)."""
    if not isinstance(text, str) or len(text) > 1000:
        return None
    text = text.strip()
    if not _EXPRESSION.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None

    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            return _OPS[type(node.op)](left, right)
        raise _Rejected

    try:
        value = walk(tree.body)
    except (_Rejected, ZeroDivisionError, RecursionError):
        return None
    if Counter(used) - Counter(numbers):  # a number not given, or given fewer times
        return None
    return value


@dataclass
class Countdown(Task):
    """Reach a target from given numbers with + - * / and parentheses, each number used at
    most once. Every problem is solvable: the target is built from the numbers first."""

    name: ClassVar[str] = "countdown"
    n_numbers: int = 4
    max_number: int = 20
    max_target: int = 100

    def __post_init__(self) -> None:
        if self.n_numbers < 2 or self.max_number < 2 or self.max_target < 2:
            raise PostTrainError(
                "countdown: need n_numbers >= 2, max_number >= 2 and max_target >= 2"
            )

    def sample(self, rng: random.Random) -> Problem:
        for _ in range(10_000):
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            used = rng.sample(numbers, rng.randint(2, self.n_numbers))
            expr, value, additive = str(used[0]), used[0], False
            for x in used[1:]:
                op = rng.choice("+-*/")
                if op == "/" and value % x:
                    op = "*"  # exact division only
                if op == "-" and value <= x:
                    op = "+"  # every intermediate stays positive
                if op in "*/" and additive:
                    expr = f"({expr})"
                expr = f"{expr} {op} {x}"
                value = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
                additive = op in "+-"
            if 1 <= value <= self.max_target and value not in numbers:
                listed = ", ".join(map(str, numbers))
                prompt = (
                    f"Using the numbers {listed} (each at most once) and + - * /, make {value}."
                )
                return Problem(prompt, expr, {"numbers": numbers, "target": value})
        raise PostTrainError(f"countdown: cannot make targets <= {self.max_target}; raise it")

    def verify(self, problem: Problem, answer_text: str) -> bool:
        value = evaluate_expression(answer_text, problem.meta["numbers"])
        return value is not None and value == problem.meta["target"]


TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic, "countdown": Countdown}


def get_task(name: str, **settings: Any) -> Task:
    if name not in TASKS:
        raise PostTrainError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    try:
        return TASKS[name](**settings)
    except TypeError as e:
        raise PostTrainError(f"task {name}: bad settings ({e})") from e
