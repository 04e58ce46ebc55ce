"""Group commit shared by the processes of one host.

Group commit batches the concurrent commands of one process. Processes that
each run their own (sixteen web or GPU workers) still commit one at a time
under the events table's lock, and each replays what the others wrote before
it can write an account. ``Ledger(url, share_group_commit=path)`` makes the
processes that name the same path share one group commit instead:

- The first of them to take the lock on ``path + ".lock"`` *serves*: it
  listens on the Unix socket at ``path`` and runs the commands the others
  send through its own group commit, beside its own. The others *send*:
  each command goes to the serving process, and its receipt or error comes
  back. A command runs in exactly one process, always in a transaction of
  that process's group commit.
- Nothing depends on which process serves. When it ends (closed, crashed,
  killed), the operating system releases its lock; the next process whose
  command finds no server takes the lock and serves, and the commands that
  were in flight are sent again. Every command carries its idempotency key,
  so a command sent again after it was recorded returns its first receipt.
- A process that cannot reach a server within ``CONNECT_TIMEOUT_S``, or
  whose command's reply takes longer than ``reply_timeout_s``, runs its
  commands itself for ``DIRECT_AFTER_TIMEOUT_S``, twice that after each
  timeout in a row up to ``MAX_DIRECT_S`` (correct either way: two
  processes that run one key race on its command record, and the second
  replays the first's receipt).
- Peers prove to each other that they hold the secret in ``path + ".key"``
  (32 random bytes, readable by their user only) before anything else
  crosses the socket, and that they opened the same store with the same
  options and release: a process whose store, options or release differ is
  refused, logs why, and runs its commands itself (a rolling deploy keeps
  working). Commands and results cross as pickles, which only such peers
  read.

POSIX only (Unix sockets and ``fcntl`` locks).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import pickle
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ledger.application.commands import Command
from ledger.application.group import CLOSE_TIMEOUT_S, GroupCommit, require_command
from ledger.application.results import Receipt
from ledger.errors import ConfigurationError, InvalidArgument, ViewsBehind

log = logging.getLogger(__name__)

#: The wire protocol's version; peers of different versions refuse each other.
PROTOCOL = b"pingvas-ledger-share-1"
#: A command or a result crosses the socket in at most this many bytes.
MAX_MESSAGE_BYTES = 1 << 20
#: Connections a serving process accepts at once (each is one thread).
MAX_SERVED_CONNECTIONS = 512
#: Connections a sending process holds open at most (one per command in flight).
MAX_SENDING_CONNECTIONS = 128
#: How long a process looks for a server (its socket, or the lock to become it).
CONNECT_TIMEOUT_S = 5.0
#: How long either side of a new connection waits for the other's proof.
HANDSHAKE_TIMEOUT_S = 5.0
#: How long a process runs its own commands after a reply timed out (doubled
#: after each timeout in a row, up to ``MAX_DIRECT_S``).
DIRECT_AFTER_TIMEOUT_S = 5.0
MAX_DIRECT_S = 60.0
#: Default and bounds of the time a command's reply may take.
DEFAULT_REPLY_TIMEOUT_S = 30.0
MAX_REPLY_TIMEOUT_S = 600.0
#: Times one command is sent again after its server went away while it was in flight.
MAX_RESENDS = 3
#: The longest socket path the operating system takes (``sun_path``, less its NUL).
MAX_SOCKET_PATH_BYTES = 103
_NONCE_BYTES = 32
_FRAME = struct.Struct(">I")

#: Reply statuses.
_OK, _ERROR, _NOT_HERE = 0, 1, 2


@dataclass(frozen=True)
class SharingStats:
    """What a process sharing group commit did so far (``Ledger.sharing_stats``)."""

    #: Whether this process serves now.
    serving: bool
    #: Commands this process sent to the serving process and got an answer for.
    sent: int
    #: Commands this process ran for other processes.
    served: int
    #: Commands this process ran itself: while serving, or with no server to send to.
    ran_here: int
    #: Times this process took the lock and began serving.
    elections: int
    #: Commands sent again because their server went away while they were in flight.
    resent: int


def check_share_path(value: object) -> Path:
    """The socket path of ``share_group_commit``: a string or path, absolute,
    in a directory that exists, short enough for a Unix socket."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidArgument(
            f"share_group_commit must be a path (str or os.PathLike), not {type(value).__name__}",
            param="share_group_commit",
        )
    path = Path(os.fspath(value))
    if not path.is_absolute():
        raise InvalidArgument(
            f"share_group_commit must be an absolute path, got {str(path)!r}", param="share_group_commit"
        )
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise InvalidArgument(
            f"share_group_commit must be at most {MAX_SOCKET_PATH_BYTES} bytes (a Unix socket's path), "
            f"got {str(path)!r}",
            param="share_group_commit",
        )
    try:
        directory = os.stat(path.parent)
    except FileNotFoundError:
        raise ConfigurationError(f"share_group_commit {str(path)!r}: its directory does not exist") from None
    if not stat.S_ISDIR(directory.st_mode):
        raise ConfigurationError(f"share_group_commit {str(path)!r}: {path.parent} is not a directory")
    if directory.st_uid != os.geteuid() or directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # In a directory others can write (/tmp), another user could take the
        # lock first, or stand up a socket of their own in its place.
        raise ConfigurationError(
            f"share_group_commit {str(path)!r}: {path.parent} must belong to this user and be writable by it "
            f"alone (owner uid {directory.st_uid}, mode {stat.filemode(directory.st_mode)})"
        )
    if not hasattr(socket, "AF_UNIX"):
        raise ConfigurationError("share_group_commit needs Unix sockets, which this platform lacks")
    return path


