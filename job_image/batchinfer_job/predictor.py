"""GPU/CPU stage: the actor class Ray Data's actor pool runs. Loads the model once, predicts per batch.

Input batch (from decode): `key`, `image` uint8 (N, H, W, 3), `error` — or, with compute.decode=device (from
`decode.fetch_batch`), `key`, `data` (encoded bytes), `device`, `error`, which the actor decodes on the model's
device first (`device_decode`), outside the model lock so that decoding one batch overlaps the model on another.
Output: a `PREDICTION_SCHEMA` table. uint8 travels to the device (pinned, non-blocking) and is normalised there;
rows whose model call raises are isolated by splitting the batch, so one poisoned row costs only itself.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batchinfer_job.decode import error_or_none
from batchinfer_job.gpu_check import check_assigned_gpus
from batchinfer_job.models import load_model, preprocess_for
from batchinfer_job.outputs import PARTITION_COLUMN, prediction_table
from batchinfer_job.spec import DEFAULT_MAX_IMAGE_PIXELS, ModelSpec

log = logging.getLogger("batchinfer.predictor")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {dtype: name for name, dtype in _DTYPES.items()}  # torch.bfloat16 → "bf16"


@dataclass(frozen=True)
class PredictorConfig:
    """What each actor needs; plain data so Ray can ship it."""

    model: dict[str, Any]
    top_k: int = 5
    device: str = "auto"
    precision: str = "auto"
    threads: int = 1
    optimize: str = "auto"
    batch_rows: int = 16  # rows per batch (batching.batchSize): a compiled model is compiled for this many
    rows_per_actor: int | None = None  # rows this actor is expected to predict (None: not known), for optimize=auto
    batch_timeout: float | None = None  # timeouts.perBatchSeconds
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # input.maxImagePixels, for decoding in the actor
    max_decode_seconds: float | None = None  # input.maxDecodeSeconds, for the actor's CPU decoder
    ledger: Any = None  # the job's reading.PartitionLedger: told when the actor starts and when its model is ready


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), which run bf16 matmuls natively."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
    return bool(probe and probe())


def pick_dtype(precision: str, device: torch.device, *, cuda_bf16: bool, cpu_amx: bool) -> torch.dtype:
    """compute.precision → dtype. auto is bf16 where the hardware runs it natively, else fp32.

    Measured on a 2-core AMX host (resnet18): bf16 eager 90.7 img/s against 48.1 for fp32 TorchScript; without
    AMX, bf16 was 6-30x slower than fp32.
    """
    if precision != "auto":
        return _DTYPES[precision]
    native_bf16 = cuda_bf16 if device.type == "cuda" else cpu_amx
    return torch.bfloat16 if native_bf16 else torch.float32


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """pick_dtype with this host's hardware filled in."""
    return pick_dtype(
        precision,
        device,
        cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        cpu_amx=device.type == "cpu" and cpu_has_amx(),
    )


class PredictorContractError(Exception):
    """A user predictor (model.predictor) cannot be built or returned something outside its contract.

    Not a per-row error: it fails the job at once, with one line naming the predictor and what it did.
    (Deliberately not a RuntimeError/ValueError/TypeError, which isolate a failing row instead.) The actor
    does not raise it through Ray, which would bury it in a wrapped traceback: it answers with a one-row
    table holding only `CONTRACT_ERROR_COLUMN`, and the driver raises it.
    """


CONTRACT_ERROR_COLUMN = "predictor_contract_error"


def load_predictor_class(ref: str) -> type:
    """The class `module:Class` names; PredictorContractError when it is not importable or not a class."""
    module_name, class_name = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PredictorContractError(
            f"model.predictor {ref!r} cannot be imported: {type(err).__name__}: {err}; install its package in "
            "the job image (or put it on PYTHONPATH locally)"
        ) from None
    except (Exception, SystemExit) as err:  # user code at import time: its failure, named once, never an exit
        raise PredictorContractError(
            f"model.predictor {ref!r}: importing {module_name} raised {type(err).__name__}: {err}"
        ) from None
    try:
        target = getattr(module, class_name)
    except AttributeError as err:
        raise PredictorContractError(
            f"model.predictor {ref!r} cannot be imported: {type(err).__name__}: {err}; install its package in "
            "the job image (or put it on PYTHONPATH locally)"
        ) from None
    if not isinstance(target, type):
        raise PredictorContractError(
            f"model.predictor {ref!r} is a {type(target).__name__}, not a class; give 'module:Class' of a class "
            "built with no arguments whose instances are called with a batch"
        )
    return target


