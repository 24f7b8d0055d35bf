"""The repository stands on its own: nothing tracked reads or names a path outside it, and what it vendors is
what its README says."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A sibling folder of the checkout that only the developers' machines have ("../shared", ".../shared/vendor").
OUTSIDE = re.compile(r"\.\./shared\b|\bshared/(vendor|notes|tools|hooks)\b|/\s*[\"']shared[\"']\s*/")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return [REPO / n.decode() for n in names if n and not n.endswith((b".png", b".jpg", b".zip"))]


def test_no_tracked_file_reads_or_names_a_path_outside_the_repository() -> None:
    offenders = []
    for path in tracked_text_files():
        if path == Path(__file__) or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, "\n".join(offenders)


def test_the_outside_pattern_catches_what_the_repository_once_read() -> None:
    assert OUTSIDE.search('KUBERAY = Path(__file__).resolve().parents[2] / "shared" / "vendor" / "kuberay"')
    assert OUTSIDE.search('VENDORED_KUBERAY = REPO.parent / "shared" / "vendor" / "kuberay"')
    assert OUTSIDE.search("(`../shared` GPU notes)")
    assert OUTSIDE.search("see shared/vendor/kuberay/README.md")


def test_vendored_kuberay_crds_match_their_readme() -> None:
    folder = REPO / "manifests" / "kuberay"
    table = dict(re.findall(r"\| `(ray\.io_\w+\.yaml)` \| `([0-9a-f]{64})` \|", (folder / "README.md").read_text()))
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("ray.io_*.yaml"))}
    assert on_disk == table
    assert set(table) == {"ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml", "ray.io_rayservices.yaml"}
    assert "Apache License" in (folder / "LICENSE").read_text()[:200]
