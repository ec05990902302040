"""The README says what exists: its commands, settings, links and CLI options are real, and
every code block that can run is run, verbatim but for the port, against a real `cdpae serve`
on the Wikipedia bundle, from a directory outside the repository.

The printed answers (ids, scores) are compared exactly when the bundle served is the one the
README's `make run` output names (its `selected:` configuration and seed: set
CDPAE_TEST_WIKIPEDIA_BUNDLE=models/wikipedia after `make run`); with the session's quick bundle
(CI) the check is weaker: the README's hits must be real gallery items with the categories
shown, and the live answers must have the same shape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.search_cli import _parser as search_parser
from app.settings import Settings
from tests.support.service import Server

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.DOTALL)]

# Blocks that are not run, each with the reason; every other block is run below.
NOT_RUN = {
    "make run    # install": "make run / make test: install and train (minutes); CI runs make test",
    ".venv/bin/cdpae train --data wikipedia": "printed output of make run, not a command",
    "docker compose up -d": "run for real by make compose-check (minutes, podman), not in CI",
    "docker compose --profile cluster up -d": "run for real by compose_check --profile cluster",
    "make compose-check ": "builds images and trains in a container (~15 min): outside CI",
    "$ time make compose-check": "printed output of make compose-check, not a command",
    "$ .venv/bin/python -m scripts.compose_check --profile cluster": "printed output of the "
    "cluster check, not a command",
    "app/        the service": "a directory listing",
}
# Blocks that are run, by their first line, and the test that runs them.
RUN = {
    "curl -s -X POST http://127.0.0.1:8000/search/text-to-image": "test_readme_curl_answer",
    '{"results":[{"hits":': "test_readme_curl_answer (the answer compared)",
    '{"error": {"type": "invalid_request"': "test_readme_error_example",
    "import numpy as np": "test_readme_python_snippets",
    "import asyncio": "test_readme_python_snippets",
    ".venv/bin/python -c": "test_readme_terminal_search",
    "query 0: 5 hits": "test_readme_terminal_search (the output compared)",
}


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


# --- every code block that can run is run ------------------------------------------------------


def _block(first_line: str) -> str:
    (code,) = [code for _, code in BLOCKS if code.startswith(first_line)]
    return code


def test_every_code_block_is_run_or_says_why_not():
    for _, code in BLOCKS:
        known = [k for k in (*NOT_RUN, *RUN) if code.startswith(k)]
        assert len(known) == 1, f"README block neither run nor excused: {code[:80]!r}"


@pytest.fixture(scope="module")
def served(wikipedia_bundle, tmp_path_factory):
    """(server URL, exact): `cdpae serve` on the Wikipedia bundle; exact when it is the bundle
    the README's `make run` output was printed from."""
    tmp = tmp_path_factory.mktemp("readme")
    server = Server(wikipedia_bundle, tmp / "data", tmp / "server.log", "--log-level", "warning")
    try:
        server.wait_ready()
        manifest = json.loads((wikipedia_bundle / "manifest.json").read_text())["hyperparameters"]
        selected = re.search(r"^selected: (\S+) \(seed (\d+),", README, re.MULTILINE)
        exact = (manifest["config_name"], manifest["seed"]) == (
            selected.group(1),
            int(selected.group(2)),
        )
        yield server.url, exact
    finally:
        server.stop()


def _run(code: str, url: str, cwd: Path, *, shell: bool) -> subprocess.CompletedProcess:
    """A README block as a user would run it, from `cwd` (not the repo root), port replaced.

    `.venv/bin/...` becomes this interpreter; PYTHONPATH points at this checkout, so the code
    under test is the one imported even where the venv's editable install is another's.
    """
    code = code.replace("http://127.0.0.1:8000", url)
    commands = {"cdpae": f"{sys.executable} -m app.cli", "python": sys.executable}
    code = re.sub(r"\.venv/bin/(cdpae|python)\b", lambda m: commands[m.group(1)], code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CDPAE_URL": url}
    env.pop("CDPAE_CLIENT_API_KEY", None)
    argv = ["bash", "-euo", "pipefail", "-c", code] if shell else [sys.executable, "-c", code]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _category_of(url: str, modality: str, item_id: str) -> str:
    r = httpx.get(f"{url}/gallery/{modality}/items/{item_id}")
    assert r.status_code == 200, (item_id, r.text)
    return r.json()["metadata"]["category"]


@pytest.mark.slow
def test_readme_curl_answer(served, tmp_path):
    url, exact = served
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    answer = json.loads(_run(_block("curl -s"), url, tmp_path, shell=True).stdout)
    shown = json.loads(_block('{"results":[{"hits":'))
    if exact:
        assert answer == shown
    else:
        assert [len(r["hits"]) for r in answer["results"]] == [
            len(r["hits"]) for r in shown["results"]
        ]
    for hit in shown["results"][0]["hits"]:
        assert _category_of(url, "image", hit["id"]) == hit["metadata"]["category"], hit


@pytest.mark.slow
def test_readme_error_example(served):
    url, _ = served
    shown = json.loads(_block('{"error": {"type": "invalid_request"'))
    # the request the README describes: a text query of 2 floats
    r = httpx.post(f"{url}/search/text-to-image", json={"vectors": [[0.1, 0.2]]})
    assert r.status_code == 422 and r.json() == shown


@pytest.mark.slow
def test_readme_python_snippets(served, tmp_path):
    url, _ = served
    sync = _run(_block("import numpy as np"), url, tmp_path, shell=False).stdout.splitlines()
    assert sync[-1] == "vectors[0] expected 10 floats (text features of bundle 'wikipedia'), got 3"
    assert sync[-2] == "{'category': 'art'} 694"  # the upserted item, in a gallery of 693 + 1
    assert all(line.split()[2] == "{'category':" for line in sync[:-2]), sync
    assert httpx.get(f"{url}/gallery/text").json()["count"] == 693  # and it deleted it
    out = _run(_block("import asyncio"), url, tmp_path, shell=False).stdout
    assert out == "4 queries, 10 hits each\n"


@pytest.mark.slow
def test_readme_terminal_search(served, tmp_path):
    url, exact = served
    out = _run(_block(".venv/bin/python -c"), url, tmp_path, shell=True).stdout
    assert (tmp_path / "q.npy").exists()
    shown = _block("query 0: 5 hits")
    if exact:
        assert out == shown
    else:
        assert out.splitlines()[:3] == shown.splitlines()[:3] and len(out.splitlines()) == 8
    for row in shown.splitlines()[3:]:
        _, item_id, _, metadata = row.split()
        assert _category_of(url, "text", item_id) == metadata.removeprefix("category=")
