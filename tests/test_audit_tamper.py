"""Tampering with stored events, behind the ledger's back, with raw SQL: the
hash chain proves the history changed and names where; the audit names what
the change broke. SQLite and PostgreSQL (the ``ledger_events`` table)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from ledger import Auditor, AuditReport, DigestHead, GrantCredits, Ledger, ManualClock, SpendCredits, VerifyResult
from ledger.storage.config import parse_url
from tests.conftest import START, pg_base_url

HOUR = timedelta(hours=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tamper.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url


class RawEvents:
    """The event table, reached around the ledger."""

    def __init__(self, url: str) -> None:
        config = parse_url(url)
        self.postgres = config.backend == "postgresql"
        if self.postgres:
            self.conn: Any = psycopg.connect(pg_base_url(), autocommit=True)
            self.table = f'"{config.pg_schema}".ledger_events'
            self.digests = f'"{config.pg_schema}".ledger_digests'
            self.id = "notification_id"
            self.mark = "%s"
        else:
            assert config.sqlite_path is not None
            self.conn = sqlite3.connect(config.sqlite_path, isolation_level=None)
            self.table, self.id, self.mark = "stored_events", "rowid", "?"
            self.digests = "ledger_digests"

    def sql(self, statement: str, *params: Any) -> list[Any]:
        cursor = self.conn.execute(statement.replace("%s", self.mark).format(t=self.table, id=self.id), params)
        return list(cursor.fetchall()) if cursor.description else []

    def state(self, position: int) -> bytes:
        return bytes(self.sql("SELECT state FROM {t} WHERE {id} = %s", position)[0][0])

    def write_json(self, position: int, state: Any) -> None:
        """Replaces the event's state with ``state`` encoded as JSON."""
        self.sql("UPDATE {t} SET state = %s WHERE {id} = %s", json.dumps(state).encode(), position)

    def position_of(self, topic_suffix: str, nth: int = 0) -> int:
        rows = self.sql("SELECT {id}, topic FROM {t} ORDER BY {id}")
        return [p for p, topic in rows if topic.endswith(topic_suffix)][nth]

    def alter(self, position: int, old: bytes, new: bytes) -> None:
        state = self.state(position)
        assert old in state
        self.sql("UPDATE {t} SET state = %s WHERE {id} = %s", state.replace(old, new, 1), position)

    def delete(self, position: int) -> None:
        self.sql("DELETE FROM {t} WHERE {id} = %s", position)

    def swap(self, a: int, b: int) -> None:
        self.sql("UPDATE {t} SET {id} = -1 WHERE {id} = %s", a)
        self.sql("UPDATE {t} SET {id} = %s WHERE {id} = %s", a, b)
        self.sql("UPDATE {t} SET {id} = %s WHERE {id} = -1", b)

    def copy_as_next_version(self, position: int) -> None:
        """The event at ``position`` again, as its aggregate's next version, at the end of the log."""
        [(originator, topic, state)] = self.sql("SELECT originator_id, topic, state FROM {t} WHERE {id} = %s", position)
        [(last,)] = self.sql("SELECT MAX(originator_version) FROM {t} WHERE originator_id = %s", originator)
        self.sql(
            "INSERT INTO {t} (originator_id, originator_version, topic, state) VALUES (%s, %s, %s, %s)",
            originator,
            last + 1,
            topic,
            state,
        )

    def close(self) -> None:
        self.conn.close()


@contextmanager
def raw_events(url: str) -> Iterator[RawEvents]:
    raw = RawEvents(url)
    try:
        yield raw
    finally:
        raw.close()


def story(url: str) -> None:
    clock = ManualClock(START)
    with Ledger(url, clock=clock) as ledger:
        alice, bob = uuid4(), uuid4()
        ledger.grant(alice, 300, "purchase", key=f"{alice}:g")
        ledger.grant(bob, 80, "bonus", key=f"{bob}:g")
        hold = ledger.reserve(alice, uuid4(), 100, clock.now() + HOUR, key=f"{alice}:r")
        clock.advance(timedelta(minutes=5))
        ledger.settle(hold.reservation_id, 60, key=f"{alice}:s")  # type: ignore[arg-type]
        ledger.spend(bob, 30, key=f"{bob}:spend")
        clock.advance(timedelta(minutes=5))
        ledger.spend(alice, 25, key=f"{alice}:spend")
        ledger.views.catch_up()


