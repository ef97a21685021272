"""Progress of a long export, for people: tqdm bars around long loops and one line per finished stage.

Library code only calls `bar(...)` (a tqdm over a loop: calibration batches, sensitivity trials, layers,
timing rounds) and the API calls `stage(name)`. Whether anything is drawn is the console's to say
(`set_bars`): bars are redrawn only on a terminal; in CI or a pipe they are off and the stage lines (logged
on `STAGE_LOGGER`, elapsed time included) are the plain-line progress. Nothing here prints: stage lines are
log records, so the console (exporter/console.py) decides where they go and the log file keeps them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

STAGE_LOGGER = "exporter.stages"  # one INFO record per finished stage: the console's default lines
_stages = logging.getLogger(STAGE_LOGGER)
_bars: bool | None = None  # None: when stderr is a terminal (the CLI sets it from --quiet/--json)
T = TypeVar("T")


def set_bars(enabled: bool | None) -> None:
    """True/False: draw bars or not; None: draw them when stderr is a terminal."""
    global _bars
    _bars = enabled


def bars_enabled() -> bool:
    return _bars if _bars is not None else sys.stderr.isatty()


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> Any:
    """A tqdm over `iterable` (or to `update()` by hand), on stderr, gone when done (the stage line stays);
    disabled (a plain iterator) unless bars are on."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.25,
        disable=not bars_enabled(),
    )


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time a stage into `timings[name]` (the report's stage times) and log its line when it ends. On a
    terminal a status line shows the stage and its elapsed time while it runs (refreshed twice a second)."""
    start = time.perf_counter()
    status = _Status(name) if bars_enabled() else None
    try:
        yield
    finally:
        if status is not None:
            status.close()
    seconds = time.perf_counter() - start
    timings[name] = round(seconds, 3)
    _stages.info("%-17s %7.1f s", name, seconds, extra={"stage": name, "seconds": seconds})


class _Status:
    """`name  12s` redrawn while a stage runs: tqdm only redraws on updates, so a thread refreshes it."""

    def __init__(self, name: str) -> None:
        self._bar = tqdm(
            desc=name, bar_format="{desc}  {elapsed}", leave=False, file=sys.stderr, dynamic_ncols=True
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(0.5):
            self._bar.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._bar.close()
