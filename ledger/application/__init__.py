"""Application layer: commands, the unit of work they run in, the retry engine,
the scheduler and the ``Ledger`` facade. Internal: import public names from
``ledger`` (and the extension API from ``ledger.extension``)."""
