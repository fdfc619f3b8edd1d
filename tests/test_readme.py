"""The README against the code: every command option is in the Commands table, shell examples run the command
the way `make run` installs it, and every repository path or link it names exists in the repository."""

from __future__ import annotations

import argparse
import re

import pytest

from gateway.cli import build_parser
from tests.support import ROOT

README = (ROOT / "README.md").read_text()
GENERATED = ("certs/dev/", "example-origin/", "state/", ".venv/", "dist/")  # made by `make run`, git-ignored


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subcommands(sub, f"{prefix}{name} ")
                out.update(nested or {f"{prefix}{name}": sub})
    return out


def table_row(command: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith(f"| `ota-gateway {command} ")]
    assert len(rows) == 1, f"the Commands table has no single row for `ota-gateway {command}`"
    return rows[0]


@pytest.mark.parametrize("command", sorted(subcommands(build_parser())))
def test_every_option_is_in_the_commands_table(command: str) -> None:
    row = table_row(command)
    parser = subcommands(build_parser())[command]
    options = [max(a.option_strings, key=len) for a in parser._actions if a.option_strings and a.dest != "help"]
    missing = [option for option in options if not re.search(rf"{re.escape(option)}(?![\w-])", row)]
    assert not missing, f"`ota-gateway {command}` options missing from the README's Commands table: {missing}"


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()]


def test_shell_examples_run_the_installed_command() -> None:
    """After `make run` the command is .venv/bin/ota-gateway; a bare `ota-gateway` is not on PATH."""
    bare = [line for line in shell_lines() if re.match(r"(sudo (-u \S+ )?)?ota-gateway\s+\w", line)]
    assert not bare, bare


def test_paths_and_links_stay_inside_the_repository() -> None:
    # the project's design notes live beside the repository, not in it: the README must not point there
    beside = "/".join(("..", "shared"))
    assert beside not in README and beside[3:] + "/reference" not in README
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert not target.startswith(("/", "..")) and (ROOT / target.split("#")[0]).exists(), target
    named = set(re.findall(r"`([A-Za-z0-9_][\w./-]*/[\w.-]+\.(?:md|py|yaml|yml|sh|json|service|toml))`", README))
    assert named, "the README names repository files"
    for path in sorted(named):
        if not path.startswith(GENERATED):
            assert (ROOT / path).is_file(), f"README names {path}, which is not in the repository"
