"""Why a job stopped producing predictions: the stage that starved, named in the stall's message.

Each stage tells the job's ledger actor what it finished, without waiting for an answer (read tasks: rows;
decode tasks: rows; model actors: started, and model ready). When no prediction has come for
timeouts.stallSeconds, the driver reads those counts once and walks back from the model to the first stage in
front of which rows pile up — or, where none pile up, to the read. Nothing is read on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchinfer_job.capacity import StageShares


@dataclass(frozen=True)
class StageProgress:
    """What the stages of this attempt had finished, as the ledger counted it."""

    read: int = 0  # rows out of read tasks
    decoded: int = 0  # rows out of decode (or fetch) tasks
    actors_started: int = 0
    actors_ready: int = 0  # model loaded

    @classmethod
    def of(cls, ticks: dict[str, int]) -> StageProgress:
        return cls(*(ticks.get(k, 0) for k in ("read", "decoded", "actor_started", "actor_ready")))


def starved_stage(
    progress: StageProgress, predicted: int, shares: StageShares, free: dict[str, float], gpus_per_actor: float = 0.0
) -> str:
    """The stage that holds the job up, in one sentence; `predicted` is the rows the driver got back."""
    cpus = free.get("CPU", 0.0)
    total = shares.capacity.cpus
    if progress.actors_ready == 0:
        if progress.actors_started == 0:
            needs = f"{shares.actor_cpus:g} CPU" + (f" and {gpus_per_actor:g} GPU" if gpus_per_actor else "")
            gpus = f", {free.get('GPU', 0.0):g} GPU" if gpus_per_actor else ""
            return (
                f"predict: no model actor has started (each needs {needs}; free now: {cpus:g} of {total:g} CPUs"
                f"{gpus}): it waits for those resources, or its worker process is still starting"
            )
        return (
            "predict: the model actor is still loading its model; if loading takes longer, raise timeouts.stallSeconds"
        )
    if progress.decoded > predicted:
        return (
            f"predict: {progress.decoded - predicted} decoded rows wait for the model and no model call returns: "
            "a model call hangs"
        )
    if progress.read > progress.decoded:
        waiting = progress.read - progress.decoded
        if cpus + 1e-9 < shares.decode_cpus:
            return (
                f"decode starved: {waiting} rows wait for decode, whose tasks need {shares.decode_cpus:g} CPU each, "
                f"and {cpus:g} of {total:g} CPUs are free ({shares.describe()}): something else holds the CPUs"
            )
        return f"decode: {waiting} rows wait for decode with {cpus:g} CPUs free: a decode task hangs"
    return (
        f"read: no input rows wait anywhere ({progress.read} read so far by this attempt): reading from storage hangs"
    )
