"""``python -m ledger``: the command line (the top layer)."""
