"""A small typed HTTP client for the cdpae service (sync `Client`, async `AsyncClient`).

    from app.client import Client
    with Client("http://127.0.0.1:8000") as cdpae:
        results = cdpae.search_image_to_text(image_features, top_k=5)
        for hit in results[0].hits:
            print(hit.id, hit.score, hit.metadata)

Options are keyword-only and default to environment variables: `CDPAE_URL`
(http://127.0.0.1:8000), `CDPAE_CLIENT_API_KEY`, `CDPAE_TIMEOUT` (seconds, 30). The key has a
name of its own, not the server's `CDPAE_API_KEY`: a shell that starts the service with a write
key should not make every client in it a writer. `retry=RetryPolicy(...)` sets the retries.
Every failure raises a subclass of `CdpaeError` carrying the server's error
type, field and message. Only failures that are safe to repeat are retried:
a connection that could not be opened (the request never reached the server)
and a 503 (the server refused it before doing anything), with exponential
backoff and jitter, honouring `Retry-After`.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx
import numpy as np

Modality = Literal["image", "text"]
Similarity = Literal["knn", "cosine"]
SearchMode = Literal["auto", "exact", "approximate"]
VectorsLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "CDPAE_CLIENT_API_KEY"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 2
MODALITIES: tuple[Modality, Modality] = ("image", "text")


# --------------------------------------------------------------------------- errors


class CdpaeError(Exception):
    """Base class of every error this client raises."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        field: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.field = field
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}" if self.status else None, self.error_type]
        prefix = " ".join(p for p in parts if p)
        where = f" [{self.field}]" if self.field else ""
        return f"{prefix}{where}: {self.message}" if prefix else f"{self.message}{where}"


class APIConnectionError(CdpaeError):
    """The service could not be reached (refused, DNS, reset) after all retries.

    `never_sent` is True when the connection was never opened, so the request
    certainly did not reach the server and repeating it is safe.
    """

    def __init__(self, message: str, *, never_sent: bool = False, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.never_sent = never_sent


class APITimeoutError(APIConnectionError):
    """The service did not answer within the timeout."""


class APIStatusError(CdpaeError):
    """The service answered with a 4xx/5xx; `status`, `error_type`, `field`, `message` say why."""


class BadRequestError(APIStatusError):
    """400, 413 or 422: the request was malformed (wrong dimension, bad top_k, body too large)."""


class AuthenticationError(APIStatusError):
    """401: no API key, or a wrong one."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but may not do this (a read-only key writing)."""


class NotFoundError(APIStatusError):
    """404: unknown item id, modality or path."""


class OverloadedError(APIStatusError):
    """429 or 503: the service is busy or not ready; `retry_after` is its hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx other than 503: a bug or a crash on the server side."""


def _error_class(status: int) -> type[APIStatusError]:
    if status in (429, 503):
        return OverloadedError
    if status == 401:
        return AuthenticationError
    if status == 403:
        return PermissionDeniedError
    if status == 404:
        return NotFoundError
    if status >= 500:
        return ServerError
    if status in (400, 413, 422):
        return BadRequestError
    return APIStatusError


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Build the exception for a 4xx/5xx from the server's `{"error": {...}}` body."""
    status = response.status_code
    error_type: str | None = None
    field_name: str | None = None
    message = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error_type = error.get("type") if isinstance(error.get("type"), str) else None
        field_name = error.get("field") if isinstance(error.get("field"), str) else None
        message = str(error.get("message") or "")
    if not message:
        # Not our JSON (a proxy's HTML page, an empty body): keep a short excerpt.
        message = response.text.strip()[:300] or response.reason_phrase or "no message"
    kwargs: dict[str, Any] = {
        "status": status,
        "error_type": error_type,
        "field": field_name,
        "request_id": response.headers.get("x-request-id"),
    }
    cls = _error_class(status)
    if cls is OverloadedError:
        return OverloadedError(
            message, retry_after=parse_retry_after(response.headers.get("retry-after")), **kwargs
        )
    return cls(message, **kwargs)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryResult:
    """The ranked hits of one query vector, best first."""

    hits: list[Hit]


@dataclass(frozen=True)
class GalleryItem:
    id: str
    vector: list[float]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GalleryInfo:
    modality: Modality
    count: int
    dim: int


@dataclass(frozen=True)
class UpsertResult:
    upserted: int
    count: int


@dataclass(frozen=True)
class DeleteResult:
    deleted: str
    count: int


def _parse_results(body: Mapping[str, Any]) -> list[QueryResult]:
    return [
        QueryResult(
            hits=[
                Hit(
                    id=str(h["id"]), score=float(h["score"]), metadata=dict(h.get("metadata") or {})
                )
                for h in result["hits"]
            ]
        )
        for result in body["results"]
    ]


def _parse_item(body: Mapping[str, Any]) -> GalleryItem:
    return GalleryItem(
        id=str(body["id"]),
        vector=[float(x) for x in body["vector"]],
        metadata=dict(body.get("metadata") or {}),
    )


# --------------------------------------------------------------------------- requests


def as_vector_rows(vectors: VectorsLike, *, name: str = "vectors") -> list[list[float]]:
    """One vector (1-D) or a batch (2-D) of finite numbers -> JSON-ready rows.

    Checked here because NaN/inf can't be sent as JSON and a ragged batch has no
    meaning; everything else (the dimension, the batch size) is the server's call.
    """
    try:
        array = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a vector or a 2-D batch of numbers ({exc})") from exc
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a vector or a 2-D batch, got {array.ndim} dimensions")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return array.tolist()


def _search_body(
    vectors: VectorsLike,
    top_k: int,
    similarity: Similarity,
    filter: Mapping[str, Any] | None,
    mode: SearchMode | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "vectors": as_vector_rows(vectors),
        "top_k": int(top_k),
        "similarity": similarity,
    }
    if filter:
        body["filter"] = dict(filter)
    if mode is not None:
        # auto (the server's default): approximate for big unfiltered knn searches, else exact.
        body["mode"] = mode
    return body


def _items_body(items: Iterable[GalleryItem | Mapping[str, Any]]) -> dict[str, Any]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, GalleryItem):
            item_id, vector, metadata = item.id, item.vector, item.metadata
        else:
            item_id, vector, metadata = item["id"], item["vector"], item.get("metadata") or {}
        row = as_vector_rows(vector, name=f"items[{i}].vector")
        if len(row) != 1:
            raise ValueError(f"items[{i}].vector: expected one vector, got a batch of {len(row)}")
        out.append({"id": str(item_id), "vector": row[0], "metadata": dict(metadata)})
    return {"items": out}


