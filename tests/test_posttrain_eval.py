"""Post-training evaluation, distillation and their CLI, on a tiny model taught one answer."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.hub import resolve_checkpoint
from nanoseek.infer import Completion, Engine
from nanoseek.posttrain.distill import distill
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.evaluate import (
    bits_per_byte,
    evaluate_task,
    pass_at_k,
    report_card,
    write_report_card,
)
from nanoseek.posttrain.sft_data import get_batch, load_sft
from nanoseek.posttrain.tasks import TASKS, Problem, Task

ANSWER = "ok</think>yes"  # what the taught model writes after <|assistant|><think>


@dataclass
class Yes(Task):
    name = "yes"

    def sample(self, rng: random.Random) -> Problem:
        return Problem(f"Say yes {rng.randint(0, 10**6)}", "yes")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only spin-waits against other busy processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ["Say yes 12345. <think>ok</think>yes, the cat sat on the mat.\n" * 50] * 2
    return Tokenizer.train(texts, vocab_size=300)


def _sft_file(path: Path, problems: list[Problem]) -> Path:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": p.prompt},
                    {"role": "assistant", "content": "yes", "reasoning_content": "ok"},
                ]
            }
        )
        for p in problems
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _model(tok: Tokenizer) -> nanoseek.Transformer:
    torch.manual_seed(0)
    return nanoseek.Transformer(nanoseek.get_preset("tiny").replace(vocab_size=tok.vocab_size))


@pytest.fixture(scope="module")
def taught(tok, tmp_path_factory) -> nanoseek.Transformer:
    """SFT on 32 chats whose reply is always <think>ok</think>yes: the model learns it."""
    data = load_sft(
        _sft_file(tmp_path_factory.mktemp("sft") / "yes.jsonl", Yes().generate(1, 32)),
        tok,
        seq_len=64,
    )
    model = _model(tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        x, y = get_batch(data, 8, seed=0, step=step, pad_id=tok.pad_id)
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval()


def test_pass_at_k():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(PostTrainError, match="pass@k"):
        pass_at_k(2, 1, 3)


def test_evaluate_task_on_the_taught_model(taught, tok):
    taught.train()  # evaluate_task puts it in eval mode, and back
    r = evaluate_task(taught, tok, Yes(), n=6, k=2, samples=3, max_tokens=8, temperature=0.5)
    assert taught.training
    assert (r.accuracy, r.format_rate, r.truncated, r.pass_at_k) == (1.0, 1.0, 0.0, 1.0)
    assert r.mean_length == len(tok.encode(ANSWER))  # the stop token is not counted
    assert r.row() == {
        "task": "yes",
        "n": 6,
        "accuracy": 1.0,
        "format_rate": 1.0,
        "mean_length": r.mean_length,
        "truncated": 0.0,
        "pass@2": 1.0,
    }


def test_evaluate_task_on_an_untrained_model(tok):
    r = evaluate_task(_model(tok), tok, Yes(), n=4, max_tokens=6)
    assert (r.accuracy, r.format_rate, r.pass_at_k, r.k) == (0.0, 0.0, None, 0)
    assert 0 < r.mean_length <= 6
    with pytest.raises(PostTrainError, match="samples >= k"):
        evaluate_task(_model(tok), tok, Yes(), n=4, k=3, samples=2)


def test_report_card(tmp_path):
    rows = [
        {"name": "runs/base", "task": "yes", "n": 6, "accuracy": 0.0, "bits_per_byte": 2.3456},
        {"name": "runs/sft", "task": "yes", "n": 6, "accuracy": 0.5, "pass@4": 0.75},
    ]
    md, data = report_card(rows)
    assert md.splitlines() == [
        "| checkpoint | task | n | accuracy | bits/byte | pass@4 |",
        "|---|---|---:|---:|---:|---:|",
        "| runs/base | yes | 6 | 0.0% | 2.346 | - |",
        "| runs/sft | yes | 6 | 50.0% | - | 75.0% |",
    ]
    assert data["rows"] == rows and data["columns"][-1] == "pass@4"
    md_path, json_path = write_report_card(tmp_path / "report.md", rows)
    assert md_path.read_text() == md and json.loads(json_path.read_text())["rows"] == rows
    with pytest.raises(PostTrainError, match=".md name"):
        write_report_card(tmp_path / "report.json", rows)


def test_distill_keeps_verified_distinct_completions(taught, tok, tmp_path):
    out = tmp_path / "distill.jsonl"
    stats = distill(
        Engine(taught, tok, max_batch=8, max_len=64),
        Yes(),
        n=4,
        out_path=out,
        samples_per_prompt=3,
        temperature=0.5,
        max_tokens=8,
    )
    assert (stats.prompts, stats.samples, stats.accepted, stats.written) == (4, 12, 12, 4)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [p.prompt for p in Yes().generate(1, 4)]
    assert [m["messages"][0]["content"] for m in lines] == prompts
    assert lines[0]["messages"][1] == {
        "role": "assistant",
        "content": "yes",
        "reasoning_content": "ok",
    }
    assert len(load_sft(out, tok, seq_len=64).examples) == 4  # it is SFT data

    class Teacher:  # any object with a tokenizer and generate() will do
        tokenizer = tok

        def generate(self, prompts, params):
            texts = ["ok</think>yes", "ok</think>no", "</think>yes", "ok</think>yes", "yes"]
            return [Completion(texts[i % 5], [], None, "stop") for i in range(len(prompts))]

    stats = distill(Teacher(), Yes(), n=3, out_path=out, samples_per_prompt=5)
    # kept: the first (verified, with reasoning); not "no", not empty reasoning, not
    # unformatted; the fourth is accepted but a duplicate
    assert (stats.accepted, stats.written, stats.acceptance_rate) == (6, 3, 6 / 15)


def test_bits_per_byte_and_cli(taught, tok, tmp_path, monkeypatch, capsys):
    import torch.nn.functional as F

    from nanoseek.cli import main
    from nanoseek.data.loader import BatchLoader
    from nanoseek.data.pipeline import prepare

    monkeypatch.setitem(TASKS, "yes", Yes)
    run = tmp_path / "runs" / "sft"
    nanoseek.save_pretrained(taught, run / "ckpt")
    tok.save(run / "ckpt")
    base = tmp_path / "base"
    nanoseek.save_pretrained(_model(tok), base)
    tok.save(base)
    assert resolve_checkpoint(run) == run / "ckpt" and resolve_checkpoint(base) == base
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(50):  # the 50th document is the val split
        (src / f"{i}.txt").write_text(f"Say yes {i}. <think>ok</think>yes, the cat sat.\n" * 20)
    shards = prepare(
        str(src), tmp_path / "shards", tokenizer=tmp_path / "base" / "tokenizer.json", verbose=False
    )
    model, loader = _model(tok).eval(), BatchLoader(shards, "val", 2, 32)
    with torch.no_grad():
        nats = [
            F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
            for x, y in loader.val_batches(2)
        ]
    bytes_per_token = loader.meta["splits"]["val"]["bytes"] / loader.meta["splits"]["val"]["tokens"]
    expected = sum(nats) / 2 / math.log(2) / bytes_per_token
    assert bits_per_byte(model, shards, 2, 32, 2, tokenizer=tok) == pytest.approx(
        expected, rel=1e-5
    )
    with pytest.raises(PostTrainError, match="tokenized with"):
        bits_per_byte(model, shards, 2, 32, 2, tokenizer=Tokenizer.train(["other " * 99], 300))

    report = tmp_path / "report.md"
    argv = [
        "eval",
        str(base),
        str(run),
        "--task",
        "yes",
        "--n",
        "4",
        "--max-tokens",
        "8",
        "--device",
        "cpu",
        "--data",
        str(shards),
        "--seq-len",
        "64",
        "--val-batches",
        "2",
        "--out",
        str(report),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed == report.read_text()
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert [(r["name"], r["accuracy"]) for r in rows] == [(str(base), 0.0), (str(run), 1.0)]
    assert all(r["bits_per_byte"] > 0 for r in rows)
    assert main([*argv[:-2], "--json"]) == 0  # the same rows, printed as JSON
    assert json.loads(capsys.readouterr().out)["rows"] == rows

    out = tmp_path / "d.jsonl"
    assert (
        main(
            [
                "distill",
                str(run),
                "--task",
                "yes",
                "--n",
                "3",
                "--out",
                str(out),
                "--max-tokens",
                "8",
                "--samples-per-prompt",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "3 prompts x 2 samples: 6 accepted (100.0%), 3 written" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3

    assert main(["eval", str(tmp_path / "nope"), "--task", "yes"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["eval", str(run), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
