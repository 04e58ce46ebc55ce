"""Snapshots are checked before they are trusted (the storage half; the
audit's replay of every snapshot is ``ledger.audit.snapshots``).

A snapshot is a cache of an account's events: nothing may trust it more than
the events it claims to summarise. On load, every snapshot must carry a
*seal*: SHA-256 over its account id, version and topic, the hash of the
stored event at its version, and the canonical encoding of its state. A
snapshot without a seal, with a seal that does not match, at a version the
account's events do not reach, or of anything but an account, is not used:
the loader logs a warning (``ledger.snapshots``) and replays the account's
events instead, and the account's next command writes a sealed snapshot in
its place. The seal is unkeyed: it catches a snapshot edited by hand,
corrupted, or left behind by a rewritten event, but whoever can write the
table can recompute it; ``audit`` and ``verify`` name such a snapshot by
replaying its events (docs/decisions.md, "Sealed snapshots").
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import Any

from eventsourcing.persistence import StoredEvent

from ledger.domain.credits import TOPIC_PREFIX

_HEAD = struct.Struct(">QQQ")  # originator id (as two 8-byte halves), version
_LENGTH = struct.Struct(">I")
_TOPICS: dict[str, bytes] = {}  # a topic's canonical bytes (length and UTF-8); a log has a few dozen


def _topic(topic: str) -> bytes:
    encoded = _TOPICS.get(topic)
    if encoded is None:
        raw = topic.encode()
        encoded = _TOPICS[topic] = _LENGTH.pack(len(raw)) + raw
    return encoded


def content_bytes(notification: Any) -> bytes:
    """A stored event's canonical bytes, less its notification id: what the
    seals here and the audit's hash chain (``ledger.audit.digest``) cover."""
    state = notification.state
    return b"".join(
        (
            _HEAD.pack(*divmod(notification.originator_id.int, 1 << 64), notification.originator_version),
            _topic(notification.topic),
            _LENGTH.pack(len(state)),
            state,
        )
    )


log = logging.getLogger("ledger.snapshots")

_SEAL_PREFIX = b"pingvas-ledger snapshot seal 1\x00"
_VERSION = struct.Struct(">Q")
#: Why a snapshot written before snapshots were sealed is not used.
UNSEALED = "it carries no seal (written before snapshots were sealed)"


def seal(transcoder: Any, snapshot: Any, event_at: Any) -> str:
    """The seal of ``snapshot`` over the stored event at its version."""
    digest = hashlib.sha256(_SEAL_PREFIX)
    digest.update(snapshot.originator_id.bytes)
    digest.update(_VERSION.pack(snapshot.originator_version))
    topic = snapshot.topic.encode()
    digest.update(_VERSION.pack(len(topic)) + topic)
    digest.update(hashlib.sha256(content_bytes(event_at)).digest())
    digest.update(transcoder.encode(snapshot.state))
    return digest.hexdigest()


def sealed(transcoder: Any, snapshot: Any, event_at: Any) -> Any:
    """``snapshot`` with its seal (stored with it, as one more attribute)."""
    object.__setattr__(snapshot, "seal", seal(transcoder, snapshot, event_at))
    return snapshot


def refusal(mapper: Any, stored: StoredEvent, event_at: StoredEvent | None) -> tuple[Any, str | None]:
    """The decoded snapshot and None when it can be trusted, else (None or the
    decoded snapshot, why not). A ledger aggregate ``A`` (topic
    ``pingvas.ledger:A``) is snapshotted as ``pingvas.ledger:A.Snapshot`` and
    its events are ``pingvas.ledger:A.<event>``: a snapshot must be of the kind
    of the events at its id."""
    try:
        snapshot = mapper.to_domain_event(stored)
    except Exception as exc:  # an edited state or topic: not readable at all
        return None, f"it cannot be read: {type(exc).__name__}: {exc}"
    aggregate = getattr(snapshot, "topic", None)
    if not isinstance(aggregate, str) or not isinstance(getattr(snapshot, "state", None), dict):
        return None, "it is not a snapshot of an aggregate"
    if not aggregate.startswith(TOPIC_PREFIX + ":") or stored.topic != f"{aggregate}.Snapshot":
        return None, f"it is a {stored.topic!r} of a {aggregate!r}: not a snapshot the ledger writes"
    if event_at is None or event_at.originator_version != stored.originator_version:
        return snapshot, f"there is no event at its version {stored.originator_version}"
    if not event_at.topic.startswith(aggregate + "."):
        return snapshot, f"the event at its version is a {event_at.topic!r}, not one of a {aggregate!r}"
    found = getattr(snapshot, "seal", None)
    if found is None:
        return snapshot, UNSEALED
    try:
        expected = seal(mapper.transcoder, snapshot, event_at)
    except Exception as exc:  # state the transcoder cannot encode again
        return snapshot, f"its state cannot be encoded: {type(exc).__name__}: {exc}"
    if found != expected:
        return snapshot, "its seal does not match its state and the event at its version"
    return snapshot, None


def trusted(app: Any, stored: StoredEvent, event_at: StoredEvent | None) -> Any | None:
    """The snapshot to start from, or None to replay the events. A refused
    snapshot is logged, and its account marked for a fresh sealed snapshot
    at its next save (``app.unsealed``)."""
    snapshot, why = refusal(app.mapper, stored, event_at)
    if why is None:
        return snapshot
    unsealed = getattr(app, "unsealed", None)
    if unsealed is not None:
        unsealed.add(stored.originator_id)
    level = logging.INFO if why == UNSEALED else logging.WARNING
    log.log(
        level,
        "snapshot of %s at version %d not used, replaying its events instead: %s",
        stored.originator_id,
        stored.originator_version,
        why,
    )
    return None
