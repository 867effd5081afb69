"""The README's set-up commands are the ones CI runs, and the commands it documents exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = lines.index('# README: "Run the tests"')
    return [ln.strip() for ln in lines[start + 1 :] if ln.strip() and not ln.startswith("#")]


def test_ci_runs_the_readme_test_commands() -> None:
    commands = _ci_commands()
    assert commands, ".ci/run lost its README commands"
    block = README.split("Run the tests:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [ln.strip() for ln in block.strip().splitlines()] == commands


def test_readme_set_up_installs_and_runs_the_demo() -> None:
    first = re.search(r"```bash\n(python3 -m venv[^\n]*)\n```", README)
    assert first, "the one-line install-and-train command is missing"
    assert "pip install -e ." in first.group(1) and "captioner train" in first.group(1)
