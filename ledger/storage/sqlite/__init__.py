"""SQLite backend: bulk stream reads, view tables."""
