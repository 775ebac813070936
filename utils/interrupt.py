"""Ctrl-C and SIGTERM: the first stops the run at the next step, saving its state; a second stops at once."""
from __future__ import annotations

import atexit
import os
import signal
import sys
from types import FrameType

INTERRUPTED_EXIT = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A long phase stopped early because a stop was requested; its message names the phase."""


class StopNow(BaseException):
    """A second signal: stop at once, without saving (what was saved before stays intact)."""


def stopped_at_once_line(signal_name: str) -> str:
    """The line a second signal prints on stderr before the process exits with status 130."""
    return f"{signal_name} again: stopped at once; what was saved before is intact"


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    print("\n" + stopped_at_once_line(signal.Signals(signum).name), file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT)


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM (at exit: a handled one would get its default action back, status 143)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class GracefulInterrupt:
    """``requested`` becomes true on the first SIGINT or SIGTERM; the second raises :class:`StopNow`. After a
    request, a later signal exits at once with status 130 (ignored during the interpreter's exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise StopNow(signal.Signals(signum).name)
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step and saving the resumable state "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> "GracefulInterrupt":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, _exit_at_once if self.requested else handler)
        if self.requested:
            atexit.unregister(ignore_stop_signals)  # once, however many runs this process stopped
            atexit.register(ignore_stop_signals)


def check_stop(stop, phase: str) -> None:
    """Raise :class:`Interrupted` naming ``phase`` when ``stop`` (a callable, or None) says so."""
    if stop is not None and stop():
        raise Interrupted(phase)
