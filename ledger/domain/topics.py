"""The prefix of every stored topic. Stored events live forever: each event
class carries an explicit ``TOPIC`` built on it, which does not depend on where
the class lives in the code."""

from __future__ import annotations

TOPIC_PREFIX = "pingvas.ledger"