def _check_modality(modality: str) -> Modality:
    if modality not in MODALITIES:
        raise ValueError(f"modality: expected 'image' or 'text', got {modality!r}")
    return modality  # type: ignore[return-value]


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter; `Retry-After` wins when given."""

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    # Cap on a server's Retry-After, so one answer can't put a caller to sleep for minutes.
    retry_after_max: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max)
        ceiling = min(self.backoff_max, self.backoff_base * (2**attempt))
        # Full jitter: spreads the retries of many clients that failed together.
        return random.uniform(0.0, ceiling)


def _retryable(exc: CdpaeError) -> bool:
    # Only failures where the server did nothing: the connection never opened,
    # or it answered 503 (not ready / shedding load). A read timeout or a reset
    # mid-request might have applied a write, and 429 means "slow down", so
    # those go straight back to the caller.
    if isinstance(exc, APIStatusError):
        return exc.status == 503
    return isinstance(exc, APIConnectionError) and exc.never_sent


def _connection_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    # ConnectError / ConnectTimeout: no byte of the request reached the server.
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out talking to {url}: {exc!r}", never_sent=never_sent)
    return APIConnectionError(f"could not reach {url}: {exc}", never_sent=never_sent)


# --------------------------------------------------------------------------- clients


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: expected a number of seconds, got {raw!r}") from exc


class _Options:
    """What both clients share: resolved options, headers, URL building."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | None,
        retry: RetryPolicy | None,
        max_retries: int | None,
        transport: object | None,
        http_client: object | None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("CDPAE_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.timeout = (
            timeout if timeout is not None else _env_float("CDPAE_TIMEOUT", DEFAULT_TIMEOUT)
        )
        if retry is not None and max_retries is not None:
            raise ValueError("pass retry=RetryPolicy(...) or max_retries, not both")
        if max_retries is not None:
            retry = RetryPolicy(max_retries=max_retries)
        self.retry = retry or RetryPolicy()
        if self.retry.max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {self.retry.max_retries}")
        if transport is not None and http_client is not None:
            # the transport would be silently unused: the given http_client has its own
            raise ValueError(
                "pass transport or http_client, not both (give the transport to your "
                "httpx client instead)"
            )

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "cdpae-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise error_from_response(response)
    try:
        return response.json()
    except ValueError as exc:  # something other than the service answered (a proxy page?)
        raise CdpaeError(
            f"HTTP {response.status_code} from {response.request.url} is not JSON: "
            f"{response.text[:200]!r}",
            status=response.status_code,
        ) from exc


