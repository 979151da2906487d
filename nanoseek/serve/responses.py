"""OpenAI response bodies: chat and text completions, whole and as stream chunks, with
logprobs in each API's own shape (chat: `content: [{token, logprob, bytes, top_logprobs}]`;
completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from nanoseek.infer.engine import StepOutput
from nanoseek.serve.reasoning import ReasoningSplitter, split_reasoning


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event: `data: {...}` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character (GPT-2's table); inverted."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenText:
    """A token id's text and exact bytes (a token may hold part of a UTF-8 character, whose
    text alone cannot say which bytes it carries: the `bytes` field can)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.table = tokenizer, _byte_decoder()
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        # tokenizers' own id -> token spelling; the Tokenizer wrapper does not expose it
        raw = getattr(self.tokenizer, "_tok", None)
        piece = raw.id_to_token(token_id) if raw is not None else None
        if piece is None or any(c not in self.table for c in piece):
            return list(self._text(token_id).encode())
        return [self.table[c] for c in piece]

    def chat_logprobs(
        self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]] | None
    ) -> list[dict[str, Any]]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            return {"token": self.text(t), "logprob": lp, "bytes": self.bytes(t)}

        out = []
        for k, (t, lp) in enumerate(zip(ids, lps, strict=True)):
            e = entry(t, lp)
            e["top_logprobs"] = [entry(a, alp) for a, alp in tops[k]] if tops else []
            out.append(e)
        return out

    def completion_logprobs(
        self,
        ids: list[int],
        lps: list[float],
        tops: list[list[tuple[int, float]]] | None,
        offset: int = 0,
    ) -> dict[str, Any]:
        tokens = [self.text(t) for t in ids]
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        top = [{self.text(a): alp for a, alp in row} for row in tops] if tops else None
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": top,
            "text_offset": offsets,
        }


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: StepOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.top += out.top_logprobs or []
        if out.finished:
            self.finish_reason = out.finish_reason


class _Body:
    def __init__(
        self,
        kind: str,
        model: str,
        texts: TokenText,
        n_top: int | None,
        prompt_tokens: int,
        include_usage: bool,
    ):
        self.id, self.created = new_id(kind), int(time.time())
        self.model, self.texts, self.n_top = model, texts, n_top
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.produced = 0  # tokens streamed so far, over all choices

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


class ChatBody(_Body):
    """One chat request's response, whole or as chunks; the reply split into reasoning and
    content by `mode` (see reasoning.py)."""

    def __init__(
        self,
        model: str,
        texts: TokenText,
        n_top: int | None,
        prompt_tokens: int,
        include_usage: bool,
        mode: str,
        n: int,
    ):
        super().__init__("chatcmpl", model, texts, n_top, prompt_tokens, include_usage)
        self.mode, self.splitters = mode, [ReasoningSplitter(mode) for _ in range(n)]

    def _logprobs(self, ids: list[int], lps: list[float], top: list | None) -> dict | None:
        if self.n_top is None or not ids:
            return None
        return {"content": self.texts.chat_logprobs(ids, lps, top), "refusal": None}

    def whole(self, results: list[Choice]) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(results):
            reasoning, content = split_reasoning(c.text, self.mode)
            message = {
                "role": "assistant",
                "content": content,
                "reasoning_content": reasoning or None,
            }
            lp = self._logprobs(c.token_ids, c.logprobs, c.top or None)
            choices.append(
                {"index": i, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        body = self.envelope("chat.completion", choices)
        body["usage"] = usage(self.prompt_tokens, sum(len(c.token_ids) for c in results))
        return body

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self.envelope("chat.completion.chunk", choices)
        if self.include_usage:  # null on every chunk but the last
            body["usage"] = None
        return body

    def head(self) -> list[dict[str, Any]]:
        """OpenAI's first chunk of each choice: the role."""
        role = {"role": "assistant", "content": ""}
        return [
            self.chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
            for i in range(len(self.splitters))
        ]

    def chunks(self, i: int, out: StepOutput) -> list[dict[str, Any]]:
        reasoning, content = self.splitters[i].feed(out.text)
        if out.finished:
            r, c = self.splitters[i].finish()
            reasoning, content = reasoning + r, content + c
        self.produced += len(out.token_ids)
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        lp = self._logprobs(out.token_ids, out.logprobs or [], out.top_logprobs)
        if not delta and lp is None and not out.finished:
            return []
        reason = out.finish_reason if out.finished else None
        return [self.chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}])]

    def final(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        last = self.chunk([])
        last["usage"] = usage(self.prompt_tokens, self.produced)
        return [last]


class CompletionBody(_Body):
    """One text-completion request's response, whole or as chunks."""

    def __init__(
        self,
        model: str,
        texts: TokenText,
        n_top: int | None,
        prompt_tokens: int,
        include_usage: bool,
        n: int,
    ):
        super().__init__("cmpl", model, texts, n_top, prompt_tokens, include_usage)
        self.offsets = [0] * n  # text_offset of each choice's next token

    def whole(self, results: list[Choice]) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(results):
            lp = None
            if self.n_top is not None:
                lp = self.texts.completion_logprobs(c.token_ids, c.logprobs, c.top or None)
            choices.append(
                {"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        body = self.envelope("text_completion", choices)
        body["usage"] = usage(self.prompt_tokens, sum(len(c.token_ids) for c in results))
        return body

    def head(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, i: int, out: StepOutput) -> list[dict[str, Any]]:
        self.produced += len(out.token_ids)
        lp = None
        if self.n_top is not None and out.token_ids:
            lp = self.texts.completion_logprobs(
                out.token_ids, out.logprobs or [], out.top_logprobs, self.offsets[i]
            )
            self.offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        if not out.text and lp is None and not out.finished:
            return []
        reason = out.finish_reason if out.finished else None
        choice = {"index": i, "text": out.text, "logprobs": lp, "finish_reason": reason}
        return [self.envelope("text_completion", [choice])]

    def final(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        last = self.envelope("text_completion", [])
        last["usage"] = usage(self.prompt_tokens, self.produced)
        return [last]