def check_reply_timeout(value: object) -> float:
    if type(value) not in (int, float) or not 0 < value <= MAX_REPLY_TIMEOUT_S:  # type: ignore[operator]
        raise InvalidArgument(
            f"share_reply_timeout_s must be a number of seconds within (0, {MAX_REPLY_TIMEOUT_S:g}], got {value!r}",
            param="share_reply_timeout_s",
        )
    return float(value)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the files beside the socket


def _check_own(path: Path, fd: int) -> None:
    """A file beside the socket must be this user's and nobody else's: another
    user who could write it could serve this ledger's commands or block them."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"{path} must belong to this user and be readable by it alone "
            f"(owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}): choose a directory only this user writes"
        )


def read_secret(path: Path) -> bytes:
    """The peers' shared secret in ``path``, made (atomically, by a link) by
    the first process that needs it."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            # A random name: a draft left by a process killed here must not stop a later one of its pid.
            draft = path.with_name(f"{path.name}.{os.urandom(8).hex()}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(_NONCE_BYTES))
            finally:
                os.close(fd)
            try:
                os.link(draft, path)  # whole or absent: a reader never sees it half written
            except FileExistsError:
                pass  # another process made it first: read theirs
            finally:
                os.unlink(draft)
            continue
        try:
            _check_own(path, fd)
            secret = os.read(fd, _NONCE_BYTES + 1)
        finally:
            os.close(fd)
        if len(secret) != _NONCE_BYTES:
            raise ConfigurationError(
                f"{path} is not a ledger's shared secret ({len(secret)} bytes, not {_NONCE_BYTES})"
            )
        return secret
    raise ConfigurationError(f"cannot make or read the shared secret {path}")


class _ServerLock:
    """The serving process's lock: an ``fcntl`` lock on a file that stays
    (removing it would let two processes lock two files of one name). The
    operating system releases it when the process ends, however it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_take(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            _check_own(self.path, fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


# ------------------------------------------------------------------ frames and proofs


class _Refused(Exception):
    """The serving process and this one cannot share: this one runs its commands itself."""


class _Busy(Exception):
    """The serving process holds ``MAX_SERVED_CONNECTIONS``: this command runs in its own process."""


#: The greeting of a server that takes no more connections (no proof: it only makes the sender run its command).
_BUSY = PROTOCOL + b"-busy"


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_FRAME.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the peer closed the connection")
        got += n
    return bytes(buffer)


def _recv_frame(sock: socket.socket) -> bytes:
    (size,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if size > MAX_MESSAGE_BYTES:
        raise EOFError(f"a message of {size} bytes, more than {MAX_MESSAGE_BYTES}: not a ledger peer")
    return _recv_exact(sock, size)


def _proof(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, PROTOCOL + role + nonce, hashlib.sha256).digest()


def _server_handshake(sock: socket.socket, secret: bytes, identity: bytes) -> bool:
    """The server's half: the client proves the secret and its identity, then the server proves the secret."""
    nonce = os.urandom(_NONCE_BYTES)
    _send_frame(sock, PROTOCOL + nonce)
    answer = _recv_frame(sock)
    proof, client_nonce, client_identity = answer[:32], answer[32:64], answer[64:]
    if len(client_nonce) != _NONCE_BYTES or not hmac.compare_digest(proof, _proof(secret, b"client", nonce)):
        return False
    same = hmac.compare_digest(client_identity, identity)
    _send_frame(sock, _proof(secret, b"server", client_nonce) + (b"\x01" if same else b"\x00"))
    return same


def _client_handshake(sock: socket.socket, secret: bytes, identity: bytes, path: Path) -> None:
    hello = _recv_frame(sock)
    if hello == _BUSY:
        raise _Busy
    if not hello.startswith(PROTOCOL) or len(hello) != len(PROTOCOL) + _NONCE_BYTES:
        raise _Refused(f"{path} is served by another version of the ledger's protocol")
    nonce = os.urandom(_NONCE_BYTES)
    _send_frame(sock, _proof(secret, b"client", hello[len(PROTOCOL) :]) + nonce + identity)
    reply = _recv_frame(sock)
    if not hmac.compare_digest(reply[:32], _proof(secret, b"server", nonce)):
        raise _Refused(f"the process serving {path} does not hold its secret ({path}.key)")
    if reply[32:] != b"\x01":
        raise _Refused(
            f"the process serving {path} opened another store, or the same one with other options or another "
            "release of the ledger"
        )


def _reply(status: int, value: object) -> bytes:
    try:
        return pickle.dumps((status, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    if isinstance(value, ViewsBehind):  # recorded: its receipt must reach the caller
        substitute: object = ViewsBehind(value.receipt, RuntimeError(f"{type(value.cause).__name__}: {value.cause}"))
    else:
        substitute = RuntimeError(f"{type(value).__name__}: {value}")
    return pickle.dumps((status, substitute), protocol=pickle.HIGHEST_PROTOCOL)


# ------------------------------------------------------------------ the shared group commit


class SharedGroupCommit:
    """One process's side of a group commit shared over ``path``: it sends
    its commands to the serving process, or serves when it holds the lock.
    Made by ``Ledger(url, share_group_commit=path)``."""

    def __init__(
        self,
        path: Path,
        group: GroupCommit,
        identity: bytes,
        *,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.group = group
        self.reply_timeout_s = reply_timeout_s
        self._identity = hashlib.sha256(PROTOCOL + identity).digest()
        self._secret = read_secret(path.with_name(path.name + ".key"))
        self._lock = _ServerLock(path.with_name(path.name + ".lock"))
        self._state = threading.Lock()
        self._electing = threading.Lock()
        self._serving = False
        self._closed = False
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._served_sockets: set[socket.socket] = set()
        self._serving_threads: set[threading.Thread] = set()
        self._idle: list[socket.socket] = []
        self._open = 0
        self._direct_until = 0.0
        #: Timeouts in a row (reply or connect): each doubles the time this process runs its commands itself.
        self._timeouts = 0
        self._sent = self._served = self._ran_here = self._elections = self._resent = 0
        self._pid = os.getpid()

    # -- callers ---------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def stats(self) -> SharingStats:
        return SharingStats(
            serving=self._serving,
            sent=self._sent,
            served=self._served,
            ran_here=self._ran_here,
            elections=self._elections,
            resent=self._resent,
        )

    def execute(self, command: Command) -> Receipt:
        """Runs ``command`` in the serving process (or here, when this process
        serves or no server answers); returns its receipt or raises its error."""
        require_command(command)
        if self._closed:
            raise ConfigurationError("the ledger is closed: its group commit takes no more commands")
        self._leave_parent()
        for _ in range(MAX_RESENDS + 1):
            if self._serving or time.monotonic() < self._direct_until:
                break
            try:
                payload = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # an extension's command holding something pickle cannot carry
                break
            sock = self._connection()
            if sock is None:
                break
            try:
                _send_frame(sock, payload)
                reply = _recv_frame(sock)
            except TimeoutError:
                self._discard(sock)
                self._go_direct(f"no reply from the process serving {self.path} within {self.reply_timeout_s:g} s")
                break
            except (OSError, EOFError):  # the server went away with the command in flight: send it again
                self._discard(sock)
                self._resent += 1
                continue
            self._give_back(sock)  # the whole reply was read: the connection is ready for the next command
            self._timeouts = 0
            try:
                status, value = pickle.loads(reply)
            except Exception as exc:  # e.g. an error whose class cannot be rebuilt from its pickle
                log.warning("cannot read the reply of %s (%s: %s): running it here", self.path, type(exc).__name__, exc)
                break  # by its key, here it replays what the server recorded, or meets the error typed
            if status == _NOT_HERE:  # the server cannot load this command's class
                break
            self._sent += 1
            if status == _ERROR:
                raise value
            result: Receipt = value
            return result
        self._ran_here += 1
        return self.group.execute(command)

    def close(self) -> None:
        """Stops serving (the commands being run finish and are answered; the
        senders find the next server) and closes the connections."""
        self._leave_parent()
        with self._electing, self._state:  # an election under way ends first: its serving is stopped here
            self._closed = True
            idle, self._idle = self._idle, []
            served = list(self._served_sockets)
            listener, self._listener = self._listener, None
        for sock in idle:
            sock.close()
        if listener is not None:
            self._stop_serving(listener, served)

    def _leave_parent(self) -> None:
        """In a child forked from the process that made this object, forgets
        what it inherited: the lock, the listening socket and the connections
        are its parent's (closing them here must not unlink the parent's
        socket or shut its connections down, nor may two processes read
        replies on one connection)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._state, self._electing = threading.Lock(), threading.Lock()  # another thread may have held them
        inherited = [*self._idle, *self._served_sockets, *([self._listener] if self._listener else [])]
        for sock in inherited:
            sock.close()  # this process's descriptor only: close() does not shut the connection down
        self._idle, self._served_sockets, self._serving_threads = [], set(), set()
        self._listener, self._accepting, self._serving, self._open = None, None, False, 0
        self._lock.release()  # likewise: an flock stays while the parent's descriptor is open

    # -- sending -----------------------------------------------------------------

    def _connection(self) -> socket.socket | None:
        """An idle connection to the server, or a new one; None when this
        process now serves, or no server can be reached."""
        with self._state:
            if self._idle:
                return self._idle.pop()
            if self._open >= MAX_SENDING_CONNECTIONS:
                return None
            self._open += 1
        sock: socket.socket | None = None
        try:
            sock = self._connect()
        finally:
            if sock is None:
                with self._state:
                    self._open -= 1
        return sock

    def _connect(self) -> socket.socket | None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not self._closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                sock.connect(os.fspath(self.path))
                _client_handshake(sock, self._secret, self._identity, self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if self._elect():
                    return None
            except _Busy:  # the server holds all the connections it takes: this command runs here
                sock.close()
                return None
            except _Refused as refused:
                sock.close()
                self._go_direct(f"{refused}: every process sharing a path must open the ledger alike")
                return None
            except (OSError, EOFError):  # the server went away mid-handshake, or timed out
                sock.close()
            else:
                sock.settimeout(self.reply_timeout_s)
                return sock
            if time.monotonic() >= deadline:
                self._go_direct(f"no process answers on {self.path}, and its lock is taken")
                return None
            time.sleep(0.005)
        return None

    def _go_direct(self, why: str) -> None:
        """Runs this process's commands itself for a while: twice as long
        after each timeout in a row (up to ``MAX_DIRECT_S``), so that a hung
        server costs a timeout now and then, not on every command."""
        self._timeouts += 1
        direct_s = min(DIRECT_AFTER_TIMEOUT_S * 2 ** (self._timeouts - 1), MAX_DIRECT_S)
        self._direct_until = time.monotonic() + direct_s
        log.warning("%s: running commands in this process for %.0f s", why, direct_s)

    def _give_back(self, sock: socket.socket) -> None:
        with self._state:
            if not self._closed:
                self._idle.append(sock)
                return
            self._open -= 1
        sock.close()

    def _discard(self, sock: socket.socket) -> None:
        """Closes a connection that failed, and the idle ones with it: they
        are to the same server, which is gone or stalled."""
        with self._state:
            idle, self._idle = self._idle, []
            self._open -= 1 + len(idle)
        for dead in (sock, *idle):
            dead.close()

    # -- serving -------------------------------------------------------------------

    def _elect(self) -> bool:
        """Takes the lock and serves, if no other process holds it."""
        with self._electing:
            if self._serving:
                return True
            if self._closed or not self._lock.try_take():
                return False
            try:
                listener = self._listen()
            except BaseException:
                self._lock.release()
                raise
            with self._state:
                self._listener = listener
                self._serving = True
                self._elections += 1
            self._accepting = threading.Thread(
                target=self._accept, args=(listener,), name="ledger-share-accept", daemon=True
            )
            self._accepting.start()
            log.info("serving the group commit shared over %s", self.path)
            return True

    def _listen(self) -> socket.socket:
        # The lock is ours: a socket file there is a dead server's.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(self.path))
            # The socket itself: this user only. (Not by umask, which is the
            # whole process's: a host thread's file made meanwhile would get it.
            # Until the chmod, the private directory keeps others out.)
            os.chmod(self.path, 0o600)
            listener.listen(MAX_SERVED_CONNECTIONS)
            listener.settimeout(0.2)  # to see close() without a wake-up connection
        except BaseException:
            listener.close()
            raise
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close(), or a moment out of descriptors or memory
                if self._listener is not listener:
                    break
                log.warning("accepting on %s failed", self.path, exc_info=True)
                time.sleep(0.05)
                continue
            with self._state:
                full = len(self._served_sockets) >= MAX_SERVED_CONNECTIONS or self._listener is not listener
                if not full:
                    self._served_sockets.add(sock)
            if full:
                with contextlib.suppress(OSError):
                    sock.settimeout(0.1)
                    _send_frame(sock, _BUSY)  # the sender runs its command itself
                sock.close()
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), name="ledger-share-serve", daemon=True)
            with self._state:
                self._serving_threads.add(thread)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: the sender finds the connection closed and sends again
                log.warning("cannot start a thread to serve a connection on %s", self.path, exc_info=True)
                with self._state:
                    self._serving_threads.discard(thread)
                    self._served_sockets.discard(sock)
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            if not _server_handshake(sock, self._secret, self._identity):
                return
            sock.settimeout(None)  # an idle sender's connection waits for its next command
            while True:
                request = _recv_frame(sock)
                _send_frame(sock, self._run(request))
        except (OSError, EOFError):
            pass  # the sender went away, or this process stopped serving
        finally:
            with self._state:
                self._served_sockets.discard(sock)
                self._serving_threads.discard(threading.current_thread())
            sock.close()

    def _run(self, request: bytes) -> bytes:
        try:
            command = pickle.loads(request)
        except Exception as exc:  # a class this process's code lacks
            return _reply(_NOT_HERE, f"{type(exc).__name__}: {exc}")
        if not isinstance(command, Command):
            return _reply(_NOT_HERE, f"not a ledger command: {type(command).__name__}")
        if self._closed:  # this process is closing its store: the sender runs the command itself
            return _reply(_NOT_HERE, "the serving process is closing")
        try:
            receipt = self.group.execute(command)
        except Exception as exc:
            return _reply(_ERROR, exc)
        self._served += 1
        return _reply(_OK, receipt)

    def _stop_serving(self, listener: socket.socket, served: list[socket.socket]) -> None:
        # Remove the socket while the lock is held: a sender that finds it
        # gone elects, and only takes the lock once it is released below.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener.close()
        if self._accepting is not None:
            self._accepting.join(1.0)
        for sock in served:
            # The read side only: a thread running a command still sends its
            # answer; an idle one sees the end and stops.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        # The commands being run must finish before the ledger closes their store.
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        with self._state:
            threads = list(self._serving_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._serving = False
        self._lock.release()


def identity_of(*parts: object) -> bytes:
    """What peers must agree on, as bytes: the store and the options a
    command runs under, and the shape of what crosses the socket."""
    return repr((parts, _wire_shapes())).encode()


def _wire_shapes() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The fields of the core's commands and results: processes of two
    releases (a rolling deploy) whose commands or receipts differ must not
    exchange pickles of them. An extension's commands, loaded or not, are
    left out, so that every process computes the same shapes."""
    import dataclasses

    from ledger.application import results

    shapes: list[tuple[str, tuple[str, ...]]] = []
    pending: list[type] = [Command]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("ledger.") and dataclasses.is_dataclass(cls):
            shapes.append((f"{cls.__module__}.{cls.__qualname__}", tuple(f.name for f in dataclasses.fields(cls))))
    for name, value in vars(results).items():
        fields = getattr(value, "model_fields", None)
        if isinstance(value, type) and isinstance(fields, dict):
            shapes.append((f"results.{name}", tuple(fields)))
    return tuple(sorted(set(shapes)))