class Client:
    """Synchronous client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        """`retry` sets the whole policy; `max_retries` alone is a shortcut for
        RetryPolicy(max_retries=n). `transport` (for tests) or `http_client` (your own
        pooled httpx client, which this client will not close), not both."""
        self._options = _Options(
            base_url, api_key, timeout, retry, max_retries, transport, http_client
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self._options.timeout, transport=transport)

    @property
    def base_url(self) -> str:
        return self._options.base_url

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        url = self._options.url(path)
        policy = self._options.retry
        for attempt in range(policy.max_retries + 1):
            try:
                try:
                    response = self._http.request(
                        method,
                        url,
                        json=json,
                        headers=self._options.headers(),
                        timeout=self._options.timeout,
                    )
                except httpx.TransportError as exc:
                    raise _connection_error(exc, url) from exc
                return _check(response)
            except CdpaeError as exc:
                if attempt == policy.max_retries or not _retryable(exc):
                    raise
                time.sleep(policy.delay(attempt, getattr(exc, "retry_after", None)))
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- search
    def search_image_to_text(
        self,
        vectors: VectorsLike,
        *,
        top_k: int = 10,
        similarity: Similarity = "knn",
        filter: Mapping[str, Any] | None = None,
        mode: SearchMode | None = None,
    ) -> list[QueryResult]:
        """Image feature vector(s) in, ranked texts out (one QueryResult per vector)."""
        body = _search_body(vectors, top_k, similarity, filter, mode)
        return _parse_results(self._request("POST", "/search/image-to-text", body))

    def search_text_to_image(
        self,
        vectors: VectorsLike,
        *,
        top_k: int = 10,
        similarity: Similarity = "knn",
        filter: Mapping[str, Any] | None = None,
        mode: SearchMode | None = None,
    ) -> list[QueryResult]:
        """Text feature vector(s) in, ranked images out (one QueryResult per vector)."""
        body = _search_body(vectors, top_k, similarity, filter, mode)
        return _parse_results(self._request("POST", "/search/text-to-image", body))

    def search(
        self,
        modality: Modality,
        vectors: VectorsLike,
        *,
        top_k: int = 10,
        similarity: Similarity = "knn",
        filter: Mapping[str, Any] | None = None,
        mode: SearchMode | None = None,
    ) -> list[QueryResult]:
        """Search with query vectors of `modality` against the gallery of the other one."""
        if _check_modality(modality) == "image":
            return self.search_image_to_text(
                vectors, top_k=top_k, similarity=similarity, filter=filter, mode=mode
            )
        return self.search_text_to_image(
            vectors, top_k=top_k, similarity=similarity, filter=filter, mode=mode
        )

    # -- gallery
    def upsert_items(
        self, modality: Modality, items: Iterable[GalleryItem | Mapping[str, Any]]
    ) -> UpsertResult:
        body = self._request(
            "PUT", f"/gallery/{_check_modality(modality)}/items", _items_body(items)
        )
        return UpsertResult(upserted=int(body["upserted"]), count=int(body["count"]))

    def get_item(self, modality: Modality, item_id: str) -> GalleryItem:
        path = f"/gallery/{_check_modality(modality)}/items/{_quote(item_id)}"
        return _parse_item(self._request("GET", path))

    def delete_item(self, modality: Modality, item_id: str) -> DeleteResult:
        path = f"/gallery/{_check_modality(modality)}/items/{_quote(item_id)}"
        body = self._request("DELETE", path)
        return DeleteResult(deleted=str(body["deleted"]), count=int(body["count"]))

    def gallery_info(self, modality: Modality) -> GalleryInfo:
        body = self._request("GET", f"/gallery/{_check_modality(modality)}")
        return GalleryInfo(
            modality=body["modality"], count=int(body["count"]), dim=int(body["dim"])
        )

    # -- health
    def health(self) -> dict[str, Any]:
        """GET /healthz: the process is up."""
        return self._request("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """GET /readyz: the bundle is loaded (raises OverloadedError while it is not)."""
        return self._request("GET", "/readyz")


class AsyncClient:
    """Asynchronous client; the same methods as `Client`, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        """`retry` sets the whole policy; `max_retries` alone is a shortcut for
        RetryPolicy(max_retries=n). `transport` (for tests) or `http_client` (your own
        pooled httpx client, which this client will not close), not both."""
        self._options = _Options(
            base_url, api_key, timeout, retry, max_retries, transport, http_client
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            timeout=self._options.timeout, transport=transport
        )

    @property
    def base_url(self) -> str:
        return self._options.base_url

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _request(self, method: str, path: str, json: Any = None) -> Any:
        url = self._options.url(path)
        policy = self._options.retry
        for attempt in range(policy.max_retries + 1):
            try:
                try:
                    response = await self._http.request(
                        method,
                        url,
                        json=json,
                        headers=self._options.headers(),
                        timeout=self._options.timeout,
                    )
                except httpx.TransportError as exc:
                    raise _connection_error(exc, url) from exc
                return _check(response)
            except CdpaeError as exc:
                if attempt == policy.max_retries or not _retryable(exc):
                    raise
                await asyncio.sleep(policy.delay(attempt, getattr(exc, "retry_after", None)))
        raise AssertionError("unreachable")

    async def search_image_to_text(
        self,
        vectors: VectorsLike,
        *,
        top_k: int = 10,
        similarity: Similarity = "knn",
        filter: Mapping[str, Any] | None = None,
        mode: SearchMode | None = None,
    ) -> list[QueryResult]:
        body = _search_body(vectors, top_k, similarity, filter, mode)
        return _parse_results(await self._request("POST", "/search/image-to-text", body))

    async def search_text_to_image(
        self,
        vectors: VectorsLike,
        *,
        top_k: int = 10,
        similarity: Similarity = "knn",
        filter: Mapping[str, Any] | None = None,
        mode: SearchMode | None = None,
    ) -> list[QueryResult]:
        body = _search_body(vectors, top_k, similarity, filter, mode)
        return _parse_results(await self._request("POST", "/search/text-to-image", body))

    async def search(
        self,
        modality: Modality,
        vectors: VectorsLike,
        *,
        top_k: int = 10,
        similarity: Similarity = "knn",
        filter: Mapping[str, Any] | None = None,
        mode: SearchMode | None = None,
    ) -> list[QueryResult]:
        if _check_modality(modality) == "image":
            return await self.search_image_to_text(
                vectors, top_k=top_k, similarity=similarity, filter=filter, mode=mode
            )
        return await self.search_text_to_image(
            vectors, top_k=top_k, similarity=similarity, filter=filter, mode=mode
        )

    async def upsert_items(
        self, modality: Modality, items: Iterable[GalleryItem | Mapping[str, Any]]
    ) -> UpsertResult:
        body = await self._request(
            "PUT", f"/gallery/{_check_modality(modality)}/items", _items_body(items)
        )
        return UpsertResult(upserted=int(body["upserted"]), count=int(body["count"]))

    async def get_item(self, modality: Modality, item_id: str) -> GalleryItem:
        path = f"/gallery/{_check_modality(modality)}/items/{_quote(item_id)}"
        return _parse_item(await self._request("GET", path))

    async def delete_item(self, modality: Modality, item_id: str) -> DeleteResult:
        path = f"/gallery/{_check_modality(modality)}/items/{_quote(item_id)}"
        body = await self._request("DELETE", path)
        return DeleteResult(deleted=str(body["deleted"]), count=int(body["count"]))

    async def gallery_info(self, modality: Modality) -> GalleryInfo:
        body = await self._request("GET", f"/gallery/{_check_modality(modality)}")
        return GalleryInfo(
            modality=body["modality"], count=int(body["count"]), dim=int(body["dim"])
        )

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/healthz")

    async def ready(self) -> dict[str, Any]:
        return await self._request("GET", "/readyz")


def _quote(item_id: str) -> str:
    # Ids are free-form strings: keep '/', '?' and '#' from changing the path.
    return quote(str(item_id), safe="")


__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "CdpaeError",
    "Client",
    "DeleteResult",
    "GalleryInfo",
    "GalleryItem",
    "Hit",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "QueryResult",
    "RetryPolicy",
    "ServerError",
    "UpsertResult",
]
