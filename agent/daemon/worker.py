"""The lifecycle every background service of the daemon shares: a thread, a wake-up, a stop.

A service subclasses :class:`ServiceThread`, implements :meth:`ServiceThread._run` (looping until
``self._stop`` is set, sleeping on ``self._wake``), and gets ``start``/``stop`` for free. ``stop``
sets both events so a sleeping thread notices at once, then joins with a timeout.
"""

from __future__ import annotations

import abc
import threading

__all__ = ["ServiceThread"]


class ServiceThread(abc.ABC):
    """A named daemon thread with a stop event and a wake-up event."""

    thread_name = "edge-service"
    stop_timeout_s = 5.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop and wait for it (at most ``timeout`` seconds)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout_s if timeout is None else timeout)

    @abc.abstractmethod
    def _run(self) -> None:
        """The thread's loop: run until ``self._stop`` is set."""
