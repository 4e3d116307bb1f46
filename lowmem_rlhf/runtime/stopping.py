"""Stopping cleanly: SIGINT/SIGTERM ask the running stage to checkpoint at the next step boundary
and exit; a second Ctrl-C aborts at once (the last periodic checkpoint stays valid)."""

from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """A stage stopped on a signal after saving a checkpoint. The CLI prints it and exits 130."""

    exit_code = 130


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM set `requested` instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce=print):
        self.signal: int | None = None
        self._old: dict = {}
        self._announce = announce

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum
        self._announce(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                       "(Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False


__all__ = ["Interrupted", "StopOnSignal"]
