"""Group commit shared by processes (``Ledger(url, share_group_commit=path)``).

Two ``Ledger``s of one process take the path's lock like two processes (an
``fcntl`` lock belongs to its open file), so most tests run both in one
process; the crash, stall and many-writer tests run real processes: the
serving one killed with SIGKILL, or stopped with SIGSTOP, while the others'
commands are in flight. Each checks what was recorded: every key exactly
once, the balances to the credit, and an audit that finds nothing."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ledger import (
    ConfigurationError,
    CreditPolicy,
    InsufficientCredits,
    InvalidArgument,
    Ledger,
    ManualClock,
    audit,
)
from ledger.application import sharing
from ledger.application.commands import SpendCredits

CTX = multiprocessing.get_context("spawn")
USER = uuid.UUID(int=0x5A)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    directory = tmp_path / "share"
    directory.mkdir(mode=0o700)
    return directory / "ledger.sock"


@pytest.fixture
def pair(durable_url: str, share: Path) -> Iterator[tuple[Ledger, Ledger]]:
    """A serving ledger (its first command took the lock) and a sending one."""
    first = Ledger(durable_url, share_group_commit=share)
    first.grant(USER, 1_000, "bonus", key="fund")
    second = Ledger(durable_url, share_group_commit=share)
    yield first, second
    second.close()
    first.close()


def test_commands_sent_to_the_serving_process_are_recorded_once(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    receipt = second.spend(USER, 30, key="spend-1")
    assert receipt.balance_credits == 970 and not receipt.replayed
    again = second.spend(USER, 30, key="spend-1")
    assert again.replayed and again.entry_id == receipt.entry_id
    assert first.balance(USER).balance_credits == 970
    served, sent = first.sharing_stats(), second.sharing_stats()
    assert served is not None and sent is not None
    assert served.serving and served.served == 2 and served.elections == 1
    assert not sent.serving and sent.sent == 2 and sent.ran_here == 0


def test_a_sent_commands_error_comes_back_typed(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair
    with pytest.raises(InsufficientCredits) as caught:
        second.spend(USER, 5_000, key="too-much")
    assert caught.value.requested_credits == 5_000 and caught.value.available_credits == 1_000
    with pytest.raises(InvalidArgument):
        second.execute("not a command")  # type: ignore[arg-type]
    assert first.balance(USER).balance_credits == 1_000
    stats = second.sharing_stats()
    assert stats is not None and stats.sent == 1  # the bad argument never left the process


def test_the_next_process_serves_when_the_server_closes(durable_url: str, share: Path) -> None:
    first = Ledger(durable_url, share_group_commit=share)
    first.grant(USER, 100, "bonus", key="fund")
    second = Ledger(durable_url, share_group_commit=share)
    third = Ledger(durable_url, share_group_commit=share)
    try:
        second.spend(USER, 1, key="a")
        first.close()
        second.spend(USER, 1, key="b")  # finds no server, takes the lock
        third.spend(USER, 1, key="c")
        stats_2, stats_3 = second.sharing_stats(), third.sharing_stats()
        assert stats_2 is not None and stats_2.serving and stats_2.elections == 1
        assert stats_3 is not None and not stats_3.serving and stats_3.sent == 1
        assert third.balance(USER).balance_credits == 97
    finally:
        third.close()
        second.close()


def _refused_then_ran_here(other: Ledger, key: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ledger.application.sharing"):
        assert other.spend(USER, 1, key=key).amount_credits == -1  # recorded all the same, here
    stats = other.sharing_stats()
    assert stats is not None and stats.sent == 0 and stats.ran_here >= 1 and not stats.serving
    assert "every process sharing a path must open the ledger alike" in caplog.text


def test_peers_that_opened_the_ledger_differently_run_their_own_commands(
    durable_url: str, share: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = Ledger(durable_url, share_group_commit=share)
    first.grant(USER, 100, "bonus", key="fund")
    try:
        for n, options in enumerate(({"credit_policy": CreditPolicy(upgrade="none")}, {"max_attempts": 3})):
            other = Ledger(durable_url, share_group_commit=share, **options)  # type: ignore[arg-type]
            try:
                caplog.clear()
                _refused_then_ran_here(other, f"refused-{n}", caplog)
                assert "other options" in caplog.text
            finally:
                other.close()
        served = first.sharing_stats()
        assert served is not None and served.served == 0
        assert first.balance(USER).balance_credits == 98
    finally:
        first.close()


def test_a_peer_of_another_release_runs_its_own_commands(
    durable_url: str, share: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling deploy: processes whose commands have other fields must not
    exchange pickles of them, and the new ones' commands still run."""
    first = Ledger(durable_url, share_group_commit=share)
    first.grant(USER, 100, "bonus", key="fund")
    real = sharing._wire_shapes()
    monkeypatch.setattr(sharing, "_wire_shapes", lambda: (*real, ("ledger.application.commands.New", ("key",))))
    newer = Ledger(durable_url, share_group_commit=share)
    try:
        _refused_then_ran_here(newer, "from-the-new-release", caplog)
        assert "another release" in caplog.text
    finally:
        newer.close()
        first.close()


