"""Storage layer: opening a store from a URL, and one module per backend
(memory, SQLite, PostgreSQL) behind one interface. Internal."""
