"""Reading predictions back for humans: labels per input-name group and the error rows."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pyarrow as pa

from batchinfer_job.commit import read_committed

_GROUP = re.compile(r"^(?P<group>.+?)_\d+\.[A-Za-z]+$")


def read_predictions(output_uri: str, columns: list[str] | None = None) -> pa.Table:
    """The committed predictions, following `_SUCCESS.json` (each input key exactly once)."""
    return read_committed(output_uri, columns)


def output_summary_lines(output_uri: str, max_errors: int = 5) -> list[str]:
    """Most frequent label per input group (`chelsea_017.jpg` → `chelsea`) and the first error rows."""
    table = read_predictions(output_uri, ["key", "label", "error"])
    by_group: dict[str, Counter] = defaultdict(Counter)
    errors = []
    for key, label, error in zip(*(table[c].to_pylist() for c in ("key", "label", "error")), strict=True):
        if error is not None:
            errors.append((key, error))
            continue
        match = _GROUP.match(key.rsplit("/", 1)[-1])
        if match:
            by_group[match["group"]][label] += 1
    lines = []
    if by_group:
        lines.append("most frequent label per input group:")
        for group, counts in sorted(by_group.items()):
            label, count = counts.most_common(1)[0]
            lines.append(f"  {group:24s} {label:28s} {count}/{sum(counts.values())}")
    if errors:
        lines.append(f"error rows ({len(errors)}):")
        lines += [f"  {cut(key)}: {cut(error, 120)}" for key, error in errors[:max_errors]]
    return lines


def cut(text: str, limit: int = 160) -> str:
    """`text`, or its start and end around a note of its length when it is longer than `limit` (a manifest
    line of 100 MB is a key too)."""
    if len(text) <= limit:
        return text
    keep = max(limit - 30, 20)
    return f"{text[: keep * 2 // 3]}…{text[-(keep // 3) :]} ({len(text):,} characters)"
