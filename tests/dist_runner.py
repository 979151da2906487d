"""nanoseek's CLI as `torchrun -m nanoseek` runs it, with two test hooks (environment):

- CRASH_AT_STEP=N: raise in optimizer step N (after the update), on CRASH_RANK only if set;
- BIAS_OUT=DIR: after every step, each rank writes its expert biases to DIR/bias_rank{R}.pt.

Not a test module (no `test_` prefix): tests/test_distributed.py launches it.
"""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from nanoseek.cli import main
from nanoseek.train import pretrain

rank = int(os.environ.get("RANK", "0"))
crash_at = int(os.environ.get("CRASH_AT_STEP", "0"))
crash_rank = os.environ.get("CRASH_RANK")
bias_out = os.environ.get("BIAS_OUT")
update = pretrain.update_expert_bias
steps = 0


def hooked_update(layers, counts, gamma):
    global steps
    update(layers, counts, gamma)
    steps += 1
    if bias_out:
        biases = torch.stack([m.gate.bias for m in layers])
        torch.save(biases, Path(bias_out) / f"bias_rank{rank}.pt")
    if steps == crash_at and crash_rank in (None, str(rank)):
        raise RuntimeError(f"injected failure in step {steps} on rank {rank}")


pretrain.update_expert_bias = hooked_update
sys.exit(record(main)())
