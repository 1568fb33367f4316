"""Progress of long loops: a tqdm bar on a terminal, a periodic log line in a job log.

tqdm redraws its bar with carriage returns; written to a file (a Snakemake or SLURM job log) that
is thousands of overwritten lines of noise. So :func:`progress` draws a bar only when stderr is a
terminal, and otherwise logs one INFO line at most every ``LOG_EVERY_S`` seconds, plus one at the
end. Every loop of the package that shows progress goes through it, so ``msa --no-progress`` (which
sets ``MSA_NO_PROGRESS=1``, seen by the processes it starts too) turns all of it off at once.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger("msa.progress")

LOG_EVERY_S = 60.0
# set (to anything) to show no progress at all: `msa --no-progress`, benchmarks
NO_PROGRESS_ENV = "MSA_NO_PROGRESS"


def progress(iterable: Iterable | None = None, *, desc: str, total: float | None = None,
             unit: str = "it", initial: float = 0, enabled: bool = True, **bar_options: Any):
    """A progress tracker with tqdm's interface (iterate, ``update``, ``n``, ``close``, ``with``).

    ``enabled=False`` shows nothing (e.g. on the non-main ranks of a torchrun job);
    ``bar_options`` (``unit_scale``, ``leave``, ``mininterval``) apply to the terminal bar only;
    with ``MSA_NO_PROGRESS`` in the environment nothing is shown."""
    enabled = enabled and os.environ.get(NO_PROGRESS_ENV) is None
    if enabled and sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, **bar_options)
    return LogProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, enabled=enabled)


class LogProgress:
    """The part of tqdm's interface the package uses, reported as periodic log lines."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: float | None = None,
                 unit: str = "it", initial: float = 0, enabled: bool = True,
                 every_s: float | None = None, clock=time.monotonic):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # as tqdm does
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = initial
        self.enabled = enabled
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self._clock = clock
        self._started = self._last = clock()
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._report("")

    def set_postfix(self, *args, **kwargs) -> None:
        """Accepted for tqdm compatibility; log lines carry the count only."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._report(" (done)")

    def _report(self, suffix: str) -> None:
        if not self.enabled:
            return
        of_total = f"/{self.total:g}" if self.total is not None else ""
        elapsed = self._clock() - self._started
        log.info("%s: %g%s %s after %.0f s%s", self.desc, self.n, of_total, self.unit, elapsed, suffix)
