"""An auditor's routine, to adapt: prove the history unchanged since the last
visit, audit the ledger, keep a new digest, and write a statement per user.

    python examples/auditor.py --url postgresql://auditor@db/pingvas?schema=pingvas \\
        --digests digests.txt --statements out/ --start 2026-03-01 --end 2026-04-01 USER_ID ...

``digests.txt`` is the auditor's own append-only list of heads, one per line,
kept outside the database (the last line is the one to verify against). The
script exits 1 if anything is wrong: a changed history, or audit findings;
2 if there is no ledger at ``--url`` (nothing is created, nothing is kept).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from ledger import Auditor, ConfigurationError, DigestHead


def day(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def last_head(digests: Path) -> DigestHead | None:
    """The head kept at the previous visit, if any."""
    if not digests.exists():
        return None
    lines = [line.split()[0] for line in digests.read_text().splitlines() if line.strip()]
    return DigestHead.parse(lines[-1]) if lines else None


def visit(url: str, digests: Path, statements: Path, start: datetime, end: datetime, users: list[UUID]) -> bool:
    ok = True
    with Auditor(url) as auditor:
        # 1. Nothing recorded before the last visit has changed.
        previous = last_head(digests)
        if previous is not None:
            proof = auditor.verify(previous)
            print("\n".join(proof.describe()))
            ok = ok and proof.ok

        # 2. The history is consistent and the read models equal it.
        report = auditor.audit()
        print(report.render())
        ok = ok and report.ok

        # 3. A new head for the next visit, kept outside the database. The
        #    audit's own digest covers exactly the history it checked.
        result = auditor.digest()
        if result.ok:
            with digests.open("a") as out:
                out.write(f"{result.head} {datetime.now(UTC).isoformat()} audit={report.digest}\n")
            print(f"kept digest {result.head}")
        else:
            ok = False
            print("not anchored: " + "; ".join(str(p) for p in result.problems))

        # 4. Statements for the period, as CSV, one file per user.
        statements.mkdir(parents=True, exist_ok=True)
        for user_id in users:
            statement = auditor.statement(user_id, start, end)
            path = statements / f"{user_id}.csv"
            path.write_text(statement.to_csv())
            print(
                f"{user_id}: opening {statement.opening_balance_credits}, closing "
                f"{statement.closing_balance_credits}, {len(statement.entries)} entries -> {path}"
            )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--digests", type=Path, default=Path("digests.txt"))
    parser.add_argument("--statements", type=Path, default=Path("statements"))
    parser.add_argument("--start", type=day, required=True)
    parser.add_argument("--end", type=day, required=True)
    parser.add_argument("users", nargs="*", type=UUID)
    args = parser.parse_args(argv)
    try:
        return 0 if visit(args.url, args.digests, args.statements, args.start, args.end, args.users) else 1
    except ConfigurationError as exc:  # a mistyped URL: no store to audit
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
