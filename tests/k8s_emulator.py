"""A stricter Kubernetes API for tests: kmock's KubernetesEmulator plus what a real API server does and the
operator depends on.

Added here:
- uid, resourceVersion, generation, creationTimestamp on create; resourceVersion on every write;
  generation bumped when anything but status/metadata changes;
- 422 Invalid for objects that fail their CRD's openAPIV3Schema (ours; KubeRay's vendored ones), and for
  ownerReferences without a uid; unknown fields pruned as a structural schema prunes them;
- the status subresource: a patch to the object ignores `status`, a patch to `/status` changes only it;
- optimistic concurrency: a write naming a stale metadata.resourceVersion is refused with 409 Conflict, and a
  JSON patch whose `test` fails with 422 (kopf's own precondition), as the API server answers;
- one-shot injected faults (429/500/503) and objects stored without admission (as if stored before a schema
  tightened), which a real API server cannot produce on demand.
Garbage collection, RBAC, CEL and KubeRay itself are tested on the real control plane (tests/controlplane).
The emulator runs on its own event loop in a thread, so tests and the operator can use blocking clients.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import jsonpatch
import jsonschema
import kmock
from kmock._internal import enums, rendering

NAMESPACE = "default"


@attrs.frozen
class KubernetesInvalidError(kmock.KubernetesError):
    """422 Unprocessable Entity, as the API server answers a schema violation."""

    status: int = 422
    reason: str = "Invalid"
    message: str = ""
    details: Any = None


@attrs.frozen
class InjectedFaultError(kmock.KubernetesError):
    """A one-shot failure the test asked for (429, 500, 503, …)."""

    status: int = 503
    reason: str = "ServiceUnavailable"
    message: str = ""
    details: Any = None


def prune(obj: Any, schema: dict[str, Any]) -> Any:
    """Drop fields the schema does not declare (unless it preserves unknown fields), like the API server."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return obj
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None:
            return {k: prune(v, props[k]) for k, v in obj.items() if k in props}
        if isinstance(extra, dict):
            return {k: prune(v, extra) for k, v in obj.items()}
        return obj
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in obj]
    return obj


