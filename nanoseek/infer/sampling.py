"""Sampling parameters and the batched sampler.

One call samples a whole batch, each row with its own temperature, top-k, top-p and
(optional) seeded generator, so batching never changes what a seeded request draws.
Categorical draws use the exponential race: argmax(p / E) with E ~ Exp(1) picks index i
with probability p_i, and needs no cumulative sum or search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """A sampling setting out of range; the message names the field and the allowed range."""


MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    logprobs: bool = False  # log-probability of each chosen token
    # "raw": under the model's distribution (OpenAI's); "sampled": under the distribution
    # the token was drawn from (after temperature, top-k, top-p), the behaviour policy that
    # off-policy RL corrects for
    logprobs_mode: str = "raw"
    top_logprobs: int = 0  # with logprobs: also the N most likely tokens' at each position
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    ignore_eos: bool = False  # keep going past EOS (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0):  # also rejects NaN
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty")
        if self.logprobs_mode not in ("raw", "sampled"):
            raise SamplingError(
                f"logprobs_mode must be 'raw' or 'sampled', got {self.logprobs_mode!r}"
            )
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] -> the distribution each row samples from, after temperature, top-k and
    top-p (rows with temperature 0 get temperature 1: the caller takes their argmax)."""
    B, V = logits.shape
    dev = logits.device
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
    x = logits.float() / temps[:, None]
    if all(p.top_k == 0 and p.top_p >= 1 for p in params):
        return x.softmax(-1)
    ks = torch.tensor([p.top_k or V for p in params], device=dev)
    ps = torch.tensor([p.top_p for p in params], device=dev)
    sorted_x, order = x.sort(-1, descending=True)
    sorted_x = sorted_x.masked_fill(torch.arange(V, device=dev) >= ks[:, None], float("-inf"))
    probs = sorted_x.softmax(-1)
    # drop a token once the mass before it already reaches top_p (the first always stays)
    sorted_x = sorted_x.masked_fill(probs.cumsum(-1) - probs >= ps[:, None], float("-inf"))
    return torch.zeros_like(x).scatter_(1, order, sorted_x.softmax(-1))


def exponential_noise(
    shape: torch.Size, gens: list[torch.Generator | None], device: torch.device
) -> torch.Tensor:
    q = torch.empty(shape, device=device)
    if all(g is None for g in gens):
        return q.exponential_()  # one draw for the batch from the global generator
    for b, g in enumerate(gens):  # seeded rows draw from their own stream
        q[b].exponential_(generator=g)
    return q


def sample(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> torch.Tensor:
    """logits [B, V] -> chosen token ids [B]."""
    greedy = logits.argmax(-1)
    if all(p.greedy for p in params):
        return greedy
    probs = filtered_probs(logits, params)
    choice = (probs / exponential_noise(probs.shape, gens, logits.device)).argmax(-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(is_greedy, greedy, choice)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the raw model distribution (before temperature/top-k/top-p)."""
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, n_top: int, lsm: torch.Tensor | None = None
) -> list[tuple[float, list[tuple[int, float]]]] | list:
    """logits [B, V] (or [B, K, V]), tokens [B] (or [B, K]) -> per row (per token):
    (log p(token), [(id, log p)] of the n_top most likely), under the raw model distribution
    (or the given log-probs `lsm`), fetched to the host in one transfer (ids travel as
    floats: exact below 2**24)."""
    if lsm is None:
        lsm = logits.float().log_softmax(-1)
    chosen = lsm.gather(-1, tokens[..., None])
    vals, ids = lsm.topk(n_top, -1) if n_top else (chosen[..., :0], chosen[..., :0])
    host = torch.cat([chosen, vals, ids.float()], -1).tolist()

    def entry(r: list[float]) -> tuple[float, list[tuple[int, float]]]:
        return r[0], [(int(i), v) for i, v in zip(r[1 + n_top :], r[1 : 1 + n_top], strict=True)]

    return [entry(r) if logits.dim() == 2 else [entry(x) for x in r] for r in host]


def verify(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    params: list[SamplingParams],
    gens: list[torch.Generator | None],
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance of up to K drafted tokens per row.

    logits [B, K + 1, V]: the target's distributions at the K drafted positions and the one
    after; drafts [B, K]; valid [B, K] (optional): False marks a padding draft, never
    accepted. Returns tokens [B, K + 1] and accepted [B]: the row commits
    tokens[:, :1 + accepted]. Greedy rows accept the longest run of drafts that are the
    argmax (output identical to greedy decoding). Sampling rows check the first draft only
    (the others count as rejected; a padding one commits just the first token), as a point
    mass q: accept with probability p(draft), else sample from p with the draft removed;
    the committed tokens are then distributed exactly as plain sampling's (the standard
    rejection rule with residual max(0, p - q))."""
    greedy = logits.argmax(-1)  # [B, K + 1]
    hit = greedy[:, :-1] == drafts
    if valid is not None:
        hit &= valid
    run = hit.long().cumprod(1).sum(1)  # leading drafts that equal the argmax
    if all(p.greedy for p in params):
        return greedy, run
    draft = drafts[:, 0]
    p0 = filtered_probs(logits[:, 0], params)
    p_draft = p0.gather(1, draft[:, None])[:, 0]
    u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in gens])
    residual = p0.scatter(1, draft[:, None], 0.0)
    noise = exponential_noise(p0.shape, gens, logits.device)
    fixed = (residual / noise).argmax(-1)
    sampled0 = torch.where(u < p_draft, draft, fixed)
    bonus = sample(logits[:, 1], params, gens)
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    tok0 = torch.where(is_greedy, greedy[:, 0], sampled0)
    tok1 = torch.where(is_greedy, greedy[:, 1], bonus)
    toks = torch.cat([torch.stack([tok0, tok1], 1), greedy[:, 2:]], 1)
    accepted = tok0 == draft
    if valid is not None:
        accepted &= valid[:, 0]
    return toks, torch.where(is_greedy, run, accepted.long())
