"""BatchInference: create (or adopt) the children, refuse changes to immutable fields, track phases."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from batchinfer_job import spec as s
from batchinfer_job.classes import ClassRejected
from batchinfer_job.documents import SpecError, parse_spec
from batchinfer_operator import kube, metrics, naming
from batchinfer_operator.changes import changed_fields, is_accepted, spec_hash
from batchinfer_operator.class_choice import resolve_in_cluster
from batchinfer_operator.render import Owner, render_children
from batchinfer_operator.settings import OperatorSettings
from batchinfer_operator.status import QUEUED_REASON, is_terminal, queued_message

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
        parsed, class_name = accepted_spec(body, dict(status))
    except SpecError as err:
        metrics.ERRORS.labels("create").inc()
        fail_invalid_spec(body, dict(status), patch, err.problems)
        return
    except ClassRejected as err:
        metrics.ERRORS.labels("create").inc()
        reject_for_class(body, dict(status), patch, err, last_try=retry + 1 >= HANDLER_RETRIES)
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
        if parsed.scheduling.queueName:
            kopf.info(body, reason="Queued", message=queued_message(parsed.scheduling.queueName))
    patch.status["rayJobName"] = rayjob
    patch.status["outputUri"] = parsed.output.uri
    if not status.get("acceptedSpecHash"):  # set once: a later (refused) spec must never become the accepted one
        patch.status["acceptedSpecHash"] = spec_hash(body.get("spec") or {})
        patch.status["observedGeneration"] = body.metadata.get("generation")
        patch.status["effectiveSpec"] = parsed.model_dump(mode="json", exclude_none=True)
        patch.status["className"] = class_name
        rejected = [c for c in conditions_of(status) if c.get("type") == "SpecRejected"]
        if rejected and rejected[0].get("status") == "True":  # it waited for its class: that is over
            accepted = condition("SpecRejected", False, "SpecAccepted", "", body.metadata.get("generation"))
            patch.status["conditions"] = merge_condition(conditions_of(status), accepted)
    if not status.get("phase") or (status.get("phase") == "Pending" and not status.get("acceptedSpecHash")):
        # The first phase, once (also after waiting Pending for its class). Later the RayJob's status decides:
        # a resumed operator must not write Suspended over a job Kueue admitted (its spec.suspend stays true).
        # A queued job starts Queued: Kueue's webhook creates its RayJob suspended, and only Kueue admits it.
        if parsed.scheduling.queueName:
            patch.status["phase"] = "Queued"
            patch.status["reason"], patch.status["message"] = QUEUED_REASON, queued_message(parsed.scheduling.queueName)
        else:
            patch.status["phase"] = "Suspended" if parsed.suspend else "Pending"


def accepted_spec(body: kopf.Body, status: dict[str, Any]) -> tuple[s.BatchInferenceSpec, str | None]:
    """The effective spec and class: as fixed in status when the job was accepted, else resolved now."""
    fixed = status.get("effectiveSpec")
    if isinstance(fixed, Mapping) and status.get("acceptedSpecHash"):
        return parse_spec(dict(fixed)), status.get("className")
    raw = body.get("spec")
    if not isinstance(raw, Mapping):
        raise SpecError([f"spec: expected an object with model, input and output, got {type(raw).__name__}"])
    return resolve_in_cluster(raw)


def effective_spec_of(body: Mapping[str, Any]) -> s.BatchInferenceSpec | None:
    """The spec a BatchInference runs with once accepted; for one accepted by an operator that did not record
    it (no classes then), its own spec. None before it is accepted, or when what is stored does not parse."""
    status = status_of(body)
    fixed = status.get("effectiveSpec")
    if not isinstance(fixed, Mapping):
        fixed = body.get("spec") if status.get("acceptedSpecHash") else None
    try:
        return parse_spec(dict(fixed)) if isinstance(fixed, Mapping) else None
    except SpecError:
        return None


CLASS_RETRY_SECONDS = 15.0


def reject_for_class(
    body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, err: ClassRejected, last_try: bool
) -> None:
    """Refuse a BatchInference its class does not allow: SpecRejected condition and Event, nothing created.

    A missing class or two defaults may be fixed by the platform team: those wait (Pending, retried); a
    limit or an enforced field cannot change without a new BatchInference: those fail it.
    """
    generation = body.metadata.get("generation")
    message = str(err)
    rejected = condition("SpecRejected", True, err.reason, message, generation)
    kopf.warn(body, reason="SpecRejected", message=message)
    if err.waiting and not last_try:
        patch.status["phase"] = "Pending"
        patch.status["conditions"] = merge_condition(conditions_of(status), rejected)
        raise kopf.TemporaryError(f"{err.reason}: {message}", delay=CLASS_RETRY_SECONDS)
    fail_permanently(
        body, {**status, "conditions": merge_condition(conditions_of(status), rejected)}, patch, "SpecRejected", message
    )


@kopf.on.update(*GVR, field="spec", retries=HANDLER_RETRIES, backoff=5)  # type: ignore[arg-type]
def spec_changed(
    body: kopf.Body, old: Any, new: Any, status: kopf.Status, name: str, namespace: str, patch: kopf.Patch, **_: Any
) -> None:
    """Only `suspend` may change; any other change is refused with a SpecRejected condition and an Event."""
    metrics.RECONCILES.labels("update").inc()
    generation = body.metadata.get("generation")
    if not isinstance(new, Mapping):
        message = f"spec: expected an object, got {type(new).__name__}"
        record_condition(namespace, name, condition("SpecRejected", True, "SpecInvalid", message, generation))
        kopf.warn(body, reason="SpecRejected", message=message)
        return
    accepted = status.get("acceptedSpecHash")
    if accepted and not is_accepted(new, accepted):
        fields = ", ".join(changed_fields(dict(old) if isinstance(old, Mapping) else None, dict(new))) or "spec"
        message = (
            f"{fields} cannot change after creation (only spec.suspend can); the running job keeps its "
            "original spec. Revert the change, or create a new BatchInference."
        )
        record_condition(namespace, name, condition("SpecRejected", True, "ImmutableField", message, generation))
        kopf.warn(body, reason="SpecRejected", message=message)
        return
    if accepted:
        record_condition(
            namespace, name, condition("SpecRejected", False, "SpecAccepted", "", generation), only_if_present=True
        )
    suspend = new.get("suspend", False) is True
    effective = effective_spec_of(body)
    if (
        effective is not None
        and (old if isinstance(old, Mapping) else {}).get("suspend", False) != suspend
        and not is_terminal(status.get("phase"))
    ):
        if effective.scheduling.queueName:
            # Kueue owns a queued RayJob's spec.suspend (it admits by unsuspending): writing it would fight Kueue.
            kopf.warn(
                body,
                reason="SuspendIgnored",
                message=f"spec.suspend={suspend} is not passed on: Kueue queue "
                f"{effective.scheduling.queueName!r} owns this RayJob's admission; stop it through Kueue instead",
            )
        else:
            kube.patch_rayjob_suspend(namespace, naming.rayjob_name(name), suspend)
            kopf.info(body, reason="Suspended" if suspend else "Resumed", message=f"suspend={suspend}")
    patch.status["observedGeneration"] = generation


@kopf.on.event(*GVR)  # type: ignore[arg-type]
def track_phase(type: str | None, name: str, namespace: str, status: kopf.Status, **_: Any) -> None:
    """Keep the phase gauge of /metrics current."""
    if type == "DELETED":
        metrics.PHASE_COLLECTOR.forget(namespace, name)
    else:
        metrics.PHASE_COLLECTOR.observe(namespace, name, status.get("phase"))
