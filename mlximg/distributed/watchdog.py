"""A rank whose peer stops answering would wait in a collective forever: the watchdog ends the process with a
clear message when no step finishes within the timeout. (A peer that exits closes its connection, and MLX's
collective raises at once; this is for one that hangs or whose machine is gone.)"""

import os
import sys
import threading
import time


class Watchdog:
    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mlximg-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def tick(self, *_) -> None:
        """Progress: call after each step (it takes a step callback's arguments)."""
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                print(f"mlximg: error: rank {self.rank}: no step finished in {self.timeout:g} s; another rank is "
                      "not answering (stopped, or its machine unreachable)", file=sys.stderr, flush=True)
                os._exit(1)
