"""BatchInference: create (or adopt) the children, refuse changes to immutable fields, track phases."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from batchinfer_job import spec as s
from batchinfer_job.documents import SpecError, parse_spec
from batchinfer_operator import kube, metrics, naming
from batchinfer_operator.changes import changed_fields, spec_hash
from batchinfer_operator.render import Owner, render_children
from batchinfer_operator.settings import OperatorSettings
from batchinfer_operator.status import is_terminal

GVR = (s.API_GROUP, s.API_VERSION, s.PLURAL)
SETTINGS = OperatorSettings.from_env()
HANDLER_RETRIES = 10


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": now(),
        "observedGeneration": generation,
    }


def conditions_of(status: Any) -> list[dict[str, Any]]:
    """The well-formed conditions of a status (objects stored before the schema tightened may hold junk)."""
    raw = status.get("conditions") if isinstance(status, Mapping) else None
    return (
        [dict(c) for c in raw if isinstance(c, Mapping) and isinstance(c.get("type"), str)]
        if isinstance(raw, list)
        else []
    )


def status_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an object's status, or {} when it has none (or junk)."""
    raw = obj.get("status")
    return dict(raw) if isinstance(raw, Mapping) else {}


def parse_stored_spec(body: kopf.Body) -> s.BatchInferenceSpec:
    """The spec of a stored object, whatever shape it arrived in; SpecError names what is wrong."""
    raw = body.get("spec")
    if not isinstance(raw, Mapping):
        raise SpecError([f"spec: expected an object with model, input and output, got {type(raw).__name__}"])
    return parse_spec(dict(raw))


