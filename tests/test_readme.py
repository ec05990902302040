"""The README says what exists: its commands, settings, links and CLI options are real."""

from __future__ import annotations

import re
from pathlib import Path

from app.search_cli import _parser as search_parser
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_one():
    makefile = (REPO / "Makefile").read_text()
    assert "make run " in README and "make test " in README
    for target in ("run", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
    ci_lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ci_lines[-1] == "make test" and "set -euo pipefail" in ci_lines


def test_settings_table_lists_every_setting_with_its_default():
    rows = dict(re.findall(r"^\| `CDPAE_(\w+)` \| ([^|]+) \|", README, flags=re.MULTILINE))
    assert set(rows) == {name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = (
            "unset"
            if default is None
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        assert rows[name.upper()].strip() == shown, name


def test_relative_links_point_at_files_in_the_repo():
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", README) if "://" not in t]
    assert "models/README.md" in links
    for target in links:
        assert (REPO / target).exists(), target


def test_search_options_in_the_readme_exist():
    options = {a for action in search_parser()._actions for a in action.option_strings}
    section = README.split("### From the terminal")[1].split("\n## ")[0]
    mentioned = set(re.findall(r"(--[a-z][a-z-]+)", section))
    assert mentioned <= options, mentioned - options
