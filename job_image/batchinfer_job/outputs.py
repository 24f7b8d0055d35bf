"""The prediction table: one schema for every shard, and how predictions for a batch become rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("predicted_class", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("top_k_classes", pa.list_(pa.int32())),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
        pa.field("error", pa.string()),
    ]
)


PARTITION_COLUMN = "partition"  # rides along from the read task to the driver; never written to a shard

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
    ]
)


def split_error(error: str) -> tuple[str, str, str]:
    """`stage: Type: message` → (stage, Type, message); errors without a type get an empty one."""
    stage, _, rest = error.partition(": ")
    kind, sep, message = rest.partition(": ")
    if not sep or " " in kind:
        return stage, "", rest
    return stage, kind, message


def dead_letters(table: pa.Table) -> pa.Table:
    """The error rows of a prediction table, one structured row each."""
    rows = [
        (k, *split_error(e)) for k, e in zip(table["key"].to_pylist(), table["error"].to_pylist(), strict=True) if e
    ]
    columns: list[tuple[object, ...]] = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, DEAD_LETTER_SCHEMA, strict=True)], schema=DEAD_LETTER_SCHEMA
    )


def prediction_table(
    keys: Sequence[str],
    errors: Sequence[str | None],
    top_classes: np.ndarray,
    top_scores: np.ndarray,
    categories: Sequence[str],
) -> pa.Table:
    """Rows for a batch. `top_classes`/`top_scores` hold one row per *successful* key, in order."""
    count = len(keys)
    ok_rows = [i for i in range(count) if errors[i] is None]
    if len(ok_rows) != len(top_classes):
        raise ValueError(f"{len(top_classes)} predictions for {len(ok_rows)} decodable rows")
    predicted: list[int | None] = [None] * count
    labels: list[str | None] = [None] * count
    confidence: list[float | None] = [None] * count
    k_classes: list[list[int] | None] = [None] * count
    k_labels: list[list[str] | None] = [None] * count
    k_scores: list[list[float] | None] = [None] * count
    for row, classes, scores in zip(ok_rows, top_classes.tolist(), top_scores.tolist(), strict=True):
        predicted[row], confidence[row] = classes[0], scores[0]
        labels[row] = categories[classes[0]]
        k_classes[row], k_scores[row] = classes, scores
        k_labels[row] = [categories[c] for c in classes]
    columns = [list(keys), predicted, labels, confidence, k_classes, k_labels, k_scores, list(errors)]
    return pa.Table.from_arrays(
        [pa.array(col, type=field.type) for col, field in zip(columns, PREDICTION_SCHEMA, strict=True)],
        schema=PREDICTION_SCHEMA,
    )
