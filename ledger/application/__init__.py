"""Application layer: commands (``commands``, ``holds``, ``billing``), what
they return (``results``), the unit of work they run in and the retry engine
(``unit``), and the ``Ledger`` facade. Internal: import public names from
``ledger`` (and the extension API from ``ledger.extension``)."""
