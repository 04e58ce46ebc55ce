"""``AsyncLedger``: the ledger's methods as coroutines, for asyncio and trio
code (FastAPI, Starlette, any anyio host).

The ledger's storage drivers block, so each call runs the synchronous
``Ledger`` method in a worker thread, never on the event loop. The threads
are bounded: at most ``max_concurrency`` calls run at once (an
``anyio.CapacityLimiter``, by default the size of the store's connection
pool), the rest wait their turn in the event loop without holding a thread or
a connection. One ``AsyncLedger`` is shared by every task of one event loop.

Each coroutine method is made from the ``Ledger`` method of the same name by
:func:`_in_thread`: its signature (names, defaults, types) is the
synchronous method's, read by mypy and by ``inspect.signature`` from that
method, so adding a method to ``AsyncLedger`` is one line. See
``docs/async.md``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ledger.application.facade import DEFAULT_URL, SWEEP_PAGE, Ledger
from ledger.application.group import GroupCommitPolicy
from ledger.application.sharing import DEFAULT_REPLY_TIMEOUT_S
from ledger.clock import Clock
from ledger.domain.subscriptions import CreditPolicy
from ledger.errors import InvalidArgument, LedgerClosed

if TYPE_CHECKING:
    import anyio

P = ParamSpec("P")
R = TypeVar("R")

#: Calls at once on a ``memory://`` ledger (it has no connection pool).
MEMORY_CONCURRENCY = 8
#: The most calls at once any ledger allows (the largest PostgreSQL pool is 100 + 100).
MAX_CONCURRENCY = 200


def pool_capacity(ledger: Ledger) -> int:
    """How many connections the ledger's store hands out at once: PostgreSQL's
    ``pool_size + max_overflow`` (from the URL), the SQLite pool's size and
    overflow, or :data:`MEMORY_CONCURRENCY` for ``memory://``."""
    config = ledger.config
    if config.backend == "postgresql":
        return config.pool_size + config.max_overflow
    pool = getattr(getattr(ledger.app.recorder, "datastore", None), "pool", None)  # eventsourcing's SQLite pool
    size, overflow = getattr(pool, "pool_size", None), getattr(pool, "max_overflow", None)
    if isinstance(size, int) and isinstance(overflow, int):
        return size + overflow
    return MEMORY_CONCURRENCY


def _in_thread(
    method: Callable[Concatenate[Ledger, P], R],
) -> Callable[Concatenate[AsyncLedger, P], Coroutine[Any, Any, R]]:
    """The coroutine method that runs ``Ledger.<name>`` of the wrapped ledger
    in a worker thread, with the same parameters. The method is looked up by
    name on the instance, so a subclass of ``Ledger`` is honoured."""
    name = method.__name__

    async def call(self: AsyncLedger, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, R] = getattr(self.ledger, name)
        return await self.run_sync(bound, *args, **kwargs)

    functools.update_wrapper(call, method)  # the Ledger method's name, docstring and parameters
    signature = inspect.signature(method)
    returns = signature.return_annotation
    if returns is not inspect.Signature.empty:
        text = returns if isinstance(returns, str) else getattr(returns, "__name__", repr(returns))
        signature = signature.replace(return_annotation=f"Coroutine[Any, Any, {text}]")
    setattr(call, "__signature__", signature)  # noqa: B010  (a function has no typed __signature__)
    return call


