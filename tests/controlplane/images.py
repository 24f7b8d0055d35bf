"""The node's images, without a registry: pause, busybox and CoreDNS made with umoci from files on this machine
(cached beside the binaries they hold), and the project's own images built from its Dockerfiles by buildah on a
local Debian base; all imported into the node's containerd as `batchinfer.local/<name>:<tag>`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from tests.controlplane.host import NodeError, run, write_file

IMAGE_PREFIX = "batchinfer.local"


def oci_image(cache: Path, name: str, tag: str, files: dict[str, Path], config: list[str]) -> Path:
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
        "pause:3.10": oci_image(cache, "pause", "3.10", {"/pause": bins / "pause"}, pause),
        "busybox:1.35": oci_image(cache, "busybox", "1.35", files, shell),
        "coredns:1.15.0": oci_image(
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


# --- the project's images, built from its Dockerfiles by buildah (daemonless) on a local base ----------------

LOCAL_BASE = "localhost/batchinfer-base:py311-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
REPO = Path(__file__).resolve().parents[2]
# name -> Dockerfile; each takes ARG BASE_IMAGE (the public default stays for users with a registry).
PROJECT_IMAGES = {
    "batchinfer-operator": REPO / "operator" / "Dockerfile",
    "batchinfer-job": REPO / "job_image" / "Dockerfile",
}
PROJECT_TAG = "dev"


BUILDAH_ENV = {**os.environ, "STORAGE_DRIVER": "overlay"}  # buildah's store: /var/lib/containers (per machine)


def buildah(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, check=False, env=BUILDAH_ENV)


def ensure_local_base(work: Path) -> str:
    """Debian bookworm (minbase) + Python 3.11 with pip and venv, bash, a uid-1000 user `ray` (as Ray's images
    have) and this machine's CA bundle (pip then trusts what the machine trusts); kept in buildah's store."""
    if buildah("inspect", "--type", "image", LOCAL_BASE).returncode == 0:
        return LOCAL_BASE
    rootfs = work / "base-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    packages = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
    run("debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs), DEBIAN_MIRROR)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)  # pip as in the official images
    run("chroot", str(rootfs), "useradd", "-m", "-u", "1000", "-g", "100", "-s", "/bin/bash", "ray")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    container = buildah("from", "scratch").stdout.strip()
    try:
        mount = buildah("mount", container).stdout.strip()
        run("cp", "-a", f"{rootfs}/.", mount)
        buildah("umount", container)
        env = ["--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--env", "LANG=C.UTF-8"]
        buildah("config", *env, "--cmd", "/bin/bash", container)
        committed = buildah("commit", "-q", container, LOCAL_BASE)
        if committed.returncode != 0:
            raise NodeError(f"buildah commit of the local base failed: {committed.stderr.strip()}")
    finally:
        buildah("rm", container)
        shutil.rmtree(rootfs, ignore_errors=True)
    return LOCAL_BASE


def project_images(out: Path) -> dict[str, Path]:
    """Every image of the project, built from its Dockerfile on the local base (buildah's layer cache keeps
    the unchanged layers), as OCI archives in `out` (name:tag -> archive) ready for containerd."""
    out.mkdir(parents=True, exist_ok=True)
    base = ensure_local_base(out)
    built = {}
    for name, dockerfile in PROJECT_IMAGES.items():
        tag, iid = f"localhost/{name}:{PROJECT_TAG}", out / f"{name}.iid"
        result = buildah(
            "bud", "-q", "--layers", "--isolation", "chroot", "--network", "host",
            "--build-arg", f"BASE_IMAGE={base}", "-f", str(dockerfile), "-t", tag, "--iidfile", str(iid), str(REPO),
        )  # fmt: skip
        if result.returncode != 0:
            raise NodeError(f"building {name} from {dockerfile.relative_to(REPO)} failed:\n{result.stderr[-3000:]}")
        archive = out / f"{name}.tar"
        image_id = iid.read_text().strip()
        stamp = out / f"{name}.id"
        if not (archive.exists() and stamp.exists() and stamp.read_text() == image_id):
            archive.unlink(missing_ok=True)
            # Uncompressed: gzip of the job image's ~5 GB would take minutes on two cores for a local copy.
            pushed = buildah("push", "-q", "--disable-compression", tag, f"oci-archive:{archive}:{PROJECT_TAG}")
            if pushed.returncode != 0:
                raise NodeError(f"exporting {name} failed: {pushed.stderr.strip()}")
            stamp.write_text(image_id)
        built[f"{name}:{PROJECT_TAG}"] = archive
    return built
