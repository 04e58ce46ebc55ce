"""PostgreSQL backend: the event recorder, bulk stream reads, view tables."""
