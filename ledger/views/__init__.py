"""Views layer: read models projected from the event log, exactly once.
Internal: reach them through ``Ledger.views``."""
