"""SIGINT and SIGTERM stop a harvest gracefully: they raise :class:`Stopped` in the main thread, so
every ``finally`` runs (shards in flight are abandoned, finished ones kept, Ray shut down, the
store's lease released) and the CLI exits with ``128 + signal``.

A signal is never lost: Python drops an exception raised where it cannot propagate (a garbage-collector
callback, as Dask's distributed installs one, or a ``__del__``), so a signal that lands there is sent
again a moment later; and a block that ends normally after a signal (one a library swallowed) raises
:class:`Stopped` then."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active = 0
_received: list[int] = []  # within graceful(): every signal received
_resend: list[threading.Timer] = []  # signals whose Stopped Python dropped, each sent again by its timer
_deferred: list[int] | None = None  # within deferred(): the signals waiting for its end


class Stopped(KeyboardInterrupt):
    """Raised by the handler of ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    _received.append(signum)
    if _deferred is not None:
        _deferred.append(signum)
        return
    raise Stopped(signum)


def _unraisable(unraisable, hook=sys.unraisablehook) -> None:
    """``sys.unraisablehook`` within :func:`graceful`: a dropped :class:`Stopped` is sent again."""
    if not isinstance(unraisable.exc_value, Stopped):
        hook(unraisable)
        return
    timer = threading.Timer(0.05, os.kill, (os.getpid(), unraisable.exc_value.signum))
    timer.daemon = True
    _resend.append(timer)
    timer.start()


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
    old_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    _active += 1
    install()
    try:
        yield
        if _received:  # swallowed on its way (a library's bare except), or sent again too late
            raise Stopped(_received[0])
    finally:
        _active -= 1
        for timer in _resend:
            timer.cancel()
        _resend.clear()
        _received.clear()
        sys.unraisablehook = old_hook
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred():
    """Within the block a signal waits, and stops the program when the block ends: for starting what
    must be shut down (a Dask cluster), which an exception in the middle of its start would leave
    half-made, out of reach of any cleanup."""
    global _deferred
    if _deferred is not None:  # already deferred by an enclosing block
        yield
        return
    _deferred = []
    try:
        yield
    finally:
        waiting, _deferred = _deferred, None
    if waiting:
        raise Stopped(waiting[0])
