"""The client's failure handling: error mapping, retry policy, what is and isn't retried.

Connection refused is real (an unused port). 503s, 429s and timeouts are hard to
provoke from a real server on demand, so those use httpx.MockTransport; what the
client sends and parses against the real service is in test_client_service.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import numpy as np
import pytest

from app import client as client_module
from app.client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    CdpaeError,
    Client,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RetryPolicy,
    ServerError,
    as_vector_rows,
    error_from_response,
    parse_retry_after,
)
from tests.support.ports import free_port


def error_body(kind: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": kind, "field": field, "message": message}}


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (405, APIStatusError),
        (413, BadRequestError),
        (422, BadRequestError),
        (429, OverloadedError),
        (500, ServerError),
        (503, OverloadedError),
    ],
)
def test_each_status_maps_to_its_exception_with_the_servers_message(status, cls):
    response = httpx.Response(
        status,
        json=error_body("invalid_request", "expected 128 floats, got 12", "vectors[3]"),
        headers={"x-request-id": "r-1"},
    )
    exc = error_from_response(response)
    assert type(exc) is cls
    assert (exc.status, exc.error_type, exc.field) == (status, "invalid_request", "vectors[3]")
    assert exc.message == "expected 128 floats, got 12"
    assert exc.request_id == "r-1"
    assert "vectors[3]" in str(exc) and str(status) in str(exc)


def test_a_non_json_error_body_keeps_an_excerpt():
    exc = error_from_response(httpx.Response(502, text="<html>Bad Gateway</html>"))
    assert isinstance(exc, ServerError)
    assert exc.error_type is None and "Bad Gateway" in exc.message


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    assert 15 < parse_retry_after(later) <= 20
    exc = error_from_response(httpx.Response(503, headers={"Retry-After": "2"}))
    assert isinstance(exc, OverloadedError) and exc.retry_after == 2.0


def test_backoff_grows_is_jittered_bounded_and_yields_to_retry_after():
    policy = RetryPolicy(max_retries=5, backoff_base=0.5, backoff_max=4.0, retry_after_max=10)
    for attempt in range(6):
        ceiling = min(4.0, 0.5 * 2**attempt)
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.5 * ceiling  # jitter spans the range, not a constant
    assert policy.delay(0, retry_after=7) == 7
    assert policy.delay(0, retry_after=300) == 10


def test_vectors_accept_numpy_and_lists_and_refuse_nonsense():
    assert as_vector_rows(np.arange(3, dtype=np.float32)) == [[0.0, 1.0, 2.0]]
    assert as_vector_rows([[1, 2], [3, 4]]) == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="NaN"):
        as_vector_rows([1.0, float("nan")])
    with pytest.raises(ValueError, match="vectors"):
        as_vector_rows([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="3 dimensions"):
        as_vector_rows(np.zeros((2, 2, 2)))


def test_options_default_to_environment_variables(monkeypatch):
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setenv("CDPAE_URL", "http://example.invalid:9/")
    monkeypatch.setenv("CDPAE_CLIENT_API_KEY", "k-env")
    monkeypatch.setenv("CDPAE_TIMEOUT", "2.5")
    with Client(transport=httpx.MockTransport(record)) as c:
        c.health()
    with Client(
        "http://other:1", api_key="k-arg", timeout=1, transport=httpx.MockTransport(record)
    ) as c:
        c.health()
    env_request, arg_request = seen
    assert str(env_request.url) == "http://example.invalid:9/healthz"
    assert env_request.headers["authorization"] == "Bearer k-env"
    assert env_request.extensions["timeout"]["read"] == 2.5
    assert str(arg_request.url) == "http://other:1/healthz"
    assert arg_request.headers["authorization"] == "Bearer k-arg"
    assert arg_request.extensions["timeout"]["read"] == 1
    monkeypatch.setenv("CDPAE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CDPAE_TIMEOUT"):
        Client()


def test_a_non_json_success_is_an_error_not_a_crash():
    proxy = httpx.MockTransport(lambda r: httpx.Response(200, text="<html>login</html>"))
    with Client("http://svc", transport=proxy) as c, pytest.raises(CdpaeError, match="not JSON"):
        c.health()


def counting_client(counter: list) -> httpx.Client:
    return httpx.Client(event_hooks={"request": [lambda request: counter.append(request.url)]})


def test_connection_refused_is_retried_then_raised():
    port, attempts = free_port(), []
    http = counting_client(attempts)
    with (
        Client(
            f"http://127.0.0.1:{port}",
            retry=RetryPolicy(max_retries=2, backoff_base=0.01),
            http_client=http,
        ) as c,
        pytest.raises(APIConnectionError) as info,
    ):
        c.health()
    http.close()
    assert len(attempts) == 3
    assert info.value.never_sent and str(port) in str(info.value)


def test_async_connection_refused_is_retried_then_raised():
    port, attempts = free_port(), []

    async def run() -> None:
        http = httpx.AsyncClient(event_hooks={"request": [_async_append(attempts)]})
        async with AsyncClient(
            f"http://127.0.0.1:{port}",
            retry=RetryPolicy(max_retries=1, backoff_base=0.01),
            http_client=http,
        ) as c:
            with pytest.raises(APIConnectionError):
                await c.health()
        await http.aclose()

    asyncio.run(run())
    assert len(attempts) == 2


def _async_append(sink: list):
    async def hook(request: httpx.Request) -> None:
        sink.append(request.url)

    return hook


class Script:
    """A MockTransport handler that plays back responses (or raises) in order."""

    def __init__(self, *steps: httpx.Response | Exception) -> None:
        self.steps = list(steps)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        return step


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", recorded.append)
    return recorded


def busy(retry_after: str | None = "1") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(503, json=error_body("overloaded", "busy, retry"), headers=headers)


def test_503_is_retried_honouring_retry_after(sleeps):
    script = Script(busy("1"), busy("2"), httpx.Response(200, json={"status": "ok"}))
    with Client("http://svc", max_retries=3, transport=httpx.MockTransport(script)) as c:
        assert c.health() == {"status": "ok"}
    assert script.calls == 3 and sleeps == [1.0, 2.0]


def test_503_retries_are_bounded(sleeps):
    script = Script(busy(None))
    c = Client("http://svc", max_retries=2, transport=httpx.MockTransport(script))
    with c, pytest.raises(OverloadedError) as info:
        c.ready()
    assert script.calls == 3 and len(sleeps) == 2
    assert info.value.message == "busy, retry" and info.value.error_type == "overloaded"


@pytest.mark.parametrize(
    "step",
    [
        httpx.Response(
            429, json=error_body("overloaded", "slow down"), headers={"Retry-After": "1"}
        ),
        httpx.Response(500, json=error_body("internal", "boom")),
        httpx.Response(422, json=error_body("invalid_request", "bad", "top_k")),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server hung up mid-response"),
    ],
    ids=["429", "500", "422", "read-timeout", "reset-mid-request"],
)
def test_other_failures_are_not_retried(step, sleeps):
    script = Script(step)
    c = Client("http://svc", max_retries=3, transport=httpx.MockTransport(script))
    with c, pytest.raises((APIStatusError, APIConnectionError)) as info:
        c.health()
    assert script.calls == 1 and sleeps == []
    if isinstance(step, httpx.ReadTimeout):
        assert isinstance(info.value, APITimeoutError) and not info.value.never_sent


def test_connect_timeout_is_retried(sleeps):
    script = Script(httpx.ConnectTimeout("no answer"), httpx.Response(200, json={"status": "ok"}))
    with Client("http://svc", max_retries=1, transport=httpx.MockTransport(script)) as c:
        assert c.health() == {"status": "ok"}
    assert script.calls == 2 and len(sleeps) == 1


def test_async_503_is_retried(monkeypatch):
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", fake_sleep)
    script = Script(busy("1"), httpx.Response(200, json={"status": "ok"}))

    async def run() -> dict:
        async with AsyncClient(
            "http://svc", max_retries=2, transport=httpx.MockTransport(script)
        ) as c:
            return await c.health()

    assert asyncio.run(run()) == {"status": "ok"}
    assert script.calls == 2 and recorded == [1.0]


def test_a_retry_policy_is_an_argument_and_is_followed(sleeps):
    # RetryPolicy was exported but no client took one: its backoff_max was unreachable.
    policy = RetryPolicy(max_retries=4, backoff_base=10.0, backoff_max=0.25)
    script = Script(busy(None))
    c = Client("http://svc", retry=policy, transport=httpx.MockTransport(script))
    with c, pytest.raises(OverloadedError):
        c.health()
    assert script.calls == 5 and len(sleeps) == 4 and max(sleeps) <= 0.25
    with pytest.raises(ValueError, match="not both"):
        Client("http://svc", retry=policy, max_retries=1)


def test_transport_and_http_client_together_are_refused():
    # The given http_client has its own transport: the other one used to be dropped silently.
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    with httpx.Client() as http, pytest.raises(ValueError, match="transport or http_client"):
        Client("http://svc", transport=transport, http_client=http)

    async def build_async() -> None:
        async with httpx.AsyncClient() as http:
            AsyncClient("http://svc", transport=transport, http_client=http)

    with pytest.raises(ValueError, match="transport or http_client, not both"):
        asyncio.run(build_async())


def test_the_servers_write_key_variable_is_not_the_clients(monkeypatch):
    # A shell that starts the service with CDPAE_API_KEY must not make its clients writers.
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setenv("CDPAE_API_KEY", "server-write-key")
    monkeypatch.delenv("CDPAE_CLIENT_API_KEY", raising=False)
    with Client("http://svc", transport=httpx.MockTransport(record)) as c:
        c.health()
    assert "authorization" not in seen[0].headers
