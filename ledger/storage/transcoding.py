"""JSON transcodings for the value objects inside account snapshots."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from eventsourcing.persistence import Transcoding

from ledger.domain.credits import Block
from ledger.domain.holds import Hold


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class BlockAsDict(Transcoding):
    type = Block
    name = "pingvas_block"

    def encode(self, obj: Block) -> dict[str, Any]:
        data = asdict(obj)
        data["granted_at"] = obj.granted_at.isoformat()
        data["expires_at"] = obj.expires_at.isoformat() if obj.expires_at else None
        return data

    def decode(self, data: dict[str, Any]) -> Block:
        return Block(
            block_id=data["block_id"],
            kind=data["kind"],
            granted=data["granted"],
            remaining=data["remaining"],
            granted_at=datetime.fromisoformat(data["granted_at"]),
            expires_at=_time(data["expires_at"]),
            seq=data["seq"],
        )


class HoldAsDict(Transcoding):
    type = Hold
    name = "pingvas_hold"

    def encode(self, obj: Hold) -> dict[str, Any]:
        data = asdict(obj)
        data["reserved_at"] = obj.reserved_at.isoformat()
        data["expires_at"] = obj.expires_at.isoformat()
        return data

    def decode(self, data: dict[str, Any]) -> Hold:
        return Hold(
            reservation_id=data["reservation_id"],
            job_id=data["job_id"],
            amount=data["amount"],
            reserved_at=datetime.fromisoformat(data["reserved_at"]),
            expires_at=datetime.fromisoformat(data["expires_at"]),
            allocations=[list(a) for a in data["allocations"]],
        )
