"""The console script: help, info, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from nanoseek.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("info", "data", "compute"):
        assert command in out.stdout


def test_info_small(capsys):
    assert main(["info", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    assert "parameters, total" in out and "44.5M" in out
    assert "1,920 B" in out  # latent: 6 layers x (128 + 32) x 2 bytes
    assert "6,144 B" in out  # full K+V: 6 x 4 heads x (64 + 64) x 2 bytes
    assert "FLOPs / token, training" in out


def test_info_deepseek_v3_matches_the_paper(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671B" in out and "36.6B" in out and "71.1x" in out


def test_unknown_preset_is_one_clear_line():
    out = run("info", "--preset", "huge")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "nanoseek info: error: unknown preset 'huge'; choose one of: "
        "tiny, tiny-v32, tiny-v4, small, small-v32, small-v4, dense-small, deepseek-v3, "
        "deepseek-v32, deepseek-v2-lite"
    )


def test_missing_config_file_is_one_clear_line(tmp_path):
    out = run("info", "--config", str(tmp_path / "nope"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no config.json here" in out.stderr
