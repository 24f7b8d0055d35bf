"""The node's images, made with umoci from files on this machine (no registry): pause, busybox, CoreDNS; cached
per machine beside the binaries they hold, and imported into the node's containerd."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from tests.controlplane.host import NodeError, run

IMAGE_PREFIX = "batchinfer.local"


def write_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _oci_image(cache: Path, name: str, tag: str, files: dict[str, Path], config: list[str]) -> Path:
    """An OCI-layout tarball holding `files` (path in image → file here) and the given `umoci config` flags."""
    tarball = cache / f"{name}-{tag}.tar"
    if tarball.exists():
        return tarball
    work = cache / f"{name}-{tag}.work"
    shutil.rmtree(work, ignore_errors=True)
    layout, bundle = work / "layout", work / "bundle"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:{tag}")
    run("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
    root = bundle / "rootfs"
    for inside, source in files.items():
        target = root / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    for folder_name in ("tmp", "etc"):
        (root / folder_name).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    write_file(root / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    write_file(root / "etc" / "group", "root:x:0:\nnogroup:x:65534:\n")
    run("umoci", "repack", "--image", f"{layout}:{tag}", str(bundle))
    run("umoci", "config", "--image", f"{layout}:{tag}", "--architecture", "amd64", "--os", "linux", *config)
    run("umoci", "gc", "--layout", str(layout))
    with tarfile.open(f"{tarball}.part", "w") as tar:
        for entry in sorted(layout.iterdir()):
            tar.add(entry, arcname=entry.name)
    os.replace(f"{tarball}.part", tarball)
    shutil.rmtree(work)
    return tarball


def node_images(cache: Path, bins: Path) -> dict[str, Path]:
    """pause, busybox and CoreDNS images (name:tag → OCI tarball), cached per machine and binary version."""
    cache.mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise NodeError("busybox is missing: run make node-packages")
    applets = run(busybox, "--list").stdout.split()
    files = {"/bin/busybox": Path(busybox)}
    links = cache / "busybox-links"
    links.mkdir(exist_ok=True)
    for applet in applets:
        link = links / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
        files.setdefault(f"/bin/{applet}", link)
    pause = ["--config.entrypoint", "/pause", "--config.user", "65535"]
    shell = ["--config.cmd", "/bin/sh", "--config.env", "PATH=/bin"]
    return {
        "pause:3.10": _oci_image(cache, "pause", "3.10", {"/pause": bins / "pause"}, pause),
        "busybox:1.35": _oci_image(cache, "busybox", "1.35", files, shell),
        "coredns:1.15.0": _oci_image(
            cache, "coredns", "1.15.0", {"/coredns": bins / "coredns"}, ["--config.entrypoint", "/coredns"]
        ),
    }


def import_images(folder: Path, images: dict[str, Path]) -> None:
    ctr = ["ctr", "--address", str(folder / "run" / "containerd.sock"), "-n", "k8s.io"]
    present = set(run(*ctr, "images", "ls", "-q").stdout.split())
    for ref, tarball in images.items():
        if f"{IMAGE_PREFIX}/{ref}" not in present:
            name = ref.split(":")[0]
            run(*ctr, "images", "import", "--base-name", f"{IMAGE_PREFIX}/{name}", str(tarball))
