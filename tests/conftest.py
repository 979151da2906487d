"""Shared fixtures: `cli` runs `nanoseek ...` in-process and returns its exit code and output."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nanoseek.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    def run(*argv: object) -> CliResult:
        capsys.readouterr()  # drop what came before
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
