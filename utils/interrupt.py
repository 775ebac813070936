"""Ctrl-C and SIGTERM: the first one asks the run to stop at the next episode or batch and save its
resumable state; a second one stops at once."""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType

INTERRUPTED_EXIT = 130


class Interrupted(Exception):
    """A long phase (training, an evaluation, the gallery build) stopped early because a stop was
    requested; its message names the phase."""


class StopNow(BaseException):
    """A second signal: stop at once, without saving (what was saved before stays intact)."""


def stopped_at_once_line(signal_name: str) -> str:
    """What a second signal prints (one line, on stderr) before the process exits with status 130."""
    return f"{signal_name} again: stopped at once; what was saved before is intact"


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    print("\n" + stopped_at_once_line(signal.Signals(signum).name), file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT)


class GracefulInterrupt:
    """Context manager; ``requested`` becomes true on the first SIGINT or SIGTERM, and the second one
    raises :class:`StopNow`. Once a stop was requested, leaving the context does not restore the
    default handlers: a signal during what follows (writing the state, closing the process group
    and the loaders, the interpreter's exit) ends the process at once with one line and status 130."""

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
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, _exit_at_once if self.requested else handler)


def check_stop(stop, phase: str) -> None:
    """Raise :class:`Interrupted` naming ``phase`` when ``stop`` (a callable, or None) says so."""
    if stop is not None and stop():
        raise Interrupted(phase)
