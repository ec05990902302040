"""Prometheus metrics, request ids, access log and the body-size limit: one ASGI middleware.

Pure ASGI (no BaseHTTPMiddleware) so it adds microseconds, not a task per request.
Each app has its own registry, so tests can build many apps in one process.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("cdpae.access")

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class ServiceMetrics:
    def __init__(
        self,
        gallery_stats: Callable[[], Iterable[tuple[str, int, int, bool]]],
        search_paths: Callable[[], dict[tuple[str, str], int]],
        neighbour_search: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cdpae_requests_total",
            "HTTP requests by route template, method and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cdpae_request_duration_seconds",
            "HTTP request latency by route template (time to the last body byte)",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(gallery_stats, search_paths, neighbour_search))


class _EngineCollector(Collector):
    """Gallery sizes and search paths, read from the engine at scrape time."""

    def __init__(
        self,
        gallery_stats: Callable[[], Iterable[tuple[str, int, int, bool]]],
        search_paths: Callable[[], dict[tuple[str, str], int]],
        neighbour_search: Callable[[], str | None],
    ) -> None:
        self._gallery_stats = gallery_stats
        self._search_paths = search_paths
        self._neighbour_search = neighbour_search

    def collect(self) -> Iterable[GaugeMetricFamily]:
        items = GaugeMetricFamily(
            "cdpae_gallery_items", "items in the gallery", labels=["modality"]
        )
        size = GaugeMetricFamily(
            "cdpae_gallery_memory_bytes",
            "bytes of the gallery's arrays and ANN index",
            labels=["modality"],
        )
        building = GaugeMetricFamily(
            "cdpae_gallery_ann_building",
            "1 while the gallery's ANN indexes are built in the background (searches exact)",
            labels=["modality"],
        )
        for modality, count, nbytes, is_building in self._gallery_stats():
            items.add_metric([modality], count)
            size.add_metric([modality], nbytes)
            building.add_metric([modality], float(is_building))
        paths = GaugeMetricFamily(
            "cdpae_search_queries_by_path",
            "query vectors answered by each similarity and path since start (exact, "
            "approximate: certified by the bound on what the index left out, uncertified: "
            "candidate cap reached)",
            labels=["similarity", "path"],
        )
        for (similarity, path), n in self._search_paths().items():
            paths.add_metric([similarity, path], n)
        method = GaugeMetricFamily(
            "cdpae_training_neighbour_search",
            "how a query's k nearest training items are found: 1 for the method in use "
            "(exact: a scan of a small training pool; hnsw: the bundle's index)",
            labels=["method"],
        )
        in_use = self._neighbour_search()
        for name in ("exact", "hnsw"):
            if in_use is not None:
                method.add_metric([name], float(name == in_use))
        yield items
        yield size
        yield building
        yield paths
        yield method


class ServiceMiddleware:
    """Request id in/out, 413 before parsing, metrics per route template, one access log line."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        max_body_bytes: int,
        max_inflight_body_bytes: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        # Bodies are read and parsed into Python objects (several times their JSON size) before
        # a route's admission check runs, so without a cap here N large uploads hold N times
        # that (64 bodies of 7.5 MB: 2.4 GB). Checked before reading; the event loop is single
        # threaded, so a plain counter is safe.
        self.max_inflight_body_bytes = max_inflight_body_bytes
        self.inflight_body_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        reserved = 0
        try:
            reserved = self._reserve_body(scope, headers)
            if reserved < 0:
                reserved = 0
                response = error_response(
                    503,
                    "overloaded",
                    "too many request body bytes in flight (CDPAE_MAX_INFLIGHT_BODY_BYTES); "
                    "retry shortly",
                    headers={"Retry-After": "1"},
                )
                await response(scope, receive, send_with_id)
                return
            body_receive = await self._bounded_body(scope, receive, headers)
            if body_receive is None:
                response = error_response(
                    413,
                    "payload_too_large",
                    f"request body is over the limit of {self.max_body_bytes} bytes "
                    "(CDPAE_MAX_BODY_BYTES)",
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, body_receive, send_with_id)
        finally:
            self.inflight_body_bytes -= reserved
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(elapsed)
            # the decoded path may hold %0A etc.: escaped, so a request can't forge log lines
            path = str(scope.get("path", "")).encode("unicode_escape").decode("ascii")
            access_log.info("%s %s %d %.1fms", method, path, status, elapsed * 1e3)
            request_id_var.reset(token)

    def _reserve_body(self, scope: Scope, headers: dict[bytes, bytes]) -> int:
        """Bytes reserved for this request's body, or -1: over the in-flight budget.

        One request is always let through, so a single body of the maximum size can pass.
        """
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return 0
        try:
            size = min(int(headers.get(b"content-length", b"")), self.max_body_bytes)
        except ValueError:
            size = self.max_body_bytes  # chunked: assume the worst
        size = max(size, 0)
        if self.inflight_body_bytes and self.inflight_body_bytes + size > (
            self.max_inflight_body_bytes
        ):
            return -1
        self.inflight_body_bytes += size
        return size

    async def _bounded_body(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]
    ) -> Receive | None:
        """A receive that replays the body, or None if the body is over the limit."""
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    return None
            except ValueError:
                return None
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        # Chunked or lying clients: read at most the limit, then refuse.
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
