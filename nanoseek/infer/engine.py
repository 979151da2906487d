"""The engine: requests in, tokens out, over a continuously batched latent cache.

    engine = Engine.load("ckpt/")                       # model + tokenizer
    engine.generate(["Once upon"], SamplingParams(max_tokens=32, temperature=0))
    for delta in engine.stream("Once upon", params): print(delta, end="")

A server drives the same loop itself: `add_request` whenever a request arrives, `step()`
in a loop (each step either prefills newly admitted requests or decodes every running
one), and reads each step's outputs; finished sequences leave the batch at once.

With `speculative=True`, MTP module 1 drafts one token per step and a lookup in the
sequence's own text drafts the next (the token that followed the last time the same two
tokens appeared: free, and often right where text repeats itself, as code does); the main
model checks [last token, MTP draft, lookup draft] in one forward, so a step commits one to
three tokens. Drafting is
adaptive (SpecPolicy): a verify step runs only while its measured cost per committed
token beats a plain step's at the current batch size; plain steps keep what the MTP
module needs, and it catches up in one batched pass when drafting resumes. Either way the
tokens are distributed as plain decoding's (greedy: identical).

A DeepSeek-V4 model gets its own cache and runner (V4Cache, V4Runner: the sliding window
plus compressed entries) behind the same slots and steps; no speculation or prefix cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.device import resolve_device
from nanoseek.infer.cache import KVCache
from nanoseek.infer.cache_v4 import V4Cache
from nanoseek.infer.prefix import PrefixCache
from nanoseek.infer.runner import ModelRunner
from nanoseek.infer.runner_v4 import V4Runner
from nanoseek.infer.sampling import (
    SamplingParams,
    filtered_probs,
    sample,
    token_logprobs,
    verify,
)
from nanoseek.infer.scheduler import Scheduler, Sequence
from nanoseek.kernels import KernelError, decode_library
from nanoseek.model.quant import QUANTIZE
from nanoseek.model.transformer import Transformer
from nanoseek.model.v4 import V4Transformer


class EngineError(ValueError):
    """A request the engine cannot serve; the message names the problem and the fix."""


def _check_v4(speculative: bool, plain: bool, prefix_cache: bool, compile: bool) -> None:
    """What the V4 engine does not do, each refused with its reason."""
    if speculative:
        raise EngineError(
            "speculative decoding needs MTP modules, and V4 models here have none; "
            "run without --speculative"
        )
    if plain:
        raise EngineError("V4 has one cached path (no plain one); generate_v4 recomputes")
    if prefix_cache:
        raise EngineError(
            "the prefix cache keeps V3's latent rows; V4's window and compressor state is "
            "not built for it: run without --prefix-cache"
        )
    if compile:
        raise EngineError("the compiled decode step is V3's (ModelRunner); run without --compile")


def _check_quantize(quantize: str, v4: bool, plain: bool, p: torch.Tensor) -> None:
    if quantize not in QUANTIZE:
        raise EngineError(f"unknown quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    _check_kernels("int8 decoding", v4, plain, p)


def _check_kernels(what: str, v4: bool, plain: bool, p: torch.Tensor) -> None:
    if v4 or plain:
        raise EngineError(f"{what} runs V3's absorbed path; not for V4 or --plain")
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise EngineError(
            f"{what} is for a float32 model on the CPU; on a GPU use --dtype bfloat16 "
            f"(this model: {str(p.dtype)[6:]} on {p.device.type})"
        )
    try:
        decode_library()  # built on first use: fail here, with the reason, not mid-request
    except KernelError as e:
        raise EngineError(str(e)) from None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" (EOS, stop token or stop string) | "length" | "abort"
    prompt_tokens: int = 0
    # with logprobs: that of the stop token which ended it (not in token_ids; RL trains on it)
    stop_logprob: float | None = None


@dataclass
class StepOutput:
    seq_id: int
    token_ids: list[int]  # committed this step
    text: str  # text delta this step ("" without a tokenizer or when not tracked)
    finished: bool
    finish_reason: str | None
    # per committed token, when the request asked (params.logprobs / top_logprobs)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # [(token id, logprob)]


@dataclass
class SpecStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    plain_steps: int = 0  # decode steps the policy ran without drafting

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


PROBE_EVERY = 64  # steps in the preferred mode, then one step of the other to re-measure it
FIRST_SAMPLES = 3  # timed steps of each mode at a new batch size before choosing


@dataclass
class SpecPolicy:
    """When drafting pays. A verify step takes t_spec and commits 1 + acceptance tokens per
    sequence, a plain step t_plain and one: draft iff (1 + acceptance) * t_plain > t_spec.
    Step times are moving averages per batch size (at batch 1 the verify's second position
    costs little; at batch 8 it doubles the experts' work), the acceptance a moving average
    over verify steps. Each starts as a plain mean, so the rarely run mode's few samples
    correct it quickly. Both modes are timed FIRST_SAMPLES times at each batch size, then
    every PROBE_EVERY steps (4x that far from break-even) one step of the other mode keeps
    its numbers current. Each batch
    size's first step of each mode is not timed (warm-up, compilation)."""

    alpha: float = 0.1
    acceptance: float | None = None
    times: dict[tuple[bool, int], float] = field(default_factory=dict)
    samples: dict[tuple[bool, int], int] = field(default_factory=dict)  # timed steps
    since: int = 0  # steps since the last probe

    def choose(self, B: int) -> bool:
        for spec in (True, False):  # measure both first
            if self.samples.get((spec, B), -1) < FIRST_SAMPLES:
                return spec
        gain = (1 + self.acceptance) * self.times[(False, B)] / self.times[(True, B)]
        self.since += 1
        # far from the break-even point, probe 4x less often: a probe (and the catch-up
        # before a verify step) costs what the losing mode costs
        if self.since > PROBE_EVERY * (1 if 0.8 < gain < 1.25 else 4):
            self.since = 0
            return gain <= 1
        return gain > 1

    def record(self, spec: bool, B: int, seconds: float, accepted: float | None = None) -> None:
        if accepted is not None:  # drafts accepted per sequence this step
            a = self.acceptance
            self.acceptance = accepted if a is None else a + self.alpha * (accepted - a)
        key = (spec, B)
        n = self.samples[key] = self.samples.get(key, -1) + 1
        if n < 1:  # the untimed first step
            return
        old = self.times.get(key, seconds)
        # a stray slow step (another process, a recompile) moves the average by at most 2x
        self.times[key] = old + max(self.alpha, 1 / n) * (min(seconds, 2 * old) - old)


DEFAULT_MAX_LEN = 4096


class Engine:
    def __init__(
        self,
        model: Transformer | V4Transformer,
        tokenizer=None,
        max_batch: int = 8,
        max_len: int | None = None,
        speculative: bool = False,
        plain: bool = False,
        dispatch: str = "auto",
        track_expert_load: bool = False,
        prefix_cache: bool = False,
        compile: bool = False,
        adaptive: bool = True,
        quantize: str | None = None,
        kernels: bool | None = None,
        lookup_drafts: int | None = None,
    ):
        """`max_len`: context length, preallocated for `max_batch` sequences (default: the
        config's max_position_embeddings, capped at DEFAULT_MAX_LEN so that a 160K-context
        config does not preallocate tens of GB).
        `plain=True` runs the reference path (re-expanded keys/values) instead of absorbed MLA.
        `dispatch`: how MoE layers send tokens to experts (nanoseek.model.moe; auto picks by
        size and device). `track_expert_load`: keep `expert_counts`, the tokens each expert
        of each MoE layer received from the served traffic. `prefix_cache`: a prompt that
        starts like an earlier one (a system prompt, a chat's earlier turns) reuses its latent
        rows and prefills only the rest (see infer/prefix.py).
        `adaptive` (with drafts): draft only while it pays (SpecPolicy); False drafts
        every step. `lookup_drafts`: tokens drafted by looking up the sequence's own text
        (what followed the last time the same two tokens appeared, copied on as a loop past
        the end of the text; greedy requests only).
        None (default): 1 with speculative, after the MTP draft (0: the MTP draft alone),
        else 0. K > 0 without speculative: prompt lookup decoding alone, K drafts a step, no
        MTP module needed (README: lookup drafts).
        `compile`: decode and verify steps through torch.compile (ModelRunner; the first
        steps of each batch shape wait for the compiler: tens of seconds on a CPU).
        `quantize="int8"` (x86 CPU, fp32 model): the weights every token reads in int8,
        weight-only, in nanoseek's AVX2 kernel (nanoseek.model.quant): a quarter of the
        bytes; the logits move slightly (the README says how much). `kernels`: a float32 model
        on the CPU can run its decode matmuls of up to 8 rows in nanoseek's own AVX2 kernel
        (1.2-3x MKL's speed there for weights read from memory; x86 with AVX2 and a C
        compiler): None (default) does where it builds and the model has 16 MB of weights
        or more (smaller ones decode from cache, where MKL's calls cost less), True always
        (EngineError where it cannot), False never.
        For a V4Transformer speculative, plain, prefix_cache and compile are refused
        (EngineError) and dispatch is unused (V4's MoE has one)."""
        cfg = model.config
        v4 = isinstance(model, V4Transformer)
        if v4:
            _check_v4(speculative, plain, prefix_cache, compile)
        elif speculative and len(model.mtp) == 0:
            raise EngineError(
                "speculative decoding needs the model's MTP modules, and this checkpoint has none "
                "(checkpoints saved by transformers drop them); run without --speculative"
            )
        # The caller's model is used as it is (GRPO samples from the model it trains): no
        # .eval() here. Cached decoding has no dropout, so the mode does not matter.
        self.model, self.tokenizer = model, tokenizer
        self.max_len = max_len or min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
        if self.max_len > cfg.max_position_embeddings:
            raise EngineError(
                f"max_len {self.max_len} exceeds the model's max_position_embeddings "
                f"({cfg.max_position_embeddings})"
            )
        if speculative and prefix_cache:
            # the MTP module's cached rows depend on the token after each position
            raise EngineError("prefix_cache and speculative decoding do not combine; pick one")
        self.speculative, self.plain = speculative, plain
        if lookup_drafts is None:
            lookup_drafts = 1 if speculative else 0
        if lookup_drafts < 0:
            raise EngineError(f"lookup_drafts must be 0 or more, got {lookup_drafts}")
        if v4 and lookup_drafts:
            raise EngineError("lookup drafts need the latent cache's verify steps; not for V4")
        self.lookup_drafts = lookup_drafts
        self.drafting = speculative or lookup_drafts > 0  # verify steps happen
        self.prefix = PrefixCache(capacity_tokens=8 * self.max_len) if prefix_cache else None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if quantize is not None:
            _check_quantize(quantize, v4, plain, p)
        if kernels:
            _check_kernels("the fp32 decode kernel (kernels=True)", v4, plain, p)
        if v4:
            self.cache = V4Cache(cfg, max_batch, self.max_len, p.dtype, p.device)
            self.runner = V4Runner(model, self.cache, track_expert_load)
        else:
            mtp_layers = 1 if speculative else 0
            self.cache = KVCache(cfg, max_batch, self.max_len, p.dtype, p.device, mtp_layers)
            self.runner = ModelRunner(
                model, self.cache, dispatch, track_expert_load, compile, quantize, kernels
            )
        self.scheduler = Scheduler(self.cache)
        self.spec_stats = SpecStats()
        self.policy = SpecPolicy() if self.drafting and adaptive else None
        eos = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        if getattr(tokenizer, "end_id", None) is not None:  # end of a chat turn
            self.eos_ids.add(tokenizer.end_id)
        self._seqs: dict[int, Sequence] = {}
        self.tokens_generated = 0

    @classmethod
    def load(
        cls,
        ckpt_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> Engine:
        """Model (and tokenizer, when the directory has tokenizer.json) from a checkpoint."""
        from nanoseek.hub import from_pretrained, resolve_checkpoint

        device = resolve_device(device)  # before the (slower) checkpoint checks
        ckpt_dir = resolve_checkpoint(ckpt_dir)
        model = from_pretrained(ckpt_dir, dtype=dtype, device=device).eval()
        tokenizer = None
        if (ckpt_dir / "tokenizer.json").exists():
            from nanoseek.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(ckpt_dir)
        return cls(model, tokenizer, **kwargs)

    @property
    def expert_counts(self) -> torch.Tensor | None:
        """[n_moe_layers, n_routed_experts] tokens routed per expert since the engine started
        (with track_expert_load; None otherwise or for a dense model)."""
        return self.runner.expert_counts

    def refresh_weights(self) -> None:
        """Re-derive the decode weights after the model's weights changed in place (GRPO
        samples from the model it trains: no reload from disk)."""
        self.runner.refresh()

    # --- requests ------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError(
                    "this checkpoint has no tokenizer.json; pass token ids instead of text"
                )
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise EngineError(
                f"prompt token ids must be in [0, {vocab}) for this model "
                "(is the tokenizer from another checkpoint?)"
            )
        return ids

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, stream: bool = False
    ) -> Sequence:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise EngineError("empty prompt; give at least one token")
        if len(ids) >= self.max_len:
            raise EngineError(
                f"prompt is {len(ids)} tokens, the context holds {self.max_len}; "
                "shorten the prompt (or load with a larger max_len)"
            )
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        seq = Sequence(ids, params, frozenset(stop_ids), stream=stream)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.scheduler.add(seq)
        self._seqs[seq.id] = seq
        return seq

    def abort(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None and not seq.finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the loop ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One forward: prefill newly admitted requests if there are any, else decode all."""
        new = self.scheduler.admit()
        if new:
            committed = self._prefill(new)
        elif self.scheduler.running:
            committed = self._decode_step(self.scheduler.running)
        else:
            return []
        outputs = []
        for seq, toks, lps in committed:
            before = len(seq.output_ids)
            for t, lp in zip(toks, lps, strict=True):
                self._append(seq, t, lp[0] if lp else None)
                if seq.finished:
                    break
            delta = self._text_delta(seq)
            out = StepOutput(
                seq.id, seq.output_ids[before:], delta, seq.finished, seq.finish_reason
            )
            if seq.params.logprobs:  # appended tokens are a prefix of the committed ones
                out.logprobs = seq.logprobs[before:]
                n, k = len(out.token_ids), seq.params.top_logprobs
                out.top_logprobs = [lp[1][:k] for lp in lps[:n]] if k else None
            outputs.append(out)
        for seq, *_ in committed:
            if seq.finished:
                self.scheduler.finish(seq)
                self._seqs.pop(seq.id, None)
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        params = [s.params for s in seqs]
        tok = sample(logits, params, [s.generator for s in seqs])
        return tok, self._logprobs(logits, tok, params)

    def _logprobs(self, logits: torch.Tensor, tok: torch.Tensor, params: list[SamplingParams]):
        """Per row: (log p(chosen), top alternatives), or None when no row asked."""
        if not any(p.logprobs for p in params):
            return None
        sampled = [p.logprobs_mode == "sampled" for p in params]
        lsm = None if all(sampled) else logits.float().log_softmax(-1)  # raw
        if any(sampled):  # log of what each row drew from (-inf where top-k/top-p cut)
            K = logits.shape[1] if logits.dim() == 3 else 1  # speculative: [B, 2, V]
            per_pos = [p for p in params for _ in range(K)]
            drawn = filtered_probs(logits.reshape(-1, logits.shape[-1]), per_pos).log()
            drawn = drawn.view(logits.shape)
            rows = torch.tensor(sampled, device=logits.device).view(-1, *[1] * (logits.dim() - 1))
            lsm = drawn if lsm is None else torch.where(rows, drawn, lsm)
        return token_logprobs(logits, tok, max(p.top_logprobs for p in params), lsm)

    def _prefill(self, seqs: list[Sequence]):
        B = len(seqs)
        done = [self._reuse_prefix(s) for s in seqs]  # tokens already in each slot
        lens = [len(s.prompt_ids) - n for s, n in zip(seqs, done, strict=True)]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, s in enumerate(seqs):  # right-padded; pads write rows no query ever sees
            ids[b, : lens[b]] = torch.tensor(s.prompt_ids[done[b] :])
        ids = ids.to(self.device)
        # a pad past the slot's last row writes the spare row (read only after a rewrite)
        spare = self.cache.rows_per_slot - 1
        pos = (torch.tensor(done)[:, None] + torch.arange(T)).clamp_(max=spare).to(self.device)
        start = seqs[0].slot
        S = min(max(done) + T, spare + 1)
        rows_len = torch.tensor(lens, device=self.device)  # V4: where each row's pads start
        h = self.runner.forward(ids, pos, start, S=S, plain=self.plain, lens=rows_len)
        if self.prefix is not None:
            for s in seqs:
                n = len(s.prompt_ids) // self.prefix.block * self.prefix.block
                self.prefix.insert(s.prompt_ids, self.cache.slot_rows(s.slot, n))
        rows, last = torch.arange(B, device=self.device), rows_len - 1
        logits = self.runner.logits(h[rows, last])
        tok, lp = self._sample(logits, seqs)
        if self.speculative:  # MTP module 1 over the prompt: position i sees h_i and token i+1
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            nxt[rows, last] = tok
            g = self.runner.mtp_forward(h, nxt, pos, start, S=T, plain=self.plain)
            drafts = self.runner.logits(g[rows, last]).argmax(-1).tolist()
            for s, d in zip(seqs, drafts, strict=True):
                s.draft = d
        toks = tok.tolist()
        lps = lp if lp is not None else [None] * B
        return [(s, [t], [p]) for s, t, p in zip(seqs, toks, lps, strict=True)]

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Copy the longest cached prefix of seq's prompt into its slot: its length (0: none)."""
        hit = self.prefix.lookup(seq.prompt_ids) if self.prefix is not None else None
        if hit is None:
            return 0
        rows, n = hit
        self.cache.put_rows(seq.slot, rows)
        return n

    def _decode_step(self, seqs: list[Sequence]):
        """A plain or a verify step, as the policy says; each timed for the policy."""
        if not self.drafting:
            return self._decode(seqs)
        B, policy = len(seqs), self.policy
        # The adaptive choice depends on timing, and a verify step draws differently from a
        # plain one: a batch holding a seeded sampled request decodes plainly, so that the
        # seed alone says what it draws (greedy output is the same in either mode).
        pinned = policy is not None and any(
            s.params.seed is not None and not s.params.greedy for s in seqs
        )
        spec = policy is None or (not pinned and policy.choose(B))
        if spec and self.speculative:
            self._catch_up(seqs)
        t0 = time.perf_counter()
        out = self._speculate(seqs) if spec else None
        if out is None:  # no drafts to check (lookup alone found none): a plain step
            spec, out = False, self._decode(seqs)
        if policy is not None:
            accepted = sum(len(toks) - 1 for _, toks, _ in out) / B if spec else None
            policy.record(spec, B, time.perf_counter() - t0, accepted)
        return out

    def _decode(self, seqs: list[Sequence]):
        positions = [s.num_tokens - 1 for s in seqs]
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        pos = torch.tensor(positions, device=self.device)[:, None]
        h = self.runner.forward(ids, pos, 0, S=max(positions) + 1, plain=self.plain)
        tok, lp = self._sample(self.runner.logits(h[:, 0]), seqs)
        lps = lp if lp is not None else [None] * len(seqs)
        toks = tok.tolist()
        if self.drafting:
            self.spec_stats.plain_steps += 1
        if self.speculative:  # not drafting this step: keep what the MTP module will need
            for b, (s, t) in enumerate(zip(seqs, toks, strict=True)):
                s.mtp_lag.append((h[b, 0], t))
                s.draft = None
        return [(s, [t], [p]) for s, t, p in zip(seqs, toks, lps, strict=True)]

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Before drafting resumes: one MTP pass over the positions decoded without it (its
        cache must hold every row its attention reads), which also drafts for each of those
        sequences. Rows are right-padded; a pad writes rows at or past the sequence's last
        position, which this step's verify (or a later step) rewrites before any query
        reads them."""
        G = max(len(s.mtp_lag) for s in seqs)
        if G == 0:
            return
        B, spare = len(seqs), self.cache.rows_per_slot - 1
        h = torch.zeros(B, G, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        nxt = torch.zeros(B, G, dtype=torch.long)
        first = []
        for b, s in enumerate(seqs):
            L = len(s.mtp_lag)
            first.append(s.num_tokens - 1 - L)
            if L:
                h[b, :L] = torch.stack([x for x, _ in s.mtp_lag])
                nxt[b, :L] = torch.tensor([t for _, t in s.mtp_lag])
        pos = (torch.tensor(first)[:, None] + torch.arange(G)).clamp_(max=spare).to(self.device)
        # eager: a compiled engine would compile a graph for each lag length
        g = self.runner.mtp_forward(h, nxt.to(self.device), pos, 0, plain=self.plain, eager=True)
        last = torch.tensor([max(len(s.mtp_lag) - 1, 0) for s in seqs], device=self.device)
        rows = torch.arange(B, device=self.device)
        drafts = self.runner.logits(g[rows, last]).argmax(-1).tolist()
        for s, d in zip(seqs, drafts, strict=True):
            if s.mtp_lag:
                s.draft, s.mtp_lag = d, []

    def _speculate(self, seqs: list[Sequence]):
        """Verify [last, drafts...] at positions [n-1, n, ...]: the MTP draft (speculative)
        then lookup drafts; commit 1 + accepted tokens; with MTP, draft again. None when
        there is nothing to verify (lookup drafts alone, and none found)."""
        B, mtp, E = len(seqs), self.speculative, self.lookup_drafts
        n = [s.num_tokens for s in seqs]
        if max(n) + mtp + E > self.cache.rows_per_slot:  # no rows for them at a slot's end
            if not mtp:
                return None
            E = 0
        K = mtp + E  # drafts a row: every row verifies as many (one compiled shape)
        ids, valid = [], []
        for s in seqs:
            if mtp:
                look = s.lookup(E, s.draft) if E and s.params.greedy else []
                drafts = [s.draft, *look]
            else:
                drafts = s.lookup(E) if s.params.greedy else []
            pad = [s.last_token] * (K - len(drafts))  # never accepted (valid False)
            ids.append([s.last_token, *drafts, *pad])
            valid.append([True] * len(drafts) + [False] * len(pad))
        if not any(map(any, valid)):
            return None
        ids = torch.tensor(ids, device=self.device)
        valid = torch.tensor(valid, device=self.device)
        pos = (
            torch.tensor(n, device=self.device)[:, None]
            - 1
            + torch.arange(1 + K, device=self.device)
        )
        S = max(n) + K
        st = None if self.plain else self.runner.prepare(pos, 0, S)  # shared with the MTP pass
        h = self.runner.forward(ids, pos, 0, S=S, plain=self.plain, step=st)
        logits = self.runner.logits(h)  # [B, 1 + K, V]
        params, gens = [s.params for s in seqs], [s.generator for s in seqs]
        toks, acc = verify(logits, ids[:, 1:], params, gens, valid)
        host = [toks, acc[:, None]]
        if mtp:  # MTP at each position sees (h, the token after): draft from the last accepted
            g = self.runner.mtp_forward(h, toks, pos, 0, S=S, plain=self.plain, step=st)
            rows = torch.arange(B, device=self.device)
            host.append(self.runner.logits(g[rows, acc]).argmax(-1)[:, None])
        lp = self._logprobs(logits, toks, params)
        host = torch.cat(host, 1).tolist()  # one sync
        lps = lp if lp is not None else [[None] * (1 + K)] * B
        self.spec_stats.steps += 1
        self.spec_stats.drafted += int(valid.sum())
        out = []
        for s, row, lp_row in zip(seqs, host, lps, strict=True):
            a = row[1 + K]
            self.spec_stats.accepted += a
            if mtp:
                s.draft = row[-1]
            out.append((s, row[: 1 + a], lp_row[: 1 + a]))
        return out

    # --- bookkeeping ---------------------------------------------------------------------
    def _append(self, seq: Sequence, tok: int, lp: float | None) -> None:
        p = seq.params
        if tok in seq.stop_ids:
            seq.finish_reason = "stop"
            seq.stop_logprob = lp
            return
        seq.output_ids.append(tok)
        self.tokens_generated += 1
        if p.logprobs:
            seq.logprobs.append(lp)
        if self.tokenizer is not None and (p.stop or seq.stream):
            seq.text = self.tokenizer.decode(seq.output_ids)
            for stop in p.stop:
                i = seq.text.find(stop, max(0, seq.emitted - len(stop)))
                if i >= 0:
                    seq.text, seq.finish_reason = seq.text[:i], "stop"
                    return
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_len:
            seq.finish_reason = "length"

    def _text_delta(self, seq: Sequence) -> str:
        if not seq.stream or self.tokenizer is None:
            return ""
        end = len(seq.text)
        if not seq.finished:
            if seq.text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
                end -= 1
            for stop in seq.params.stop:  # hold back what could be the start of a stop string
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if seq.text[end - k : end] == stop[:k]:
                        end -= k
                        break
        delta, seq.emitted = seq.text[seq.emitted : max(end, seq.emitted)], max(end, seq.emitted)
        return delta

    def _completion(self, seq: Sequence) -> Completion:
        text = ""
        if self.tokenizer is not None:
            text = (
                seq.text
                if (seq.params.stop or seq.stream)
                else self.tokenizer.decode(seq.output_ids)
            )
        lps = seq.logprobs if seq.params.logprobs else None
        return Completion(
            text,
            list(seq.output_ids),
            lps,
            seq.finish_reason or "abort",
            len(seq.prompt_ids),
            seq.stop_logprob if seq.params.logprobs else None,
        )

    # --- convenience ---------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt, batched; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise EngineError("generate() takes a list of prompts; wrap a single prompt in a list")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise EngineError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        for p in prompts:  # validate all before queueing any
            self.encode(p)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while not all(s.finished for s in seqs):
            self.step()
        return [self._completion(s) for s in seqs]

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield text deltas as they are decoded (token ids as text when there is no tokenizer)."""
        seq = self.add_request(prompt, params, stream=True)
        try:
            while not seq.finished:
                for out in self.step():
                    if out.seq_id == seq.id:
                        yield (
                            out.text
                            if self.tokenizer is not None
                            else "".join(f"{t} " for t in out.token_ids)
                        )
        finally:
            if not seq.finished:
                self.abort(seq.id)
