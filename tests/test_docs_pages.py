"""/docs (Swagger UI) and /redoc render the API in a real headless Chromium with no internet.

Chromium runs against a real `cdpae serve` with every host name but 127.0.0.1 made
unresolvable, so a page that needed a CDN would render no operations. Needs Debian's
`chromium-headless-shell` (or `chromium`): `apt-get install chromium-headless-shell`, about 1 s
per page; without one the browser tests are skipped and only the assets' presence is checked.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import httpx
import pytest

from tests.support.service import Server

pytestmark = pytest.mark.slow

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def server(synthetic_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    srv = Server(synthetic_bundle, tmp / "data", tmp / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def render(url: str) -> str:
    """The page's DOM after its scripts ran, from a browser that can reach only 127.0.0.1."""
    browser = _browser()
    if browser is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}): apt-get install {BROWSERS[0]}")
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # runs as root here
            "--disable-gpu",
            # offline: any other host fails to resolve, as on a machine without internet
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _operations(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    return [
        (path, op["operationId"], op["summary"])
        for path, item in doc["paths"].items()
        for op in item.values()
    ]


def test_swagger_ui_renders_every_operation_offline(server):
    dom = render(f"{server.url}/docs")
    rendered_paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    operations = _operations(server)
    assert rendered_paths == {path for path, _, _ in operations}
    text = html.unescape(dom)
    for _, _, summary in operations:
        assert summary in text, summary
    assert "Authorize" not in text  # no key configured: no security scheme to fill in


def test_redoc_renders_every_operation_offline(server):
    text = html.unescape(render(f"{server.url}/redoc"))
    for _, operation_id, summary in _operations(server):
        assert f"operation/{operation_id}" in text, operation_id
        assert summary in text, summary
    assert "ErrorResponse" in text


def test_docs_assets_are_served_by_the_service(server):
    """The weaker check, also where no browser exists: the pages name only local assets."""
    for page in ("/docs", "/redoc"):
        page_html = httpx.get(f"{server.url}{page}").text
        sources = re.findall(r'(?:src|href)="([^"]+)"', page_html)
        assert sources, page
        for source in sources:
            assert source.startswith("/"), (page, source)  # nothing from another host
            r = httpx.get(f"{server.url}{source}")
            assert r.status_code == 200 and len(r.content) > 1000, (page, source)
