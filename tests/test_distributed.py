"""`torchrun` on CPU (gloo, 2 processes): FSDP2, DDP and expert parallelism train exactly what
one process trains on the same global batch; checkpoints move between numbers of ranks; an
exported checkpoint opens in `transformers`; a failing rank ends the job with its error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek.hub import from_pretrained

RUNNER = Path(__file__).with_name("dist_runner.py")
STEPS = 10


def launch(
    nproc: int, shards: Path, out: Path, *flags, timeout: float = 300, **env
) -> subprocess.CompletedProcess:
    """`nanoseek train` on `nproc` processes (torchrun when > 1), tiny model, fp32, 1 thread;
    `env`: the runner's hooks."""
    args = (
        f"train --preset tiny --data {shards} --out {out} --steps {STEPS} --batch-size 4 "
        "--seq-len 32 --lr 3e-3 --warmup-steps 2 --eval-every 5 --eval-batches 2 "
        "--save-every 5 --no-progress --threads 1 --dtype fp32"
    ).split() + [str(f) for f in flags]
    cmd = [sys.executable, str(RUNNER), *args]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def metrics(out: Path, key: str = "loss") -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from nanoseek.data import prepare

    src = tmp_path_factory.mktemp("corpus")
    text = "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    items = []\n\n"
    for i in range(100):
        (src / f"mod{i:02d}.py").write_text(text.replace("add", f"add{i % 7}") * 4)
    return prepare(str(src), src.parent / "dist_shards", vocab_size=300, verbose=False)


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory) -> Path:
    """The reference: one process, the same global batch of 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    bias = out.parent / "bias"
    bias.mkdir()
    ok(launch(1, shards, out, BIAS_OUT=bias))
    return out


def check_same_run(run: Path, ref: Path, tol: float = 1e-5) -> None:
    assert metrics(run) == pytest.approx(metrics(ref), rel=tol, abs=tol)
    assert metrics(run, "grad_norm") == pytest.approx(metrics(ref, "grad_norm"), rel=1e-4)
    assert metrics(run, "val_loss") == pytest.approx(metrics(ref, "val_loss"), rel=tol)


def two_rank_run(shards: Path, out: Path, parallel: str, ep: int) -> Path:
    bias = out.parent / "bias"
    bias.mkdir()
    ok(launch(2, shards, out, "--parallel", parallel, "--ep", ep, BIAS_OUT=bias))
    return out


@pytest.fixture(scope="module")
def fsdp_ep(shards, tmp_path_factory) -> Path:
    """FSDP2 for the dense parameters, the experts split over 2 ranks: the default layout."""
    return two_rank_run(shards, tmp_path_factory.mktemp("fsdp_ep") / "run", "fsdp", 2)


def check_two_ranks(run: Path, single: Path) -> None:
    check_same_run(run, single)
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["tokens_seen"] == STEPS * 4 * 32  # a global batch of 4
    # the expert biases: the same on both ranks, and what one process arrived at
    b0, b1 = (torch.load(run.parent / "bias" / f"bias_rank{r}.pt") for r in (0, 1))
    assert torch.equal(b0, b1)
    assert torch.allclose(b0, torch.load(single.parent / "bias" / "bias_rank0.pt"))
    assert b0.abs().sum() > 0  # they moved


def test_fsdp_and_expert_parallel_train_what_one_process_trains(fsdp_ep, single):
    check_two_ranks(fsdp_ep, single)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,ep", [("fsdp", 1), ("ddp", 1), ("ddp", 2)])
def test_other_layouts_train_what_one_process_trains(shards, single, tmp_path, parallel, ep):
    check_two_ranks(two_rank_run(shards, tmp_path / "run", parallel, ep), single)


def test_checkpoints_move_between_numbers_of_ranks(shards, single, tmp_path):
    """A run killed in step 7 on 2 ranks (FSDP2 + EP) resumes from its step-5 checkpoint on
    1 process, and one killed on 1 process resumes on 2, each continuing the same curve."""
    for first, then, flags in ((2, 1, ("--ep", 2)), (1, 2, ())):
        out = tmp_path / f"{first}to{then}"
        p = launch(first, shards, out, *(flags if first == 2 else ()), CRASH_AT_STEP=7)
        assert p.returncode != 0 and "injected failure in step 7" in p.stderr
        assert json.loads((out / "ckpt/train_state/state.json").read_text())["step"] == 5
        ok(launch(then, shards, out, "--resume", *(flags if then == 2 else ())))
        check_same_run(out, single)


def test_exported_checkpoint_opens_in_transformers(fsdp_ep):
    """The checkpoint of a sharded run (FSDP2 + EP, weights gathered by rank 0) is a Hugging
    Face checkpoint: `transformers` computes the same logits from it as nanoseek."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(fsdp_ep / "ckpt").eval()
    ours = from_pretrained(fsdp_ep / "ckpt")
    x = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)


def test_a_failing_rank_ends_the_job_with_its_error(shards, tmp_path):
    """Rank 1 raises in step 3 while rank 0 goes on into the next collective: torchrun stops
    the job (no hang) and its report names rank 1 and its error."""
    t0 = time.perf_counter()
    p = launch(2, shards, tmp_path / "run", timeout=120, CRASH_AT_STEP=3, CRASH_RANK=1)
    assert p.returncode != 0
    assert time.perf_counter() - t0 < 120
    assert "injected failure in step 3 on rank 1" in p.stderr
    assert "rank      : 1" in p.stderr  # torchrun's summary: the first failure


@pytest.mark.slow
def test_bf16_optimizer_states_under_fsdp_and_expert_parallel(shards, tmp_path):
    """`--optim-states bf16` on 2 ranks (FSDP2 + EP: the moments are DTensor shards, updated by
    the torch-ops reference) trains what one process (the C++ step) trains, and a run killed
    on 2 ranks resumes on 1 with its bf16 moments (DCP) on the same curve."""
    flags = ("--optim-states", "bf16")
    one = tmp_path / "one"
    ok(launch(1, shards, one, *flags))
    two = tmp_path / "two"
    ok(launch(2, shards, two, "--ep", 2, *flags))
    check_same_run(two, one)
    moved = tmp_path / "moved"
    p = launch(2, shards, moved, "--ep", 2, *flags, CRASH_AT_STEP=7)
    assert p.returncode != 0 and "injected failure in step 7" in p.stderr
    ok(launch(1, shards, moved, "--resume"))
    check_same_run(moved, one)
    assert json.loads((moved / "train_config.json").read_text())["optim_states"] == "bf16"
