"""Domain layer: aggregates, events, ids and policies. Pure: no I/O and no
storage; every other layer builds on it. Internal: import public names from
``ledger``."""
