"""What a node changes on this machine, and how it is undone: root and packages checked, the bridge with the
node's address and the forwarding guard, the sysctls saved and restored, and every leftover found (processes,
mounts, links, iptables rules, cgroups, the kubelet's fixed paths)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.controlplane.processes import alive

BRIDGE = "bi0"
GATEWAY = "198.18.0.1"  # the node's address on the pod network, where the API server and kubelet listen
SERVICE_CIDR = "198.19.0.0/16"
KUBERNETES_SERVICE_IP = "198.19.0.1"
GUARDED = "198.18.0.0/15"  # pods and Services: the only addresses a forwarded packet may have
GUARD_CHAIN = "BATCHINFER-GUARD"
# The kubelet rewrites the kernel ones at start (no protectKernelDefaults); ip_forward is ours.
SYSCTLS = ("net.ipv4.ip_forward", "kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory")
PACKAGES = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "umoci": "umoci",
    "iptables": "iptables",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
}
CNI_DIR = Path("/usr/lib/cni")
# Created by the kubelet, containerd's shim and CNI outside any folder we give them (removed if we made them).
FIXED_PATHS = ("/var/lib/kubelet", "/var/lib/cni", "/var/log/containers", "/run/containerd/runc/k8s.io")


class NodeError(RuntimeError):
    """The node could not start; the message says why in one line (and names the log)."""


def check_host() -> None:
    """Root, the runtime packages and bridge netfilter: one clear line for whatever is missing."""
    if os.geteuid() != 0:
        raise NodeError("a node needs root (containerd, runc, iptables, a bridge): run make k8s-up as root")
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    if missing or not (CNI_DIR / "bridge").exists():
        raise NodeError(f"missing {', '.join(missing) or 'CNI plugins'}: run make node-packages (Debian, as root)")
    if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
        raise NodeError("bridge netfilter is off (no /proc/sys/net/bridge): modprobe br_netfilter")


def kubectl_binary() -> str:
    """kubectl on PATH, else the one `make helm` unpacked into build/tools."""
    return shutil.which("kubectl") or str(Path(__file__).resolve().parents[2] / "build" / "tools" / "kubectl")


def write_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def sysctl(name: str) -> str:
    return Path("/proc/sys", *name.split(".")).read_text().strip()


def set_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value)


def network_up(folder: Path) -> None:
    """The bridge with the node's address, the forwarding guard, ip_forward=1; saves what it changes first."""
    saved = folder / "host-before.json"
    if not saved.exists():
        before = {
            "sysctls": {name: sysctl(name) for name in SYSCTLS},
            "existing": [p for p in FIXED_PATHS if os.path.lexists(p)],
            "iptables": iptables_rules(),
        }
        saved.write_text(json.dumps(before, indent=2))
    if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    if f"{GATEWAY}/16" not in run("ip", "-4", "addr", "show", "dev", BRIDGE).stdout:
        run("ip", "addr", "add", f"{GATEWAY}/16", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    if run("iptables", "-t", "mangle", "-N", GUARD_CHAIN, check=False).returncode != 0:
        run("iptables", "-t", "mangle", "-F", GUARD_CHAIN)
    run("iptables", "-t", "mangle", "-A", GUARD_CHAIN, "-s", GUARDED, "-d", GUARDED, "-j", "RETURN")
    run("iptables", "-t", "mangle", "-A", GUARD_CHAIN, "-j", "DROP")
    if run("iptables", "-t", "mangle", "-C", "FORWARD", "-j", GUARD_CHAIN, check=False).returncode != 0:
        run("iptables", "-t", "mangle", "-I", "FORWARD", "1", "-j", GUARD_CHAIN)
    set_sysctl("net.ipv4.ip_forward", "1")


def restore_sysctls(folder: Path) -> list[str]:
    """Put back every sysctl saved before the node started; returns those that had changed."""
    saved = folder / "host-before.json"
    if not saved.exists():
        return []
    changed = []
    for name, value in json.loads(saved.read_text())["sysctls"].items():
        if sysctl(name) != value:
            set_sysctl(name, value)
            changed.append(name)
    return changed


def network_down(folder: Path) -> None:
    """Undo `network_up` (after the API server, which listens on the bridge, has stopped)."""
    run("iptables", "-t", "mangle", "-D", "FORWARD", "-j", GUARD_CHAIN, check=False)
    run("iptables", "-t", "mangle", "-F", GUARD_CHAIN, check=False)
    run("iptables", "-t", "mangle", "-X", GUARD_CHAIN, check=False)
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        # A pod's veth whose namespace the kernel has yet to free outlives its pod (seen after an interrupted run).
        for line in run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout.splitlines():
            run("ip", "link", "del", line.split(":")[1].strip().split("@")[0], check=False)
        run("ip", "link", "del", BRIDGE)
    restore_sysctls(folder)


def mounts_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


def shims(folder: Path) -> list[int]:
    """containerd shims of this node's containerd (they outlive it by design)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "containerd-shim" in cmdline and str(folder) in cmdline:
                    found.append(int(proc.name))
    return found


def kill_leftover_shims(folder: Path, notes: list[str]) -> None:
    for pid in shims(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        notes.append(f"killed shim {pid}")


def remove_kube_chains() -> None:
    """Chains the kubelet and kube-proxy made (KUBE-*), with the jumps to them from the built-in chains."""
    for table in ("filter", "nat", "mangle"):
        rules = run("iptables", "-t", table, "-S", check=False).stdout.splitlines()
        for rule in rules:
            parts = rule.split()
            builtin = parts[:1] == ["-A"] and parts[1] in ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING")
            if builtin and "-j" in parts and parts[parts.index("-j") + 1].startswith("KUBE-"):
                run("iptables", "-t", table, "-D", *parts[1:], check=False)
        chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
        for chain in chains:
            run("iptables", "-t", table, "-F", chain, check=False)
        for chain in chains:
            run("iptables", "-t", table, "-X", chain, check=False)


def remove_cgroups(notes: list[str]) -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if not top.is_dir():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        if top.exists():
            notes.append(f"cgroup left: {top}")


def remove_fixed_paths(folder: Path) -> None:
    saved = folder / "host-before.json"
    existing = set(json.loads(saved.read_text())["existing"]) if saved.exists() else set(FIXED_PATHS)
    for path in FIXED_PATHS:
        if path not in existing and os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)


def iptables_rules() -> list[str]:
    """Every table's own chains and rules, without counters (`*table :CHAIN` and `*table -A ...`). Built-in chains
    (they have a policy) are not listed: a table appears with them the first time anything uses it, and stays,
    so on a fresh machine they are not something the node left."""
    rules, table = [], ""
    for line in run("iptables-save", check=False).stdout.splitlines():
        if line.startswith("*"):
            table = line
        elif line.startswith(":") and line.split()[1] == "-":
            rules.append(f"{table} {line.split()[0]}")
        elif line.startswith("-A"):
            rules.append(f"{table} {line}")
    return sorted(rules)


def leftovers(folder: Path, pids: list[int]) -> list[str]:
    """What a stopped node left on the host: processes, mounts, links, iptables rules, network namespaces,
    cgroups, changed sysctls and the kubelet's fixed paths. Empty when `stop` and `network_down` did their job."""
    saved = folder / "host-before.json"
    before = json.loads(saved.read_text()) if saved.exists() else {"sysctls": {}, "existing": [], "iptables": []}
    left = [f"process {pid}" for pid in pids if alive(pid)]
    left += [f"mount {m}" for m in mounts_under(folder)]
    left += [
        f"mount {line.split()[1]}"
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if "/netns/cni-" in line or "/kubelet/" in line
    ]
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        left.append(f"link {BRIDGE}")
    left += [
        f"link {line.split(':')[1].strip()}"
        for line in run("ip", "-o", "link", "show", "type", "veth", check=False).stdout.splitlines()
    ]
    left += [f"iptables {rule}" for rule in sorted(set(iptables_rules()) - set(before["iptables"]))]
    left += [f"cgroup {h}" for h in Path("/sys/fs/cgroup").glob("*/kubepods")]
    left += [f"sysctl {k}={sysctl(k)} (was {v})" for k, v in before["sysctls"].items() if sysctl(k) != v]
    left += [f"path {p}" for p in FIXED_PATHS if p not in before["existing"] and os.path.lexists(p)]
    left += [f"shim {pid}" for pid in shims(folder)]
    return left
