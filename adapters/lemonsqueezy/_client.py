"""A small client for Lemon Squeezy's REST API (https://api.lemonsqueezy.com/v1).

JSON:API over HTTPS with a Bearer key. The API allows 300 requests a minute:
a token bucket keeps the client under it, a 429 is retried after its
``Retry-After`` (or an exponential backoff), as are 5xx answers and transport
errors, a bounded number of times. Lists are paged with ``page[size]`` (at most
100) and followed through ``links.next``, a bounded number of pages, and only
to the API's own host.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

API_URL = "https://api.lemonsqueezy.com/v1"
JSON_API = "application/vnd.api+json"
MAX_PAGE_SIZE = 100
DEFAULT_MAX_PAGES = 1_000
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_BACKOFF_S = 60.0
REQUESTS_PER_MINUTE = 300


class LemonSqueezyApiError(Exception):
    """The API answered with an error, or kept failing past the retries."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class TokenBucket:
    """At most ``rate_per_s`` takes a second on average, bursts of ``capacity``."""

    def __init__(
        self,
        rate_per_s: float,
        capacity: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_per_s <= 0 or capacity < 1:
            raise ValueError("rate_per_s must be > 0 and capacity >= 1")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._sleep = sleep
        self._tokens = capacity
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Takes a token, sleeping until one is there; returns the time slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now
            wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate_per_s
            self._tokens -= 1  # may go negative: the sleep below pays it back
        if wait > 0:
            self._sleep(wait)
        return wait


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class LemonSqueezyClient:
    """``with LemonSqueezyClient(api_key) as client: client.subscriptions()``."""

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = API_URL,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 30.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        bucket: TokenBucket | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key or not isinstance(api_key, str):
            raise ValueError("a Lemon Squeezy API key is required")
        if not 0 <= max_retries <= 10:
            raise ValueError("max_retries must be 0..10")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        # 300 a minute is 5 a second; a burst of 10 stays well inside it.
        self.bucket = bucket or TokenBucket(REQUESTS_PER_MINUTE / 60, 10, sleep=sleep)
        self.requests = 0
        self._http = httpx.Client(
            transport=transport,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {api_key}", "Accept": JSON_API, "Content-Type": JSON_API},
            follow_redirects=False,
        )

    def __repr__(self) -> str:  # never show the key
        return f"LemonSqueezyClient(base_url={self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LemonSqueezyClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------

    def get(self, url: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """One GET with rate limiting and bounded retries; the JSON document."""
        self._check_host(url)
        for attempt in range(self.max_retries + 1):
            self.bucket.take()
            self.requests += 1
            try:
                response = self._http.get(url, params=params)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise LemonSqueezyApiError(f"GET {_path(url)} failed: {type(exc).__name__}: {exc}") from exc
                self._sleep(self._backoff(attempt))
                continue
            if response.status_code == 429 or response.status_code >= 500:
                if attempt == self.max_retries:
                    raise LemonSqueezyApiError(
                        f"GET {_path(url)} answered {response.status_code} after {attempt + 1} attempts",
                        response.status_code,
                    )
                wait = retry_after_s(response.headers.get("retry-after")) if response.status_code == 429 else None
                self._sleep(min(self.max_backoff_s, wait) if wait is not None else self._backoff(attempt))
                continue
            return self._document(url, response)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, 2**attempt + random.uniform(0, 1)))

    def _check_host(self, url: str) -> None:
        # links.next comes from the response: follow it only to the API itself.
        base, target = urlsplit(self.base_url), urlsplit(url)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            raise LemonSqueezyApiError(f"refusing to follow a link off {base.netloc}: {target.netloc}")

    @staticmethod
    def _document(url: str, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            detail = ""
            try:
                errors = response.json().get("errors") or []
                detail = "; ".join(str(e.get("detail") or e.get("title") or e) for e in errors[:3])
            except (ValueError, AttributeError):
                detail = response.text[:200]
            raise LemonSqueezyApiError(
                f"GET {_path(url)} answered {response.status_code}: {detail}".rstrip(": "), response.status_code
            )
        try:
            document = response.json()
        except ValueError:
            raise LemonSqueezyApiError(f"GET {_path(url)} did not answer JSON") from None
        if not isinstance(document, dict):
            raise LemonSqueezyApiError(f"GET {_path(url)} answered a JSON {type(document).__name__}")
        return document

    def paginate(
        self,
        path: str,
        filters: dict[str, str] | None = None,
        *,
        page_size: int = MAX_PAGE_SIZE,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> Iterator[dict[str, Any]]:
        """The resources of a list endpoint, page after page through links.next."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}")
        params: dict[str, str] | None = {f"filter[{k}]": v for k, v in (filters or {}).items()}
        assert params is not None
        params.update({"page[number]": "1", "page[size]": str(page_size)})
        url: str | None = f"{self.base_url}/{path.lstrip('/')}"
        for _ in range(max_pages):
            assert url is not None
            document = self.get(url, params)
            data = document.get("data")
            if not isinstance(data, list):
                raise LemonSqueezyApiError(f"GET {_path(url)} answered no data list")
            yield from (item for item in data if isinstance(item, dict))
            links = document.get("links")
            url = links.get("next") if isinstance(links, dict) else None
            if not url:
                return
            params = None  # links.next carries the query
        raise LemonSqueezyApiError(f"{path} has more than {max_pages} pages; raise max_pages or filter")

    def subscriptions(
        self, *, store_id: str | None = None, max_pages: int = DEFAULT_MAX_PAGES
    ) -> Iterator[dict[str, Any]]:
        return self.paginate("subscriptions", _filters(store_id=store_id), max_pages=max_pages)

    def subscription_invoices(
        self, *, store_id: str | None = None, subscription_id: str | None = None, max_pages: int = DEFAULT_MAX_PAGES
    ) -> Iterator[dict[str, Any]]:
        """Newest first (the API's order)."""
        return self.paginate(
            "subscription-invoices", _filters(store_id=store_id, subscription_id=subscription_id), max_pages=max_pages
        )


def _filters(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


def _path(url: str) -> str:
    return urlsplit(url).path