def merge_condition(existing: list[dict[str, Any]] | None, new: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the condition of the same type; keep its transition time if its status did not change."""
    out, replaced = [], False
    for cond in existing or []:
        if cond.get("type") == new["type"]:
            replaced = True
            if cond.get("status") == new["status"]:
                new = {**new, "lastTransitionTime": cond.get("lastTransitionTime", new["lastTransitionTime"])}
            out.append(new)
        else:
            out.append(cond)
    return out if replaced else [*out, new]


def fail_permanently(body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, reason: str, message: str) -> None:
    """End the BatchInference as Failed with `reason` and `message` (status, condition, Event); kopf stops."""
    generation = body.metadata.get("generation")
    patch.status["phase"] = "Failed"
    patch.status["reason"] = reason
    patch.status["message"] = message
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = merge_condition(
        conditions_of(status), condition("Failed", True, reason, message, generation)
    )
    kopf.warn(body, reason=reason, message=message)
    raise kopf.PermanentError(f"{reason}: {message}")


def fail_invalid_spec(body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, problems: list[str]) -> None:
    fail_permanently(body, status, patch, "SpecInvalid", "; ".join(problems))


def record_condition(namespace: str, name: str, new: dict[str, Any], only_if_present: bool = False) -> None:
    """Set one condition on the stored object, keeping every other writer's conditions (see kube)."""

    def merged(bi: dict[str, Any]) -> dict[str, Any] | None:
        existing = conditions_of(bi.get("status"))
        if only_if_present and not any(c.get("type") == new["type"] for c in existing):
            return None
        return {"conditions": merge_condition(existing, new)}

    kube.update_batchinference_status(namespace, name, merged)


# kopf's callback protocols list every keyword it passes; handlers name the ones they use and take **_.
@kopf.on.resume(*GVR, retries=HANDLER_RETRIES, backoff=5)
@kopf.on.create(*GVR, retries=HANDLER_RETRIES, backoff=5)  # type: ignore[arg-type]
def create_children(
    body: kopf.Body,
    status: kopf.Status,
    name: str,
    namespace: str,
    uid: str,
    patch: kopf.Patch,
    retry: int,
    **_: Any,
) -> None:
    """Create the ConfigMap, RBAC and RayJob; on resume/409 adopt what exists. Terminal runs are left alone."""
    metrics.RECONCILES.labels("create").inc()
    if is_terminal(status.get("phase")):
        return  # finished; its RayJob may be gone by TTL and must not be recreated
    try:
        parsed = parse_stored_spec(body)
    except SpecError as err:
        metrics.ERRORS.labels("create").inc()
        fail_invalid_spec(body, dict(status), patch, err.problems)
        return
    children = render_children(parsed, Owner(name=name, namespace=namespace), SETTINGS)
    kopf.append_owner_reference(children, owner=body)
    created = []
    try:
        for child in children:
            if kube.create_or_adopt(child, owner_uid=uid) == "created":
                metrics.CHILDREN_CREATED.labels(child["kind"]).inc()
                created.append(f"{child['kind']}/{child['metadata']['name']}")
    except kopf.PermanentError as err:  # refused (403, 422) or a child someone else owns: no retry will help
        metrics.ERRORS.labels("create").inc()
        fail_permanently(body, dict(status), patch, "ChildCreationFailed", str(err))
    except kopf.TemporaryError as err:
        metrics.ERRORS.labels("create").inc()
        if retry + 1 >= HANDLER_RETRIES:
            message = f"gave up after {HANDLER_RETRIES} attempts: {err}"
            fail_permanently(body, dict(status), patch, "RetriesExhausted", message)
        raise
    rayjob = naming.rayjob_name(name)
    if created:
        kopf.info(body, reason="Created", message=f"created {', '.join(created)}")
    patch.status["rayJobName"] = rayjob
    patch.status["outputUri"] = parsed.output.uri
    if not status.get("acceptedSpecHash"):  # set once: a later (refused) spec must never become the accepted one
        patch.status["acceptedSpecHash"] = spec_hash(parsed)
        patch.status["observedGeneration"] = body.metadata.get("generation")
    if not status.get("phase"):
        patch.status["phase"] = "Suspended" if parsed.suspend else "Pending"


@kopf.on.update(*GVR, field="spec", retries=HANDLER_RETRIES, backoff=5)  # type: ignore[arg-type]
def spec_changed(
    body: kopf.Body, old: Any, new: Any, status: kopf.Status, name: str, namespace: str, patch: kopf.Patch, **_: Any
) -> None:
    """Only `suspend` may change; any other change is refused with a SpecRejected condition and an Event."""
    metrics.RECONCILES.labels("update").inc()
    generation = body.metadata.get("generation")
    try:
        if not isinstance(new, Mapping):
            raise SpecError([f"spec: expected an object, got {type(new).__name__}"])
        parsed = parse_spec(dict(new))
    except SpecError as err:
        problems = "; ".join(err.problems)
        record_condition(namespace, name, condition("SpecRejected", True, "SpecInvalid", problems, generation))
        kopf.warn(body, reason="SpecRejected", message=problems)
        return
    accepted = status.get("acceptedSpecHash")
    if accepted and spec_hash(parsed) != accepted:
        fields = ", ".join(changed_fields(dict(old) if isinstance(old, Mapping) else None, dict(new))) or "spec"
        message = (
            f"{fields} cannot change after creation (only spec.suspend can); the running job keeps its "
            "original spec. Revert the change, or create a new BatchInference."
        )
        record_condition(namespace, name, condition("SpecRejected", True, "ImmutableField", message, generation))
        kopf.warn(body, reason="SpecRejected", message=message)
        return
    record_condition(
        namespace, name, condition("SpecRejected", False, "SpecAccepted", "", generation), only_if_present=True
    )
    if (old if isinstance(old, Mapping) else {}).get("suspend", False) != parsed.suspend and not is_terminal(
        status.get("phase")
    ):
        if parsed.scheduling.queueName:
            # Kueue owns a queued RayJob's spec.suspend (it admits by unsuspending): writing it would fight Kueue.
            kopf.warn(
                body,
                reason="SuspendIgnored",
                message=f"spec.suspend={parsed.suspend} is not passed on: Kueue queue "
                f"{parsed.scheduling.queueName!r} owns this RayJob's admission; stop it through Kueue instead",
            )
        else:
            kube.patch_rayjob_suspend(namespace, naming.rayjob_name(name), parsed.suspend)
            kopf.info(body, reason="Suspended" if parsed.suspend else "Resumed", message=f"suspend={parsed.suspend}")
    patch.status["observedGeneration"] = generation


@kopf.on.event(*GVR)  # type: ignore[arg-type]
def track_phase(type: str | None, name: str, namespace: str, status: kopf.Status, **_: Any) -> None:
    """Keep the phase gauge of /metrics current."""
    if type == "DELETED":
        metrics.PHASE_COLLECTOR.forget(namespace, name)
    else:
        metrics.PHASE_COLLECTOR.observe(namespace, name, status.get("phase"))
