"""Adapters between the ledger and payment providers (Lemon Squeezy lives in
``adapters.lemonsqueezy``)."""
