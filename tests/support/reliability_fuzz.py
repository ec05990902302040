"""Hostile-input fuzzing of the HTTP API, shared by tests/test_reliability_fuzz.py (CI, ~1,350
requests) and scripts/fuzz_long.py (20,000+ requests).

Two generators, both hypothesis:
- schemathesis strategies built from the service's own /openapi.json, every operation, in
  positive (schema-valid) and negative (schema-violating) modes;
- a hand-written strategy that knows what the schema can't say: vectors of the bundle's real
  dimensions filled with hostile floats, ids with slashes, dots, controls and unicode, metadata
  of every JSON shape, and a follow-up read of every item an upsert acknowledged.

Every response is checked by `problems()`: no 5xx, strict JSON (no NaN), errors in the one
shape {"error": {"type", "field", "message"}} naming the field of every 422 and auth error.
Schema cases are also checked by schemathesis against the document itself (`RESPONSE_CHECKS`):
the status is documented for the operation, the body matches the documented schema, the
content type and headers are the documented ones, and schema-violating requests get a 4xx.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# schemathesis's checks of a response against the OpenAPI document it was generated from.
RESPONSE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    # a 2xx on an operation that declares a key: the same request without the key, and with a
    # wrong one, must be refused (re-sent to the server that answered)
    ignored_auth,
]

WRITE_KEY = "fuzz-write-key-0123456789"
READ_KEY = "fuzz-read-key-9876543210"

_AUTH = {
    "write": f"Bearer {WRITE_KEY}",
    "read": f"Bearer {READ_KEY}",
}


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.by_status.items()))
        return f"{self.requests} requests ({statuses}); {len(self.failures)} problems"


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def problems(response: httpx.Response) -> list[str]:
    """Everything wrong with one response, as readable lines (empty: fine)."""
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    found: list[str] = []
    if response.status_code >= 500:
        found.append(f"{where}: server error {response.text[:300]}")
    ctype = response.headers.get("content-type", "")
    if response.request.url.path == "/metrics" and response.status_code == 200:
        return found
    if "json" not in ctype and not ctype.startswith("text/html"):
        found.append(f"{where}: content-type {ctype!r}")
        return found
    if ctype.startswith("text/html"):  # /docs
        return found
    try:
        body = _strict_json(response.text)
    except ValueError as exc:
        found.append(f"{where}: body is not strict JSON ({exc}): {response.text[:200]}")
        return found
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or set(error) != {"type", "field", "message"}:
            found.append(f"{where}: error body not in the contract shape: {response.text[:200]}")
            return found
        if not isinstance(error["type"], str) or not error["type"]:
            found.append(f"{where}: error type missing: {error}")
        if not isinstance(error["message"], str) or not error["message"]:
            found.append(f"{where}: error message missing: {error}")
        if error["field"] is not None and not isinstance(error["field"], str):
            found.append(f"{where}: error field is not a string: {error}")
        if response.status_code == 422 and not error["field"]:
            found.append(f"{where}: 422 does not name the field: {error}")
        if response.status_code in (401, 403) and error["field"] != "authorization":
            found.append(f"{where}: auth error does not name the authorization field: {error}")
        if response.status_code in (429, 503) and "retry-after" not in response.headers:
            found.append(f"{where}: overload without Retry-After")
    elif isinstance(body, dict) and "results" in body:
        for result in body["results"]:
            for hit in result["hits"]:
                if not math.isfinite(hit["score"]):
                    found.append(f"{where}: non-finite score {hit}")
    return found


def schema_violations(case: Any, response: httpx.Response, base_url: str) -> list[str]:
    """What schemathesis's RESPONSE_CHECKS find wrong with `response` to `case` (empty: fine).

    `base_url` is where checks that re-send the request (ignored_auth) send it.
    """
    try:
        case.validate_response(
            response,
            checks=RESPONSE_CHECKS,
            headers=dict(response.request.headers),
            transport_kwargs={"base_url": base_url},
        )
    except FailureGroup as group:
        where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
        return [f"{where}: {exc}" for exc in group.exceptions]
    return []


def schema_operations(client: httpx.Client) -> list[Any]:
    """Every operation of the app's own OpenAPI document."""
    raw = client.get("/openapi.json").json()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_dict(raw)
        return [result.ok() for result in schema.get_all_operations()]