class AsyncLedger:
    """The ledger for async code: every public ``Ledger`` method as a
    coroutine of the same name and parameters.

    ``ledger``: an open ``Ledger``; it is closed by :meth:`aclose` unless
    ``close_ledger=False``. ``max_concurrency``: calls running at once, each
    in a worker thread holding at most one of the store's connections
    (default and maximum: :func:`pool_capacity`). Open one from a URL with
    :meth:`open`, which opens the store in a worker thread:

    >>> import anyio
    >>> from uuid import UUID
    >>> async def main() -> int:
    ...     async with AsyncLedger.open("memory://") as ledger:
    ...         await ledger.grant(UUID(int=1), 100, "bonus", key="welcome:1")
    ...         return (await ledger.balance(UUID(int=1))).available_credits
    >>> anyio.run(main)
    100
    """

    def __init__(self, ledger: Ledger, *, max_concurrency: int | None = None, close_ledger: bool = True) -> None:
        if not isinstance(ledger, Ledger):
            raise InvalidArgument(f"ledger must be a Ledger, not {type(ledger).__name__}", param="ledger")
        capacity = pool_capacity(ledger)
        if max_concurrency is None:
            max_concurrency = capacity
        if type(max_concurrency) is not int or not 1 <= max_concurrency <= min(capacity, MAX_CONCURRENCY):
            raise InvalidArgument(
                f"max_concurrency must be an int within 1..{capacity} (the store's connection pool: more calls "
                f"at once would wait for a connection in their threads), got {max_concurrency!r}",
                param="max_concurrency",
            )
        if type(close_ledger) is not bool:
            raise InvalidArgument(
                f"close_ledger must be a bool, not {type(close_ledger).__name__}", param="close_ledger"
            )
        import anyio

        #: The synchronous ledger: give it to what needs a ``Ledger`` (a
        #: webhook adapter); never call its methods on the event loop.
        self.ledger = ledger
        self.max_concurrency = max_concurrency
        #: The bound on calls at once. Give it to other code that uses this
        #: ledger from worker threads (``WebhookApp(adapter, limiter=...)``)
        #: so that they share one bound, the size of the pool.
        self.limiter = anyio.CapacityLimiter(max_concurrency)
        # The worker threads' own limiter: never the one that waits (a call
        # holds a turn of ``limiter`` first), so it only keeps anyio's
        # default limiter of 40 threads out of the way.
        self._threads = anyio.CapacityLimiter(MAX_CONCURRENCY)
        self._close_ledger = close_ledger
        self._admitted = 0
        self._admitting = threading.Lock()
        self._loop: object = None
        self._closing = False
        self._drained: anyio.Event | None = None
        self._closed: anyio.Event | None = None

    def __repr__(self) -> str:
        state = ", closed" if self._closing else ""
        return f"AsyncLedger({self.ledger.url!r}, max_concurrency={self.max_concurrency}{state})"

    @staticmethod
    def open(
        url: str = DEFAULT_URL,
        *,
        clock: Clock | None = None,
        max_attempts: int = 16,
        sync_views: bool = False,
        sync_user_credits: bool = False,
        sync_user_tier: bool = False,
        credit_policy: CreditPolicy | None = None,
        create: bool = True,
        group_commit: GroupCommitPolicy | bool = False,
        share_group_commit: str | os.PathLike[str] | None = None,
        share_reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        max_concurrency: int | None = None,
    ) -> Opening:
        """Opens ``Ledger(url, ...)`` in a worker thread (opening connects
        and may create tables): ``ledger = await AsyncLedger.open(url)``, or
        ``async with AsyncLedger.open(url) as ledger:``, which closes it at
        the end. The options are ``Ledger``'s, and ``max_concurrency``."""
        factory = functools.partial(
            Ledger,
            url,
            clock=clock,
            max_attempts=max_attempts,
            sync_views=sync_views,
            sync_user_credits=sync_user_credits,
            sync_user_tier=sync_user_tier,
            credit_policy=credit_policy,
            create=create,
            group_commit=group_commit,
            share_group_commit=share_group_commit,
            share_reply_timeout_s=share_reply_timeout_s,
        )
        return Opening(factory, max_concurrency)

    # -- running calls ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has begun: no call is admitted any more."""
        return self._closing

    @property
    def calls_in_flight(self) -> int:
        """Calls admitted and not yet finished: running, or waiting their turn."""
        return self._admitted

    async def run_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs any blocking call on this ledger (``ledger.views.catch_up``,
        an adapter's ``ingest``, an audit) in a worker thread, under the same
        bound and the same shutdown as the methods.

        A task cancelled while its call waits for its turn never runs it; a
        call that has started runs to its end (a command is recorded or not,
        never left half done) and the cancellation takes effect when it
        returns. Raises :class:`LedgerClosed` once :meth:`aclose` has begun,
        and for a call still waiting its turn then: it did not run."""
        if self._closing:
            raise LedgerClosed(f"{self!r} is closed: the call did not run")
        self._admit()
        try:
            # The turn is taken here, in the event loop, and given back only
            # once the call's thread has returned (see _Call), so the bound
            # holds even for a call whose awaiter was cancelled.
            async with self.limiter:
                if self._closing:  # close began while this call waited for its turn
                    raise LedgerClosed(f"{self!r} began closing before the call's turn came: it did not run")
                result: R = await _Call(functools.partial(fn, *args, **kwargs)).run(self._threads)
                return result
        finally:
            with self._admitting:
                self._admitted -= 1
            if self._admitted == 0 and self._drained is not None:
                self._drained.set()

    def _admit(self) -> None:
        """Counts a call in, from the event loop of the calls in flight. The
        limiter's waiters and the close's event belong to the loop that made
        them, and a wake-up from another loop's thread may never reach them:
        a call from a second loop while the first has calls in flight would
        hang where it should fail."""
        import anyio.lowlevel

        loop = anyio.lowlevel.current_token().native_token
        with self._admitting:
            if self._admitted and loop is not self._loop:
                raise RuntimeError(
                    f"{self!r} is serving the calls of another event loop: open one AsyncLedger per event loop"
                )
            self._loop = loop
            self._admitted += 1

    # -- closing --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stops admitting calls (they raise :class:`LedgerClosed`), lets the
        calls already running finish, fails the ones still waiting for their
        turn with :class:`LedgerClosed` (they did not run), then closes the
        ``Ledger`` (unless ``close_ledger=False``). Shielded from
        cancellation: a shutdown that is cancelled still closes the store.
        Calling it again waits for the first close to end."""
        import anyio

        if self._closed is not None:
            await self._closed.wait()
            return
        import anyio.lowlevel

        with self._admitting:  # as for a call: the drain's wake-up comes from the calls' loop
            if self._admitted and anyio.lowlevel.current_token().native_token is not self._loop:
                raise RuntimeError(f"{self!r} is serving the calls of another event loop: close it from that loop")
        self._closing = True
        self._closed = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                while self._admitted:
                    self._drained = anyio.Event()
                    await self._drained.wait()
                if self._close_ledger:
                    await anyio.to_thread.run_sync(self.ledger.close)
        finally:
            self._closed.set()

    async def __aenter__(self) -> AsyncLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the ledger's methods, as coroutines -----------------------------------------
    #
    # One line each: the signature is the Ledger method's. tests/test_async_ledger.py
    # fails for a public Ledger method that has no counterpart here.

    execute = _in_thread(Ledger.execute)
    execute_batch = _in_thread(Ledger.execute_batch)
    grant = _in_thread(Ledger.grant)
    spend = _in_thread(Ledger.spend)
    reserve = _in_thread(Ledger.reserve)
    settle = _in_thread(Ledger.settle)
    release = _in_thread(Ledger.release)
    adjust = _in_thread(Ledger.adjust)
    expire_holds = _in_thread(Ledger.expire_holds)
    record_due = _in_thread(Ledger.record_due)
    read_aggregate = _in_thread(Ledger.read_aggregate)
    balance = _in_thread(Ledger.balance)
    reservation = _in_thread(Ledger.reservation)
    history = _in_thread(Ledger.history)
    define_plan = _in_thread(Ledger.define_plan)
    install_default_catalog = _in_thread(Ledger.install_default_catalog)
    plan = _in_thread(Ledger.plan)
    plan_history = _in_thread(Ledger.plan_history)
    start_subscription = _in_thread(Ledger.start_subscription)
    change_plan = _in_thread(Ledger.change_plan)
    activate_subscription = _in_thread(Ledger.activate_subscription)
    renew_subscription = _in_thread(Ledger.renew_subscription)
    mark_past_due = _in_thread(Ledger.mark_past_due)
    recover_subscription = _in_thread(Ledger.recover_subscription)
    cancel_subscription = _in_thread(Ledger.cancel_subscription)
    resume_subscription = _in_thread(Ledger.resume_subscription)
    pause_subscription = _in_thread(Ledger.pause_subscription)
    unpause_subscription = _in_thread(Ledger.unpause_subscription)
    expire_subscription = _in_thread(Ledger.expire_subscription)
    subscription = _in_thread(Ledger.subscription)
    subscription_of = _in_thread(Ledger.subscription_of)
    entitlements = _in_thread(Ledger.entitlements)
    tick = _in_thread(Ledger.tick)
    check = _in_thread(Ledger.check)
    record_use = _in_thread(Ledger.record_use)
    command_stats = _in_thread(Ledger.command_stats)
    sharing_stats = _in_thread(Ledger.sharing_stats)
    set_credit_limit = _in_thread(Ledger.set_credit_limit)
    define_price_book = _in_thread(Ledger.define_price_book)
    install_default_price_book = _in_thread(Ledger.install_default_price_book)
    price_book = _in_thread(Ledger.price_book)
    price_book_history = _in_thread(Ledger.price_book_history)
    quote = _in_thread(Ledger.quote)
    reserve_for_job = _in_thread(Ledger.reserve_for_job)
    set_balance_thresholds = _in_thread(Ledger.set_balance_thresholds)
    balance_thresholds = _in_thread(Ledger.balance_thresholds)
    outbox = _in_thread(Ledger.outbox)

    async def scan(self, topics: list[str]) -> AsyncIterator[Any]:
        """``Ledger.scan`` as an async iterator: every recorded event with one
        of these topics, decoded, in log order, read a page at a time in a
        worker thread. Extension API."""
        events = self.ledger.scan(topics)  # checks the topics; reads nothing yet
        while True:
            page = await self.run_sync(_page, events, SWEEP_PAGE)
            for event in page:
                yield event
            if len(page) < SWEEP_PAGE:
                return


class _Call:
    """One blocking call in a worker thread that, once started, is awaited to
    its end. anyio's worker shields the call from anyio's cancellation, but
    not from asyncio's own (``asyncio.wait_for``, ``task.cancel()``): that
    cancellation would return to the caller, and give back the turn, while
    the command still runs in its thread, and a close would then close the
    store under it. So a cancellation that arrives once the call has started
    waits for it to return, then goes on; one that arrives before it started
    keeps it from ever running."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._started = self._ended = self._abandoned = False
        self._waiter: anyio.Event | None = None

    def _work(self) -> Any:
        with self._lock:
            if self._abandoned:  # the awaiter was cancelled before the thread took the call
                return None
            self._started = True
        try:
            return self._fn()
        finally:
            with self._lock:
                self._ended = True
                waiter = self._waiter
            if waiter is not None:
                import anyio.from_thread

                with contextlib.suppress(RuntimeError):  # the event loop has gone
                    anyio.from_thread.run_sync(waiter.set)

    async def run(self, threads: anyio.CapacityLimiter) -> Any:
        import anyio
        import anyio.to_thread

        try:
            return await anyio.to_thread.run_sync(self._work, limiter=threads)
        except BaseException:
            with self._lock:
                if not self._started:
                    self._abandoned = True
                    raise
                if self._ended:
                    raise
                self._waiter = waiter = anyio.Event()
            with anyio.CancelScope(shield=True):
                while not waiter.is_set():
                    try:
                        await waiter.wait()
                    except anyio.get_cancelled_exc_class():  # asyncio's own, again: the shield does not stop it
                        continue
            raise


def _page(events: Iterator[Any], size: int) -> list[Any]:
    return list(itertools.islice(events, size))


class Opening:
    """What :meth:`AsyncLedger.open` returns: await it for the
    ``AsyncLedger``, or enter it with ``async with`` to close it at the end."""

    def __init__(self, factory: Callable[[], Ledger], max_concurrency: int | None) -> None:
        self._factory = factory
        self._max_concurrency = max_concurrency
        self._opened: AsyncLedger | None = None

    async def _open(self) -> AsyncLedger:
        import anyio
        import anyio.to_thread

        opened: list[Ledger] = []

        def open_ledger() -> None:
            opened.append(self._factory())

        try:
            await anyio.to_thread.run_sync(open_ledger)
            return AsyncLedger(opened[0], max_concurrency=self._max_concurrency)
        except BaseException:
            # Cancelled while the store was opening (it opened all the same),
            # or an invalid max_concurrency: close what was opened.
            if opened:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(opened[0].close)
            raise

    def __await__(self) -> Generator[Any, None, AsyncLedger]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncLedger:
        self._opened = await self._open()
        return self._opened

    async def __aexit__(self, *exc: object) -> None:
        if self._opened is not None:
            await self._opened.aclose()
