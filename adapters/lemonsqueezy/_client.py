"""A small client for Lemon Squeezy's REST API (https://api.lemonsqueezy.com/v1).

JSON:API over HTTPS with a Bearer key. The API allows 300 requests a minute
(it says so in ``X-Ratelimit-Limit`` and ``X-Ratelimit-Remaining``): a token
bucket keeps the client under it, and a response with few requests remaining
slows the next one down. A 429 is retried after its ``Retry-After``, or else
after an exponential backoff whose last wait reaches past the one-minute
window (the quota is back by then); 5xx answers and transport errors are
retried with the backoff; all a bounded number of times. Lists are paged with
``page[size]`` (at most 100) and followed through ``links.next``, a bounded
number of pages, only to the API's own host, and with the list's filters and
page size (added back if the link lacks them; a link that changes one is an
error).
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

API_URL = "https://api.lemonsqueezy.com/v1"
JSON_API = "application/vnd.api+json"
MAX_PAGE_SIZE = 100
DEFAULT_MAX_PAGES = 1_000
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_BACKOFF_S = 60.0
#: How long to wait for a TCP/TLS connection to the API: a machine without a
#: route fails at once, one whose packets vanish waits this long, once.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
REQUESTS_PER_MINUTE = 300
#: The window the API's limit is counted in.
RATE_WINDOW_S = 60.0
#: The bucket's burst; its rate leaves room for it within a window.
BURST = 10
#: At or under this many requests remaining (``X-Ratelimit-Remaining``), the
#: next request waits a request's share of the window per request short.
LOW_REMAINING = 5


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
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        bucket: TokenBucket | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sleep`` and ``clock`` (seconds, monotonic): every wait goes
        through them, the bucket's too when it is the default one. Until the
        API has answered once, a failure to connect is not retried: no
        network, a wrong ``base_url`` or a firewall would otherwise keep the
        caller waiting through every backoff before it hears why."""
        if not api_key or not isinstance(api_key, str):
            raise ValueError("a Lemon Squeezy API key is required")
        if not 0 <= max_retries <= 10:
            raise ValueError("max_retries must be 0..10")
        if not 0 < max_backoff_s <= 3_600:
            raise ValueError("max_backoff_s must be in (0, 3600]")
        if not 0 < connect_timeout_s <= timeout_s:
            raise ValueError("connect_timeout_s must be in (0, timeout_s]")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._clock = clock
        # A burst of 10, then (300 - 10) a minute: at most 300 in any minute.
        self.bucket = bucket or TokenBucket(
            (REQUESTS_PER_MINUTE - BURST) / RATE_WINDOW_S, BURST, clock=clock, sleep=sleep
        )
        self.requests = 0
        #: Whether the API has answered at least once (connect errors are
        #: retried only after that: they are then transient).
        self.reached = False
        #: Seconds the next request waits first (few requests remaining).
        self._pace_s = 0.0
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
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
        first_429: float | None = None
        for attempt in range(self.max_retries + 1):
            if self._pace_s > 0:
                self._sleep(self._pace_s)
                self._pace_s = 0.0
            self.bucket.take()
            self.requests += 1
            try:
                response = self._http.get(url, params=params)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if not self.reached:
                    raise LemonSqueezyApiError(
                        f"cannot connect to {_origin(url)} (tried GET {url}): {type(exc).__name__}: "
                        f"{exc or 'no answer'}; check the network, or the API's URL"
                    ) from exc
                if attempt == self.max_retries:
                    raise LemonSqueezyApiError(f"GET {_path(url)} failed: {type(exc).__name__}: {exc}") from exc
                self._sleep(self._backoff(attempt))
                continue
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise LemonSqueezyApiError(f"GET {_path(url)} failed: {type(exc).__name__}: {exc}") from exc
                self._sleep(self._backoff(attempt))
                continue
            self.reached = True
            self._note_remaining(response)
            status = response.status_code
            if status == 429 or status >= 500:
                if attempt == self.max_retries:
                    what = "rate limited (429)" if status == 429 else f"answered {status}"
                    raise LemonSqueezyApiError(f"GET {_path(url)} {what} after {attempt + 1} attempts", status)
                wait = retry_after_s(response.headers.get("retry-after")) if status == 429 else None
                if wait is not None:
                    wait = min(self.max_backoff_s, wait)
                else:
                    wait = self._backoff(attempt)
                    if status == 429:
                        # No Retry-After: the last retry waits until a whole
                        # window has passed since the first 429, so that the
                        # quota is back before the client gives up.
                        now = self._clock()
                        first_429 = now if first_429 is None else first_429
                        if attempt == self.max_retries - 1:
                            wait = max(wait, RATE_WINDOW_S + random.uniform(1, 2) - (now - first_429))
                self._sleep(wait)
                continue
            return self._document(url, response)
        raise AssertionError("unreachable")  # pragma: no cover

    def _note_remaining(self, response: httpx.Response) -> None:
        """Few requests left in the window (another client may share the
        key): the next request waits a request's share of the window for each
        one short of LOW_REMAINING + 1 (at most 1.2 s at 300 a minute)."""
        remaining = _header_int(response, "x-ratelimit-remaining")
        if remaining is None or remaining > LOW_REMAINING:
            return
        limit = _header_int(response, "x-ratelimit-limit") or REQUESTS_PER_MINUTE
        self._pace_s = RATE_WINDOW_S / max(limit, 1) * (LOW_REMAINING + 1 - remaining)

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
        """The resources of a list endpoint, page after page through
        links.next, which must keep the filters and the page size: either is
        added back if the link lacks it (a page number counts pages of this
        size), and a link that changes one is an error (a wider or different
        list is not what was asked for)."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}")
        kept = {f"filter[{k}]": v for k, v in (filters or {}).items()}
        kept["page[size]"] = str(page_size)
        params: dict[str, str] | None = {**kept, "page[number]": "1"}
        url = f"{self.base_url}/{path.lstrip('/')}"
        seen: set[str] = set()
        for _ in range(max_pages):
            document = self.get(url, params)
            data = document.get("data")
            if not isinstance(data, list):
                raise LemonSqueezyApiError(f"GET {_path(url)} answered no data list")
            yield from (item for item in data if isinstance(item, dict))
            links = document.get("links")
            following = links.get("next") if isinstance(links, dict) else None
            if not following:
                return
            if not isinstance(following, str):
                raise LemonSqueezyApiError(f"GET {_path(url)} answered a links.next that is not a URL")
            url, params = _with_params(following, kept), None
            if url in seen:
                raise LemonSqueezyApiError(f"{path}: links.next repeats a page ({_path(url)})")
            seen.add(url)
        raise LemonSqueezyApiError(f"{path} has more than {max_pages} pages; raise max_pages or filter")

    def subscriptions(
        self, *, store_id: str | None = None, max_pages: int = DEFAULT_MAX_PAGES
    ) -> Iterator[dict[str, Any]]:
        return self.paginate("subscriptions", _filters(store_id=store_id), max_pages=max_pages)

    def subscription_invoices(
        self,
        *,
        store_id: str | None = None,
        subscription_id: str | None = None,
        status: str | None = None,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> Iterator[dict[str, Any]]:
        """Newest first (the API's order); ``status``: only invoices in it
        (``paid``, ``refunded``, ``partial_refund``, ...)."""
        filters = _filters(store_id=store_id, subscription_id=subscription_id, status=status)
        return self.paginate("subscription-invoices", filters, max_pages=max_pages)


def _filters(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


def _path(url: str) -> str:
    return urlsplit(url).path


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _header_int(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() and len(value) <= 9 else None


def _with_params(url: str, kept: dict[str, str]) -> str:
    """``url`` with every parameter of ``kept`` it lacks added; one it gives
    another value is an error."""
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    present: dict[str, list[str]] = {}
    for key, value in query:
        present.setdefault(key, []).append(value)
    for key, value in kept.items():
        if key in present and present[key] != [value]:
            raise LemonSqueezyApiError(
                f"links.next changes {key} from {value!r} to {present[key][:2]!r}; refusing a different list"
            )
    missing = {k: v for k, v in kept.items() if k not in present}
    return str(httpx.URL(url).copy_merge_params(missing)) if missing else url