def head_and_audit(url: str) -> DigestHead:
    with Auditor(url) as auditor:
        result = auditor.digest(every=10)
        assert result.ok and auditor.audit().ok
        return result.head


def verify(url: str, head: DigestHead) -> VerifyResult:
    with Auditor(url) as auditor:
        return auditor.verify(head)


def audit(url: str) -> AuditReport:
    with Auditor(url) as auditor:
        return auditor.audit()


def named(result: VerifyResult) -> list[tuple[int, str]]:
    return [(p.position, p.kind) for p in result.problems]


def positions(report: AuditReport, check: str) -> set[int | None]:
    return {f.position for f in report.findings if f.check == check}


def test_an_untouched_history_verifies(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    result = verify(durable_url, head)
    assert result.ok and result.history_intact and result.anchored_events == head.events
    assert "unchanged" in result.describe()[0]


def test_an_altered_event_is_named(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        spend = raw.position_of("CreditAccount.Debited", 1)  # alice's spend of 25
        raw.alter(spend, b'"amount":25', b'"amount":5')
    result = verify(durable_url, head)
    assert not result.ok and not result.history_intact
    assert named(result) == [(spend, "altered")]
    report = audit(durable_url)
    # The receipt and the views still say 25: both are named at the event.
    assert spend in positions(report, "view")
    assert any("receipt says" in f.message for f in report.findings if f.check == "key")


def test_a_deleted_event_is_named(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        spend = raw.position_of("CreditAccount.Debited", 0)  # bob's spend
        raw.delete(spend)
    assert named(verify(durable_url, head)) == [(spend, "deleted")]
    report = audit(durable_url)
    assert spend in positions(report, "view")  # its credit_transactions row has no event now
    assert any("no account event" in f.message for f in report.findings if f.check == "key")


def test_a_deleted_last_event_is_named(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        raw.delete(head.position)
    assert named(verify(durable_url, head)) == [(head.position, "deleted")]
    report = audit(durable_url)
    assert any("past the log's head" in f.message for f in report.findings)


def test_reordered_events_are_named(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        first = raw.position_of("CreditAccount.Granted", 0)
        second = raw.position_of("CreditAccount.Granted", 1)
        raw.swap(first, second)
    result = verify(durable_url, head)
    assert named(result) == [(first, "moved"), (second, "moved")]
    assert result.problems[0].moved_from == second


def test_a_command_applied_twice_is_named_by_the_audit(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        grant = raw.position_of("CreditAccount.Granted", 1)
        raw.copy_as_next_version(grant)  # bob's grant, applied again
        [(copy,)] = raw.sql("SELECT MAX({id}) FROM {t}")
    # The copy sits after the digest's position: the digest covers what it covers.
    assert verify(durable_url, head).ok
    report = audit(durable_url)
    assert copy in positions(report, "key") and copy in positions(report, "block")
    assert any("no CommandRecord" in f.message for f in report.findings)


def test_an_event_written_below_the_first_id_is_named(durable_url: str) -> None:
    """The tools read the log from id 1, the ledger loads an account by
    version whatever the ids: a grant written at id -5 was spendable while
    verify, digest and the audit all passed."""
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        grant = raw.position_of("CreditAccount.Granted", 1)  # bob's grant
        [(originator, topic, state)] = raw.sql("SELECT originator_id, topic, state FROM {t} WHERE {id} = %s", grant)
        [(last,)] = raw.sql("SELECT MAX(originator_version) FROM {t} WHERE originator_id = %s", originator)
        raw.sql(
            "INSERT INTO {t} ({id}, originator_id, originator_version, topic, state) VALUES (-5, %s, %s, %s, %s)",
            originator,
            last + 1,
            topic,
            bytes(state).replace(b'"amount":80', b'"amount":800'),
        )
    result = verify(durable_url, head)
    assert not result.history_intact and named(result) == [(-5, "inserted")]
    with Auditor(durable_url) as auditor:
        assert not auditor.digest(every=10).ok
    report = audit(durable_url)
    assert not report.ok and -5 in positions(report, "sequence")


def test_rewritten_anchors_cannot_hide_a_change(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        raw.alter(raw.position_of("CreditAccount.Granted", 0), b'"amount":300', b'"amount":900')
        raw.sql(f"DELETE FROM {raw.digests}")
    with Auditor(durable_url) as auditor:
        assert auditor.digest(every=10).ok  # anchors the altered history afresh
    result = verify(durable_url, head)
    assert not result.history_intact and result.problems == []
    assert "cannot be named" in "\n".join(result.describe())


def test_an_edited_anchor_is_reported(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        raw.sql(f"UPDATE {raw.digests} SET digest = %s WHERE segment = 0", "0" * 64)
    result = verify(durable_url, head)
    assert result.history_intact and not result.ok
    assert [p.kind for p in result.problems] == ["anchor"]


def test_an_anchor_row_that_cannot_be_read_is_reported_not_a_crash(durable_url: str) -> None:
    """Leaves cut short by hand made verify and digest die in struct.unpack."""
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        raw.sql(f"UPDATE {raw.digests} SET leaves = %s WHERE segment = 0", b"\x01\x02")
    result = verify(durable_url, head)
    assert result.history_intact and not result.ok
    assert result.problems[0].kind == "anchor"
    assert "segment 0 cannot be read: its leaves are 2 bytes, not a multiple of 16" in result.problems[0].message
    assert "the events are intact, but ledger_digests rows were edited" in "\n".join(result.describe())
    with Auditor(durable_url) as auditor:
        refused = auditor.digest(every=10)
    assert not refused.ok and refused.segments_written == 0


def test_digest_refuses_to_anchor_a_changed_history(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        spend = raw.position_of("CreditAccount.Debited", 0)
        raw.alter(spend, b'"amount":30', b'"amount":3')
    with Auditor(durable_url) as auditor:
        result = auditor.digest(every=10)
        incremental = auditor.digest(every=10, incremental=True)
    assert not result.ok and result.segments_written == 0
    assert [(p.position, p.kind) for p in result.problems] == [(spend, "altered")]
    # Incremental trusts the stored anchors: it extends them and sees nothing.
    assert incremental.ok and incremental.head.position == head.position


def test_an_event_relabelled_with_another_topic_is_named_not_a_crash(durable_url: str) -> None:
    """The mapper builds whatever class the topic names from the stored state:
    a Debited relabelled Granted decoded, and the audit died on the grant's
    missing expires_at instead of reporting."""
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        spend = raw.position_of("CreditAccount.Debited", 0)
        raw.sql("UPDATE {t} SET topic = %s WHERE {id} = %s", "pingvas.ledger:CreditAccount.Granted", spend)
    assert named(verify(durable_url, head)) == [(spend, "altered")]
    [finding] = [f for f in audit(durable_url).findings if f.check == "decode"]
    assert finding.position == spend
    assert "does not fit CreditAccount.Granted: no expires_at; draws not fields of it" in finding.message


@pytest.mark.parametrize("originator_topic", ["pingvas.ledger:CommandRecord", "no.such:Aggregate"])
def test_an_account_opened_as_another_aggregate_is_named(durable_url: str, originator_topic: str) -> None:
    """A created event's originator_topic names the class the ledger builds
    the aggregate as: an account's Opened relabelled so could not be loaded
    (balance() and every command on it raised), and the audit passed."""
    story(durable_url)
    head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        opened = raw.position_of("CreditAccount.Opened", 0)
        state = json.loads(raw.state(opened))
        state["originator_topic"] = originator_topic
        raw.write_json(opened, state)
    report = audit(durable_url)
    [finding] = [f for f in report.findings if f.check == "decode"]
    assert finding.position == opened
    assert f"its originator_topic {originator_topic!r} is not the aggregate a CreditAccount.Opened creates" in (
        finding.message
    )


def test_an_event_with_a_value_of_the_wrong_type_is_named_not_a_crash(durable_url: str) -> None:
    """A grant whose key was nulled decodes and fits its class; the account
    check died deriving the entry id from the key."""
    story(durable_url)
    head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        grant = raw.position_of("CreditAccount.Granted", 1)
        state = json.loads(raw.state(grant))
        state["key"] = None
        raw.write_json(grant, state)
    report = audit(durable_url)
    assert not report.ok
    assert [(f.position, f.message.split(":")[0]) for f in report.findings if f.check == "decode"] == [
        (grant, "cannot be checked (pingvas.ledger")
    ]


@pytest.mark.postgres
def test_an_event_inserted_into_a_gap_is_named(pg_url: str) -> None:
    story(pg_url)
    schema = parse_url(pg_url).pg_schema
    with raw_events(pg_url) as raw:
        # A rolled-back save leaves a gap in the ids; a forger can fill it.
        [(gap,)] = raw.sql(f"SELECT nextval(pg_get_serial_sequence('\"{schema}\".ledger_events', 'notification_id'))")
    story(pg_url)
    head = head_and_audit(pg_url)
    with raw_events(pg_url) as raw:
        [(originator, topic, state)] = raw.sql(
            "SELECT originator_id, topic, state FROM {t} WHERE topic LIKE %s ORDER BY {id} LIMIT 1", "%Granted"
        )
        raw.sql(
            "INSERT INTO {t} (notification_id, originator_id, originator_version, topic, state) "
            "VALUES (%s, %s, 99, %s, %s)",
            gap,
            originator,
            topic,
            state,
        )
    assert named(verify(pg_url, head)) == [(gap, "inserted")]
    assert gap in positions(audit(pg_url), "sequence")


def test_verify_reads_only_and_needs_no_anchors(durable_url: str) -> None:
    story(durable_url)
    with Auditor(durable_url) as auditor:
        head = auditor.audit().digest  # the audit's own digest, no anchors written
        assert auditor.verify(head).ok
    with raw_events(durable_url) as raw:
        found = raw.sql(
            "SELECT to_regclass(%s) IS NOT NULL"
            if raw.postgres
            else "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = %s",
            raw.digests if raw.postgres else "ledger_digests",
        )
        assert not found[0][0]
        raw.alter(raw.position_of("CreditAccount.Granted"), b'"amount":300', b'"amount":301')
    result = verify(durable_url, DigestHead.parse(head))
    assert not result.history_intact and result.problems == []
    assert "cannot be named" in result.describe()[-1]


def test_a_resumed_audit_finds_events_changed_before_its_checkpoint(durable_url: str, tmp_path: Path) -> None:
    """A resumed run starts from the checkpoint's state and link: events at
    or before its position edited since were never read, the run passed, and
    its digest was the outside head of the history as it had been."""
    story(durable_url)
    head = head_and_audit(durable_url)
    checkpoint = tmp_path / "audit.ckpt"
    with Auditor(durable_url) as auditor:
        assert auditor.audit(checkpoint=checkpoint).ok
    with raw_events(durable_url) as raw:
        raw.alter(raw.position_of("CreditAccount.Granted", 0), b'"amount":300', b'"amount":3000')
    with Auditor(durable_url) as auditor:
        resumed = auditor.audit(from_position=head.position, checkpoint=checkpoint)
    assert not resumed.ok
    [finding] = resumed.findings
    assert finding.check == "checkpoint" and finding.position == head.position
    assert "changed since the checkpoint was written" in finding.message
    assert resumed.digest != str(head)  # the head of the history as it is now
    assert resumed.digest == str(verify(durable_url, head).computed)


def test_a_digest_expecting_the_last_head_refuses_a_re_anchored_forgery(durable_url: str) -> None:
    """Events and anchors rewritten together: a plain digest anchors the
    forged history afresh and prints a new head, which then verifies. Given
    the last head kept outside, digest refuses to anchor a history that does
    not pass through it."""
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        raw.alter(raw.position_of("CreditAccount.Granted", 0), b'"amount":300', b'"amount":900')
        raw.sql(f"DELETE FROM {raw.digests}")
    with Auditor(durable_url) as auditor:
        refused = auditor.digest(every=10, expect=head)
        assert not refused.ok and refused.segments_written == 0
        assert [(p.position, p.kind) for p in refused.problems] == [(head.position, "head")]
        assert "not the head kept outside" in refused.problems[0].message
        with raw_events(durable_url) as raw:
            assert raw.sql(f"SELECT COUNT(*) FROM {raw.digests}") == [(0,)]
        with pytest.raises(ValueError, match="incremental"):
            auditor.digest(every=10, expect=head, incremental=True)


def test_a_digest_expecting_the_last_head_anchors_a_history_that_grew_from_it(durable_url: str) -> None:
    story(durable_url)
    head = head_and_audit(durable_url)
    story(durable_url)  # more events after the head
    with Auditor(durable_url) as auditor:
        result = auditor.digest(every=10, expect=str(head))
        assert result.ok and result.head.position > head.position and result.segments_written > 0
        assert auditor.verify(result.head).ok and auditor.verify(head).ok
        # A head past the end of the log is not one the history passes through.
        beyond = DigestHead(result.head.position + 5, result.head.digest)
        assert [p.kind for p in auditor.digest(every=10, expect=beyond).problems] == ["head"]


def rewrite_record(raw: RawEvents, key_suffix: str, edit: Any) -> int:
    """Edits the CommandRecord whose key ends with ``key_suffix`` in place; its position."""
    for position, topic, state in raw.sql("SELECT {id}, topic, state FROM {t} ORDER BY {id}"):
        record = json.loads(bytes(state))
        if topic.endswith("CommandRecord.Recorded") and record["key"].endswith(key_suffix):
            edit(record)
            raw.write_json(position, record)
            return int(position)
    raise AssertionError(f"no record of a key ending {key_suffix!r}")


def test_a_grant_rewritten_with_its_receipts_but_not_its_arguments_is_named(durable_url: str) -> None:
    """A grant of 300 edited to 3000, with its receipt and the balance every
    later receipt of the account reported: the audit passed, while the
    record still said the command granted 300 (and a retry of that command
    was answered with the forged receipt)."""
    story(durable_url)
    head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        grant = raw.position_of("CreditAccount.Granted", 0)
        raw.alter(grant, b'"amount":300', b'"amount":3000')

        def more(record: dict[str, Any]) -> None:
            record["receipt"]["balance_credits"] += 2700
            record["receipt"]["available_credits"] += 2700

        def granted(record: dict[str, Any]) -> None:
            record["receipt"]["amount_credits"] = 3000
            more(record)

        record = rewrite_record(raw, ":g", granted)  # alice's grant is the first ":g"
        for suffix in (":r", ":s", ":spend"):
            state = json.loads(raw.state(raw.position_of("CreditAccount.Reserved")))
            alice = state["key"].split(":")[0]
            rewrite_record(raw, f"{alice}{suffix}", more)
    with Auditor(durable_url) as auditor:
        report = auditor.audit(compare_views=False)
    assert [(f.check, f.position) for f in report.findings] == [("key", record)], report.render()
    assert "its arguments say amount 300; the event at position" in report.findings[0].message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("available_credits", 999, "receipt says balance 50, held 0, available 999"),
        ("key", "another", "receipt is of key 'another', command 'spend'"),
        ("command", "grant", "receipt is of key"),
    ],
)
def test_a_receipt_edited_where_it_answers_the_caller_is_named(
    durable_url: str, field: str, value: object, message: str
) -> None:
    story(durable_url)
    head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        state = json.loads(raw.state(raw.position_of("CreditAccount.Debited", 0)))  # bob's spend

        def edit(record: dict[str, Any]) -> None:
            record["receipt"][field] = value

        record = rewrite_record(raw, state["key"], edit)
    report = audit(durable_url)
    assert [(f.check, f.position) for f in report.findings] == [("key", record)], report.render()
    assert message in report.findings[0].message


@pytest.mark.parametrize("resumed", [False, True])
def test_a_settle_moved_onto_lapsed_credits_its_hold_never_earmarked_is_named(
    durable_url: str, tmp_path: Path, resumed: bool
) -> None:
    """A hold earmarks a purchase; a bonus granted after it lapses before the
    settle, which expires the bonus's 100 credits. Rewritten so that the
    settle draws the lapsed bonus and the expiry takes only the other 50
    (receipt and views to match), the account kept 50 credits it never had
    and the audit passed: a settle may draw lapsed credits, but only those
    its own hold earmarked. A run resumed from a checkpoint taken while the
    hold was open knows what it earmarks."""
    clock = ManualClock(START)
    user = uuid4()
    with Ledger(durable_url, clock=clock) as ledger:
        purchase = ledger.grant(user, 100, "purchase", key="purchase").entry_id
        hold = ledger.reserve(user, uuid4(), 50, clock.now() + 2 * HOUR, key="reserve")
        bonus = ledger.grant(user, 100, "bonus", key="bonus", expires_in=HOUR).entry_id
    checkpoint, start = tmp_path / "audit.ckpt", 0
    if resumed:
        with Auditor(durable_url) as auditor:
            start = auditor.audit(checkpoint=checkpoint).head
    with Ledger(durable_url, clock=clock) as ledger:
        clock.advance(90 * timedelta(minutes=1))
        assert ledger.settle(hold.reservation_id, 50, key="settle").balance_credits == 50
    with raw_events(durable_url) as raw:
        settled = raw.position_of("CreditAccount.Settled")
        raw.alter(settled, str(purchase).encode(), str(bonus).encode())
        raw.alter(raw.position_of("CreditAccount.Expired"), b'"amount":100', b'"amount":50')

        def receipt(record: dict[str, Any]) -> None:
            record["receipt"]["balance_credits"] = record["receipt"]["available_credits"] = 100

        rewrite_record(raw, "settle", receipt)
    with Ledger(durable_url, clock=clock) as ledger:
        ledger.views.swap_in(ledger.views.build_aside())
        assert ledger.balance(user).balance_credits == 100
    with Auditor(durable_url) as auditor:
        report = auditor.audit(from_position=start, checkpoint=checkpoint if resumed else None)
    assert [(f.check, f.position) for f in report.findings] == [("block", settled)], report.render()
    assert f"draws 50 credits from block {bonus}, lapsed at" in report.findings[0].message
    assert "which its hold earmarks 0 of" in report.findings[0].message


def test_a_coherent_rewrite_passes_the_audit_and_fails_verify(durable_url: str) -> None:
    """The trust model (docs/auditing.md): a grant's amount rewritten with
    everything that follows from it (receipts, arguments, fingerprint, the
    views) is a history the ledger could have recorded. The audit passes it;
    only the head kept outside catches it."""
    story(durable_url)
    head = head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        grant = raw.position_of("CreditAccount.Granted", 0)
        alice = json.loads(raw.state(grant))["key"].split(":")[0]
        raw.alter(grant, b'"amount":300', b'"amount":3000')

        def granted(record: dict[str, Any]) -> None:
            record["receipt"]["amount_credits"] = record["arguments"]["amount_credits"] = 3000
            record["fingerprint"] = hashlib.sha256(json.dumps(record["arguments"], sort_keys=True).encode()).hexdigest()
            later(record)

        def later(record: dict[str, Any]) -> None:
            record["receipt"]["balance_credits"] += 2700
            record["receipt"]["available_credits"] += 2700

        rewrite_record(raw, f"{alice}:g", granted)
        for suffix in (":r", ":s", ":spend"):
            rewrite_record(raw, f"{alice}{suffix}", later)
    with Ledger(durable_url) as ledger:
        ledger.views.swap_in(ledger.views.build_aside())
    assert audit(durable_url).ok
    result = verify(durable_url, head)
    assert not result.history_intact and grant in {p.position for p in result.problems}


def test_a_whole_command_inserted_into_the_log_passes_the_audit_and_fails_verify(
    durable_url: str, tmp_path: Path
) -> None:
    """A grant to a new user, made by the ledger itself in a scratch store
    (so every id, version and receipt is what the command would have
    written), copied into the middle of the log with the later events
    renumbered after it, and the views rebuilt."""
    story(durable_url)
    head = head_and_audit(durable_url)
    scratch = f"sqlite:///{tmp_path / 'scratch.sqlite3'}"
    with Ledger(scratch, clock=ManualClock(START)) as ledger:
        ledger.grant(uuid4(), 5000, "purchase", key="forged-order")
    with raw_events(scratch) as raw:
        forged = raw.sql("SELECT originator_id, originator_version, topic, state FROM {t} ORDER BY {id}")
    with raw_events(durable_url) as raw:
        after = raw.position_of("CommandRecord.Recorded", 1)  # bob's grant, the first transaction's end
        raw.sql("UPDATE {t} SET {id} = -({id} + %s) WHERE {id} > %s", len(forged), after)
        raw.sql("UPDATE {t} SET {id} = -{id} WHERE {id} < 0")
        for offset, (originator, version, topic, state) in enumerate(forged, start=1):
            raw.sql(
                "INSERT INTO {t} ({id}, originator_id, originator_version, topic, state) VALUES (%s, %s, %s, %s, %s)",
                after + offset,
                UUID(originator) if raw.postgres else originator,  # SQLite keeps it as text
                version,
                topic,
                bytes(state),
            )
    with Ledger(durable_url) as ledger:
        ledger.views.swap_in(ledger.views.build_aside())
    report = audit(durable_url)
    assert report.ok, report.render()
    assert report.summary["credits"]["granted"] == 300 + 80 + 5000
    result = verify(durable_url, head)
    assert not result.history_intact
    # The renumbered events sit where anchored ones did: each is named.
    assert {p.position for p in result.problems} >= set(range(after + 1, head.position + 1))


def test_a_receipt_of_a_command_before_the_last_in_a_batch_is_checked(durable_url: str) -> None:
    """A batch saves its account events first, then its records: only the
    receipt of the last command on an account was compared with the replay,
    so the grant's receipt in a batch of grant, spend and spend could say
    any balance."""
    user = uuid4()
    with Ledger(durable_url, clock=ManualClock(START)) as ledger:
        receipts = ledger.execute_batch(
            [
                GrantCredits(key="g", user_id=user, amount_credits=100, kind="purchase"),
                SpendCredits(key="s", user_id=user, amount_credits=30, kind="api_use"),
                SpendCredits(key="s2", user_id=user, amount_credits=5, kind="api_use"),
            ]
        )
        assert [r.balance_credits for r in receipts] == [100, 70, 65]
    assert audit(durable_url).ok
    with raw_events(durable_url) as raw:

        def edit(record: dict[str, Any]) -> None:
            record["receipt"]["balance_credits"] = record["receipt"]["available_credits"] = 999

        grant = rewrite_record(raw, "g", edit)
    report = audit(durable_url)
    assert [(f.check, f.position) for f in report.findings] == [("key", grant)], report.render()
    assert "receipt says balance 999, held 0, available 999; the replay says balance 100" in report.findings[0].message


@pytest.mark.parametrize("given", ["expires_at", "expires_in"])
def test_a_grant_whose_expiry_was_moved_is_named_by_its_arguments(durable_url: str, given: str) -> None:
    """A bonus's expiry moved a year on in the event and the views keeps its
    credits from lapsing; nothing the receipt says changes, and the audit
    passed. The command's recorded arguments still say when it lapses."""
    clock = ManualClock(START)
    user = uuid4()
    expiry: dict[str, Any] = {"expires_at": START + HOUR} if given == "expires_at" else {"expires_in": HOUR}
    with Ledger(durable_url, clock=clock) as ledger:
        ledger.grant(user, 100, "bonus", key="bonus", **expiry)
        ledger.views.catch_up()
    with raw_events(durable_url) as raw:
        grant = raw.position_of("CreditAccount.Granted")
        raw.alter(grant, b'"2026-01-01T01:00:00+00:00"', b'"2027-01-01T01:00:00+00:00"')
    with Ledger(durable_url) as ledger:
        ledger.views.swap_in(ledger.views.build_aside())
    report = audit(durable_url)
    assert [f.check for f in report.findings] == ["key"], report.render()
    assert "its arguments say expires_at 2026-01-01T01:00:00+00:00; the event at position" in report.findings[0].message
    assert "says expires_at 2027-01-01T01:00:00+00:00" in report.findings[0].message


@pytest.mark.parametrize("timestamp", [None, "2026-01-01", 5, "naive"])
def test_an_event_whose_timestamp_is_not_a_time_is_named_not_a_crash(durable_url: str, timestamp: object) -> None:
    """An account's Opened with its timestamp edited into text or a number
    decoded, fitted its class, and made the audit die comparing the views
    (AttributeError, no report)."""
    story(durable_url)
    head_and_audit(durable_url)
    with raw_events(durable_url) as raw:
        opened = raw.position_of("CreditAccount.Opened", 0)
        state = json.loads(raw.state(opened))
        if timestamp == "naive":
            state["timestamp"]["_data_"] = "2026-01-01T00:00:00"
        else:
            state["timestamp"] = timestamp
        raw.write_json(opened, state)
    report = audit(durable_url)
    [finding] = [f for f in report.findings if f.check == "decode"]
    assert (
        finding.position == opened and "its timestamp" in finding.message and "is not a time in UTC" in finding.message
    )


def test_a_record_whose_arguments_are_not_a_mapping_is_named(durable_url: str) -> None:
    story(durable_url)
    head_and_audit(durable_url)
    with raw_events(durable_url) as raw:

        def edit(record: dict[str, Any]) -> None:
            record["arguments"] = "edited"

        record = rewrite_record(raw, ":spend", edit)
    report = audit(durable_url)
    assert [(f.check, f.position) for f in report.findings] == [("key", record)], report.render()
    assert "its arguments are not the command's arguments: 'edited'" in report.findings[0].message


@pytest.mark.parametrize("what", ["limit", "hold"])
def test_a_limit_or_a_hold_rewritten_with_its_views_is_named_by_its_arguments(durable_url: str, what: str) -> None:
    """A credit limit raised from 50 to 5000, or a hold cut from 30 to 3 (its
    HoldRecord too), with the receipts and the views to match: the audit
    passed, while the commands' recorded arguments still said 50 and 30."""
    clock = ManualClock(START)
    user = uuid4()
    with Ledger(durable_url, clock=clock) as ledger:
        ledger.set_credit_limit(user, 50, "postpaid", "ops", key="limit")
        ledger.reserve(user, uuid4(), 30, expires_in=HOUR, key="hold")
    with raw_events(durable_url) as raw:
        if what == "limit":
            raw.alter(raw.position_of("CreditAccount.LimitSet"), b'"limit_credits":50', b'"limit_credits":5000')
            more, held = 4950, 30
        else:
            raw.alter(raw.position_of("CreditAccount.Reserved"), b'"amount":30', b'"amount":3')
            raw.alter(raw.position_of("Reservation.Reserved"), b'"amount":30', b'"amount":3')
            more, held = 27, 3

        def receipt(record: dict[str, Any]) -> None:
            record["receipt"]["available_credits"] += more
            if record["key"] == "hold":
                record["receipt"]["held_credits"] = held

        record = rewrite_record(raw, "limit", receipt) if what == "limit" else None
        hold = rewrite_record(raw, "hold", receipt)
    with Ledger(durable_url) as ledger:
        ledger.views.swap_in(ledger.views.build_aside())
    report = audit(durable_url)
    assert [(f.check, f.position) for f in report.findings] == [("key", record or hold)], report.render()
    said = "limit_credits 50" if what == "limit" else "amount_credits 30"
    assert f"its arguments say {said};" in report.findings[0].message