def merge(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


@attrs.define(kw_only=True)
class StrictEmulator(kmock.KubernetesEmulator):
    schemas: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # plural → openAPIV3Schema
    status_subresource: set[str] = attrs.field(factory=set)  # plurals with a /status subresource
    validating: bool = True  # False stores objects as they come (created before a schema tightened)
    faults: list[tuple[str, str, int]] = attrs.field(factory=list)  # one-shot (action, plural, HTTP status)
    updates: list[tuple[str, Any]] = attrs.field(factory=list)  # (plural, body) of every update/patch, in order
    _versions: Any = attrs.field(factory=lambda: itertools.count(1000), init=False)

    def _now(self) -> str:
        return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _schema_violations(self, schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
        body = {k: v for k, v in obj.items() if k != "metadata"}
        found = jsonschema.Draft4Validator(schema).iter_errors({**body, "metadata": {}})
        return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in found)

    def _check(self, plural: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """422 for schema violations. On update, violations the stored object already had are let through
        (CRD validation ratcheting: beta and on by default since Kubernetes 1.30, GA in 1.33)."""
        if not self.validating:
            return obj
        for ref in obj.get("metadata", {}).get("ownerReferences") or []:
            missing = [f for f in ("apiVersion", "kind", "name", "uid") if not ref.get(f)]
            if missing:
                raise KubernetesInvalidError(message=f"metadata.ownerReferences.{missing[0]}: Required value")
        schema = self.schemas.get(plural)
        if schema is None:
            return obj
        causes = self._schema_violations(schema, obj)
        if previous is not None:
            causes = [c for c in causes if c not in set(self._schema_violations(schema, previous))]
        if causes:
            raise KubernetesInvalidError(
                message=f"{obj.get('kind')} {obj.get('metadata', {}).get('name')!r} is invalid: " + "; ".join(causes),
                details={"causes": [{"message": c} for c in causes]},
            )
        body = {k: v for k, v in obj.items() if k != "metadata"}
        pruned = prune(body, schema)
        return {**pruned, "metadata": obj.get("metadata", {})}

    def _admit(self, request: rendering.Request) -> rendering.Request:
        plural = request.resource.plural
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            obj = copy.deepcopy(request.data)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            if plural in self.status_subresource:
                obj.pop("status", None)
            obj = self._check(plural, obj)
            meta = obj["metadata"]
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(next(self._versions)),
                generation=1,
                creationTimestamp=self._now(),
            )
            return self._replace_data(request, obj)
        if request.action == enums.action.UPDATE and request.name and isinstance(request.data, dict):
            key = (request.resource, request.namespace, request.name)
            if key not in self._objects or self._objects[key].deleted:
                return request  # the emulator answers 404
            current = copy.deepcopy(self._objects[key].raw)
            patch = copy.deepcopy(request.data)
            self._check_precondition(request, current, patch)
            if plural in self.status_subresource:
                patch = (
                    {"status": patch.get("status")}
                    if request.subresource == "status"
                    else {k: v for k, v in patch.items() if k != "status"}
                )
            merged = merge(current, patch)
            self._check(plural, merged, previous=current)
            schema = self.schemas.get(plural)
            if schema is not None:
                props = schema.get("properties", {})
                patch = {
                    k: prune(v, props[k]) if k != "metadata" else v
                    for k, v in patch.items()
                    if k == "metadata" or k in props
                }
            meta = patch.get("metadata") if isinstance(patch.get("metadata"), dict) else {}
            patch["metadata"] = {**meta, "resourceVersion": str(next(self._versions))}
            body_before = {k: v for k, v in current.items() if k not in ("metadata", "status")}
            body_after = {k: v for k, v in merged.items() if k not in ("metadata", "status")}
            if body_before != body_after:
                patch["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
            return self._replace_data(request, patch)
        return request

    @staticmethod
    def _check_precondition(request: rendering.Request, current: dict[str, Any], patch: dict[str, Any]) -> None:
        """A write that carries metadata.resourceVersion applies only to that version (optimistic concurrency)."""
        meta = patch.get("metadata") if isinstance(patch.get("metadata"), dict) else {}
        expected = meta.get("resourceVersion")
        stored = current.get("metadata", {}).get("resourceVersion")
        if expected is not None and expected != stored:
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message=f"Operation cannot be fulfilled on {request.resource.plural} {request.name!r}: the object "
                "has been modified; please apply your changes to the latest version and try again",
            )

    @staticmethod
    def _replace_data(request: rendering.Request, data: dict[str, Any]) -> rendering.Request:
        """Requests are frozen and matched by identity: change the payload dict in place."""
        request.data.clear()
        request.data.update(data)
        return request

    def _inject_fault(self, request: rendering.Request) -> None:
        for fault in self.faults:
            action, plural, status = fault
            if request.resource.plural == plural and str(request.action).endswith(action):
                self.faults.remove(fault)
                raise InjectedFaultError(status=status, message=f"injected {status} for {action} {plural}")

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None:
            self._inject_fault(request)
        if request.resource is not None and request.action == enums.action.UPDATE:
            self.updates.append((request.resource.plural, copy.deepcopy(request.data)))
        if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
            request = self._admit(request)
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as err:  # kopf's own precondition: 422, as the API server answers
            raise KubernetesInvalidError(message=f"the JSON patch test failed: {err}") from err
        if request.action == enums.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)  # as the API server answers a create
        return response


class EmulatorThread:
    """Runs the emulator's HTTP server on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, configure: Callable[[StrictEmulator], None]) -> None:
        self._configure = configure
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.emulator: StrictEmulator | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start in 30 s")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def forget_namespace(self, namespace: str) -> None:
        """Hard-delete every stored object of a namespace and the request log (from any thread).

        The emulator lives for the session; without this, each test's operator would resume every earlier
        test's objects (and run their resync timers), and spend a test's one-shot faults on them.
        """
        assert self._loop is not None and self.emulator is not None
        emulator = self.emulator

        async def forget() -> None:  # on the emulator's own loop: no request is half-served meanwhile
            objects = emulator._objects
            for key in [k for k in objects if k[1] == namespace]:
                del objects[key]
            emulator._requests.clear()

        asyncio.run_coroutine_threadsafe(forget(), self._loop).result(30)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        emulator = StrictEmulator()
        self._configure(emulator)
        async with emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
