"""The audit's checks, one module per subject."""
