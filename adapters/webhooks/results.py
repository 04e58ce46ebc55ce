"""What a provider's ``ingest`` tells the host about one delivery."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict


class IngestResult(BaseModel):
    """What became of one delivery. ``http_status`` is what to answer the
    provider: 200 for every stored delivery (duplicates included), 401 for a
    bad signature, 400 for a malformed body, 413 for an oversized one, 500
    only when it could not be stored, or its storing not confirmed (the
    provider then retries)."""

    model_config = ConfigDict(frozen=True)

    status: Literal["stored", "duplicate", "rejected", "error"]
    http_status: int
    reason: str
    event_row_id: UUID | None = None
    event_name: str | None = None
    #: For a stored delivery: processed, failed, held (failed until what it
    #: waits for arrives), ignored (test-mode mismatch), or pending (outcome
    #: not recorded; ``webhooks retry`` picks it up).
    processing: Literal["processed", "failed", "held", "ignored", "pending"] | None = None
