"""nanoseek.device.preload_tcmalloc: `nanoseek train` / `sft` / `rl` and `make run` restart
themselves on tcmalloc where it is installed (Debian's libtcmalloc-minimal4: .ci/run installs
it)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

PROBE = (
    "from nanoseek.device import preload_tcmalloc, tcmalloc_loaded\n"
    "print('before', flush=True)\n"
    "preload_tcmalloc()\n"
    "import os\n"
    "print(tcmalloc_loaded(), os.environ.get('LD_PRELOAD', ''))\n"
)
installed = ctypes.util.find_library("tcmalloc_minimal") is not None
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "NANOSEEK_TCMALLOC")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@needs_linux
@pytest.mark.skipif(not installed, reason="libtcmalloc-minimal4 is not installed")
def test_restarts_once_on_tcmalloc_with_the_same_command():
    lines = probe()
    # the first run printed, then exec'd the same `python -c` once: tcmalloc loaded, no loop
    assert lines[0] == lines[1] == "before"
    assert lines[2].startswith("True libtcmalloc_minimal")
    assert len(lines) == 3


@needs_linux
def test_off_switch_and_a_user_preload_are_left_alone():
    assert probe(NANOSEEK_TCMALLOC="0") == ["before", "False "]
    # a preload that already names tcmalloc (the user's own, or one ld.so refused) is kept
    lines = probe(LD_PRELOAD="/nonexistent/libtcmalloc.so")
    assert (
        lines[0] == "before"
        and len(lines) == 2
        and lines[1].endswith("/nonexistent/libtcmalloc.so")
    )


def test_only_the_command_lines_own_entry_restarts(monkeypatch, tmp_path):
    from nanoseek.cli import main

    calls = []
    monkeypatch.setattr("nanoseek.device.preload_tcmalloc", lambda: calls.append(1))
    bad = ["train", "--preset", "no-such-preset", "--steps", "1", "--out", str(tmp_path)]
    assert main(bad) == 2  # in-process (tests, libraries): never restarts
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["nanoseek", *bad])
    assert main() == 2  # the console script: restarts before anything else
    assert calls == [1]
    monkeypatch.setattr(sys, "argv", ["nanoseek", "compute", "gpus"])
    assert main() == 0
    assert calls == [1]  # not a training command
