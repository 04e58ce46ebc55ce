"""A provider's webhook endpoint as a plain ASGI application (no framework
needed).

POST only. The body is read up to the receiver's size limit and handed to
its ``ingest`` in a worker thread (it talks to the database). The answer is
JSON: ``{"status", "reason", "id", "processing"}`` with the status code the
provider acts on: 200 for every stored delivery (duplicates too, also when
processing failed: the delivery is kept and retried here), 401 for a bad
signature, 400 for a malformed body, 413 for an oversized one, 405 for
another method, 503 when the application's ledger is closing (with a
``runner``: nothing stored), and 500 only when the delivery could not be
stored, so that the provider retries exactly then.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

import anyio
import anyio.to_thread

from ledger import LedgerClosed

from .results import IngestResult

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Receiver(Protocol):
    """What the endpoint hands deliveries to: a provider's adapter."""

    #: Bodies larger than this are refused with 413 before they are read whole.
    max_body_bytes: int

    def ingest(self, raw_body: bytes, headers: Mapping[str, str]) -> IngestResult: ...


class Runner(Protocol):
    """Runs a blocking call in a worker thread: ``AsyncLedger.run_sync``."""

    def __call__(
        self, fn: Callable[[bytes, Mapping[str, str]], IngestResult], body: bytes, headers: Mapping[str, str], /
    ) -> Awaitable[IngestResult]: ...


class WebhookApp:
    """``await app(scope, receive, send)``: route to it in Starlette or FastAPI
    with ``app.add_route("/webhooks/lemonsqueezy", WebhookApp(adapter),
    methods=["POST"])``. Not ``app.mount``: a mount answers its own path
    (without a trailing slash) with a 307 redirect, not with this endpoint.

    ``max_concurrency``: deliveries processed at once (each holds a worker
    thread and a database connection); more wait their turn. Keep it at or
    under the ledger's connection pool (``pool_size`` + ``max_overflow``).

    ``runner``: what runs ``ingest`` in a worker thread instead, in an
    application that also calls the ledger: ``AsyncLedger.run_sync``. The
    deliveries then take turns with the application's ledger calls within one
    bound (the pool's size; ``max_concurrency`` is not used), and the
    ledger's shutdown waits for those in flight; one that arrives once the
    ledger is closing is answered 503, not stored (the provider retries)."""

    def __init__(self, adapter: Receiver, *, max_concurrency: int = 8, runner: Runner | None = None) -> None:
        if type(max_concurrency) is not int or not 1 <= max_concurrency <= 256:
            raise ValueError("max_concurrency must be an int of 1..256")
        if runner is not None and not callable(runner):
            raise ValueError(f"runner must be callable (AsyncLedger.run_sync), not {type(runner).__name__}")
        self.adapter = adapter
        self.max_concurrency = max_concurrency
        self.runner = runner
        self._limiter: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"WebhookApp serves HTTP, not {scope['type']}")
        if scope["method"] != "POST":
            await _answer(send, 405, {"status": "rejected", "reason": "use POST"}, [(b"allow", b"POST")])
            return
        headers = _headers(scope)
        limit = self.adapter.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, {"status": "rejected", "reason": f"body over {limit} bytes"})
            return
        body = await _read_body(receive, limit)
        if body is None:
            await _answer(send, 413, {"status": "rejected", "reason": f"body over {limit} bytes"})
            return
        if self.runner is not None:
            try:
                result = await self.runner(self.adapter.ingest, body, headers)
            except LedgerClosed:
                await _answer(send, 503, {"status": "error", "reason": "the ledger is closing: not stored, retry"})
                return
        else:
            if self._limiter is None:  # created in the event loop that serves the app
                self._limiter = anyio.CapacityLimiter(self.max_concurrency)
            result = await anyio.to_thread.run_sync(self.adapter.ingest, body, headers, limiter=self._limiter)
        payload = {
            "status": result.status,
            "reason": result.reason,
            "id": str(result.event_row_id) if result.event_row_id else None,
            "processing": result.processing,
        }
        await _answer(send, result.http_status, payload)


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        # The first of a repeated header wins; latin-1 is HTTP's header charset.
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(
    send: Send, status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
