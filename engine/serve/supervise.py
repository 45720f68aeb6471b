"""Keeping Triton up: restarts within a budget per time window, with backoff, never a lifetime count.

A Triton that dies is started again after a delay that doubles with each restart still inside the
window (0 s for the first, then `first_delay_s`, 2x, 4x ... up to `max_delay_s`); once `restarts`
restarts fall inside the window, the next waits until the oldest has left it. So whoever can make
Triton die (a crafted request, a local user) slows the restarts down but cannot use them up: the
server is back as soon as they stop. `restarts=0` turns restarting off: the first death ends
t2f-serve (exit 1), for an orchestrator that restarts it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Protocol

from t2f.errors import T2FError


@dataclasses.dataclass
class RestartBudget:
    restarts: int = 5                   # restarts allowed inside one window; 0 = none (the first death is final)
    window_s: float = 600.0             # the window's length
    first_delay_s: float = 1.0          # the delay before the second restart inside the window; it doubles with each one after
    max_delay_s: float = 60.0           # the longest delay the doubling reaches
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)   # monotonic times of restarts in the window

    def delay(self, now: float) -> float | None:
        """Seconds to wait before the next restart (None: restarting is off)."""
        if self.restarts == 0:
            return None
        while self.recent and now - self.recent[0] >= self.window_s:
            self.recent.popleft()
        backoff = 0.0 if not self.recent else min(self.max_delay_s, self.first_delay_s * 2 ** (len(self.recent) - 1))
        if len(self.recent) >= self.restarts:
            backoff = max(backoff, self.recent[len(self.recent) - self.restarts] + self.window_s - now)
        return backoff

    def record(self, now: float) -> None:
        self.recent.append(now)


class Server(Protocol):
    def start(self, cancel: threading.Event | None = None) -> None: ...
    def stop(self) -> None: ...
    def alive(self) -> bool: ...
    def exit_reason(self) -> str: ...


class Stopped(T2FError, RuntimeError):
    """The server died and restarting is off; the message is one line."""


def supervise(server: Server, stop: threading.Event, budget: RestartBudget, say: Callable[[str], None],
              errors: tuple[type[BaseException], ...] = (), every: Callable[[], None] = lambda: None, poll_s: float = 0.5) -> None:
    """Watch `server` until `stop` is set, restarting it within `budget` when it dies; `every()` runs at each poll.

    A restart that fails (one of `errors`) counts as a death. Raises Stopped where restarting is off.
    """
    while not stop.wait(poll_s):
        every()
        if server.alive():
            continue
        reason = server.exit_reason()
        now = time.monotonic()
        delay = budget.delay(now)
        if delay is None:
            raise Stopped(f"Triton Inference Server {reason}; not restarting (--restarts 0)")
        server.stop()
        recent = len(budget.recent)
        say(f"Triton Inference Server {reason}; restarting" + (f" in {delay:.0f} s" if delay >= 0.5 else "")
            + (f" ({recent} restart(s) in the last {budget.window_s:.0f} s)" if recent else ""))
        if stop.wait(delay):
            return
        budget.record(time.monotonic())
        try:
            server.start(cancel=stop)
        except errors as e:
            if stop.is_set():
                return
            say(f"Triton Inference Server did not start again: {e}")
            continue
        say("ready again")
