"""`python -m tests.controlplane up|down [FOLDER] [--node]`: what `make k8s-up` and `make k8s-down` run;
`python -m tests.controlplane images`: what `make k8s-images` runs."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.controlplane import object_store
from tests.controlplane.cluster import IMAGES, ControlPlaneError, start, stop
from tests.controlplane.node import NodeError, project_images


def main(argv: list[str]) -> int:
    with_node = "--node" in argv
    argv = [a for a in argv if a != "--node"]
    if not argv or argv[0] not in ("up", "down", "images"):
        print("usage: python -m tests.controlplane up|down [FOLDER] [--node] | images", file=sys.stderr)
        return 2
    if argv[0] == "images":
        try:
            built = project_images(IMAGES)
        except NodeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print("\n".join(f"{ref}: {archive}" for ref, archive in built.items()))
        return 0
    folder = Path(argv[1] if len(argv) > 1 else "build/k8s").resolve()
    if argv[0] == "down":
        try:
            stopped = stop(folder)
        except ControlPlaneError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        return 0
    try:
        plane = start(folder, with_node=with_node)
    except (ControlPlaneError, NodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"control plane up at {plane.url}; logs in {folder}")
    env = folder / object_store.ENV_FILE
    print(f"source {env}" if env.exists() else f"export KUBECONFIG={plane.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