def build_user_predictor(ref: str) -> Callable[[dict[str, np.ndarray]], Any]:
    cls = load_predictor_class(ref)
    try:
        instance = cls()
    except Exception as err:  # any failure of user code to construct is a contract failure, named once
        raise PredictorContractError(
            f"model.predictor {ref!r} could not be constructed: {type(err).__name__}: {err}"
        ) from None
    if not callable(instance):
        raise PredictorContractError(f"model.predictor {ref!r} instances are not callable; define __call__(batch)")
    return instance


def check_user_output(ref: str, out: Any, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The (classes, scores) of a user predictor's answer for `rows` rows, or PredictorContractError."""
    if not isinstance(out, dict) or "top_k_classes" not in out or "top_k_scores" not in out:
        shown = f"a dict with keys {sorted(map(str, out))[:6]}" if isinstance(out, dict) else type(out).__name__
        raise PredictorContractError(
            f"model.predictor {ref!r} returned {shown}; it must return a dict with 'top_k_classes' and "
            "'top_k_scores' (N x k)"
        )
    try:
        classes, scores = np.asarray(out["top_k_classes"]), np.asarray(out["top_k_scores"])
    except (TypeError, ValueError) as err:
        raise PredictorContractError(f"model.predictor {ref!r} returned arrays numpy cannot read: {err}") from None
    if classes.ndim != 2 or classes.shape[0] != rows or scores.shape != classes.shape:
        raise PredictorContractError(
            f"model.predictor {ref!r} returned top_k_classes {classes.shape} and top_k_scores {scores.shape} "
            f"for {rows} rows; both must be ({rows}, k)"
        )
    if not np.issubdtype(classes.dtype, np.integer):
        raise PredictorContractError(
            f"model.predictor {ref!r} returned top_k_classes of dtype {classes.dtype}; they must be integers"
        )
    return classes, scores


class BatchTimeoutError(TimeoutError):
    """A model call ran past timeouts.perBatchSeconds."""


def call_with_timeout(fn: Callable[[], Any], seconds: float | None) -> Any:
    """Run `fn`, giving up after `seconds`.

    A Python thread cannot be killed: a call that hangs keeps its thread, and the caller moves on (the batch
    is split and retried). If calls keep hanging, timeouts.stallSeconds fails the job.
    """
    if seconds is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the calling thread and re-raised there
            box["error"] = err

    worker = threading.Thread(target=target, daemon=True, name="model-call")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise BatchTimeoutError(f"model call exceeded timeouts.perBatchSeconds={seconds:g}")
    if "error" in box:
        raise box["error"]
    return box["value"]


# torch.compile, measured on one H200 (ResNet-152 bf16, batch 256): 28-35 s to compile, then 10,906 img/s against
# 7,454 eager. The compile runs beside the eager model, which serves batches meanwhile, so it costs CPU time, not
# model time; auto compiles on a GPU when the eager model alone would be busy for at least twice that long, so
# that at least half the job runs compiled: 2 x 35 s x 7,454 img/s.
COMPILE_SECONDS = 35
EAGER_ROWS_PER_SECOND = 7_454
COMPILE_MIN_ROWS_PER_ACTOR = 2 * COMPILE_SECONDS * EAGER_ROWS_PER_SECOND  # 521,780


def resolve_optimize(mode: str, device: torch.device, dtype: torch.dtype, rows_per_actor: int | None) -> str:
    """compute.optimize resolved. auto: TorchScript on a CPU in fp32 (the fastest CPU path measured); on a GPU,
    compile when the actor has at least COMPILE_MIN_ROWS_PER_ACTOR rows to predict, else eager."""
    if mode != "auto":
        return mode
    if device.type == "cpu":
        return "torchscript" if dtype == torch.float32 else "eager"
    if rows_per_actor is not None and rows_per_actor >= COMPILE_MIN_ROWS_PER_ACTOR:
        return "compile"
    return "eager"


def optimize_model(
    model: torch.nn.Module, mode: str, device: torch.device, dtype: torch.dtype, example: torch.Tensor
) -> tuple[Any, str]:
    """Apply a resolved compute.optimize now; returns the callable model and the mode actually used.

    A model that cannot be traced falls back to eager, with a warning naming why. `compile` returns the model
    unchanged: the actor compiles it in the background (`TorchPredictor._compile`).
    """
    if mode == "torchscript":
        try:
            autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            with torch.inference_mode(), autocast, warnings.catch_warnings():
                # TorchScript is deprecated upstream but still the fastest CPU fp32 path measured here; chosen
                # deliberately, so its FutureWarnings would only repeat in every actor's log.
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
                traced = torch.jit.trace(model, example, check_trace=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced)), mode
        except (RuntimeError, TypeError, ValueError) as err:
            log.warning("torchscript_failed falling_back=eager error=%r", err)
        return model, "eager"
    return model, "compile" if mode == "compile" else "eager"


