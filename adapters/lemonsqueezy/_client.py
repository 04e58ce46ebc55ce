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
error). The rate limiting, retries and bounded pages are the kit's
(``adapters.webhooks.client``); this module adds Lemon Squeezy's URL, key,
limits, error format and JSON:API paging.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import httpx

from adapters.webhooks.client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_BACKOFF_S,
    DEFAULT_MAX_PAGES,
    DEFAULT_MAX_RETRIES,
    LOW_REMAINING,
    RATE_WINDOW_S,
    ApiClient,
    ApiError,
    TokenBucket,
    retry_after_s,
)

__all__ = [
    "API_URL",
    "BURST",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_BACKOFF_S",
    "DEFAULT_MAX_PAGES",
    "DEFAULT_MAX_RETRIES",
    "JSON_API",
    "LOW_REMAINING",
    "MAX_PAGE_SIZE",
    "RATE_WINDOW_S",
    "REQUESTS_PER_MINUTE",
    "LemonSqueezyApiError",
    "LemonSqueezyClient",
    "TokenBucket",
    "retry_after_s",
]

API_URL = "https://api.lemonsqueezy.com/v1"
JSON_API = "application/vnd.api+json"
MAX_PAGE_SIZE = 100
REQUESTS_PER_MINUTE = 300
#: The bucket's burst; its rate leaves room for it within a window.
BURST = 10


class LemonSqueezyApiError(ApiError):
    """The API answered with an error, or kept failing past the retries."""


class LemonSqueezyClient(ApiClient):
    """``with LemonSqueezyClient(api_key) as client: client.subscriptions()``."""

    error: ClassVar[type[ApiError]] = LemonSqueezyApiError

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
        caller waiting through every backoff before it hears why. The rate
        limiting and retries are the kit's (``adapters.webhooks.client``)."""
        if not api_key or not isinstance(api_key, str):
            raise ValueError("a Lemon Squeezy API key is required")
        # A burst of 10, then (300 - 10) a minute: at most 300 in any minute.
        super().__init__(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "Accept": JSON_API, "Content-Type": JSON_API},
            transport=transport,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_retries=max_retries,
            max_backoff_s=max_backoff_s,
            bucket=bucket,
            sleep=sleep,
            clock=clock,
            requests_per_minute=REQUESTS_PER_MINUTE,
            burst=BURST,
        )

    def error_detail(self, response: httpx.Response) -> str:
        """JSON:API's ``errors``: the first three details (or titles)."""
        try:
            errors = response.json().get("errors") or []
            return "; ".join(str(e.get("detail") or e.get("title") or e) for e in errors[:3])
        except (ValueError, AttributeError):
            return response.text[:200]

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
        url = f"{self.base_url}/{path.lstrip('/')}"

        def next_url(document: dict[str, Any]) -> str | None:
            links = document.get("links")
            following = links.get("next") if isinstance(links, dict) else None
            if not following:
                return None
            if not isinstance(following, str):
                raise LemonSqueezyApiError(f"GET {_path(url)} answered a links.next that is not a URL")
            return _with_params(following, kept)

        pages = self.pages(
            url, {**kept, "page[number]": "1"}, next_url, what=path, max_pages=max_pages, link="links.next"
        )
        for document in pages:
            data = document.get("data")
            if not isinstance(data, list):
                raise LemonSqueezyApiError(f"GET {_path(url)} answered no data list")
            yield from (item for item in data if isinstance(item, dict))

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

    def orders(self, *, store_id: str | None = None, max_pages: int = DEFAULT_MAX_PAGES) -> Iterator[dict[str, Any]]:
        """Newest first (the API's order). The list takes no status filter:
        a refunded order is found by reading them all."""
        return self.paginate("orders", _filters(store_id=store_id), max_pages=max_pages)


def _filters(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


def _path(url: str) -> str:
    return urlsplit(url).path


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
