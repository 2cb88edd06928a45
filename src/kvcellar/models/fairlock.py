"""A first-come, first-served lock for the model.

``threading.Lock`` lets a thread that releases and re-acquires at once win again, so one long
generation could starve the others. Handing the lock over in arrival order makes concurrent
streams advance one forward step each in turn.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class FairLock:
    """FIFO mutual exclusion (not re-entrant)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._waiting: deque[object] = deque()
        self._held = False

    def acquire(self) -> None:
        me = object()
        with self._cond:
            self._waiting.append(me)
            while self._held or self._waiting[0] is not me:
                self._cond.wait()
            self._waiting.popleft()
            self._held = True

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unlocked FairLock")
            self._held = False
            self._cond.notify_all()

    def waiting(self) -> int:
        """Threads queued for the lock (the server reports it as queue depth)."""
        with self._cond:
            return len(self._waiting)

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
