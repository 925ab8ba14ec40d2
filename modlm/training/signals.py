"""Stop requests (SIGINT, SIGTERM) turned into a flag the training loop reads between steps."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignal:
    """SIGINT/SIGTERM set a flag the loop checks between steps (so a checkpoint is never taken
    mid-update); a second SIGINT interrupts at once.

    Handlers are installed only from the main thread (Python allows no other) and restored on
    exit; elsewhere the flag simply never rises.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