def _send_case(client: httpx.Client, case: Any, auth: str) -> httpx.Response | None:
    """Send a schemathesis case through our own client; None if it can't be put on the wire."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    parts = urlsplit(kwargs["url"])
    headers = {
        k: v
        for k, v in kwargs.get("headers", {}).items()
        if k.lower() not in ("user-agent", "connection", "x-schemathesis-testcaseid")
    }
    if auth in _AUTH:
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["Authorization"] = _AUTH[auth]
    content = kwargs.get("data")
    if "json" in kwargs:
        content = json.dumps(kwargs["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    if isinstance(content, str):
        content = content.encode()
    try:
        return client.request(
            kwargs["method"],
            parts.path + (f"?{parts.query}" if parts.query else ""),
            headers=headers,
            params=kwargs.get("params") or None,
            content=content,
        )
    except (httpx.LocalProtocolError, UnicodeEncodeError, ValueError, TypeError):
        return None  # a header or URL the HTTP client itself refuses to send: not the server's


def _run(test: Callable[..., None], examples: int, seed: int | None) -> None:
    configured = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )(test)
    if seed is not None:
        from hypothesis import seed as hypothesis_seed

        configured = hypothesis_seed(seed)(configured)
    configured()


def fuzz_schema(
    client: httpx.Client,
    examples_per_operation: Callable[[str, str], int],
    report: FuzzReport,
    *,
    stop_on_problem: bool = True,
    seed: int | None = None,
) -> None:
    """schemathesis positive + negative cases for every operation of the app's schema."""
    for operation in schema_operations(client):
        examples = examples_per_operation(operation.method.upper(), operation.path)
        if examples <= 0:
            continue
        strategies = [
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        ]
        if "{modality}" in operation.path:
            # a random modality is a 404 before anything else runs: also fuzz the real ones
            strategies += [
                operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"modality": m})
                for m in ("image", "text")
            ]
        strategy = st.one_of(strategies)

        @given(case=strategy, auth=st.sampled_from(["write", "write", "read", "generated"]))
        def one(case: Any, auth: str) -> None:
            response = _send_case(client, case, auth)
            if response is None:
                return
            found = problems(response) + schema_violations(case, response, str(client.base_url))
            _record(report, response, found, stop_on_problem)

        _run(one, examples, seed)


def _record(report: FuzzReport, response: httpx.Response, found: list[str], stop: bool) -> None:
    report.requests += 1
    report.by_status[response.status_code] += 1
    report.failures.extend(found)
    if found and stop:
        raise AssertionError("\n".join(found))


# --- the hand-written strategy: what the schema can't express -----------------------------------

_ORDINARY_FLOATS = st.floats(-50, 50)
_HOSTILE_FLOATS = st.one_of(
    _ORDINARY_FLOATS,
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0.0, -0.0, 1e-45, 5e-324, 3.4e38, 3.5e38, -3.5e38, 1e300, 1e-300, 1.0]),
)
_IDS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(min_size=0, max_size=40),
    st.sampled_from(
        [
            "a/b",
            "/",
            "..",
            ".",
            "a?b",
            "a#b",
            "%2F",
            " ",
            "a b",
            "é",
            "\x00",
            "x" * 256,
            "x" * 257,
            "../../etc",
            "a%20b",
            "🙂",
        ]
    ),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _vectors(draw: st.DrawFn, dim: int) -> list[list[float]]:
    rows = draw(st.integers(1, 2))
    out = []
    for _ in range(rows):
        length = draw(st.sampled_from([dim] * 8 + [dim - 1, dim + 1, 0]))
        # most rows ordinary, so whole requests pass validation and reach the engine
        values = draw(st.sampled_from([_ORDINARY_FLOATS] * 3 + [_HOSTILE_FLOATS]))
        out.append(draw(st.lists(values, min_size=length, max_size=length)))
    return out


def _raw_json_with_constants(body: dict, constant: str) -> bytes:
    """A body Python would accept but strict JSON would not (NaN / Infinity literals)."""
    return json.dumps(body).replace('"__CONSTANT__"', constant).encode()


