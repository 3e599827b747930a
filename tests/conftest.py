"""Fixtures and helpers shared by the test modules."""
import os
import shlex
from pathlib import Path

import ddpm_main

REPO = Path(__file__).resolve().parent.parent


def run_cli(command: str, cwd: Path) -> int:
    """Run ddpm_main in-process from `cwd`, as `python ddpm_main.py <command>` would; return its exit code."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return ddpm_main.main(shlex.split(command))
    finally:
        os.chdir(previous)