@dataclass(frozen=True)
class CompiledModel:
    """A torch.compile'd model, compiled for exactly `rows` rows per call (shorter calls are padded to it)."""

    model: Any
    rows: int
    seconds: float


def is_out_of_memory(err: BaseException) -> bool:
    """A device ran out of memory (CUDA, or any accelerator torch reports the same way)."""
    return isinstance(err, torch.OutOfMemoryError)


class TorchPredictor:
    """Ray Data callable class: `__init__` loads once per actor, `__call__` predicts one batch.

    On a device out-of-memory error the actor halves the rows per model call, retries the same rows, and keeps
    the smaller size for every later batch (logged once per halving): OOM never loses or fails a row while a
    single row still fits.
    """

    def __init__(self, config: PredictorConfig) -> None:
        if config.ledger is not None:
            config.ledger.tick.remote("actor_started")
        self._load(config)
        if config.ledger is not None:
            config.ledger.tick.remote("actor_ready")

    def _load(self, config: PredictorConfig) -> None:
        self.max_rows: int | None = None  # rows per model call after an out-of-memory back-off; None: no cap
        self.compiled: CompiledModel | None = None  # set by the background compile (optimize=compile)
        self.model_lock = threading.Lock()  # one batch on the model at a time; decoding runs beside it
        self.streams = threading.local()  # each decoding thread's own CUDA stream
        torch.set_num_threads(max(1, config.threads))  # Ray sets OMP_NUM_THREADS=1 in workers
        spec = ModelSpec.model_validate(config.model)
        self.preprocess = preprocess_for(spec)
        self.max_pixels = config.max_pixels
        self.max_decode_seconds = config.max_decode_seconds
        self.top_k = config.top_k
        check_assigned_gpus()  # GPUs Ray gave this actor that torch cannot use: fail now, never run on the CPU
        self.device = pick_device(config.device)
        self.dtype = resolve_dtype(config.precision, self.device)
        self.batch_timeout = config.batch_timeout
        self.user_predictor: Callable[[dict[str, np.ndarray]], Any] | None = None
        self.predictor_ref = spec.predictor
        self.categories: list[str] = []
        self.contract_error: str | None = None
        if spec.predictor is not None:
            try:
                self.user_predictor = build_user_predictor(spec.predictor)
            except PredictorContractError as err:
                self.contract_error = str(err)
            return
        loaded = load_model(spec)
        self.categories = loaded.categories
        self.model, self.optimized = optimize_model(
            loaded.module.to(self.device).eval(),
            resolve_optimize(config.optimize, self.device, self.dtype, config.rows_per_actor),
            self.device,
            self.dtype,
            example=torch.zeros(2, 3, self.preprocess.crop, self.preprocess.crop, device=self.device),
        )
        # Frozen TorchScript (oneDNN) wants plain NCHW; eager convolutions run faster channels-last.
        self.memory_format = torch.contiguous_format if self.optimized == "torchscript" else torch.channels_last
        if self.optimized != "torchscript":
            self.model = self.model.to(memory_format=torch.channels_last)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([m * 255 for m in self.preprocess.mean], device=self.device).view(shape)
        self.std = torch.tensor([s * 255 for s in self.preprocess.std], device=self.device).view(shape)
        log.info(
            "model_ready device=%s precision=%s optimize=%s threads=%d",
            self.device,
            PRECISION_NAMES[self.dtype],
            self.optimized,
            torch.get_num_threads(),
        )
        if self.optimized == "compile":  # eager serves batches until the compiled model is ready
            self.compile_thread = threading.Thread(
                target=self._compile, args=(config.batch_rows,), daemon=True, name="model-compile"
            )
            self.compile_thread.start()

    def _compile(self, rows: int) -> None:
        """Compile the model for `rows` rows per call (static shapes: no recompiles later) while the eager model
        serves; from its first call on, batches go to the compiled model. A model torch.compile cannot compile
        stays eager, with a warning naming why."""
        start = time.monotonic()
        try:
            compiled = torch.compile(self.model, dynamic=False)
            example = torch.zeros((rows, self.preprocess.crop, self.preprocess.crop, 3), dtype=torch.uint8)
            with torch.inference_mode():
                self._forward(compiled, example.to(self.device))  # compiles, with every later call's shapes and modes
        except Exception as err:  # torch.compile raises many kinds; the eager model is still there and serving
            log.warning("compile_failed staying=eager error=%r", err, exc_info=True)
            return
        self.compiled = CompiledModel(compiled, rows, time.monotonic() - start)
        log.info("model_compiled seconds=%.1f rows_per_call=%d", self.compiled.seconds, rows)

    def wait_compiled(self, timeout: float | None = None) -> CompiledModel | None:
        """The compiled model once its background compile ends (None: not compiling, or it failed)."""
        thread = getattr(self, "compile_thread", None)
        if thread is not None:
            thread.join(timeout)
        return self.compiled

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        try:
            if "data" in batch and self.contract_error is None:
                batch = self.decode(batch)  # outside the lock: overlaps the model on the batch before
            with self.model_lock:
                return self._predict_batch(batch)
        except PredictorContractError as err:
            self.contract_error = str(err)
        return pa.table({CONTRACT_ERROR_COLUMN: [self.contract_error]})

    def decode(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A `fetch_batch` batch → the same rows with `image` (uint8 NHWC on the model's device) and `error`."""
        from batchinfer_job.device_decode import decode_on_device  # torchcodec: only actors that decode

        errors = [error_or_none(e) for e in batch["error"]]
        with self._decode_stream():
            images = decode_on_device(
                list(batch["data"]),
                list(batch["device"]),
                errors,
                self.preprocess,
                self.device,
                self.max_pixels,
                max_seconds=self.max_decode_seconds,
            )
        if self.device.type == "cuda":  # made on this thread's stream, used on the model's: keep it until then
            images.record_stream(torch.cuda.default_stream(self.device))
        decoded = {k: v for k, v in batch.items() if k not in ("data", "device")}
        return decoded | {"image": images, "error": np.asarray([e or "" for e in errors], dtype=object)}

    def _decode_stream(self) -> Any:
        """On CUDA: this thread's own stream, synchronised on exit so the model sees finished crops."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self.streams, "stream"):
            self.streams.stream = torch.cuda.Stream(self.device)
        return _synchronised(self.streams.stream)

    def _predict_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.contract_error is not None:
            raise PredictorContractError(self.contract_error)
        keys = [str(k) for k in batch["key"]]
        errors = [error_or_none(e) for e in batch["error"]]
        images = batch["image"]
        ok = [i for i, e in enumerate(errors) if e is None]
        results = self._predict_in_chunks(keys, images, ok, errors)
        ok_after = [i for i in ok if errors[i] is None]
        width = len(next(iter(results.values()))[0]) if results else self.top_k
        classes = np.stack([results[i][0] for i in ok_after]) if ok_after else np.zeros((0, width), np.int32)
        scores = np.stack([results[i][1] for i in ok_after]) if ok_after else np.zeros((0, width), np.float32)
        table = prediction_table(keys, errors, classes, scores, self.categories)
        if PARTITION_COLUMN in batch:  # the input partition of each row, for the driver's bookkeeping
            table = table.append_column(PARTITION_COLUMN, pa.array([str(p) for p in batch[PARTITION_COLUMN]]))
        return table

    def _predict_in_chunks(
        self, keys: list[str], images: np.ndarray, rows: list[int], errors: list[str | None]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Predict `rows` in model calls of at most `max_rows`; halve it on out-of-memory and retry."""
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        start = 0
        while start < len(rows):
            chunk = rows[start : start + (self.max_rows or len(rows))]
            try:
                results |= self._predict_isolating(keys, images, chunk, errors)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                if len(chunk) == 1:  # nothing smaller to try: this row cannot be predicted on this device
                    errors[chunk[0]] = f"predict: {type(err).__name__}: {err}"
                    start += 1
                    continue
                self.max_rows = len(chunk) // 2
                if self.compiled is not None:  # compiled for full batches: smaller calls are padded back to them
                    log.warning("out of memory with the compiled model; continuing eager")
                    self.compiled = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of memory at %d rows per model call; continuing with %d", len(chunk), self.max_rows)
                continue  # the same rows again, in smaller calls
            start += len(chunk)
        return results

    def _predict_isolating(
        self, keys: list[str], images: np.ndarray, rows: list[int], errors: list[str | None]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Predict `rows`; on failure split in halves until the failing rows are single, then mark them.

        One poisoned row costs only itself: log2(batch) extra calls for the halves that contain it. Running out of
        memory is not a poisoned row: it goes up to `_predict_in_chunks`, which makes the calls smaller.
        """
        if not rows:
            return {}
        try:
            classes, scores = call_with_timeout(
                lambda: self._predict_rows([keys[i] for i in rows], images[rows]), self.batch_timeout
            )
        except (RuntimeError, ValueError, TypeError, BatchTimeoutError) as err:
            if is_out_of_memory(err):
                raise
            if len(rows) == 1:
                errors[rows[0]] = f"predict: {type(err).__name__}: {err}"
                return {}
            half = len(rows) // 2
            left = self._predict_isolating(keys, images, rows[:half], errors)
            return {**left, **self._predict_isolating(keys, images, rows[half:], errors)}
        return {row: (classes[j], scores[j]) for j, row in enumerate(rows)}

    def _predict_rows(self, keys: list[str], images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.user_predictor is None:
            return self.predict_uint8(images)
        host = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        out = self.user_predictor({"key": np.asarray(keys, dtype=object), "image": host})
        classes, scores = check_user_output(str(self.predictor_ref), out, len(keys))
        if "categories" in out:
            self.categories = list(out["categories"])
        elif len(self.categories) <= int(classes.max(initial=0)):
            self.categories = [f"class_{i}" for i in range(int(classes.max(initial=0)) + 1)]
        return classes, scores

    def predict_uint8(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC on the host (or already on the device) → (top-k classes, top-k probabilities), both (N, k)."""
        if isinstance(images, torch.Tensor):
            classes, scores = self.predict_tensor(images.to(self.device))
            return classes.cpu().numpy(), scores.cpu().numpy()
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        classes, scores = self.predict_tensor(tensor)
        return classes.cpu().numpy(), scores.cpu().numpy()

    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NHWC already on the model's device → top-k classes (int32) and probabilities, on device.

        Once a compiled model is ready, calls of up to its rows go to it, padded with zero images to exactly its
        rows (it was compiled for that shape alone); the padding's outputs are dropped."""
        compiled, rows = self.compiled, images.shape[0]
        if compiled is not None and 0 < rows <= compiled.rows:
            if rows < compiled.rows:
                images = torch.cat([images, images.new_zeros((compiled.rows - rows, *images.shape[1:]))])
            logits = self._forward(compiled.model, images)[:rows]
        else:
            logits = self._forward(self.model, images)
        probs = logits.float().softmax(dim=-1)
        scores, classes = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        return classes.to(torch.int32), scores

    def _forward(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on the device → the model's logits (normalised, in the model's memory format and dtype)."""
        x = images.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return model(x)


@contextlib.contextmanager
def _synchronised(stream: torch.cuda.Stream) -> Iterator[None]:
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()
