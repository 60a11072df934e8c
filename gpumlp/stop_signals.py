"""Stopping a run on a signal, safely.

SIGINT (Ctrl-C), SIGTERM (a cluster pre-empting the job) and SIGHUP (the terminal closed) all stop a
command the same way while `handled()` is active: StopRequested is raised in the main thread between
two Python statements, the command saves the last finished epoch and exits 128 + the signal number
(130, 143, 129). Inside `held()` a signal waits until the block ends, so a file being written is
finished and renamed, never abandoned half-way. Once a stop has begun, further signals are ignored,
so a second Ctrl-C cannot cut short the final save.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopRequested(BaseException):
    """Like KeyboardInterrupt (not caught by `except Exception`), for any of STOP_SIGNALS."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(self.name)


class _State:
    depth = 0          # nesting of held() blocks
    pending = None     # a signal that arrived inside held()
    stopping = False   # a stop has been raised: ignore further signals


def _on_signal(signum, frame) -> None:
    if _State.stopping:
        return
    if _State.depth:
        _State.pending = _State.pending or signum
        return
    _State.stopping = True
    raise StopRequested(signum)


@contextmanager
def handled():
    """Turns STOP_SIGNALS into StopRequested for the duration of the block (main thread only; the
    previous handlers come back afterwards). A signal the process was started ignoring stays
    ignored: `nohup` ignores SIGHUP so that the run outlives the terminal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    _State.depth, _State.pending, _State.stopping = 0, None, False
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _State.depth, _State.pending, _State.stopping = 0, None, False


@contextmanager
def held():
    """A signal arriving inside the block takes effect when the block ends."""
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if not _State.depth and _State.pending is not None and not _State.stopping:
            signum, _State.pending = _State.pending, None
            _State.stopping = True
            raise StopRequested(signum)


def stopping() -> None:
    """Called when the command begins to stop for any reason (KeyboardInterrupt included): from
    here on signals are ignored, so the final save completes."""
    _State.stopping = True
