"""Split a reply into its reasoning and its answer (DeepSeek-R1's plain-text convention).

A reply may start with `<think>…</think>`: the text inside goes to `reasoning_content`, the
rest to `content`, as DeepSeek's API returns it. Where the reply starts depends on how the
chat prompt opened it (see nanoseek/data/tokenizer.py):

    "reasoning"  the prompt ended with <think>: the reply starts inside the reasoning
    "content"    the prompt ended with <think></think> (non-thinking): all answer
    "auto"       the model decides: a reply that opens with <think> reasons first

Text arrives as deltas that may cut a tag anywhere ("</th" + "ink>"), so the splitter holds
back only what could still become a tag and releases it when it cannot. Feeding any split of
a text gives the same result as feeding it whole.
"""

from __future__ import annotations

from nanoseek.data.tokenizer import THINK_CLOSE, THINK_OPEN

MODES = ("reasoning", "content", "auto")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown reasoning mode {mode!r}; use one of {', '.join(MODES)}")
        self.state = {"reasoning": "reasoning", "content": "content", "auto": "start"}[mode]
        self.held = ""  # text that might still turn out to be (part of) a tag

    def feed(self, delta: str) -> tuple[str, str]:
        """A text delta -> (reasoning delta, content delta)."""
        text, self.held = self.held + delta, ""
        reasoning = content = ""
        if self.state == "start":
            body = text.lstrip()
            if body.startswith(THINK_OPEN):
                self.state, text = "reasoning", body[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(body):  # "", "<", "<thi": not decided yet
                self.held = text
                return "", ""
            else:
                self.state = "content"
        if self.state == "reasoning":
            i = text.find(THINK_CLOSE)
            if i < 0:
                k = _partial_suffix(text, THINK_CLOSE)
                reasoning, self.held = text[: len(text) - k], text[len(text) - k :]
                return reasoning, ""
            reasoning, text, self.state = text[:i], text[i + len(THINK_CLOSE) :], "content"
        content = text
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The end of the reply: whatever was held back is plain text of the current part.
        An unclosed <think> leaves the whole reply as reasoning (the model ran out of room)."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "reasoning" else ("", held)


def split_reasoning(text: str, mode: str = "auto") -> tuple[str, str]:
    """A whole reply -> (reasoning, content)."""
    s = ReasoningSplitter(mode)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    return r1 + r2, c1 + c2
