"""A run's budget: steps, tokens and/or wall-clock minutes; the first one reached ends it.

A run has two: the one it stops at (its config's, which `--resume` may move) and the LR
horizon, the one its schedules run over, fixed when the run starts and kept in its state, so
a longer budget on resume moves where the run stops but does not make the LR jump back up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    steps: int | None = None
    tokens: float | None = None
    minutes: float | None = None

    def fraction(self, step: int, tokens: int, elapsed: float) -> float:
        """How far through the budget a run is (elapsed in seconds); >= 1.0: done."""
        fracs = [0.0]
        if self.steps:
            fracs.append(step / self.steps)
        if self.tokens:
            fracs.append(tokens / self.tokens)
        if self.minutes:
            fracs.append(elapsed / (60 * self.minutes))
        return max(fracs)

    def __bool__(self) -> bool:
        return any((self.steps, self.tokens, self.minutes))

    def describe(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in self.to_dict().items() if v) or "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        """From any dict holding the three keys (a saved train config, for one); others are ignored."""
        return cls(d.get("steps"), d.get("tokens"), d.get("minutes"))
