"""The OpenAI-compatible server, driven by the real `openai` client over loopback HTTP.

A tiny random model with a tokenizer trained on a few sentences; its head is scaled up so
greedy choices have clear margins (batched and one-at-a-time numerics then pick the same
tokens). Where a random model cannot be made to say what a test needs (`</think>`, an
engine failure), a scripted stand-in for the engine is used, and says so.
"""

from __future__ import annotations

import copy
import http.client
import itertools
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, SamplingParams, StepOutput
from nanoseek.infer.engine import SpecStats
from nanoseek.serve import ServerSettings, create_app
from nanoseek.serve.reasoning import ReasoningSplitter, split_reasoning

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

TEXTS = ["the cat sat on the mat. " * 40, "a dog ran far away. " * 40, "why is the sky blue? " * 40]
USER = [{"role": "user", "content": "the cat"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine thread, the server and the clients share 2 cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok) -> nanoseek.Transformer:
    torch.manual_seed(0)
    m = nanoseek.Transformer(nanoseek.get_preset("tiny").replace(vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        m.head.weight.mul_(30)  # clear argmax margins (see the module docstring)
    return m


def engine(model, tok, **kw) -> Engine:
    kw.setdefault("max_batch", 8)
    kw.setdefault("max_len", 256)
    kw.setdefault("track_expert_load", True)  # as `nanoseek serve` runs it
    kw.setdefault("prefix_cache", not kw.get("speculative", False))
    return Engine(copy.deepcopy(model), tok, **kw)


@contextmanager
def serving(app):
    """uvicorn in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def url(model, tok):
    with serving(create_app(engine(model, tok), ServerSettings(model_name="tiny"))) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, path: str, body: bytes | dict, headers: dict | None = None):
    """Raw HTTP (for what the openai client would not send): (status, headers, json)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if raw else None


def get(url: str, path: str, key: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(
        url + path, headers={"Authorization": f"Bearer {key}"} if key else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(url: str, name: str) -> float:
    text = get(url, "/metrics")[1]
    return float(re.search(rf"^nanoseek_{name} (\S+)$", text, re.M).group(1))


def chat_stream(client, **kw) -> tuple[str, str, list]:
    """(content, reasoning, chunks) of a streamed chat completion."""
    chunks = list(client.chat.completions.create(**{"model": "tiny", "stream": True, **kw}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    return content, reasoning, chunks


GREEDY = dict(temperature=0, max_tokens=20, extra_body={"ignore_eos": True})


# --- the reasoning splitter ----------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,text,want",
    [
        ("auto", "<think>why</think>because", ("why", "because")),
        ("auto", "\n<think>a</think>", ("a", "")),
        ("auto", "plain answer", ("", "plain answer")),
        ("auto", "<thin", ("", "<thin")),  # never completed: it was text
        ("auto", "a <think>b</think>", ("", "a <think>b</think>")),  # only at the start
        ("reasoning", "step 1</think>42", ("step 1", "42")),
        ("reasoning", "ran out of room </thi", ("ran out of room </thi", "")),
        ("content", "<think>x</think>y", ("", "<think>x</think>y")),
    ],
)
def test_reasoning_splitter_any_split_equals_whole(mode, text, want):
    assert split_reasoning(text, mode) == want
    rng = random.Random(0)
    for _ in range(30):  # tags cut anywhere, across any number of deltas
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        s, r, c = ReasoningSplitter(mode), "", ""
        for a, b in itertools.pairwise([0, *cuts, len(text)]):
            dr, dc = s.feed(text[a:b])
            r, c = r + dr, c + dc
        dr, dc = s.finish()
        assert (r + dr, c + dc) == want


def test_reasoning_splitter_releases_text_early():
    s = ReasoningSplitter("reasoning")
    assert s.feed("thinking </th") == ("thinking ", "")  # only the possible tag is held
    assert s.feed("ink>ans") == ("", "ans")
    assert s.feed("wer") == ("", "wer")


# --- engine additions: top logprobs ------------------------------------------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_engine_top_logprobs_are_the_model_distribution(model, tok, speculative):
    eng = engine(model, tok, speculative=speculative)
    prompt = [tok.bos_id, *tok.encode("the cat sat")]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    seq = eng.add_request(prompt, sp, stream=True)
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.seq_id == seq.id]
    ids = [t for o in outs for t in o.token_ids]
    lps = [x for o in outs for x in o.logprobs]
    tops = [x for o in outs for x in o.top_logprobs]
    assert len(ids) == len(lps) == len(tops) == 8
    with torch.no_grad():
        ref = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)[len(prompt) - 1 : -1]
    vals, best = ref.topk(3, -1)
    for k, (t, lp, top) in enumerate(zip(ids, lps, tops, strict=True)):
        assert t == top[0][0] == best[k, 0]  # greedy: the chosen token is the top one
        assert [i for i, _ in top] == best[k].tolist()
        assert lp == pytest.approx(ref[k, t].item(), abs=1e-4)
        assert [v for _, v in top] == pytest.approx(vals[k].tolist(), abs=1e-4)


# --- the OpenAI API ------------------------------------------------------------------------
def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_streamed_equals_whole_and_usage(client, tok):
    whole = client.chat.completions.create(model="tiny", messages=USER, **GREEDY)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    prompt = tok.apply_chat_template(USER, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == len(prompt) + 20
    content, reasoning, chunks = chat_stream(
        client, messages=USER, stream_options={"include_usage": True}, **GREEDY
    )
    assert content == choice.message.content and reasoning == ""
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streamed_equals_whole(client, model, tok):
    whole = client.completions.create(model="tiny", prompt="the cat", **GREEDY)
    eng = engine(model, tok)
    ref = eng.generate(["the cat"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[
        0
    ]
    assert whole.choices[0].text == ref.text
    assert whole.usage.prompt_tokens == 1 + len(tok.encode("the cat"))  # BOS + text
    streamed = client.completions.create(model="tiny", prompt="the cat", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    ids = client.completions.create(
        model="tiny", prompt=[tok.bos_id, *tok.encode("the cat")], **GREEDY
    )
    assert ids.choices[0].text == ref.text  # token-id prompts
    default = client.completions.create(model="tiny", prompt="the cat", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_n_choices_and_seeds(client):
    kw = dict(
        model="tiny",
        messages=USER,
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # ... and the n choices differ (seed + i each)
    assert a.usage.completion_tokens == 3 * 12  # the prompt counts once, the choices each
    streamed = client.chat.completions.create(stream=True, **kw)
    got = ["", "", ""]
    for c in streamed:
        for ch in c.choices:
            got[ch.index] += ch.delta.content or ""
    assert got == texts
    multi = client.completions.create(model="tiny", prompt=["the cat", "a dog"], n=2, **GREEDY)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text != multi.choices[2].text


def test_stop_strings(client):
    full = client.completions.create(model="tiny", prompt="a dog", **GREEDY).choices[0].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    cut = full[: full.find(stop)]
    kw = dict(model="tiny", prompt="a dog", stop=[stop, "zzzz"], **GREEDY)
    whole = client.completions.create(**kw).choices[0]
    assert (whole.text, whole.finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(
        model="tiny", messages=USER, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 20
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content)
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8", "replace") == r.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=USER, logprobs=True, top_logprobs=3, stream=True, **GREEDY
        )
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    c = client.completions.create(model="tiny", prompt="the cat", logprobs=2, **GREEDY).choices[0]
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 20
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0
    plain = client.chat.completions.create(model="tiny", messages=USER, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_reasoning_with_a_prompt_opened_think(client, tok):
    """thinking=True ends the prompt with <think>: everything up to </think> is reasoning.
    The raw text of the same prompt (via /v1/completions) must split exactly that way."""
    for thinking, mode in ((True, "reasoning"), (False, "content")):
        prompt = tok.apply_chat_template(USER, add_generation_prompt=True, thinking=thinking)
        raw = client.completions.create(model="tiny", prompt=prompt, **GREEDY).choices[0].text
        want_reasoning, want_content = split_reasoning(raw, mode)
        r = client.chat.completions.create(
            model="tiny",
            messages=USER,
            extra_body={"thinking": thinking, "ignore_eos": True},
            temperature=0,
            max_tokens=20,
        )
        msg = r.choices[0].message
        assert r.usage.prompt_tokens == len(prompt)
        assert (getattr(msg, "reasoning_content", None) or "", msg.content) == (
            want_reasoning,
            want_content,
        )
        assert (want_reasoning if thinking else want_content) != ""
        content, reasoning, _ = chat_stream(
            client,
            messages=USER,
            temperature=0,
            max_tokens=20,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}, "ignore_eos": True},
        )
        assert (reasoning, content) == (want_reasoning, want_content)


class ScriptedEngine:
    """A stand-in for Engine that emits fixed text deltas, one per step: the server's
    reasoning split and failure handling, where a random model cannot say `</think>`."""

    def __init__(self, tok, deltas: list[str]):
        self.tokenizer, self.deltas, self.max_len = tok, deltas, 64
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=tok.vocab_size))
        self.cache = SimpleNamespace(slots=4, used=0, nbytes=lambda: 4, bytes_per_token=lambda: 4)
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.prefix = self.expert_counts = None
        self.spec_stats, self.tokens_generated = SpecStats(), 0
        self.seqs: dict[int, list] = {}
        self.ids = itertools.count()
        self.fail_next = False

    def add_request(self, prompt, params, stream=False):
        seq = SimpleNamespace(id=next(self.ids))
        self.seqs[seq.id] = [0]
        return seq

    def has_unfinished(self):
        return bool(self.seqs)

    def abort(self, seq_id):
        self.seqs.pop(seq_id, None)

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("scripted failure")
        outs = []
        for sid, pos in list(self.seqs.items()):
            done = pos[0] + 1 == len(self.deltas)
            outs.append(StepOutput(sid, [5], self.deltas[pos[0]], done, "stop" if done else None))
            pos[0] += 1
            if done:
                del self.seqs[sid]
        return outs


def test_reasoning_split_across_deltas_through_the_server(tok):
    deltas = ["\n<thi", "nk>Let me", " think.</th", "ink>", "The answer", " is 4."]
    eng = ScriptedEngine(tok, deltas)
    with serving(create_app(eng, ServerSettings(model_name="tiny"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        msg = client.chat.completions.create(model="tiny", messages=USER).choices[0].message
        assert (msg.reasoning_content, msg.content) == ("Let me think.", "The answer is 4.")
        content, reasoning, chunks = chat_stream(client, messages=USER)
        assert (reasoning, content) == ("Let me think.", "The answer is 4.")
        assert any(
            getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks if c.choices
        )
        # an engine failure fails the requests in flight with a 500, and the server goes on
        eng.fail_next = True
        with pytest.raises(openai.InternalServerError, match="scripted failure"):
            client.chat.completions.create(model="tiny", messages=USER)
        assert (
            client.chat.completions.create(model="tiny", messages=USER).choices[0].message.content
        )
        assert get(url, "/health")[0] == 200


def test_auth(model, tok):
    app = create_app(
        engine(model, tok, max_batch=2), ServerSettings(model_name="tiny", api_key="s3cret")
    )
    with serving(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        status, _, body = post(url, "/v1/completions", {"prompt": "x"})  # no header at all
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert good.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices
        assert get(url, "/metrics")[0] == 401
        assert get(url, "/metrics", key="s3cret")[0] == 200
        assert get(url, "/health")[0] == 200 and get(url, "/")[0] == 200  # open


# fmt: off
BAD = [  # (what, route, body or raw bytes, status, param)
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("wrong type", "/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("bool for int", "/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0].type"),
    ("tool role", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("negative max_tokens", "/v1/chat/completions", {"messages": USER, "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", {"messages": USER, "max_tokens": 10**12}, 400, "max_tokens"),
    ("n over the limit", "/v1/chat/completions", {"messages": USER, "n": 1000}, 400, "n"),
    ("prompt over context", "/v1/completions", {"prompt": "the cat sat on the mat. " * 200}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-5", "messages": USER}, 404, "model"),
    ("tools", "/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    ("logit_bias", "/v1/chat/completions", {"messages": USER, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("json mode", "/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("too many logprobs", "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("five stops", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("long stop", "/v1/completions", {"prompt": "x", "stop": "x" * 1000}, 400, "stop"),
    ("top_p zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("seed overflow", "/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("body too large", "/v1/completions", {"prompt": "x" * (3 << 20)}, 413, None),
]
# fmt: on


def test_bad_inputs_get_4xx_while_a_good_request_completes(client, url):
    kw = dict(
        model="tiny", messages=USER, temperature=0, max_tokens=200, extra_body={"ignore_eos": True}
    )
    want = client.chat.completions.create(**kw).choices[0].message.content
    started = threading.Event()

    def good_request() -> str:
        text = ""
        for c in client.chat.completions.create(stream=True, **kw):
            started.set()
            text += (c.choices[0].delta.content or "") if c.choices else ""
        return text

    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(good_request)
        assert started.wait(30)
        for what, path, body, status, param in BAD:
            code, headers, r = post(url, path, body)
            assert code == status, (what, r)
            err = r["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], what
            assert err["param"] == param, (what, err)
        # harmless unknown fields are accepted and ignored
        ok = {
            "messages": USER,
            "max_tokens": 2,
            "user": "u1",
            "metadata": {"a": "b"},
            "store": False,
            "frobnicate": 3,
            "tool_choice": "none",
            "tools": [],
        }
        assert post(url, "/v1/chat/completions", ok)[0] == 200
        assert get(url, "/v1/nothing")[0] == 404
        assert good.result(timeout=60) == want  # the concurrent good request is untouched


def test_sixteen_concurrent_equal_one_at_a_time(client):
    prompts = [f"{w} {i}" for i, w in zip(range(16), itertools.cycle(["the cat", "a dog", "why"]))]

    def one(p: str) -> str:
        return client.completions.create(model="tiny", prompt=p, **GREEDY).choices[0].text

    alone = [one(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:  # 16 clients, 8 slots: batching and queueing
        together = list(pool.map(one, prompts))
    assert together == alone
    assert len(set(alone)) > 1


def test_queue_full_and_disconnect_free_the_slot(model, tok):
    """One slot, no queue: a second request is turned away (429 + Retry-After) while the
    first runs; the first client hanging up frees the slot at once."""
    app = create_app(
        engine(model, tok, max_batch=1), ServerSettings(model_name="tiny", max_waiting=0)
    )
    long = {"prompt": "the cat", "max_tokens": 230, "ignore_eos": True, "stream": True}
    with serving(app) as url:
        for streaming in (True, False):
            host, port = url.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps({**long, "stream": streaming}),
                {"Content-Type": "application/json"},
            )
            if streaming:
                resp = conn.getresponse()
                assert resp.status == 200 and resp.read(6) == b"data: "
            else:
                while metric(url, "requests_running") < 1:
                    time.sleep(0.02)
            code, headers, body = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert code == 429 and headers["retry-after"] == "1", body
            assert body["error"]["code"] == "queue_full"
            conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-generation
            conn.close()
            deadline = time.time() + 10
            while metric(url, "requests_running") > 0:
                assert time.time() < deadline, "the slot was not freed"
                time.sleep(0.02)
            assert metric(url, "aborted_total") >= 1
            for _ in range(100):  # the server's own bookkeeping follows within moments
                code, _, body = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
                if code != 429:
                    break
                time.sleep(0.05)
            assert code == 200, body


def test_metrics(url, client, model):
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    code, text = get(url, "/metrics")
    assert code == 200
    for name in (
        "requests_running",
        "requests_waiting",
        "generation_tokens_per_second",
        "time_to_first_token_seconds_count",
        "kv_cache_slots 8",
        "kv_cache_bytes",
        "kv_cache_bytes_used",
        "spec_acceptance_rate",
    ):
        assert re.search(rf"^nanoseek_{name}", text, re.M), name
    assert metric(url, "time_to_first_token_seconds_count") >= 1
    assert re.search(
        r'^nanoseek_http_requests_total\{route="/v1/chat/completions",code="200"\} \d+', text, re.M
    )
    experts = re.findall(
        r'^nanoseek_expert_tokens_total\{layer="(\d+)",expert="\d+"\} (\d+)', text, re.M
    )
    per_layer = [0] * (model.config.num_hidden_layers - model.config.first_k_dense_replace)
    for layer, n in experts:
        per_layer[int(layer)] += int(n)
    k = model.config.num_experts_per_tok  # every token routed goes to k experts
    assert per_layer[0] > 0 and per_layer[0] % k == 0 and len(set(per_layer)) == 1
    assert re.search(r'^nanoseek_expert_load_max_over_mean\{layer="0"\} ', text, re.M)


def test_prefix_cache_reuses_a_shared_system_prompt(model, tok):
    """Two chats with one long system prompt: the second reuses the first's latent rows
    (counted on /metrics) and answers exactly as a server without a prefix cache does."""
    system = {"role": "system", "content": "You are a terse assistant. " * 6}
    chats = [[system, {"role": "user", "content": q}] for q in ("hello there", "and again")]
    answers = {}
    for prefix in (True, False):
        app = create_app(engine(model, tok, prefix_cache=prefix), ServerSettings(model_name="t"))
        with serving(app) as u:
            c = openai.OpenAI(base_url=u + "/v1", api_key="-", max_retries=0)
            answers[prefix] = [
                c.chat.completions.create(model="t", messages=m, temperature=0, max_tokens=8)
                .choices[0]
                .message.content
                for m in chats
            ]
            hits = metric(u, "prefix_cache_hits_total")
            reused = metric(u, "prefix_cache_reused_tokens_total")
        assert (hits >= 1 and reused >= 32) if prefix else hits == reused == 0
    assert answers[True] == answers[False]


def test_speculative_engine_behind_the_server(model, tok, client):
    """MTP speculation commits one or two tokens a step: the same greedy text, and the
    acceptance rate on /metrics."""
    want = client.completions.create(model="tiny", prompt="a dog", **GREEDY).choices[0].text
    app = create_app(engine(model, tok, speculative=True), ServerSettings(model_name="tiny"))
    with serving(app) as url:
        spec = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        got = spec.completions.create(model="tiny", prompt="a dog", stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in got) == want
        assert metric(url, "spec_drafted_total") > 0
        assert 0 <= metric(url, "spec_acceptance_rate") <= 1


def test_expert_load_metric(tok):
    eng = ScriptedEngine(tok, ["x"])
    eng.expert_counts = torch.tensor([[3, 1, 0, 0], [1, 1, 1, 1]])
    with serving(create_app(eng, ServerSettings())) as url:
        text = get(url, "/metrics")[1]
    assert 'nanoseek_expert_tokens_total{layer="0",expert="0"} 3' in text
    assert 'nanoseek_expert_load_max_over_mean{layer="0"} 3' in text
    assert 'nanoseek_expert_load_max_over_mean{layer="1"} 1' in text


def test_cli_serve_and_sigterm(model, tok, tmp_path):
    """`nanoseek serve RUN_DIR` (weights in RUN_DIR/ckpt) serves; SIGTERM shuts it down
    cleanly (exit 0) even with a request streaming."""
    ckpt = tmp_path / "run" / "ckpt"
    nanoseek.save_pretrained(model, ckpt)
    tok.save(ckpt)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanoseek",
            "serve",
            str(tmp_path / "run"),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--max-len",
            "256",
            "--prefix-cache",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if get(url, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        assert c.models.list().data[0].id == "run"  # the run directory's name
        stream = c.chat.completions.create(
            model="run", messages=USER, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "Finished server process" in out or "Shutting down" in out, out
