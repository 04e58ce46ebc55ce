"""A rate-limited JSON API client: what a provider's REST client shares.

A token bucket keeps the client under the API's requests a minute, and a
response with few requests remaining (``X-Ratelimit-Remaining``) slows the
next one down. A 429 is retried after its ``Retry-After``, or else after an
exponential backoff whose last wait reaches past the rate window (the quota
is back by then); 5xx answers and transport errors are retried with the
backoff; all a bounded number of times. Until the API has answered once, a
failure to connect is not retried. Links from responses are followed only to
the API's own host, a bounded number of pages, never the same page twice.

Imported as ``adapters.webhooks.client`` (it loads httpx, which the rest of
the kit does not need). A provider subclasses :class:`ApiClient`, names its
error class, and adds its endpoints and its paging (``pages``).
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import httpx

DEFAULT_MAX_PAGES = 1_000
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_BACKOFF_S = 60.0
#: How long to wait for a TCP/TLS connection to the API: a machine without a
#: route fails at once, one whose packets vanish waits this long, once.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: The window an API's limit is counted in.
RATE_WINDOW_S = 60.0
#: At or under this many requests remaining (``X-Ratelimit-Remaining``), the
#: next request waits a request's share of the window per request short.
LOW_REMAINING = 5


class ApiError(Exception):
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


class ApiClient:
    """GETs of JSON documents from one API, rate limited and retried.

    ``requests_per_minute`` and ``burst``: the API's limit; the default
    bucket allows a burst, then (limit - burst) a minute, so at most the limit
    in any minute. ``sleep`` and ``clock`` (seconds, monotonic): every wait
    goes through them, the bucket's too when it is the default one."""

    #: What this client raises: a provider names its own subclass.
    error: ClassVar[type[ApiError]] = ApiError

    def __init__(
        self,
        *,
        base_url: str,
        headers: dict[str, str],
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        bucket: TokenBucket | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        requests_per_minute: int = 300,
        burst: int = 10,
    ) -> None:
        if not 0 <= max_retries <= 10:
            raise ValueError("max_retries must be 0..10")
        if not 0 < max_backoff_s <= 3_600:
            raise ValueError("max_backoff_s must be in (0, 3600]")
        if not 0 < connect_timeout_s <= timeout_s:
            raise ValueError("connect_timeout_s must be in (0, timeout_s]")
        if not 1 <= burst < requests_per_minute:
            raise ValueError("burst must be 1..requests_per_minute - 1")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_backoff_s = max_backoff_s
        self.requests_per_minute = requests_per_minute
        self._sleep = sleep
        self._clock = clock
        self.bucket = bucket or TokenBucket(
            (requests_per_minute - burst) / RATE_WINDOW_S, burst, clock=clock, sleep=sleep
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
            headers=headers,
            follow_redirects=False,
        )

    def __repr__(self) -> str:  # never show the headers (they hold the key)
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
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
                    raise self.error(
                        f"cannot connect to {_origin(url)} (tried GET {url}): {type(exc).__name__}: "
                        f"{exc or 'no answer'}; check the network, or the API's URL"
                    ) from exc
                if attempt == self.max_retries:
                    raise self.error(f"GET {_path(url)} failed: {type(exc).__name__}: {exc}") from exc
                self._sleep(self._backoff(attempt))
                continue
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise self.error(f"GET {_path(url)} failed: {type(exc).__name__}: {exc}") from exc
                self._sleep(self._backoff(attempt))
                continue
            self.reached = True
            self._note_remaining(response)
            status = response.status_code
            if status == 429 or status >= 500:
                if attempt == self.max_retries:
                    what = "rate limited (429)" if status == 429 else f"answered {status}"
                    raise self.error(f"GET {_path(url)} {what} after {attempt + 1} attempts", status)
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

    def pages(
        self,
        url: str,
        params: dict[str, str] | None,
        next_url: Callable[[dict[str, Any]], str | None],
        *,
        what: str,
        max_pages: int = DEFAULT_MAX_PAGES,
        link: str = "the next link",
    ) -> Iterator[dict[str, Any]]:
        """The documents of a paged list, at most ``max_pages``: from ``url``,
        then each document's ``next_url`` (None: the last page). A page seen
        before is an error (a loop), so is one page too many."""
        seen: set[str] = set()
        for _ in range(max_pages):
            document = self.get(url, params)
            yield document
            following = next_url(document)
            if not following:
                return
            url, params = following, None
            if url in seen:
                raise self.error(f"{what}: {link} repeats a page ({_path(url)})")
            seen.add(url)
        raise self.error(f"{what} has more than {max_pages} pages; raise max_pages or filter")

    def _note_remaining(self, response: httpx.Response) -> None:
        """Few requests left in the window (another client may share the
        key): the next request waits a request's share of the window for each
        one short of LOW_REMAINING + 1 (at most 1.2 s at 300 a minute)."""
        remaining = _header_int(response, "x-ratelimit-remaining")
        if remaining is None or remaining > LOW_REMAINING:
            return
        limit = _header_int(response, "x-ratelimit-limit") or self.requests_per_minute
        self._pace_s = RATE_WINDOW_S / max(limit, 1) * (LOW_REMAINING + 1 - remaining)

    def _backoff(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, 2**attempt + random.uniform(0, 1)))

    def _check_host(self, url: str) -> None:
        # Links come from responses: follow them only to the API itself.
        base, target = urlsplit(self.base_url), urlsplit(url)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            raise self.error(f"refusing to follow a link off {base.netloc}: {target.netloc}")

    def error_detail(self, response: httpx.Response) -> str:
        """What an error response says, for the exception's message: its
        first 200 characters; a provider reads its own error format."""
        return response.text[:200]

    def _document(self, url: str, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise self.error(
                f"GET {_path(url)} answered {response.status_code}: {self.error_detail(response)}".rstrip(": "),
                response.status_code,
            )
        try:
            document = response.json()
        except ValueError:
            raise self.error(f"GET {_path(url)} did not answer JSON") from None
        if not isinstance(document, dict):
            raise self.error(f"GET {_path(url)} answered a JSON {type(document).__name__}")
        return document


def _path(url: str) -> str:
    return urlsplit(url).path


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _header_int(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() and len(value) <= 9 else None
