"""Delivering the outbox to a host over HTTP: signed POSTs, retried with
exponential backoff, dead-lettered after a bounded number of tries, in log
order (so in order per account). Run by ``python -m ledger notify``.

One notifier delivers one notification at a time: a later notification of
the same account is never sent before an earlier one has been delivered or
given up on. One notifier delivers a consumer at a time: it holds the
consumer's lease (``Outbox.take_lease``) while it delivers, and a second one
gets ``ConsumerBusy`` or, as a standby, waits for the lease.

Its position moves once per pass past what the pass delivered, and past a
notification given up on in the same transaction that records its dead
letter; a crash before a commit sends again what it had not committed (at
least once: receivers dedupe by ``id``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ledger.application.signing import ID_HEADER, TYPE_HEADER, signed_headers
from ledger.errors import ConsumerBusy, InvalidArgument
from ledger.storage.base import Lease
from ledger.views.outbox import Notification, Outbox, OutboxMoved

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("ledger.notify")

#: The longest one POST may take, all told, by default.
DEFAULT_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 100
#: How much of a failed answer's body is kept in the log and the dead letter.
ERROR_BODY_BYTES = 200
#: How often a standby notifier tries for the lease, by default.
STANDBY_POLL_S = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """How a notification is retried: ``max_attempts`` tries in all, waiting
    ``backoff_base_s * 2**(n-1)`` (at most ``backoff_max_s``, with up to 10 %
    jitter) after the n-th failure; then it is dead-lettered."""

    max_attempts: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if type(self.max_attempts) is not int or not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise InvalidArgument(f"max_attempts must be within 1..{MAX_ATTEMPTS}", param="max_attempts")
        for name in ("backoff_base_s", "backoff_max_s", "timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value <= 3600:
                raise InvalidArgument(f"{name} must be within 0..3600 seconds, got {value!r}", param=name)

    def backoff_s(self, failures: int) -> float:
        wait = float(min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1)))
        return wait * (1 + random.uniform(0, 0.1))


class _Deadline:
    """The overall deadline of one POST. httpx's timeouts bound each read and
    write, so a receiver that drips its answer a byte at a time would hold a
    POST for ever; this ends it. When the POST connects (the ``trace``
    extension's connect event) it keeps a duplicate of the connection's socket,
    and a timer shuts that socket down at the deadline: whatever httpx is then
    waiting on (the TLS handshake, the request, the status line, a header, the
    body) fails at once, and the try is a failed one. Connecting itself is
    bounded by the connect timeout (the same ``timeout_s``). Leaving closes the
    duplicate and ends the timer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if not event.endswith((".connect_tcp.complete", ".connect_unix_socket.complete")):
            return
        stream = info.get("return_value")
        sock = None if stream is None else stream.get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            return
        duplicate = sock.dup()  # the same connection: shutting it down ends every wait on it
        with self._lock:
            self._sockets.append(duplicate)
            if self.expired:
                self._shut(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already gone
            sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


@dataclass
class DeliveryReport:
    """What a pass delivered."""

    delivered: int = 0
    dead: int = 0
    attempts: int = 0
    #: Positions delivered, in order (for logs and tests).
    positions: list[int] = field(default_factory=list)


class Notifier:
    """Posts an outbox consumer's notifications to ``url``, signed with ``secret``."""

    def __init__(
        self,
        outbox: Outbox,
        url: str,
        secret: str | bytes,
        *,
        policy: RetryPolicy | None = None,
        client: httpx.Client | None = None,
        stop: threading.Event | None = None,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"the endpoint must be an http(s) URL, got {url!r}", param="url")
        signed_headers(secret, b"")  # refuses a short secret before anything is sent
        self.outbox = outbox
        self.url = url
        self.secret = secret
        self.policy = policy or RetryPolicy()
        self.stop = stop or threading.Event()
        self._sleep = sleep or self.stop.wait
        self._own_client = client is None
        # No kept-alive connections: each POST opens its own, so its deadline
        # (_Deadline) can always reach the socket it waits on.
        self.client = client or httpx.Client(
            timeout=self.policy.timeout_s,
            follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._lease: Lease | None = None
        self._claimed = False

    def close(self) -> None:
        self._let_go()
        if self._own_client:
            self.client.close()

    # -- the consumer's lease ----------------------------------------------------------

    def claim(self, *, wait: bool = False, poll_s: float = STANDBY_POLL_S) -> bool:
        """Takes the consumer's delivery lease, which this notifier then holds
        until ``close()`` (or its process ends). While another notifier holds
        it: ``ConsumerBusy``, or with ``wait`` a standby's wait, trying every
        ``poll_s``, until it is free (True) or ``stop`` is set (False).
        Delivering claims it first when this was not called."""
        if self._holds_lease():
            return True
        while True:
            try:
                self._lease = self.outbox.take_lease()
            except ConsumerBusy:
                if not wait:
                    raise
                if self.stop.wait(poll_s):
                    return False
                continue
            self._claimed = True
            log.info("holding the lease of consumer %r", self.outbox.name)
            return True

    def _holds_lease(self) -> bool:
        if not self._claimed:
            return False
        if self._lease is None or self._lease.held():
            return True  # (None: an outbox without leases)
        log.warning("lost the lease of consumer %r (its connection ended); taking it again", self.outbox.name)
        self._let_go()
        return False

    def _let_go(self) -> None:
        lease, self._lease, self._claimed = self._lease, None, False
        if lease is not None:
            lease.release()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one notification ----------------------------------------------------------

    def post(self, notification: Notification) -> str | None:
        """One try: None when the receiver answered 2xx, else why not."""
        import httpx

        body = notification.body()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "pingvas-ledger-notify",
            ID_HEADER: str(notification.id),
            TYPE_HEADER: notification.type,
            **signed_headers(self.secret, body),
        }
        # Streamed: the status decides, and the body is only read for the
        # error's first bytes. Reading it all would let a receiver that answers
        # with an endless (or huge) body fill the notifier's memory; the
        # deadline ends a POST whose answer (head or body) is too slow in coming.
        with _Deadline(self.policy.timeout_s) as deadline:
            try:
                with self.client.stream(
                    "POST", self.url, content=body, headers=headers, extensions={"trace": deadline.trace}
                ) as response:
                    if response.is_success:
                        return None
                    head = b""
                    try:
                        for chunk in response.iter_bytes():
                            head += chunk
                            if len(head) >= ERROR_BODY_BYTES or time.monotonic() > deadline.at:
                                break
                    except httpx.HTTPError:
                        pass  # the body was cut short (by the deadline or the receiver): the status is the answer
            except httpx.HTTPError as exc:
                if deadline.expired:
                    return f"no answer within the {deadline.seconds:g} s deadline ({type(exc).__name__}: {exc})"
                return f"{type(exc).__name__}: {exc}"
        text = head[:ERROR_BODY_BYTES].decode("utf-8", "replace")
        return f"HTTP {response.status_code}: {text}"

    def deliver(self, notification: Notification) -> tuple[bool, int, str]:
        """Tries until delivered or out of tries: (delivered, tries, last error).
        Stops early (not delivered, not given up) when ``stop`` is set."""
        error = ""
        for attempt in range(1, self.policy.max_attempts + 1):
            if self.stop.is_set():
                return False, attempt - 1, "stopped"
            failed = self.post(notification)
            if failed is None:
                return True, attempt, ""
            error = failed
            log.warning(
                "notification %s (position %d) try %d failed: %s",
                notification.id,
                notification.position,
                attempt,
                error,
            )
            if attempt < self.policy.max_attempts:
                self._sleep(self.policy.backoff_s(attempt))
        return False, self.policy.max_attempts, error

    # -- passes -----------------------------------------------------------------------

    def run_once(self, *, limit: int = 100) -> DeliveryReport:
        """Delivers (or dead-letters) the pending notifications, at most
        ``limit``, in order; returns what it did. The position moves once per
        pass (and at each dead letter, which is written in that same
        transaction): a crash re-sends at most the pass's delivered ones."""
        self.claim()
        report = DeliveryReport()
        position = self.outbox.position()
        reached = position
        found, through = self.outbox.scan(position, limit)
        try:
            for notification in found:
                delivered, tries, error = self.deliver(notification)
                report.attempts += tries
                if delivered:
                    reached = notification.position
                    report.delivered += 1
                    report.positions.append(reached)
                    continue
                if self.stop.is_set():
                    break  # not given up on: sent again by the next run
                with self.outbox.advancing(position, notification.position) as tx:
                    self.outbox.bury(tx, notification, attempts=tries, error=error)
                position = reached = notification.position
                report.dead += 1
                log.error(
                    "notification %s (position %d) dead-lettered after %d tries: %s",
                    notification.id,
                    position,
                    tries,
                    error,
                )
            else:
                reached = max(reached, through)  # every one handled: past the rest of the scan too
            if reached > position:
                self.outbox.commit(position, reached)
        except OutboxMoved:
            log.info("another notifier of consumer %r moved on; reading again", self.outbox.name)
        return report

    def run(
        self, *, poll_s: float = 0.2, limit: int = 100, wake: Callable[[float], None] | None = None
    ) -> DeliveryReport:
        """Delivers until ``stop`` is set; ``wake(timeout_s)`` blocks until a
        commit may have happened (LISTEN/NOTIFY), polling every ``poll_s`` otherwise."""
        total = DeliveryReport()
        while not self.stop.is_set():
            report = self.run_once(limit=limit)
            total.delivered += report.delivered
            total.dead += report.dead
            total.attempts += report.attempts
            if report.delivered or report.dead:
                continue  # there may be more
            if wake is not None:
                wake(poll_s)
            else:
                self.stop.wait(poll_s)
        return total

    # -- dead letters -------------------------------------------------------------------

    def redrive(self, ids: Iterable[UUID] | None = None) -> DeliveryReport:
        """Delivers dead letters again (all of them, or those ``ids``), in log
        order; one delivered is marked ``redelivered``, one that fails again stays dead."""
        self.claim()
        wanted = None if ids is None else set(ids)
        report = DeliveryReport()
        for letter in self.outbox.all_dead_letters():
            if wanted is not None and letter.notification_id not in wanted:
                continue
            notification = self.outbox.at(letter.position)
            if notification is None or notification.id != letter.notification_id:
                raise InvalidArgument(f"dead letter {letter.notification_id} is not in the log at {letter.position}")
            delivered, tries, error = self.deliver(notification)
            report.attempts += tries
            if delivered:
                self.outbox.mark_redelivered(letter.notification_id)
                report.delivered += 1
                report.positions.append(letter.position)
            elif not self.stop.is_set():
                self.outbox.mark_dead_again(letter.notification_id, attempts=tries, error=error)
                report.dead += 1
        return report
