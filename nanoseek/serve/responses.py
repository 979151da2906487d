"""OpenAI response bodies: chat and text completions, whole and as stream chunks, with
logprobs in each API's own shape (chat: `content: [{token, logprob, bytes, top_logprobs}]`;
completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

import json
import secrets
import time
from functools import lru_cache
from typing import Any


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


def chat_response(
    rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion),
    }


def chat_chunk(
    rid: str, created: int, model: str, choices: list[dict[str, Any]], with_usage: bool
) -> dict[str, Any]:
    chunk = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage:  # stream_options.include_usage: null on every chunk but the last
        chunk["usage"] = None
    return chunk


def completion_response(
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None,
    chunk: bool = False,
) -> dict[str, Any]:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body
