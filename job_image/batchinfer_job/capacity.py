"""How the pipeline's stages share the cluster's CPUs, so that every stage can always make progress.

Read tasks, decode tasks and model actors all ask Ray for CPUs. A read task paused by backpressure keeps its
CPUs, and an actor keeps its CPUs for life: on 2 CPUs, an actor (1 CPU) and one paused read task (0.25) left
0.75 CPU, a decode task asked for 1, and the job waited forever (each stage waiting on the next). So the shares
are fitted once, here, from the CPUs the cluster has: read tasks get a bounded share, the actor pool leaves room
for one read task and one decode task, and a decode task asks for no more than what is left. When even the
smallest shares do not fit, the job is refused at start with the numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from batchinfer_job.spec import BatchInferenceSpec, ComputeSpec

READ_CPUS = 0.25  # a read task mostly waits on storage; a small share keeps it from queueing behind decode
MIN_DECODE_CPUS = 0.25  # the least a decode task is given; below it the job is refused
READ_SHARE = 0.25  # read tasks take at most this fraction of the CPUs the actors leave (always at least one task)


class CapacityError(ValueError):
    """The job's stages cannot all run on the cluster's CPUs; the message names the numbers and the fix."""


@dataclass(frozen=True)
class Capacity:
    """The CPUs Ray can place work on: the whole cluster and its largest node, and where the numbers came from."""

    cpus: float
    node_cpus: float
    source: str


@dataclass(frozen=True)
class StageShares:
    """What each stage asks Ray for, fitted to a `Capacity`."""

    read_cpus: float  # per read task
    read_tasks: int  # read tasks at once
    decode_cpus: float  # per decode (or fetch) task
    max_actors: int  # model actors at most (compute.maxActors, or fewer where they would leave no room)
    actor_cpus: float  # per model actor
    capacity: Capacity

    def describe(self) -> str:
        return (
            f"read {self.read_tasks}x{self.read_cpus:g} CPU, decode {self.decode_cpus:g} CPU per task, "
            f"model actors up to {self.max_actors}x{self.actor_cpus:g} CPU, "
            f"of {self.capacity.cpus:g} CPUs ({self.capacity.source})"
        )


def fit_stages(compute: ComputeSpec, capacity: Capacity) -> StageShares:
    """Shares that always leave one read task and one decode task room beside the largest actor pool.

    The pool shrinks below compute.maxActors where its CPUs would leave no such room; decode tasks ask for
    compute.preprocessCpus or what is left, whichever is smaller.
    """
    per_actor = compute.cpusPerActor
    if per_actor > capacity.node_cpus:
        raise CapacityError(
            f"compute.cpusPerActor={per_actor:g} exceeds the {capacity.node_cpus:g} CPUs of the largest node "
            f"({capacity.source}): the model actor could never start. Lower compute.cpusPerActor or give the "
            "workers more CPUs"
        )
    room = READ_CPUS + MIN_DECODE_CPUS
    most_actors = math.floor((capacity.cpus - room) / per_actor + 1e-9)
    if most_actors < compute.minActors:
        left = capacity.cpus - compute.minActors * per_actor
        raise CapacityError(
            f"compute.minActors={compute.minActors} model actors x cpusPerActor={per_actor:g} leave {left:g} of "
            f"the {capacity.cpus:g} CPUs ({capacity.source}) for reading and decoding, which need at least "
            f"{room:g} ({READ_CPUS:g} + {MIN_DECODE_CPUS:g}); lower compute.minActors or compute.cpusPerActor, "
            "or give the job more CPUs"
        )
    max_actors = min(compute.maxActors, most_actors)
    free = capacity.cpus - max_actors * per_actor
    read_tasks = max(1, math.floor(free * READ_SHARE / READ_CPUS + 1e-9))
    decode = min(compute.preprocessCpus, free - read_tasks * READ_CPUS, capacity.node_cpus)
    return StageShares(
        read_cpus=READ_CPUS,
        read_tasks=read_tasks,
        decode_cpus=math.floor(decode * 100 + 1e-9) / 100,  # whole hundredths: no float dust in Ray's accounting
        max_actors=max_actors,
        actor_cpus=per_actor,
        capacity=capacity,
    )


def cpu_quantity(value: str) -> float:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") in CPUs."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m?)", value)
    if not match:
        raise ValueError(f"not a CPU quantity: {value!r}")
    return float(match.group(1)) / (1000 if match.group(2) else 1)


def planned_capacity(spec: BatchInferenceSpec) -> Capacity:
    """The CPUs the RayJob's workers will have at most (the head runs no tasks: num-cpus 0).

    Ray counts a pod's CPU limit rounded up to whole CPUs (KubeRay's `num-cpus`).
    """
    workers = spec.cluster.workers
    per_node = float(math.ceil(cpu_quantity(workers.resources.cpu)))
    return Capacity(
        cpus=per_node * workers.maxReplicas,
        node_cpus=per_node,
        source=f"{workers.maxReplicas} worker pods x {per_node:g} CPUs, cluster.workers",
    )


def live_capacity() -> Capacity:
    """The CPUs of the Ray cluster this driver is connected to, as Ray reports them now."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=0.0)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    return Capacity(cpus=cpus, node_cpus=node_cpus, source=f"the Ray cluster's {len(nodes)} node(s)")


def larger(a: Capacity, b: Capacity) -> Capacity:
    """The larger of two views of a cluster (an autoscaling cluster may not have every worker yet)."""
    return a if (a.cpus, a.node_cpus) >= (b.cpus, b.node_cpus) else b
