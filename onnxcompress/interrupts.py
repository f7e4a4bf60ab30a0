"""Holding SIGINT and SIGTERM over a few steps that must happen all or not at all."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM received in the block wait for its end, then act as they would
    have (the handler runs, or the default action ends the process). Handlers belong to the
    main thread; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None and handler != signal.SIG_IGN:  # None: not set from Python
            previous[signum] = signal.signal(signum, lambda *received: held.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in held[:1]:
            if callable(previous[signum]):
                previous[signum](signum, frame)
            else:  # SIG_DFL: the end of the process, as the signal meant
                signal.raise_signal(signum)
