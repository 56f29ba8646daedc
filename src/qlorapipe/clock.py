"""Wall seconds per phase of a stage, written to its metrics so `dvc metrics diff` shows where time went."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class PhaseClock:
    """Adds the seconds since the last lap to ``seconds[name]`` at each ``lap(name)``.

    Named after its stage, it also logs each phase as it ends: a stage that runs for minutes without a
    progress bar (merge, export, or any stage whose output goes to a log file) shows where it is.
    """

    def __init__(self, stage: str | None = None):
        self.stage = stage
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        before = self.seconds.get(name)
        self.seconds[name] = round((before or 0.0) + now - self.last, 2)
        if self.stage is not None:
            if before is None:
                logger.info("%s: %s done (%.1f s)", self.stage, name, now - self.last)
            else:  # a phase run again (merge times each model): the log says the sum too
                logger.info("%s: %s done again (%.1f s; %.1f s in all)", self.stage, name, now - self.last,
                            self.seconds[name])
        self.last = now

    def summary(self) -> str:
        """The phases' seconds as one line: ``write 23.6 s, check_and_hash 0.3 s``."""
        return ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
