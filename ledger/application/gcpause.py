"""Pausing Python's cyclic garbage collector while a large batch runs.

A batch of 10,000 commands allocates a few million objects that live until
the batch's transaction commits (events, stored events, command records,
receipts). Each of them counts towards the collector's thresholds, so the
collector runs hundreds of times during the batch and, every few batches, walks
every live object of the process, the account cache included: a third of a
10,000-grant batch's time was measured in collections that found nothing to
free (the objects are still in use). Reference counting frees everything
acyclic as usual while the collector is paused; what the batch leaves in
cycles is collected once the collector runs again.

The pause is process-wide (the collector is), counted: the first batch to
start pauses it, the last to end resumes it, and only if it was enabled when
the first started. A host that disabled the collector itself keeps it
disabled.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Batches of at least this many commands run with the collector paused.
GC_PAUSE_MIN_COMMANDS = 256

_lock = threading.Lock()
_depth = 0
_resume = False


@contextmanager
def collector_paused(active: bool = True) -> Iterator[None]:
    """Pauses the cyclic collector for the duration (when ``active``)."""
    global _depth, _resume
    if not active:
        yield
        return
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                _resume = False
                gc.enable()


def paused() -> bool:
    """Whether a batch holds the collector paused now."""
    with _lock:
        return _depth > 0
