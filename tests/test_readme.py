"""The README opens with exactly two commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path


def _readme_commands(root: Path) -> list[str]:
    text = (root / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index("```bash") < 200, "the README must open with its commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one(repo_root):
    root = Path(repo_root)
    commands = _readme_commands(root)
    assert len(commands) == 2
    assert "zmqdisagg-train" in commands[0] and "pytest" in commands[1]
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, ".ci/run must run the README's test command"


def test_main_command_config_exists(repo_root):
    root = Path(repo_root)
    config = re.search(r"--config (\S+)", _readme_commands(root)[0]).group(1)
    assert (root / config).is_file(), f"{config} named in the README does not exist"
