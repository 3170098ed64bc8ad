"""`--help` of every command, run as the installed `iafactory` script: it answers (exit 0) and a
flag reads as a flag (`--json`), never with a value type (`--json <bool>`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from iafactory.cli import load_commands

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): --help texts, no
# database.
pytestmark = pytest.mark.server_independent


# Duck-typed: typer (0.29) builds on its own copy of click, not necessarily the installed one.
def command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The root, every group and every command under it, as argument lists."""
    paths = [prefix]
    if getattr(command, "commands", None):
        for name, sub in sorted(command.commands.items()):
            paths.extend(command_paths(sub, (*prefix, name)))
    return paths


ROOT = typer.main.get_command(load_commands())
PATHS = command_paths(ROOT)


def flags_of(path: tuple[str, ...]) -> list[str]:
    command = ROOT
    for name in path:
        command = command.commands[name]
    return [
        opt
        for p in command.params
        if p.param_type_name == "option" and getattr(p, "is_flag", False)
        for opt in (*p.opts, *p.secondary_opts)
        if opt.startswith("--")
    ]


def test_every_command_is_listed() -> None:
    assert {("tenants", "list"), ("billing", "grant-monthly"), ("demo",), ("knowledge", "reembed")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) or "iafactory" for p in PATHS])
def test_help_answers_and_shows_flags_as_plain_flags(path: tuple[str, ...]) -> None:
    exe = Path(sys.executable).with_name("iafactory")
    result = subprocess.run(
        [str(exe), *path, "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "120"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: iafactory {' '.join(path)}".rstrip()), result.stdout
    assert "<bool>" not in result.stdout, result.stdout
    for flag in ["--help", *flags_of(path)]:
        line = next((line for line in result.stdout.splitlines() if re.search(rf"(^|\s|/){flag}(\s|$)", line)), None)
        assert line is not None, (flag, result.stdout)
        assert "<" not in line.split(flag, 1)[1].split("  ", 1)[0], line  # nothing between the flag and its help
