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
    """Counts of committed rows so far."""

    processed: int
    failed: int
    total: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rows_per_second
        return (self.total - self.processed) / rate if rate > 0 else None

    def as_status(self) -> dict[str, Any]:
        """The `status.progress` object of the CRD."""
        percent = 100.0 * self.processed / self.total if self.total else 100.0
        eta = self.eta_seconds
        return {
            "processed": self.processed,
            "failed": self.failed,
            "total": self.total,
            "rowsPerSecond": round(self.rows_per_second, 2),
            "eta": human_duration(eta) if eta is not None else None,
            "display": f"{self.processed}/{self.total} ({percent:.0f}%)",
            "updateTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
