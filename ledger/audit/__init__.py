"""Audit layer: replaying history to prove balances and find tampering.
Internal: import ``audit``, ``Auditor`` and their results from ``ledger``."""
