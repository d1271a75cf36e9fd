"""SIGINT and SIGTERM stop a harvest gracefully: they raise :class:`Stopped` in the main thread, so
every ``finally`` runs (shards in flight are abandoned, finished ones kept, Ray shut down, the
store's lease released) and the CLI exits with ``128 + signal``."""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active = 0


class Stopped(KeyboardInterrupt):
    """Raised by the handler of ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Stopped(signum)


def install() -> None:
    """(Re-)install the handlers; again after ``ray.init``, whose core worker replaces them with its own
    (which dumps a C stack and exits). Only inside :func:`graceful`."""
    if _active and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise)


@contextlib.contextmanager
def graceful():
    """Within the block, SIGINT and SIGTERM raise :class:`Stopped`; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _active
    old = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _active += 1
    install()
    try:
        yield
    finally:
        _active -= 1
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
