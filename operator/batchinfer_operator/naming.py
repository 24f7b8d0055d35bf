"""Deterministic, valid Kubernetes names and label values for a BatchInference's children."""

from __future__ import annotations

import hashlib
import re

# KubeRay derives RayCluster/pod names from the RayJob's; it rejects RayJob names over 47 characters.
RAYJOB_NAME_MAX = 47
# With autoscaling, KubeRay passes the head pod's serviceAccountName through CheckName (longer names are cut
# to their last 50 characters, a leading digit becomes "r") and binds the autoscaler to the cut name: a name
# must already be what CheckName makes of it.
SERVICE_ACCOUNT_NAME_MAX = 50
LABEL_VALUE_MAX = 63
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue's LocalQueue of a job (Kueue manages only labelled jobs)
_HASH_LEN = 8


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_LEN}}}$")


def _kept(original: str, clean: str, max_length: int) -> bool:
    """Whether a name stays as it is: unchanged, short enough, and not shaped like a hashed name (`…-` and 8
    hex digits), so that a kept name can never equal the hashed form of another."""
    return clean == original and len(clean) <= max_length and not _HASHED.search(clean)


def dns1035(name: str, max_length: int) -> str:
    """A DNS-1035 label (lowercase letter first, [a-z0-9-], alphanumeric last) of at most `max_length`.

    Names that had to change or be shortened, and names that already end like a hash suffix, get a hash suffix
    of the original: every other name is kept as it is, so two different inputs never give the same output
    (`team.job` and `team-job-846ee701` once did).
    """
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not clean or not clean[0].isalpha():
        clean = f"bi-{clean}".rstrip("-")
    if _kept(name, clean, max_length):
        return clean
    suffix = f"-{_digest(name)}"
    return clean[: max_length - len(suffix)].rstrip("-") + suffix


def label_value(value: str) -> str:
    """A valid label value (≤ 63, [A-Za-z0-9_.-], alphanumeric at both ends), hashed when shortened."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")
    if _kept(value, clean, LABEL_VALUE_MAX):
        return clean
    suffix = f"-{_digest(value)}"
    return clean[: LABEL_VALUE_MAX - len(suffix)].rstrip("-_.") + suffix


def rayjob_name(bi_name: str) -> str:
    return dns1035(bi_name, RAYJOB_NAME_MAX)


def runner_account_name(bi_name: str) -> str:
    """The Ray pods' ServiceAccount: `<rayjob>-runner`, hashed down to 50 characters, so that KubeRay's
    CheckName leaves it unchanged."""
    return dns1035(f"{rayjob_name(bi_name)}-runner", SERVICE_ACCOUNT_NAME_MAX)


def child_name(bi_name: str, role: str) -> str:
    """Name of a namespaced child such as the ConfigMap or ServiceAccount: `<rayjob>-<role>`."""
    return f"{rayjob_name(bi_name)}-{role}"
