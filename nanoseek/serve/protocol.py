"""The OpenAI request schema the server accepts, and the errors it answers with.

Requests are parsed by hand (not FastAPI's body binding) so that every bad input gets an
OpenAI-shaped 4xx: `{"error": {"message", "type", "param", "code"}}`. Types are strict (a
string is not a number, `true` is not 1). Fields the OpenAI API has but nanoseek does not
implement are refused when their value would change the output (`tools`, `logit_bias`, ...)
and ignored otherwise (`user`, `metadata`, `store`, ...), as are fields nobody knows.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanoseek.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# field -> (does this value change the output?, what to do instead)
_REFUSED: dict[str, tuple[Any, str]] = {
    "tools": (bool, "tool calling is not supported"),
    "functions": (bool, "function calling is not supported"),
    "tool_choice": (lambda v: v not in (None, "none"), "tool calling is not supported"),
    "function_call": (lambda v: v not in (None, "none"), "function calling is not supported"),
    "response_format": (
        lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
        "only response_format {'type': 'text'} is supported",
    ),
    "logit_bias": (bool, "logit_bias is not supported"),
    "presence_penalty": (lambda v: v not in (None, 0), "presence_penalty is not supported"),
    "frequency_penalty": (lambda v: v not in (None, 0), "frequency_penalty is not supported"),
    "repetition_penalty": (lambda v: v not in (None, 1), "repetition_penalty is not supported"),
    "min_tokens": (lambda v: v not in (None, 0), "min_tokens is not supported"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "modalities": (lambda v: v not in (None, ["text"]), "only the text modality is supported"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is not None, "web search is not supported"),
    "reasoning_effort": (
        lambda v: v is not None,
        "reasoning_effort is not supported; use thinking: true/false",
    ),
    "echo": (bool, "echo is not supported"),
    "suffix": (bool, "suffix (insertion) is not supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of is not supported; use n"),
}
MAX_STOP_CHARS = 256
GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing by it overflows)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str:
    """pydantic's error location as a path a user recognises: messages[0].role."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in part and "-" not in part:
            out += f".{part}" if out else part
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None

    def as_template(self) -> dict[str, str]:
        text = self.content
        if isinstance(text, list):
            text = "".join(p.text for p in text)
        # the newer OpenAI name for the system role
        m = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        if self.role == "assistant" and self.reasoning_content:
            m["reasoning_content"] = self.reasoning_content
        return m


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: fixed-length outputs for benchmarks

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop: stop sequences must be non-empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):  # each is searched on every step
            raise APIError(400, f"stop: at most {MAX_STOP_CHARS} characters each", param="stop")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # True: the reply opens inside <think>; False: an empty <think></think>; None: the
    # server's default. vLLM's chat_template_kwargs {"enable_thinking": ...} means the same.
    thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def thinking_mode(self, default: bool | None) -> bool | None:
        if self.thinking is not None:
            return self.thinking
        kw = self.chat_template_kwargs or {}
        value = kw.get("enable_thinking", kw.get("thinking"))
        if value is not None and not isinstance(value, bool):
            raise APIError(
                400,
                "chat_template_kwargs.enable_thinking must be a boolean",
                param="chat_template_kwargs",
            )
        return default if value is None else value

    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def n_top(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(isinstance(x, list) and not x for x in p):  # "" is fine: BOS only
            raise APIError(400, "prompt must hold at least one token", param="prompt")
        return list(p)

    def n_top(self) -> int | None:
        return self.logprobs


def parse_body(raw: bytes, model: type[_Strict]) -> Any:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, (changes_output, why) in _REFUSED.items():
        if name in data and changes_output(data[name]):
            raise APIError(400, f"{name}: {why} by this server", param=name, code="unsupported")
    if any(isinstance(m, dict) and m.get("role") == "tool" for m in data.get("messages") or []):
        raise APIError(400, "messages: tool messages are not supported", param="messages")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # of a union's failed branches, the deepest says the most ("content[0].type")
        err = max(e.errors(), key=lambda x: len(x["loc"]))
        param = _param(err["loc"])
        msg = err["msg"] if err["type"] != "missing" else "required field is missing"
        raise APIError(400, f"{param}: {msg}", param=param or None) from None


def sampling_params(
    req: ChatRequest | CompletionRequest, max_tokens: int, choice: int
) -> SamplingParams:
    """Choice i of n draws with seed + i: reproducible, yet the n choices differ."""
    n_top = req.n_top()
    t = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if t < GREEDY_BELOW else t,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=None if req.seed is None else req.seed + choice,
        stop=req.stop_list(),
        logprobs=n_top is not None,
        top_logprobs=n_top or 0,
        ignore_eos=req.ignore_eos,
    )