def fuzz_semantic(
    client: httpx.Client,
    dims: dict[str, int],
    examples: int,
    report: FuzzReport,
    *,
    stop_on_problem: bool = True,
    seed: int | None = None,
    percent_in_ids: bool = True,
) -> None:
    """Bundle-aware hostile requests: right dimensions, hostile values, awkward ids.

    percent_in_ids=False for starlette's TestClient, which percent-decodes paths twice
    (a real uvicorn decodes once; scripts/fuzz_long.py runs against one).
    """
    headers = {"Authorization": _AUTH["write"]}
    ids = _IDS if percent_in_ids else _IDS.filter(lambda i: "%" not in i)

    @given(
        kind=st.sampled_from(["search", "search", "upsert", "upsert", "constant"]),
        modality=st.sampled_from(["image", "text"]),
        data=st.data(),
    )
    def one(kind: str, modality: str, data: st.DataObject) -> None:
        sent: list[httpx.Response] = []
        unreadable: list[str] = []
        if kind == "search":
            body = {
                "vectors": data.draw(_vectors(dims[modality])),
                "top_k": data.draw(st.integers(1, 40) | st.integers(-2, 1002)),
                "similarity": data.draw(st.sampled_from(["knn", "cosine"] * 4 + ["KNN", ""])),
                "mode": data.draw(st.sampled_from(["auto", "exact", "approximate"] * 3 + ["x"])),
            }
            if data.draw(st.booleans()):
                values = st.sampled_from([_SCALARS] * 4 + [_JSON])
                body["filter"] = data.draw(
                    st.dictionaries(
                        st.sampled_from(["category", "x", ""]) | st.text(max_size=8),
                        data.draw(values),
                        max_size=3,
                    )
                )
            other = "text" if modality == "image" else "image"
            path = f"/search/{modality}-to-{other}"
            sent.append(client.post(path, json=body, headers=headers))
        elif kind == "upsert":
            item_ids = data.draw(st.lists(ids, min_size=1, max_size=3))
            items = [
                {
                    "id": i,
                    "vector": data.draw(_vectors(dims[modality]))[0],
                    "metadata": data.draw(st.dictionaries(st.text(max_size=8), _JSON, max_size=3)),
                }
                for i in item_ids
            ]
            response = client.put(
                f"/gallery/{modality}/items", json={"items": items}, headers=headers
            )
            sent.append(response)
            if response.status_code == 200:
                # every acknowledged item must be readable and deletable through the URL
                for item_id in dict.fromkeys(item_ids):
                    url = f"/gallery/{modality}/items/{quote(item_id, safe='')}"
                    got = client.get(url, headers=headers)
                    sent.append(got)
                    if got.status_code != 200 or got.json().get("id") != item_id:
                        unreadable.append(
                            f"acknowledged item {item_id!r} not readable: {got.status_code} "
                            f"{got.text[:200]}"
                        )
                    if data.draw(st.booleans()):
                        sent.append(client.delete(url, headers=headers))
        else:
            constant = data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400"]))
            where = data.draw(st.sampled_from(["vector", "metadata", "filter", "top_k"]))
            vector = [1.0] * dims[modality]
            if where in ("vector", "metadata"):
                item = {"id": "c", "vector": vector, "metadata": {}}
                if where == "vector":
                    item["vector"] = [*vector[:-1], "__CONSTANT__"]
                else:
                    item["metadata"] = {"x": "__CONSTANT__"}
                raw = _raw_json_with_constants({"items": [item]}, constant)
                path, method = f"/gallery/{modality}/items", "PUT"
            else:
                body: dict[str, Any] = {"vectors": [vector]}
                body[where] = {"x": "__CONSTANT__"} if where == "filter" else "__CONSTANT__"
                raw = _raw_json_with_constants(body, constant)
                other = "text" if modality == "image" else "image"
                path, method = f"/search/{modality}-to-{other}", "POST"
            sent.append(
                client.request(
                    method,
                    path,
                    content=raw,
                    headers={**headers, "Content-Type": "application/json"},
                )
            )
        for response in sent:
            _record(report, response, problems(response), stop_on_problem)
        report.failures.extend(unreadable)
        if unreadable and stop_on_problem:
            raise AssertionError("\n".join(unreadable))

    _run(one, examples, seed)