def test_a_peer_of_another_store_runs_its_own_commands(
    tmp_path: Path, share: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = Ledger(f"sqlite:///{tmp_path}/one.sqlite3", share_group_commit=share)
    first.grant(USER, 100, "bonus", key="fund")
    other = Ledger(f"sqlite:///{tmp_path}/two.sqlite3", share_group_commit=share)
    try:
        other.grant(USER, 100, "bonus", key="fund")
        _refused_then_ran_here(other, "spend-two", caplog)
        stats = other.sharing_stats()
        assert stats is not None and stats.ran_here == 2
        assert first.balance(USER).balance_credits == 100 and other.balance(USER).balance_credits == 99
    finally:
        other.close()
        first.close()


def test_a_stranger_on_the_socket_is_dropped_and_the_peers_go_on(pair: tuple[Ledger, Ledger], share: Path) -> None:
    first, second = pair
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.settimeout(5)
    stranger.connect(str(share))
    hello = stranger.recv(1024)
    assert hello  # the server's challenge
    stranger.sendall(struct.pack(">I", 96) + os.urandom(96))  # a wrong proof
    assert stranger.recv(1024) == b""  # dropped, nothing answered
    stranger.close()
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(str(share))
    flood.sendall(struct.pack(">I", 2**31))  # a frame too large to read
    flood.close()
    assert second.spend(USER, 10, key="after-strangers").balance_credits == 990
    assert first.balance(USER).balance_credits == 990


def test_the_shared_files_must_be_this_users_alone(durable_url: str, share: Path) -> None:
    key = share.with_name(share.name + ".key")
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by it alone"):
        Ledger(durable_url, share_group_commit=share)
    key.chmod(0o600)
    key.write_bytes(b"short")
    with pytest.raises(ConfigurationError, match="not a ledger's shared secret"):
        Ledger(durable_url, share_group_commit=share)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("relative/ledger.sock", InvalidArgument, "absolute"),
        ("/" + "x" * 120, InvalidArgument, "at most"),
        ("/no/such/directory/ledger.sock", ConfigurationError, "does not exist"),
        ("/tmp/ledger.sock", ConfigurationError, "writable by it alone"),
        (42, InvalidArgument, "must be a path"),
    ],
)
def test_bad_share_paths_are_refused(tmp_path: Path, value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Ledger(f"sqlite:///{tmp_path}/l.sqlite3", share_group_commit=value)  # type: ignore[arg-type]


def test_bad_sharing_options_are_refused(tmp_path: Path, share: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.sqlite3"
    with pytest.raises(ConfigurationError, match="memory"):
        Ledger("memory://", share_group_commit=share)
    with pytest.raises(InvalidArgument, match="system clock"):
        Ledger(url, share_group_commit=share, clock=ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
    for timeout in (0, -1, 601, "5", True):
        with pytest.raises(InvalidArgument, match="share_reply_timeout_s"):
            Ledger(url, share_group_commit=share, share_reply_timeout_s=timeout)  # type: ignore[arg-type]


def test_a_command_the_server_cannot_load_runs_in_its_own_process(pair: tuple[Ledger, Ledger]) -> None:
    first, second = pair

    @dataclass(frozen=True)
    class Unpicklable(SpendCredits):  # defined where pickle cannot find it: it runs where it was made
        name: ClassVar[str] = "spend"

    receipt = second.execute(Unpicklable(key="local-1", user_id=USER, amount_credits=4))
    assert receipt.balance_credits == 996
    stats = second.sharing_stats()
    assert stats is not None and stats.ran_here == 1 and stats.sent == 0
    assert first.balance(USER).balance_credits == 996


# ------------------------------------------------------------------ real processes


def _serve_then_wait(url: str, share: str, ready: Any, stop: Any) -> None:
    ledger = Ledger(url, share_group_commit=share)
    ledger.spend(USER, 1, key=f"server-{os.getpid()}")  # takes the lock
    stats = ledger.sharing_stats()
    assert stats is not None and stats.serving
    ready.set()
    stop.wait(60)
    ledger.close()


def _spend_many(url: str, share: str, tag: str, count: int, reply_timeout_s: float, done: Any) -> None:
    ledger = Ledger(url, share_group_commit=share, share_reply_timeout_s=reply_timeout_s)
    for i in range(count):
        ledger.spend(USER, 1, key=f"{tag}:{i}")
    stats = ledger.sharing_stats()
    done.put((tag, stats))
    ledger.close()


def _start_spenders(url: str, share: Path, tag: str, processes: int, count: int, done: Any) -> list[Any]:
    """Processes that each spend 1 credit ``count`` times, keys ``<tag><n>:<i>``, and report their stats to ``done``."""
    spenders = [
        CTX.Process(target=_spend_many, args=(url, str(share), f"{tag}{n}", count, 30.0, done), daemon=True)
        for n in range(processes)
    ]
    for p in spenders:
        p.start()
    return spenders


def _start_server(url: str, share: Path) -> tuple[Any, Any]:
    ready, stop = CTX.Event(), CTX.Event()
    server = CTX.Process(target=_serve_then_wait, args=(url, str(share), ready, stop), daemon=True)
    server.start()
    assert ready.wait(60), "the serving process did not start"
    return server, stop


def _recorded_keys(ledger: Ledger) -> list[str]:
    return [e.data["key"] for e in ledger.history(USER, limit=1_000) if "key" in e.data]


def _check_recorded(url: str, expected_keys: set[str], funded: int) -> None:
    with Ledger(url) as ledger:
        keys = [k for k in _recorded_keys(ledger) if k != "fund"]
        assert sorted(keys) == sorted(expected_keys)  # each key exactly once
        assert ledger.balance(USER).balance_credits == funded - len(expected_keys)
        ledger.views.catch_up()
        assert audit(ledger).ok


@pytest.mark.slow
def test_killing_the_serving_process_loses_and_doubles_nothing(durable_url: str, share: Path) -> None:
    with Ledger(durable_url) as ledger:
        ledger.grant(USER, 10_000, "bonus", key="fund")
    server, _ = _start_server(durable_url, share)
    done = CTX.Queue()
    senders = _start_spenders(durable_url, share, "s", 3, 150, done)
    time.sleep(1.0)  # commands in flight through the server
    os.kill(server.pid, signal.SIGKILL)
    server.join(10)
    results = dict(done.get(timeout=120) for _ in senders)
    for p in senders:
        p.join(30)
    expected = {f"s{n}:{i}" for n in range(3) for i in range(150)} | {f"server-{server.pid}"}
    _check_recorded(durable_url, expected, 10_000)
    assert sum(s.elections for s in results.values()) >= 1  # one of the senders took over
    assert sum(s.sent for s in results.values()) > 0


def _stop_while_idle(pid: int) -> None:
    """SIGSTOP once the server is idle, and wait until it is stopped: a
    process stopped inside a transaction would hold the store's write lock,
    which stalls every writer, shared or not (SQLite's lock, PostgreSQL's on
    the events table), and is not what this test is about."""
    time.sleep(0.2)  # its last reply is sent: let it finish the turn and wait for the next command
    os.kill(pid, signal.SIGSTOP)
    if not Path("/proc").is_dir():  # not Linux: no process state to read
        time.sleep(0.5)
        return
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("T", "t"):
        assert time.monotonic() < deadline, "the server did not stop"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_stalled_server_times_out_and_its_commands_run_once(durable_url: str, share: Path) -> None:
    with Ledger(durable_url) as ledger:
        ledger.grant(USER, 10_000, "bonus", key="fund")
    server, stop = _start_server(durable_url, share)
    sender = Ledger(durable_url, share_group_commit=share, share_reply_timeout_s=2.0)
    try:
        for i in range(5):
            sender.spend(USER, 1, key=f"t:{i}")
        sent_before = sender.sharing_stats()
        assert sent_before is not None and sent_before.sent >= 1  # (a loaded machine may time one out)
        _stop_while_idle(server.pid)
        try:
            started = time.monotonic()
            for i in range(5, 10):  # the first waits out the timeout, then runs here
                sender.spend(USER, 1, key=f"t:{i}")
            # One timeout, not five: the others ran here at once.
            assert time.monotonic() - started < 2.0 + 6
        finally:
            os.kill(server.pid, signal.SIGCONT)
        stats = sender.sharing_stats()
        assert stats is not None and stats.sent == sent_before.sent and stats.sent + stats.ran_here == 10
    finally:
        sender.close()
    stop.set()
    server.join(60)  # it ran the command that timed out, as a replay
    _check_recorded(durable_url, {f"t:{i}" for i in range(10)} | {f"server-{server.pid}"}, 10_000)


@pytest.mark.slow
def test_many_processes_share_one_group_commit(durable_url: str, share: Path) -> None:
    with Ledger(durable_url) as ledger:
        ledger.grant(USER, 10_000, "bonus", key="fund")
    done = CTX.Queue()
    procs = _start_spenders(durable_url, share, "m", 4, 100, done)
    results = dict(done.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(30)
    _check_recorded(durable_url, {f"m{n}:{i}" for n in range(4) for i in range(100)}, 10_000)
    assert sum(s.sent for s in results.values()) > 0  # commands crossed processes
    assert not share.exists()  # the last server removed its socket


# ------------------------------------------------------------------ review: races and failures


def test_close_during_the_election_stops_the_serving_it_began(
    durable_url: str, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(durable_url, share_group_commit=share)
    shared = ledger._shared
    assert shared is not None
    entered, go = threading.Event(), threading.Event()
    listen = sharing.SharedGroupCommit._listen

    def slow_listen(self: sharing.SharedGroupCommit) -> socket.socket:
        entered.set()
        go.wait(10)
        return listen(self)

    monkeypatch.setattr(sharing.SharedGroupCommit, "_listen", slow_listen)
    spender = threading.Thread(target=lambda: ledger.grant(USER, 5, "bonus", key="racing"))
    spender.start()
    assert entered.wait(10)  # the lock is taken, the socket not yet bound
    closer = threading.Thread(target=shared.close)
    closer.start()
    time.sleep(0.2)
    go.set()
    closer.join(10)
    spender.join(10)
    try:
        assert not shared.serving and not share.exists()
        assert sharing._ServerLock(share.with_name(share.name + ".lock")).try_take()  # released
    finally:
        ledger.close()


def test_a_failed_accept_does_not_end_serving(pair: tuple[Ledger, Ledger], monkeypatch: pytest.MonkeyPatch) -> None:
    _, second = pair
    accept = socket.socket.accept
    failed: list[int] = []

    def flaky_accept(self: socket.socket) -> Any:
        if not failed:
            failed.append(1)
            raise OSError(errno.EMFILE, "Too many open files")  # a moment out of descriptors
        return accept(self)

    monkeypatch.setattr(socket.socket, "accept", flaky_accept)
    monkeypatch.setattr(sharing, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(sharing, "CONNECT_TIMEOUT_S", 0.5)
    time.sleep(0.5)  # the accepting thread meets the failure
    assert failed
    second.spend(USER, 1, key="after-emfile")
    stats = second.sharing_stats()
    assert stats is not None and stats.sent == 1 and stats.ran_here == 0


def test_a_full_server_lets_the_sender_run_its_command_at_once(
    pair: tuple[Ledger, Ledger], durable_url: str, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, second = pair
    monkeypatch.setattr(sharing, "MAX_SERVED_CONNECTIONS", 1)
    second.spend(USER, 1, key="holds-the-one-connection")
    third = Ledger(durable_url, share_group_commit=share)
    try:
        started = time.monotonic()
        third.spend(USER, 1, key="server-full")
        assert time.monotonic() - started < 1.0  # not CONNECT_TIMEOUT_S of retries
        stats = third.sharing_stats()
        assert stats is not None and stats.ran_here == 1
        monkeypatch.setattr(sharing, "MAX_SERVED_CONNECTIONS", 512)
        third.spend(USER, 1, key="server-has-room")  # no window of running commands here
        stats = third.sharing_stats()
        assert stats is not None and stats.sent == 1
    finally:
        third.close()


class _Stubborn(Exception):
    """An error pickle writes but cannot read back (its __init__ takes other arguments than its message)."""

    def __init__(self, user: object, why: str) -> None:
        super().__init__(f"{user}: {why}")


def test_a_reply_this_process_cannot_read_runs_the_command_here(
    pair: tuple[Ledger, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = pair
    served = first._shared
    assert served is not None

    def stubborn(command: object) -> Any:
        raise _Stubborn(USER, "an extension's error")

    monkeypatch.setattr(served.group, "execute", stubborn)
    receipt = second.spend(USER, 2, key="unreadable")  # here, as if never sent: the error it would have met here
    assert receipt.balance_credits == 998
    shared = second._shared
    assert shared is not None and shared._open == len(shared._idle) == 1  # the connection is kept, not leaked


def test_a_forked_child_closing_the_ledger_leaves_its_parents_socket(pair: tuple[Ledger, Ledger], share: Path) -> None:
    first, second = pair
    second.spend(USER, 1, key="before-fork")  # an idle connection the child inherits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a process with threads
        child = os.fork()
    if child == 0:  # a worker forked after the ledgers were made (a preloading web server), then closing them
        code = 1
        try:
            for ledger in (first, second):
                assert ledger._shared is not None
                ledger._shared.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert share.exists()
    second.spend(USER, 1, key="after-fork")  # on the connection the child had a copy of
    stats = second.sharing_stats()
    assert stats is not None and stats.sent == 2 and stats.ran_here == 0 and stats.resent == 0


def test_a_draft_of_the_secret_left_by_a_killed_process_is_no_obstacle(durable_url: str, share: Path) -> None:
    # A process killed while it wrote the secret's draft leaves it; a later one of the same pid (a container's) goes on.
    key = share.with_name(share.name + ".key")
    draft = key.with_name(f"{key.name}.{os.getpid()}.{threading.get_ident()}")
    draft.write_bytes(b"half")
    draft.chmod(0o600)
    with Ledger(durable_url, share_group_commit=share) as ledger:
        assert ledger.grant(USER, 1, "bonus", key="after-draft").balance_credits == 1
    assert len(key.read_bytes()) == 32
