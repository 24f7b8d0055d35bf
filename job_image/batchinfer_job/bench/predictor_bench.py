"""Predictor-stage benchmark (no Ray): model-only throughput vs decode+predict throughput.

Model-only feeds random uint8 batches that already sit on the device. Decode+predict decodes real JPEGs on a
thread pool (PIL releases the GIL) and hands batches to the same predictor, so the difference is what the
input path costs the accelerator.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from batchinfer_job.bench.images import make_image_set
from batchinfer_job.decode import Preprocess, decode_batch
from batchinfer_job.predictor import PredictorConfig, TorchPredictor


@dataclass(frozen=True)
class StageRow:
    model: str
    precision: str
    optimize: str
    model_only: float
    decode_predict: float

    @property
    def ratio(self) -> float:
        return self.decode_predict / self.model_only


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(predictor: TorchPredictor, batch: int, batches: int) -> float:
    device = predictor.device
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)
    for _ in range(3):
        predictor.predict_tensor(x)  # warm-up (and compile)
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        predictor.predict_tensor(x)
    _sync(device)
    return batch * batches / (time.perf_counter() - start)


def decode_predict(predictor: TorchPredictor, paths: list[Path], batch: int, workers: int) -> float:
    """Decode on `workers` threads while the predictor consumes finished batches."""
    chunks = [paths[i : i + batch] for i in range(0, len(paths) - batch + 1, batch)]
    ready: queue.Queue = queue.Queue(maxsize=workers * 2)
    pre = Preprocess()

    def produce() -> None:
        with ThreadPoolExecutor(workers) as pool:
            for out in pool.map(
                lambda chunk: decode_batch(
                    {
                        "key": np.asarray([str(p) for p in chunk], dtype=object),
                        "uri": np.asarray([str(p) for p in chunk], dtype=object),
                    },
                    preprocess=pre,
                ),
                chunks,
            ):
                ready.put(out)
        ready.put(None)

    predictor.predict_uint8(np.zeros((batch, 224, 224, 3), np.uint8))  # warm-up
    threading.Thread(target=produce, daemon=True).start()
    start, done = time.perf_counter(), 0
    while (item := ready.get()) is not None:
        predictor.predict_uint8(item["image"])
        done += len(item["image"])
    return done / (time.perf_counter() - start)


def run_predictor_bench(
    models: tuple[str, ...],
    precisions: tuple[str, ...],
    modes: tuple[str, ...],
    device: str,
    images: int,
    batch: int,
    folder: Path,
) -> list[StageRow]:
    paths = make_image_set(folder / f"images-{images}", images)
    workers = max(1, (os.cpu_count() or 2) - 1)
    rows = []
    for name in models:
        for precision in precisions:
            for mode in modes:
                config = PredictorConfig(
                    model={"torchvision": {"name": name, "weights": "NONE"}},
                    device=device,
                    precision=precision,
                    threads=os.cpu_count() or 1,
                    optimize=mode,
                    batch_rows=batch,
                )
                predictor = TorchPredictor(config)
                predictor.wait_compiled()  # optimize=compile: measure the compiled model
                rows.append(
                    StageRow(
                        model=name,
                        precision=precision,
                        optimize=predictor.optimized,
                        model_only=model_only(predictor, batch, batches=max(3, images // batch)),
                        decode_predict=decode_predict(predictor, paths, batch, workers),
                    )
                )
    return rows


def stage_table(rows: list[StageRow], device: str) -> list[str]:
    name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"
    lines = [
        f"device={name} cpus={os.cpu_count()}",
        f"{'model':10s} {'precision':9s} {'optimize':11s} {'model-only img/s':>17s} "
        f"{'decode+predict img/s':>21s} {'ratio':>6s}",
    ]
    for r in rows:
        lines.append(
            f"{r.model:10s} {r.precision:9s} {r.optimize:11s} {r.model_only:17.1f} "
            f"{r.decode_predict:21.1f} {r.ratio:6.2f}"
        )
    return lines
