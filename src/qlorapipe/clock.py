"""Wall seconds per phase of a stage, written to its metrics so `dvc metrics diff` shows where time went."""

from __future__ import annotations

import time


class PhaseClock:
    """Adds the seconds since the last lap to ``seconds[name]`` at each ``lap(name)``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 2)
        self.last = now
