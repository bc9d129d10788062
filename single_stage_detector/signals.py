"""SIGTERM / SIGINT during a run: stop at the next step boundary with a checkpoint, or at once.

The handler only records the signal (no I/O, no GPU work); the training loop reads the
record at step boundaries, so the hot path gains no host synchronisation. A second
signal (more than ``DUPLICATE_WINDOW_S`` after the first) raises :class:`RunInterrupted` in
the main thread, which unwinds the run at once
(the MLPerf log still gets its ``run_stop``; no new checkpoint is written).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

__all__ = ["StopSignals", "RunInterrupted", "EXIT_STOPPED", "EXIT_WRITE_FAILED", "signal_exit_code"]

# Exit status of a run stopped by its first SIGTERM / SIGINT after writing a resume checkpoint.
EXIT_STOPPED = 5
# Exit status of a run whose outputs could not be written mid-run (full disk, read-only folder).
EXIT_WRITE_FAILED = 6
HANDLED = (signal.SIGTERM, signal.SIGINT)
# A repeat within this many seconds of the first signal is the same request arriving twice:
# Ctrl-C reaches torchrun and its workers (which torchrun forwards it to again), and SLURM
# signals every process of a step, launchers included. Only a later one means "at once".
DUPLICATE_WINDOW_S = 1.0


def signal_exit_code(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 128 + its number (143 SIGTERM, 130 SIGINT)."""
    return 128 + int(signum)


class RunInterrupted(BaseException):
    """A second stop signal: the run ends at once, without a new checkpoint.

    A ``BaseException`` (as ``KeyboardInterrupt``) so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"second {signal.Signals(signum).name}: stopped at once, without a new checkpoint")
        self.signum = signum


class StopSignals:
    """Installs SIGTERM and SIGINT handlers for the duration of a ``with`` block.

    ``signum`` is the first signal received (None: none yet). Handlers can only be set in
    the main thread; elsewhere (a run started from a thread) the block installs nothing.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if now - self._first_at < DUPLICATE_WINDOW_S:
                return  # the same request by a second path (see DUPLICATE_WINDOW_S)
            raise RunInterrupted(signum)
        self.signum, self._first_at = signum, now
        if self._announce:
            # os.write, not print: the handler may run while the main thread is inside a
            # buffered write to the same stream, which print would re-enter.
            os.write(sys.stderr.fileno(), f"{signal.Signals(signum).name} received: stopping after the current "
                     "step with a checkpoint (send it again to stop at once)\n".encode())

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
