"""Progress numbers: one shape for the console line and for `BatchInference.status.progress`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


def human_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m" if hours else (f"{minutes}m{secs}s" if minutes else f"{secs}s")


@dataclass(frozen=True)
class ProgressReport:
    """Counts of committed rows so far. `total` is None while inputs are still being listed."""

    processed: int
    failed: int
    total: int | None
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far: only once the total is known and rows have been committed."""
        rate = self.rows_per_second
        return (self.total - self.processed) / rate if self.total is not None and rate > 0 else None

    @property
    def display(self) -> str:
        """`n/total (percent)`, or `n/?` while the total is not known yet."""
        if self.total is None:
            return f"{self.processed}/?"
        percent = 100.0 * self.processed / self.total if self.total else 100.0
        return f"{self.processed}/{self.total} ({percent:.0f}%)"

    @property
    def finished(self) -> bool:
        return self.total is not None and self.processed >= self.total

    def as_status(self) -> dict[str, Any]:
        """The `status.progress` object of the CRD."""
        eta = self.eta_seconds
        return {
            "processed": self.processed,
            "failed": self.failed,
            "total": self.total,
            "rowsPerSecond": round(self.rows_per_second, 2),
            "eta": human_duration(eta) if eta is not None else None,
            "display": self.display,
            "updateTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
