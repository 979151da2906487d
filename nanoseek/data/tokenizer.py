"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with nanoseek's special tokens and
chat format. Saved as tokenizer.json + tokenizer_config.json, which
`transformers.AutoTokenizer.from_pretrained(dir)` loads, chat template included."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.data.errors import DataError
from nanoseek.utils import atomic_write_text

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
CHAT_ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{r}|>" for r in CHAT_ROLES), END]
# Reasoning (DeepSeek-R1's convention, as plain text, not special tokens): an assistant turn
# may start with <think>...</think> before its answer. A message's `reasoning_content` is
# rendered that way. The generation prompt can open a turn in thinking mode (`<think>`: the
# model writes its reasoning, then </think>, then the answer) or non-thinking mode (an empty
# `<think></think>`, as DeepSeek-V3.1 closes the block), or leave the choice to the model.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# The same format as Tokenizer.apply_chat_template; a test checks that the two agree.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['role'] == 'assistant' and message.reasoning_content %}"
    "<think>{{ message.reasoning_content }}</think>{% endif %}"
    "{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is not none %}"
    "{% if enable_thinking %}<think>{% else %}<think></think>{% endif %}{% endif %}"
    "{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
# nanoseek starts every training document and every text prompt with <|bos|> (the chat
# template writes it itself) and never ends a prompt with <|eos|>. tokenizer_config.json and
# the GGUF export say so, for loaders (llama.cpp) that add special tokens themselves.
ADD_BOS, ADD_EOS = True, False


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer):
        # Tokenizers from elsewhere may lack our special tokens; append the missing ones.
        vocab = tok.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            tok.add_special_tokens(missing)
        canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"))
        self.hash = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        # Text is always text: a document or chat message that contains "<|end|>" must not
        # turn into a control token. Not serialised, so the saved file is unaffected.
        tok.encode_special_tokens = True
        self._tok = tok
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id, self.end_id = ids[BOS], ids[EOS], ids[PAD], ids[END]
        self.role_ids = {r: ids[f"<|{r}|>"] for r in CHAT_ROLES}

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8192, show_progress: bool = False
    ) -> Tokenizer:
        if vocab_size < MIN_VOCAB:
            raise DataError(
                f"vocab size {vocab_size} is too small; byte-level BPE needs >= {MIN_VOCAB}"
            )
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,  # ids 0..6, in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
            min_frequency=2,
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a tokenizer.json, or a directory holding one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"no tokenizer at {file}; give a tokenizer.json or a directory with one"
            )
        try:
            return cls(tokenizers.Tokenizer.from_file(str(file)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{file}: not a valid tokenizer.json ({e})") from e

    def save(self, out_dir: str | Path, requested_vocab_size: int | None = None) -> Path:
        """Write tokenizer.json + tokenizer_config.json. `requested_vocab_size` records what
        training was asked for (a small corpus can yield fewer merges), so a rerun with the
        same request is recognised."""
        out_dir = Path(out_dir)
        self._tok.encode_special_tokens = False  # only a runtime switch; keep the file plain
        try:
            atomic_write_text(out_dir / "tokenizer.json", self._tok.to_str(pretty=True))
        finally:
            self._tok.encode_special_tokens = True
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": ADD_BOS,
            "add_eos_token": ADD_EOS,
            "additional_special_tokens": SPECIAL_TOKENS[3:],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if requested_vocab_size is not None:
            config["nanoseek_requested_vocab_size"] = requested_vocab_size
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return out_dir

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Runs in parallel across cores inside `tokenizers`.
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> list[int]:
        """<|bos|> then <|role|>content<|end|> per message, then <|assistant|> to prompt a reply.
        `thinking`: True opens the reply with <think>, False with an empty <think></think>,
        None leaves it to the model (transformers: `enable_thinking=`)."""
        return self.render_chat(messages, add_generation_prompt, thinking)[0]

    def render_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> tuple[list[int], list[bool]]:
        """The chat template's ids, and for each id whether it belongs to an assistant turn's
        reply (its text and closing <|end|>: what SFT trains on)."""
        ids, mask = [self.bos_id], [False]
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            if role not in self.role_ids:
                raise DataError(f"unknown chat role {role!r}; use one of {', '.join(CHAT_ROLES)}")
            text = m.get("content") or ""
            if role == "assistant" and m.get("reasoning_content"):
                text = f"{THINK_OPEN}{m['reasoning_content']}{THINK_CLOSE}{text}"
            body = [*self.encode(text), self.end_id]
            ids += [self.role_ids[role], *body]
            mask += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            opener = {None: "", True: THINK_OPEN, False: THINK_OPEN + THINK_CLOSE}[thinking]
            prompt = [self.role_ids["assistant"], *self.encode(opener)]
            ids += prompt
            mask += [False] * len(prompt)
        return ids, mask

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash})"
