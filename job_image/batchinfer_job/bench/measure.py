"""Timing and memory of one benchmark run: wall seconds and the peak RSS of this process and its children."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil


class PeakRss:
    """Samples the summed RSS of this process tree (Ray's raylet, workers and actors included)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process(os.getpid())
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a worker that exited between listing and reading
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


@dataclass(frozen=True)
class Sample:
    images: int
    seconds: float
    peak_rss: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def timed(run: Callable[[], int]) -> Sample:
    with PeakRss() as rss:
        start = time.perf_counter()
        images = run()
        seconds = time.perf_counter() - start
    return Sample(images=images, seconds=seconds, peak_rss=rss.peak)
