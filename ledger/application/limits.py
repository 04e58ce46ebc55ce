"""Credit limits: the command that sets an account's limit. The limit itself
(how far below zero the balance may go, and what ``available`` then means)
is the account's, in ``ledger.domain.credits``; see docs/credit-limits.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from uuid import UUID

from ledger.application.commands import Command, UnitOfWork
from ledger.application.results import Receipt
from ledger.domain.checks import MAX_LABEL_LENGTH, MAX_TEXT_LENGTH, check_key, check_text, check_user_id
from ledger.domain.credits import MAX_CREDIT_LIMIT
from ledger.errors import InvalidAmount


def check_limit(value: object, name: str = "limit_credits") -> int:
    """A credit limit: a whole number of credits within 0..MAX_CREDIT_LIMIT."""
    if type(value) is not int:  # bool is an int subclass: True credits is a bug
        raise InvalidAmount(f"{name} must be a whole number of credits (int), not {type(value).__name__}", param=name)
    if not 0 <= value <= MAX_CREDIT_LIMIT:
        raise InvalidAmount(f"{name} must be within 0..{MAX_CREDIT_LIMIT}, got {value}", param=name)
    return value


@dataclass(frozen=True)
class SetCreditLimit(Command):
    """Sets how far below zero the user's balance may go: available credits
    become balance - held + ``limit_credits``. 0 removes the limit. Opens
    the account if the user has none."""

    name: ClassVar[str] = "set_credit_limit"
    user_id: UUID = field(kw_only=True)
    limit_credits: int = field(kw_only=True)
    reason: str = field(kw_only=True)
    actor: str = field(kw_only=True)

    def __post_init__(self) -> None:
        self._normalise("key", check_key(self.key))
        self._normalise("user_id", check_user_id(self.user_id))
        check_limit(self.limit_credits)
        self._normalise("reason", check_text(self.reason, "reason", MAX_TEXT_LENGTH, required=True))
        self._normalise("actor", check_text(self.actor, "actor", MAX_LABEL_LENGTH, required=True))

    def apply(self, unit: UnitOfWork) -> Receipt:
        account = unit.account(self.user_id, open_missing=True)
        account.set_limit(
            limit_credits=self.limit_credits, reason=self.reason, actor=self.actor, key=self.key, now=unit.now
        )
        return unit.done(self, account, amount=0)
