"""Ctrl-C and SIGTERM: finish the current step, save, exit. A second signal stops at once."""
from __future__ import annotations

import signal
from types import FrameType


class GracefulInterrupt:
    """Context manager; ``requested`` becomes true on the first SIGINT or SIGTERM."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving the resumable state "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> "GracefulInterrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


INTERRUPTED_EXIT = 130
